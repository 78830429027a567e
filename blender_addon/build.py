"""Build the installable extension: dist/rayfarm-addon-<version>.zip.

    python blender_addon/build.py [--out DIR] [--wheels DIR]

Reads blender_manifest.toml, downloads the wheels it lists with ``pip download``
into a cache (build/addon-wheels/, reused when the file is already there; never
committed), and zips the add-on's modules, the manifest and the wheels the way
Blender expects (the manifest at the zip's root). The SDK's packer goes in too:
the modules ``vendor/__init__.py`` names are copied from ``sdk/`` into the zip's
``vendor/`` as they are, after checking that Blender's Python can import them (see
``foreign_imports``). When the ``bpy`` module is installed, Blender's own extension
validator checks the zip.
"""

from __future__ import annotations

import argparse
import ast
import re
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
SDK = ROOT / "sdk"
#: A wheel file name: distribution, version, then tags.
_WHEEL = re.compile(r"^(?P<name>[^-]+)-(?P<version>[^-]+)-.+\.whl$")
#: What a vendored SDK module may import besides its fellows: Blender's Python has the
#: standard library and zstandard; blender-asset-tracer is the extension's own wheel.
VENDOR_MAY_IMPORT = frozenset(sys.stdlib_module_names) | {"blender_asset_tracer", "zstandard"}


def fetch_wheels(manifest: dict, cache: Path) -> list[Path]:
    """Each wheel the manifest lists, downloaded (no dependencies: the manifest lists
    every wheel the add-on needs) unless the cache has it."""
    cache.mkdir(parents=True, exist_ok=True)
    wheels = []
    for entry in manifest.get("wheels", []):
        name = Path(entry).name
        match = _WHEEL.match(name)
        if match is None:
            raise SystemExit(f"not a wheel file name in blender_manifest.toml: {entry}")
        target = cache / name
        if not target.exists():
            requirement = f"{match['name'].replace('_', '-')}=={match['version']}"
            subprocess.run(
                [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
                 "--only-binary=:all:", "--dest", str(cache), requirement],
                check=True,
            )  # fmt: skip
            if not target.exists():
                raise SystemExit(f"pip download {requirement} did not give {name}")
        wheels.append(target)
    return wheels


def vendored_modules() -> list[Path]:
    """The SDK modules the add-on carries (``MODULES`` in vendor/__init__.py), each
    checked to import nothing Blender's Python lacks."""
    init = ast.parse((HERE / "vendor" / "__init__.py").read_text())
    names: tuple[str, ...] = next(
        ast.literal_eval(node.value)
        for node in init.body
        if isinstance(node, ast.Assign) and ast.unparse(node.targets[0]) == "MODULES"
    )
    modules = [SDK / name for name in names]
    fellows = {module.stem for module in modules}
    for module in modules:
        foreign = foreign_imports(module, fellows)
        if foreign:
            raise SystemExit(
                f"sdk/{module.name} goes into the add-on (vendor/__init__.py) but imports "
                f"{', '.join(foreign)}: Blender's Python has only the standard library, "
                f"zstandard, blender-asset-tracer and the vendored {sorted(fellows)} (relatively)"
            )
    return modules


def foreign_imports(module: Path, fellows: set[str]) -> list[str]:
    """The imports in ``module``, anywhere in it, that the extension could not satisfy:
    absolute ones outside ``VENDOR_MAY_IMPORT`` (``rayfarm.errors`` included: the
    vendored copy is not the ``rayfarm`` package), relative ones outside ``fellows``."""
    found = []
    for node in ast.walk(ast.parse(module.read_text(), str(module))):
        if isinstance(node, ast.Import):
            found += [a.name for a in node.names if a.name.split(".")[0] not in VENDOR_MAY_IMPORT]
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            if (node.module or "").split(".")[0] not in VENDOR_MAY_IMPORT:
                found.append(node.module or "")
        elif isinstance(node, ast.ImportFrom):
            targets = [node.module] if node.module else [a.name for a in node.names]
            if node.level > 1 or not set(targets) <= fellows:
                found.append("." * node.level + (node.module or ""))
    return found


def build(out_dir: Path, cache: Path) -> Path:
    manifest_path = HERE / "blender_manifest.toml"
    manifest = tomllib.loads(manifest_path.read_text())
    wheels = fetch_wheels(manifest, cache)
    vendored = vendored_modules()
    out_dir.mkdir(parents=True, exist_ok=True)
    zip_path = out_dir / f"rayfarm-addon-{manifest['version']}.zip"
    tmp = zip_path.with_suffix(".zip.part")
    with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.write(manifest_path, "blender_manifest.toml")
        for module in sorted(HERE.glob("*.py")):
            if module.name != "build.py":
                zf.write(module, module.name)
        zf.write(HERE / "vendor" / "__init__.py", "vendor/__init__.py")
        for module in vendored:
            zf.write(module, f"vendor/{module.name}")
        for wheel in wheels:
            zf.write(wheel, f"wheels/{wheel.name}")
    tmp.replace(zip_path)
    return zip_path


def blender_validator() -> Path | None:
    """bl_pkg's command line (``blender --command extension validate`` runs it), as the
    bpy module ships it, if installed."""
    try:
        import importlib.util

        spec = importlib.util.find_spec("bpy")
    except ImportError:
        return None
    if spec is None or spec.origin is None:
        return None
    found = sorted(Path(spec.origin).parent.glob("*/scripts/addons_core/bl_pkg/cli/blender_ext.py"))
    return found[-1] if found else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "dist")
    parser.add_argument("--wheels", type=Path, default=ROOT / "build" / "addon-wheels")
    args = parser.parse_args()
    zip_path = build(args.out, args.wheels)
    validator = blender_validator()
    if validator is not None:
        checked = subprocess.run([sys.executable, str(validator), "validate", str(zip_path)])
        if checked.returncode != 0:
            zip_path.unlink()
            raise SystemExit(f"Blender's validator refused {zip_path.name} (see above); removed it")
    print(zip_path)


if __name__ == "__main__":
    main()

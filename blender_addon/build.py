"""Build the installable extension: dist/rayfarm-addon-<version>.zip.

    python blender_addon/build.py [--out DIR] [--wheels DIR]

Reads blender_manifest.toml, downloads the wheels it lists with ``pip download``
into a cache (build/addon-wheels/, reused when the file is already there; never
committed), and zips the add-on's modules, the manifest and the wheels the way
Blender expects (the manifest at the zip's root). When the ``bpy`` module is
installed, Blender's own extension validator checks the zip.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
#: A wheel file name: distribution, version, then tags.
_WHEEL = re.compile(r"^(?P<name>[^-]+)-(?P<version>[^-]+)-.+\.whl$")


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


def build(out_dir: Path, cache: Path) -> Path:
    manifest_path = HERE / "blender_manifest.toml"
    manifest = tomllib.loads(manifest_path.read_text())
    wheels = fetch_wheels(manifest, cache)
    out_dir.mkdir(parents=True, exist_ok=True)
    zip_path = out_dir / f"rayfarm-addon-{manifest['version']}.zip"
    tmp = zip_path.with_suffix(".zip.part")
    with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.write(manifest_path, "blender_manifest.toml")
        for module in sorted(HERE.glob("*.py")):
            if module.name != "build.py":
                zf.write(module, module.name)
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

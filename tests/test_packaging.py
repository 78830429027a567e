"""Packaging rules: the SDK is light, bpy stays in its two rooms, no generic names."""

import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _modules_after(code: str) -> set[str]:
    out = subprocess.run(
        [sys.executable, "-c", f"{code}\nimport sys; print(' '.join(sys.modules))"],
        check=True, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    return set(out.stdout.split())


def test_sdk_import_loads_neither_ray_nor_bpy():
    mods = _modules_after("import rayfarm, rayfarm.cli")
    assert "bpy" not in mods and "ray" not in mods and "fastapi" not in mods


def test_cluster_import_leaves_bpy_out():
    mods = _modules_after(
        "import rayfarm.cluster.api, rayfarm.cluster.dispatcher, rayfarm.cluster.serve, "
        "rayfarm.cluster.local, rayfarm.render.actor, rayfarm.render.tiles"
    )
    assert "ray" in mods and "bpy" not in mods


def test_plain_install_has_no_ray_or_bpy_and_extras_do():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    base = " ".join(project["dependencies"])
    assert "ray" not in base and "bpy" not in base
    extras = project["optional-dependencies"]
    assert any(d.startswith("ray[serve]") for d in extras["cluster"])
    assert "bpy==5.0.*" in extras["render"]
    assert project["requires-python"] == ">=3.11,<3.12"


def test_no_generic_top_level_packages():
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert all(p == "rayfarm" or p.startswith("rayfarm.") for p in cfg["packages"])
    import rayfarm.cluster
    import rayfarm.render

    assert Path(rayfarm.cluster.__file__).parent == ROOT / "cluster"
    assert Path(rayfarm.render.__file__).parent == ROOT / "render_actor"


def test_bpy_is_imported_only_in_its_rooms():
    offenders = []
    for folder in ("sdk", "cluster"):
        for path in (ROOT / folder).rglob("*.py"):
            for line in path.read_text().splitlines():
                if line.strip().startswith(("import bpy", "from bpy")):
                    offenders.append(f"{path}: {line.strip()}")
    assert offenders == []

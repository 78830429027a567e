"""Packaging rules: the SDK is light, bpy stays in its two rooms (the Blender worker and
the add-on), no generic names, and the worker needs nothing but the standard library,
bpy and numpy."""

import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from helpers import ROOT


def _modules_after(code: str) -> set[str]:
    out = subprocess.run(
        [sys.executable, "-c", f"{code}\nimport sys; print(' '.join(sys.modules))"],
        check=True, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    return set(out.stdout.split())


def test_sdk_import_loads_neither_ray_nor_bpy():
    mods = _modules_after("import rayfarm, rayfarm.cli")
    assert "bpy" not in mods and "ray" not in mods and "fastapi" not in mods


@pytest.mark.slow
def test_cluster_import_leaves_bpy_out():
    mods = _modules_after(
        "import rayfarm.cluster.api, rayfarm.cluster.dispatcher, rayfarm.cluster.serve, "
        "rayfarm.cluster.local, rayfarm.render.actor, rayfarm.render.tiles"
    )
    assert "ray" in mods and "bpy" not in mods


def test_no_install_of_the_farm_brings_bpy():
    """Blender is a render environment (``rayfarm blender install``), never a dependency:
    the farm's own Python runs on CPython 3.11 and newer."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    base = " ".join(project["dependencies"])
    assert "ray" not in base and "bpy" not in base
    extras = project["optional-dependencies"]
    assert any(d.startswith("ray[serve]") for d in extras["cluster"])
    assert not any("bpy" in d for deps in extras.values() for d in deps)
    assert project["requires-python"] == ">=3.11"


def test_no_generic_top_level_packages():
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert all(p == "rayfarm" or p.startswith("rayfarm.") for p in cfg["packages"])
    import rayfarm.cluster
    import rayfarm.render

    assert Path(rayfarm.cluster.__file__).parent == ROOT / "cluster"
    assert Path(rayfarm.render.__file__).parent == ROOT / "render_actor"


def test_bpy_is_imported_only_in_its_rooms():
    offenders = []
    for folder in ("sdk", "cluster", "render_actor"):
        for path in (ROOT / folder).rglob("*.py"):
            if path.is_relative_to(ROOT / "render_actor" / "worker"):
                continue
            for line in path.read_text().splitlines():
                if line.strip().startswith(("import bpy", "from bpy")):
                    offenders.append(f"{path}: {line.strip()}")
    assert offenders == []


def test_the_worker_imports_only_the_standard_library_bpy_numpy_and_itself():
    """It runs under a Blender environment's interpreter (CPython 3.11 or 3.13), where
    neither ``rayfarm`` nor its dependencies are installed."""
    import ast

    allowed = set(sys.stdlib_module_names) | {"bpy", "numpy", "OpenImageIO"}
    for path in (ROOT / "render_actor" / "worker").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module or ""]
            else:
                continue
            for name in names:
                assert name.split(".")[0] in allowed, f"{path.name} imports {name}"


def test_every_package_folder_is_in_the_distribution():
    """A subpackage setuptools is not told of works in an editable install and is missing
    from a real one (a cluster node's ``pip install``)."""
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    mapped = {folder: name for name, folder in cfg["package-dir"].items()}
    found = set()
    for folder, name in mapped.items():
        for init in (ROOT / folder).rglob("__init__.py"):
            parts = init.parent.relative_to(ROOT / folder).parts
            found.add(".".join((name, *parts)))
    assert found == set(cfg["packages"])

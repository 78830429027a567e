"""Lay out the `rayfarm` package for mypy as setuptools installs it, in build/mypy/.

The product's folders map onto one import name (pyproject.toml's
``[tool.setuptools.package-dir]``: ``rayfarm`` is sdk/, ``rayfarm.cluster`` is cluster/,
``rayfarm.render`` is render_actor/). Python finds them through the editable install's
import hook, which mypy cannot follow: without this tree every import of one rayfarm
module by another reads as ``Any`` to mypy, and a wrong call between them goes unseen.

The tree is symlinks to the source (a folder mapped inside another's is linked whole;
the others' files one by one), rebuilt on each run, so mypy reports errors in
build/mypy/rayfarm/<module>.py for the source file it links to. ``make lint`` and
``make test`` run it before mypy; run it again after adding a module to sdk/.

    python scripts/mypy_tree.py
"""

from __future__ import annotations

import shutil
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TREE = ROOT / "build" / "mypy"


def package_dirs() -> dict[str, Path]:
    """Each package's folder, from pyproject.toml."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    mapping = config["tool"]["setuptools"]["package-dir"]
    return {name: ROOT / folder for name, folder in mapping.items()}


def build(tree: Path = TREE) -> Path:
    """Rebuild ``tree`` with every mapped package linked where its import name puts it."""
    shutil.rmtree(tree, ignore_errors=True)
    packages = package_dirs()
    for name in sorted(packages, key=lambda n: n.count(".")):
        where = tree.joinpath(*name.split("."))
        nested = [n for n in packages if n.startswith(name + ".")]
        if not nested:  # nothing mapped inside it: the folder itself
            where.parent.mkdir(parents=True, exist_ok=True)
            where.symlink_to(packages[name], target_is_directory=True)
            continue
        # Others are mapped inside it: a real folder, its own entries linked one by one.
        where.mkdir(parents=True, exist_ok=True)
        inside = {n.split(".")[name.count(".") + 1] for n in nested}
        for entry in sorted(packages[name].iterdir()):
            if entry.name in inside or entry.name == "__pycache__":
                continue
            if entry.suffix in (".py", ".pyi", ".typed") or entry.is_dir():
                (where / entry.name).symlink_to(entry, target_is_directory=entry.is_dir())
    return tree


if __name__ == "__main__":
    print(f"mypy's view of the rayfarm package: {build().relative_to(ROOT)}", file=sys.stderr)

"""Blender in the tests: scenes built and frames rendered by real bpy, always in a Blender
environment's own interpreter (the test process never loads bpy), the same environments
the farm's render actors use, so a reference is rendered by the Blender the farm used."""

from __future__ import annotations

import hashlib
import subprocess
from pathlib import Path

import numpy as np
from PIL import Image

from rayfarm.render import environments
from rayfarm.render.inputs import InputFile, Inputs, blob_key
from rayfarm.render.supervisor import LOADER, PACKAGE_DIR, run_tool

from helpers import ROOT

MAKE_SCENE = ROOT / "examples" / "make_scene.py"


#: The Blender the tests build scenes with (so the farm renders them with it, too).
TEST_BLENDER = "5.0"


def blender_python(version: str = TEST_BLENDER) -> str:
    """The interpreter of the Blender environment for ``version`` (``make setup`` builds
    the offered ones; a missing one is built here)."""
    return str(environments.install(version).python)


def blender_code(code: str, *args: str, blender: str = TEST_BLENDER) -> list[str]:
    """The command that runs ``code`` with Blender ``blender``'s interpreter, the worker
    package importable as ``rayfarm_worker``."""
    return [blender_python(blender), "-c", f"_d = {PACKAGE_DIR!r}\n{LOADER}{code}", *args]


class SceneFactory:
    """Builds .blend files with examples/make_scene.py (real bpy, ``blender``'s version:
    the file says it saved it), cached per arguments."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def __call__(self, *args: str, blender: str = TEST_BLENDER) -> Path:
        name = hashlib.sha1(" ".join((blender, *args)).encode()).hexdigest()[:12] + ".blend"
        path = self.directory / name
        if not path.exists():
            subprocess.run(
                [blender_python(blender), str(MAKE_SCENE), str(path), *args],
                check=True,
                capture_output=True,
                timeout=120,
            )
        return path


SMALL = ("--width", "64", "--height", "48", "--samples", "4", "--frames", "8")


def render_reference(
    scene: Path,
    out_dir: Path,
    frames: list[int],
    exr: bool = False,
    depth: int = 32,
    blender: str = TEST_BLENDER,
) -> dict[int, Path]:
    """Render frames directly with bpy ``blender`` in a fresh process (the ground truth):
    PNG, or with ``exr`` multi-layer OpenEXR with every pass (``depth`` 32 float or 16
    half)."""
    subprocess.run(
        [blender_python(blender), str(ROOT / "tests" / "helpers" / "render_reference.py"),
         str(scene), str(out_dir), *([f"--exr{depth}"] if exr else []), *map(str, frames)],
        check=True,
        capture_output=True,
        timeout=300,
    )  # fmt: skip
    return {f: out_dir / f"{f:04d}.{'exr' if exr else 'png'}" for f in frames}


def exr_parts(
    path: Path, blender: str = TEST_BLENDER
) -> dict[str, tuple[tuple[str, ...], np.ndarray, str]]:
    """Every part of a multi-layer EXR (channels, float32 pixels, "half" or "float" as
    stored), read in a fresh process with the OpenImageIO bpy ships (the test process
    never loads bpy)."""
    out = path.with_suffix(".npz")
    run_tool(blender_python(blender), "dump-exr", str(path), str(out), timeout_s=120)
    with np.load(out) as data:
        names = [str(n) for n in data["names"]]
        return {
            name: (
                tuple(str(c) for c in data[f"channels{i}"]),
                data[f"pixels{i}"],
                str(data["stored"][i]),
            )
            for i, name in enumerate(names)
        }


def pixels(path: Path) -> np.ndarray:
    with Image.open(path) as img:
        return np.asarray(img.convert("RGBA"))


def stored_scene(scene: Path, storage: Path) -> Inputs:
    """``scene`` stored as a farm stores it: one blob under a file:// root, named
    ``scene.blend`` in the job's folder (for a RenderActor driven without a farm)."""
    data = scene.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    blob = storage / blob_key(digest)
    blob.parent.mkdir(parents=True, exist_ok=True)
    blob.write_bytes(data)
    return Inputs(storage.as_uri(), "scene.blend", (InputFile("scene.blend", digest, len(data)),))

"""Multi-part OpenEXR in and out, with the OpenImageIO that ships inside the bpy wheel.

Blender writes a multi-layer EXR as one part per pass, named ``"<view layer>.<pass>"``
(``"ViewLayer.Combined"``, ``"ViewLayer.Depth"``, ...) with channels
``"<part>.<R|G|B|A|X|Y|Z>"``, plus a leading ``"Composite.Combined"`` part when the
scene composites. A tile comes back as exactly that: every pass of every view layer,
so tiles assemble per pass and nothing a pass holds is lost on the way.

Why this OpenImageIO: it is the build bpy itself links (same OpenEXR, same
compression code), so it adds nothing to install and never loads a second copy of
the libraries into a process that already has Blender in it. bpy reads EXR too, but
only the first layer of a multi-layer file through ``Image.pixels``.

``dump`` writes every part of a file to one numpy ``.npz`` (``names``, ``stored``,
``channels<i>``, ``pixels<i>``); the worker's command line runs it (``rayfarm.render.
supervisor.run_tool(python, "dump-exr", IN, OUT)``) for tests and benchmarks that compare
EXR output without loading bpy themselves.
"""

from __future__ import annotations

import os
import sys
from typing import Any

import numpy as np

from .errors import RenderError
from .parts import Part

__all__ = ["dump", "oiio", "read_parts", "write_parts"]

_OIIO: Any = None
_COLOUR = frozenset("RGBA")


def oiio() -> Any:
    """The OpenImageIO module bundled in the bpy wheel (imports bpy first)."""
    global _OIIO
    if _OIIO is None:
        import bpy

        py = f"python{sys.version_info.major}.{sys.version_info.minor}"
        path = os.path.join(bpy.utils.system_resource("PYTHON"), "lib", py, "site-packages")
        if path not in sys.path:
            sys.path.append(path)
        import OpenImageIO

        _OIIO = OpenImageIO
    return _OIIO


def read_parts(path: str) -> dict[str, Part]:
    """Every part of an EXR file, by part name, in file order."""
    io = oiio()
    inp = io.ImageInput.open(path)
    if inp is None:
        raise RenderError(f"cannot read {os.path.basename(path)}: {io.geterror()}")
    parts: dict[str, Part] = {}
    try:
        index = 0
        while inp.seek_subimage(index, 0):
            spec = inp.spec()
            pixels = inp.read_image(index, 0, 0, spec.nchannels, "float")
            if pixels is None:
                raise RenderError(f"cannot read {os.path.basename(path)}: {inp.geterror()}")
            pixels = np.asarray(pixels, dtype=np.float32).reshape(
                spec.height, spec.width, spec.nchannels
            )
            name = spec.get_string_attribute("name") or "Combined"
            parts[name] = Part(tuple(spec.channelnames), pixels, str(spec.format))
            index += 1
    finally:
        inp.close()
    return parts


def write_parts(
    path: str,
    parts: dict[str, Part],
    depth: int,
    attributes: dict[str, str] | None = None,
    compression: str = "zip",
) -> None:
    """Write ``parts`` as a multi-part EXR (``depth`` 16 = half or 32 = float), as
    Blender writes a multi-layer file; ``attributes`` go into every part's header.
    ``compression``: ZIP for files the farm keeps; ``"none"`` for a scratch file that
    Blender reads back at once (lossless either way, and no time spent compressing).

    As Blender does, half depth applies to colour passes only (channels R, G, B, A):
    data passes (depth, normals, vectors: X, Y, Z, ...) stay float, where half would
    lose what they are for.
    """
    io = oiio()
    specs = []
    for name, part in parts.items():
        height, width, nch = part.pixels.shape
        colour = all(c.rsplit(".", 1)[-1] in _COLOUR for c in part.channels)
        fmt = "half" if depth == 16 and colour else "float"
        spec = io.ImageSpec(width, height, nch, fmt)
        spec.channelnames = part.channels
        spec.attribute("name", name)
        spec.attribute("compression", compression)
        for key, value in (attributes or {}).items():
            spec.attribute(key, value)
        specs.append(spec)
    out = io.ImageOutput.create(path)
    if out is None:
        raise RenderError(f"cannot write EXR: {io.geterror()}")
    try:
        if not out.open(path, tuple(specs)):
            raise RenderError(f"cannot write {os.path.basename(path)}: {out.geterror()}")
        for index, part in enumerate(parts.values()):
            if index and not out.open(path, specs[index], "AppendSubimage"):
                raise RenderError(f"cannot write {os.path.basename(path)}: {out.geterror()}")
            if not out.write_image(np.ascontiguousarray(part.pixels, dtype=np.float32)):
                raise RenderError(f"cannot write {os.path.basename(path)}: {out.geterror()}")
    finally:
        out.close()


def dump(src: str, dst: str) -> None:
    """Every part of the EXR ``src`` into the numpy archive ``dst``."""
    parts = read_parts(src)
    arrays: dict[str, np.ndarray] = {
        "names": np.array(list(parts)),
        "stored": np.array([p.stored for p in parts.values()]),
    }
    for i, part in enumerate(parts.values()):
        arrays[f"channels{i}"] = np.array(part.channels)
        arrays[f"pixels{i}"] = part.pixels
    save: Any = np.savez  # its stubs take any keyword for allow_pickle (a bool)
    save(dst, **arrays)

"""Dump every part of a multi-layer EXR to .npz (names, channels<i>, pixels<i>).

    python exr_parts.py IN.exr OUT.npz

Uses the OpenImageIO that ships in the bpy wheel, through rayfarm.render.exr.
"""

import sys

import numpy as np

from rayfarm.render.exr import read_parts


def main() -> None:
    src, dst = sys.argv[1:]
    parts = read_parts(src)
    arrays = {"names": np.array(list(parts))}
    for i, part in enumerate(parts.values()):
        arrays[f"channels{i}"] = np.array(part.channels)
        arrays[f"pixels{i}"] = part.pixels
    np.savez(dst, **arrays)


if __name__ == "__main__":
    main()

"""Hand-made .blend files for the checks that no file bpy saves would reach."""

from __future__ import annotations

import struct

import zstandard

__all__ = ["CHUNK_BYTES", "bhead", "zstd_bomb"]

CHUNK_BYTES = 64 * 1024**2
HEADER = b"BLENDER17-01v0500"


def bhead(code: bytes, length: int) -> bytes:
    """A Blender 5.x block header (format 1: code, SDNA index, pointer, length, count)."""
    return struct.pack("<4siQqq", code, 0, 0, length, 1)


def zstd_bomb(gib: int = 128) -> bytes:
    """A well-formed 5.0 .blend, zstd-compressed: one block of ``gib`` GiB of zeros, then
    ENDB. About 4.2 MB for 128 GiB, the issue's bomb; unbounded, checking it decompresses
    all of it and then accepts it."""
    c = zstandard.ZstdCompressor()
    zeros = c.compress(b"\0" * CHUNK_BYTES)  # one frame, repeated: frames concatenate
    n = gib * 1024**3 // CHUNK_BYTES
    head = c.compress(HEADER + bhead(b"DATA", n * CHUNK_BYTES))
    return head + zeros * n + c.compress(bhead(b"ENDB", 0))

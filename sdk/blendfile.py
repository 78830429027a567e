"""Read a .blend file's header and check its block structure, without bpy.

The farm refuses a scene before it is stored when the file is not a .blend or is
cut short; the version the header names decides which Blender renders it
(``rayfarm.versions``).

Header layouts (after optional zstd compression, magic ``28 B5 2F FD``):

- up to Blender 4.x: ``BLENDER`` + pointer size (``_`` 4, ``-`` 8) + endianness
  (``v`` little, ``V`` big) + three version digits, e.g. ``BLENDER-v405``.
- from 5.0: ``BLENDER`` + header size (``17``) + ``-`` + file format version
  (``01``) + endianness + four version digits, e.g. ``BLENDER17-01v0500``.

Blocks follow the header, each a BHead then ``len`` bytes, the last one ``ENDB``:

- pointer size 4: code, len (int32), old pointer (4), SDNA index, count = 20 bytes
- pointer size 8: code, len (int32), old pointer (8), SDNA index, count = 24 bytes
- format 1 (5.0+): code, SDNA index (int32), old pointer (8), len (int64), count (int64) = 32 bytes
"""

from __future__ import annotations

import io
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from rayfarm.errors import InvalidScene

__all__ = ["BlendHeader", "check_blend", "read_header"]

ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
_LEGACY = re.compile(rb"^BLENDER([_-])([vV])(\d{3})$")
_MODERN = re.compile(rb"^BLENDER(\d{2})-(\d{2})([vV])(\d{4})$")
_SKIP_CHUNK = 1 << 20


@dataclass(frozen=True)
class BlendHeader:
    """What a .blend file's header says about the Blender that saved it."""

    version: tuple[int, int]
    pointer_size: int
    little_endian: bool
    compressed: bool
    header_size: int
    format_version: int

    @property
    def version_string(self) -> str:
        return f"{self.version[0]}.{self.version[1]}"


def _open_stream(f: BinaryIO) -> tuple[BinaryIO, bool]:
    magic = f.read(4)
    f.seek(0)
    if magic == ZSTD_MAGIC:
        import zstandard

        reader = zstandard.ZstdDecompressor().stream_reader(f, read_across_frames=True)
        return reader, True
    return f, False


def _read_exact(stream: BinaryIO, n: int) -> bytes:
    try:
        data = stream.read(n)
    except Exception as exc:  # zstandard raises ZstdError on a damaged stream
        raise InvalidScene(f"the .blend's compressed data is damaged: {exc}") from exc
    return data


def _parse_header(head: bytes, compressed: bool) -> BlendHeader:
    m = _MODERN.match(head[:17])
    if m is not None:
        size = int(m[1])
        if size != 17:
            raise InvalidScene(f"unknown .blend header size {size}")
        digits = int(m[4])
        return BlendHeader(
            version=(digits // 100, digits % 100),
            pointer_size=8,
            little_endian=m[3] == b"v",
            compressed=compressed,
            header_size=17,
            format_version=int(m[2]),
        )
    m = _LEGACY.match(head[:12])
    if m is not None:
        digits = int(m[3])
        return BlendHeader(
            version=(digits // 100, digits % 100),
            pointer_size=4 if m[1] == b"_" else 8,
            little_endian=m[2] == b"v",
            compressed=compressed,
            header_size=12,
            format_version=0,
        )
    if head.startswith(b"BLENDER"):
        raise InvalidScene(f"unrecognised .blend header {head[:17]!r}")
    raise InvalidScene(
        "not a .blend file: it starts with neither 'BLENDER' nor zstd's magic bytes",
        {"head": head[:12].hex()},
    )


def read_header(f: BinaryIO) -> BlendHeader:
    """Read the header of the .blend open in ``f`` (plain or zstd-compressed)."""
    stream, compressed = _open_stream(f)
    head = _read_exact(stream, 17)
    if len(head) < 12:
        raise InvalidScene(f"not a .blend file: only {len(head)} bytes")
    return _parse_header(head, compressed)


def _walk_blocks(stream: BinaryIO, header: BlendHeader) -> int:
    endian = "<" if header.little_endian else ">"
    if header.format_version >= 1:
        bhead = struct.Struct(endian + "4siQqq")
    elif header.pointer_size == 8:
        bhead = struct.Struct(endian + "4siQii")
    else:
        bhead = struct.Struct(endian + "4siIii")
    blocks = 0
    while True:
        raw = _read_exact(stream, bhead.size)
        if len(raw) < bhead.size:
            raise InvalidScene(
                f"the .blend is truncated: it ends after {blocks} blocks without an ENDB block"
            )
        fields = bhead.unpack(raw)
        code = fields[0]
        length = fields[3] if header.format_version >= 1 else fields[1]
        blocks += 1
        if code == b"ENDB":
            return blocks
        if length < 0:
            raise InvalidScene(f"the .blend is damaged: block {blocks} has length {length}")
        remaining = length
        while remaining:
            chunk = _read_exact(stream, min(remaining, _SKIP_CHUNK))
            if not chunk:
                raise InvalidScene(
                    f"the .blend is truncated inside block {blocks} ({code!r}); "
                    "the upload or the save was cut short"
                )
            remaining -= len(chunk)


def check_blend(source: str | Path | BinaryIO | bytes) -> BlendHeader:
    """Validate a whole .blend: header, then every block up to ``ENDB``.

    Reads the file once, streaming (constant memory even for compressed files).
    Raises ``InvalidScene`` for anything that is not a complete .blend.
    """
    if isinstance(source, bytes):
        return check_blend(io.BytesIO(source))
    if isinstance(source, str | Path):
        with open(source, "rb") as f:
            return check_blend(f)
    stream, compressed = _open_stream(source)
    head = _read_exact(stream, 17)
    if len(head) < 12:
        raise InvalidScene(f"not a .blend file: only {len(head)} bytes")
    header = _parse_header(head, compressed)
    if header.header_size == 12:
        # The legacy header is 12 bytes; the 5 we read beyond it start the first block.
        rest = io.BytesIO(head[12:])
        stream = _Chain(rest, stream)  # type: ignore[assignment]
    _walk_blocks(stream, header)
    return header


class _Chain:
    """Read from ``first`` until it is empty, then from ``second``."""

    def __init__(self, first: BinaryIO, second: BinaryIO) -> None:
        self._first, self._second = first, second

    def read(self, n: int) -> bytes:
        data = self._first.read(n)
        if len(data) < n:
            data += self._second.read(n - len(data))
        return data

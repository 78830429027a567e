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

A compressed file is read within bounds (``BlendLimits``): walking to ``ENDB`` means
decompressing every block, and a few MB of zstd can expand to terabytes (a "bomb").

The Blender add-on carries this module (with ``rayfarm.pack`` and ``rayfarm.errors``):
it imports only the standard library, zstandard and ``errors``, relatively.
"""

from __future__ import annotations

import io
import re
import struct
import time
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from .errors import InvalidScene, SceneTooLarge

__all__ = ["BlendHeader", "BlendLimits", "check_blend", "read_header"]

ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
_LEGACY = re.compile(rb"^BLENDER([_-])([vV])(\d{3})$")
_MODERN = re.compile(rb"^BLENDER(\d{2})-(\d{2})([vV])(\d{4})$")
_SKIP_CHUNK = 1 << 20

#: Defaults of the farm's ``RAYFARM_MAX_BLEND_EXPANDED_BYTES``, ``RAYFARM_MAX_BLEND_RATIO``
#: and ``RAYFARM_MAX_BLEND_READ_S``; the SDK checks a scene with them before upload.
MAX_EXPANDED_BYTES = 32 * 1024**3
MAX_EXPANSION_RATIO = 64
MAX_READ_S = 60.0
#: What any compressed file may expand to on top of its ratio: a small scene compresses
#: far better than a big one (mostly empty blocks), and this much costs well under a second.
EXPANSION_FLOOR_BYTES = 256 * 1024**2


@dataclass(frozen=True)
class BlendLimits:
    """How far ``check_blend`` reads a zstd-compressed .blend: at most
    ``max_expanded_bytes`` decompressed, at most ``EXPANSION_FLOOR_BYTES`` plus
    ``max_ratio`` times the compressed size, for at most ``max_read_s`` seconds.

    Real scenes expand 2-10 times; a zstd "bomb" thousands of times. Plain files need
    no bound: their walk reads each byte once.
    """

    max_expanded_bytes: int = MAX_EXPANDED_BYTES
    max_ratio: int = MAX_EXPANSION_RATIO
    max_read_s: float = MAX_READ_S

    def allowance(self, compressed_bytes: int | None) -> int:
        """Most bytes a file of ``compressed_bytes`` (None: unknown) may expand to."""
        if compressed_bytes is None:
            return self.max_expanded_bytes
        by_ratio = EXPANSION_FLOOR_BYTES + self.max_ratio * compressed_bytes
        return min(self.max_expanded_bytes, by_ratio)


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
    except InvalidScene:
        raise  # a bound passed (SceneTooLarge)
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


class _Bounded:
    """A decompressed stream read within ``BlendLimits``: ``SceneTooLarge`` the moment
    it passes its allowance of expanded bytes or its time. Never decompresses more than
    one byte past the allowance (``expanded`` counts what it did)."""

    def __init__(self, stream: BinaryIO, compressed_bytes: int | None, limits: BlendLimits) -> None:
        self._stream = stream
        self._compressed = compressed_bytes
        self._limits = limits
        self._allowance = limits.allowance(compressed_bytes)
        self._deadline = time.monotonic() + limits.max_read_s
        self.expanded = 0

    def read(self, n: int) -> bytes:
        data = self._stream.read(min(n, self._allowance + 1 - self.expanded))
        self.expanded += len(data)
        if self.expanded > self._allowance:
            by_ratio = self._allowance < self._limits.max_expanded_bytes
            why = (
                f"{self._limits.max_ratio} times its compressed size of {self._compressed} "
                "bytes (RAYFARM_MAX_BLEND_RATIO)"
                if by_ratio
                else "the farm's limit (RAYFARM_MAX_BLEND_EXPANDED_BYTES)"
            )
            raise SceneTooLarge(
                f"the compressed .blend expands past {self._allowance} bytes, {why}: save it "
                "uncompressed, or ask the farm's admin to raise the limit",
                self._detail(
                    "RAYFARM_MAX_BLEND_RATIO" if by_ratio else "RAYFARM_MAX_BLEND_EXPANDED_BYTES",
                    self._allowance,
                ),
            )
        if time.monotonic() > self._deadline:
            raise SceneTooLarge(
                f"reading the compressed .blend took over {self._limits.max_read_s:g} s "
                f"(RAYFARM_MAX_BLEND_READ_S) after {self.expanded} expanded bytes: save it "
                "uncompressed, or ask the farm's admin to raise the limit",
                self._detail("RAYFARM_MAX_BLEND_READ_S", self._limits.max_read_s),
            )
        return data

    def _detail(self, setting: str, limit: float) -> dict[str, object]:
        return {
            "setting": setting,
            "limit": limit,
            "expanded_bytes": self.expanded,
            "compressed_bytes": self._compressed,
        }


def _size_of(f: BinaryIO) -> int | None:
    """The bytes from ``f``'s position to its end, None when it cannot seek."""
    try:
        here = f.tell()
        end = f.seek(0, io.SEEK_END)
        f.seek(here)
    except (AttributeError, OSError, ValueError):
        return None
    return end - here


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


def check_blend(
    source: str | Path | BinaryIO | bytes, limits: BlendLimits | None = None
) -> BlendHeader:
    """Validate a whole .blend: header, then every block up to ``ENDB``.

    Reads the file once, streaming (constant memory even for compressed files); a
    compressed one within ``limits`` (the defaults when None). Raises ``InvalidScene``
    for anything that is not a complete .blend, ``SceneTooLarge`` (a kind of it) past
    the limits.
    """
    if isinstance(source, bytes):
        return check_blend(io.BytesIO(source), limits)
    if isinstance(source, str | Path):
        with open(source, "rb") as f:
            return check_blend(f, limits)
    size = _size_of(source)
    stream, compressed = _open_stream(source)
    if compressed:
        stream = _Bounded(stream, size, limits or BlendLimits())  # type: ignore[assignment]
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

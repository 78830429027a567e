"""The header reader and structure check, on real .blend files saved by bpy."""

import io
import struct

import pytest
import zstandard

from rayfarm import InvalidScene
from rayfarm.blendfile import check_blend, read_header


@pytest.fixture(scope="module")
def plain(small_scene):
    return small_scene.read_bytes()


@pytest.fixture(scope="module")
def compressed(make_scene):
    return make_scene("--width", "32", "--height", "24", "--compress").read_bytes()


def test_plain_5x_file(plain):
    assert plain.startswith(b"BLENDER17-01v0500")
    header = check_blend(plain)
    assert (header.version, header.pointer_size, header.little_endian) == ((5, 0), 8, True)
    assert (header.compressed, header.header_size, header.format_version) == (False, 17, 1)
    assert header.version_string == "5.0"


def test_zstd_file(compressed):
    assert compressed[:4] == b"\x28\xb5\x2f\xfd"
    header = check_blend(compressed)
    assert header.compressed and header.version == (5, 0)
    assert read_header(io.BytesIO(compressed)).version == (5, 0)


def _with_version(data: bytes, digits: bytes) -> bytes:
    return data[:13] + digits + data[17:]


def test_a_newer_files_version_is_read(plain):
    """What the farm routes by (``rayfarm.versions.route``, tests/test_versions.py)."""
    header = check_blend(_with_version(plain, b"0501"))
    assert header.version == (5, 1) and header.version_string == "5.1"


def test_newer_compressed_file_is_detected(plain):
    data = zstandard.ZstdCompressor().compress(_with_version(plain, b"0600"))
    assert check_blend(data).version == (6, 0)


def _legacy(pointer: bytes, endian: bytes, version: bytes, blocks: list[tuple[bytes, bytes]]):
    fmt = ("<" if endian == b"v" else ">") + ("4siIii" if pointer == b"_" else "4siQii")
    out = b"BLENDER" + pointer + endian + version
    for code, payload in blocks:
        out += struct.pack(fmt, code, len(payload), 0, 0, 1) + payload
    return out


@pytest.mark.parametrize(("pointer", "size"), [(b"-", 8), (b"_", 4)])
@pytest.mark.parametrize("endian", [b"v", b"V"])
def test_legacy_headers(pointer, size, endian):
    data = _legacy(pointer, endian, b"405", [(b"REND", b"x" * 10), (b"ENDB", b"")])
    header = check_blend(data)
    assert header.version == (4, 5) and header.pointer_size == size
    assert header.little_endian == (endian == b"v") and header.header_size == 12
    assert check_blend(_legacy(pointer, endian, b"293", [(b"ENDB", b"")])).version == (2, 93)


@pytest.mark.parametrize(
    ("data", "fragment"),
    [
        (b"", "only 0 bytes"),
        (b"hello world, this is not blender", "not a .blend"),
        (b"\x89PNG\r\n\x1a\n" + b"\0" * 40, "not a .blend"),
        (b"BLENDER?v405" + b"\0" * 30, "unrecognised"),
    ],
)
def test_not_a_blend(data, fragment):
    with pytest.raises(InvalidScene) as err:
        check_blend(data)
    assert fragment in str(err.value)


@pytest.mark.parametrize("keep", [20, 1000, 0.5, 0.999])
def test_truncated_file(plain, keep):
    n = keep if isinstance(keep, int) else int(len(plain) * keep)
    with pytest.raises(InvalidScene) as err:
        check_blend(plain[:n])
    assert "truncated" in str(err.value)


def test_truncated_compressed_file(compressed):
    with pytest.raises(InvalidScene):
        check_blend(compressed[: len(compressed) // 2])


def test_legacy_block_cut_short():
    data = _legacy(b"-", b"v", b"405", [(b"REND", b"x" * 100), (b"ENDB", b"")])
    with pytest.raises(InvalidScene, match="truncated inside block 1"):
        check_blend(data[:60])

"""The header reader and structure check, on real .blend files saved by bpy."""

import io
import struct

import pytest
import zstandard

from rayfarm import InvalidScene, SceneTooLarge
from rayfarm.blendfile import BlendLimits, check_blend, read_header

from helpers.blends import bhead, zstd_bomb


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
    """What the farm routes by (``rayfarm.versions.route``, tests/render/test_versions.py)."""
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


# --- compressed files are read within bounds ----------------------------------------


class Counted(io.BytesIO):
    """The compressed bytes the check pulled from its source."""

    pulled = 0

    def read(self, n: int | None = -1) -> bytes:
        data = super().read(n)
        self.pulled += len(data)
        return data


def test_a_zstd_bomb_is_refused_by_its_ratio_having_read_a_sliver():
    bomb = zstd_bomb()
    assert 4_000_000 < len(bomb) < 4_500_000
    source = Counted(bomb)
    with pytest.raises(SceneTooLarge) as err:
        check_blend(source)
    allowance = 256 * 1024**2 + 64 * len(bomb)
    assert err.value.status == 413 and "RAYFARM_MAX_BLEND_RATIO" in str(err.value)
    assert err.value.detail == {
        "setting": "RAYFARM_MAX_BLEND_RATIO",
        "limit": allowance,
        "expanded_bytes": allowance + 1,  # never a byte more than the bound
        "compressed_bytes": len(bomb),
    }
    # 0.5 GB of the 128 GiB were expanded: the source was read for those (and zstd's
    # 128 KiB read-ahead), not to its end.
    assert source.pulled < len(bomb) // 10, source.pulled


def test_the_absolute_bound_and_the_time_bound_name_their_settings():
    c = zstandard.ZstdCompressor()
    data = c.compress(b"BLENDER17-01v0500" + bhead(b"DATA", 8 * 1024**2) + b"\0" * 8 * 1024**2)
    data += c.compress(bhead(b"ENDB", 0))
    assert check_blend(data).compressed  # well within the defaults
    with pytest.raises(SceneTooLarge) as err:
        check_blend(data, BlendLimits(max_expanded_bytes=4 * 1024**2))
    assert "RAYFARM_MAX_BLEND_EXPANDED_BYTES" in str(err.value)
    assert err.value.detail["expanded_bytes"] == 4 * 1024**2 + 1
    with pytest.raises(SceneTooLarge) as err:  # a deadline already past: the first read
        check_blend(data, BlendLimits(max_read_s=-1.0))
    assert "RAYFARM_MAX_BLEND_READ_S" in str(err.value)
    assert err.value.detail["expanded_bytes"] == 17


def test_real_compressed_scenes_pass_tight_bounds_and_truncation_is_still_found(compressed):
    reader = zstandard.ZstdDecompressor().stream_reader(compressed, read_across_frames=True)
    size = len(reader.read())  # Blender writes several frames
    tight = BlendLimits(max_expanded_bytes=size, max_ratio=1)
    assert check_blend(compressed, tight).version == (5, 0)
    with pytest.raises(SceneTooLarge):
        check_blend(compressed, BlendLimits(max_expanded_bytes=size - 1))
    with pytest.raises(InvalidScene, match="truncated") as err:
        check_blend(compressed[: len(compressed) * 3 // 4], tight)
    assert not isinstance(err.value, SceneTooLarge)


def test_plain_files_are_not_bounded_by_the_compressed_limits(plain):
    assert check_blend(plain, BlendLimits(max_expanded_bytes=1, max_read_s=-1.0)).version == (5, 0)

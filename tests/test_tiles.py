"""Tile geometry: tiles cover the frame exactly and map back to the right pixels."""

import math

import pytest

from rayfarm.render.tiles import border_fractions, split


@pytest.mark.parametrize(
    ("w", "h", "nx", "ny"),
    [(64, 48, 1, 1), (64, 48, 2, 2), (67, 45, 2, 2), (67, 45, 3, 3), (1920, 1080, 16, 16),
     (5, 3, 5, 3), (101, 7, 4, 2)],
)  # fmt: skip
def test_tiles_cover_the_frame_exactly_once(w, h, nx, ny):
    tiles = split(w, h, nx, ny)
    assert [t.index for t in tiles] == list(range(nx * ny))
    covered = [[0] * w for _ in range(h)]
    for t in tiles:
        assert t.width >= 1 and t.height >= 1
        for y in range(t.y0, t.y1):
            for x in range(t.x0, t.x1):
                covered[y][x] += 1
    assert all(c == 1 for row in covered for c in row)
    # Tile sizes differ by at most one pixel along each axis.
    assert max(t.width for t in tiles) - min(t.width for t in tiles) <= 1
    assert max(t.height for t in tiles) - min(t.height for t in tiles) <= 1


@pytest.mark.parametrize(
    ("w", "h", "nx", "ny"), [(67, 45, 3, 3), (1920, 1080, 16, 16), (7, 5, 7, 5)]
)
def test_border_fractions_truncate_back_to_the_tile(w, h, nx, ny):
    """Blender truncates border fractions times the frame size to pixels."""
    for t in split(w, h, nx, ny):
        x0, x1, y0, y1 = border_fractions(t, w, h)
        assert (math.floor(x0 * w), math.floor(x1 * w)) == (t.x0, t.x1)
        assert (math.floor(y0 * h), math.floor(y1 * h)) == (t.y0, t.y1)
        assert 0.0 <= x0 < x1 <= 1.0 and 0.0 <= y0 < y1 <= 1.0


def test_more_tiles_than_pixels_is_refused():
    with pytest.raises(ValueError, match="cannot be split"):
        split(8, 6, 16, 16)

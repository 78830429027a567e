"""Tile geometry: tiles cover the frame exactly and map back to the right pixels; the
assembler puts every pass of every tile where it belongs; ``tiles="auto"`` picks."""

import math

import numpy as np
import pytest

from rayfarm.errors import RenderError
from rayfarm.render.assembler import TileAssembler
from rayfarm.render.tiles import (
    MAX_TILE_COST_SHARE,
    auto_grid,
    border_band,
    border_fractions,
    split,
)
from rayfarm.render.worker.parts import Part


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


def _frame(w, h, nch, seed):
    return np.random.default_rng(seed).random((h, w, nch), dtype=np.float32)


def _tile(frame, rect):
    """``rect``'s pixels of a top-row-first frame (as EXR stores them)."""
    h = frame.shape[0]
    return frame[h - rect.y1 : h - rect.y0, rect.x0 : rect.x1]


@pytest.mark.parametrize(("w", "h", "nx", "ny"), [(67, 45, 3, 3), (321, 241, 2, 3)])
def test_the_assembler_stitches_every_pass_in_any_order(w, h, nx, ny):
    passes = {"ViewLayer.Combined": _frame(w, h, 4, 1), "ViewLayer.Depth": _frame(w, h, 1, 2)}
    channels = {"ViewLayer.Combined": ("R", "G", "B", "A"), "ViewLayer.Depth": ("Z",)}
    asm = TileAssembler()
    rects = split(w, h, nx, ny)
    order = np.random.default_rng(3).permutation(len(rects))
    counts = []
    for i in order:
        parts = {k: Part(channels[k], _tile(v, rects[i]).copy()) for k, v in passes.items()}
        counts.append(asm.add("job", 7, len(rects), (w, h), rects[i], parts))
    assert counts == list(range(1, len(rects) + 1))
    assert asm.stats()["frames"] == 1
    done = asm.take("job", 7)
    assert list(done.parts) == list(passes)
    assert done.join_s > 0
    for name, want in passes.items():
        assert done.parts[name].channels == channels[name]
        assert np.array_equal(done.parts[name].pixels, want), name
    assert asm.stats() == {"frames": 0, "bytes": 0}


def test_the_assembler_counts_a_redelivered_tile_once_and_refuses_early_takes():
    w, h = 20, 10
    frame = _frame(w, h, 4, 5)
    rects = split(w, h, 2, 1)
    asm = TileAssembler()
    part = {"L.Combined": Part(("R", "G", "B", "A"), _tile(frame, rects[0]).copy())}
    assert asm.add("j", 1, 2, (w, h), rects[0], part) == 1
    assert asm.add("j", 1, 2, (w, h), rects[0], part) == 1
    with pytest.raises(RenderError, match=r"frame 1 is not assembled \(1 of 2 tiles\)"):
        asm.take("j", 1)
    other = {"L.Depth": Part(("Z",), np.zeros((rects[1].height, rects[1].width, 1), np.float32))}
    assert asm.add("j", 2, 2, (w, h), rects[0], part) == 1
    with pytest.raises(RenderError, match="tile 1 has passes"):
        asm.add("j", 2, 2, (w, h), rects[1], other)
    asm.drop("j")
    assert asm.stats()["frames"] == 0


def test_auto_renders_whole_frames_when_frames_keep_every_actor_busy():
    assert auto_grid(250, 8, 1920, 1080, 60.0, 0.01)[0] == (1, 1)
    assert auto_grid(2, 2, 1920, 1080, 60.0, 0.01)[0] == (1, 1)


def test_auto_splits_a_frame_so_every_actor_has_two_tiles():
    grid, reason = auto_grid(1, 2, 960, 540, 9.0, 0.005)
    assert grid == (2, 2), reason
    assert auto_grid(1, 4, 960, 540, 9.0, 0.005)[0] in ((4, 2), (2, 4))
    assert auto_grid(1, 8, 1920, 1080, 60.0, 0.005)[0] == (4, 4)
    assert auto_grid(2, 8, 1920, 1080, 60.0, 0.005)[0] in ((4, 2), (2, 4))
    assert auto_grid(1, 3, 1920, 1080, 60.0, 0.005)[0] == (3, 2)
    assert auto_grid(3, 4, 1920, 1080, 60.0, 0.005)[0] in ((3, 1), (1, 3))


@pytest.mark.parametrize(
    ("frame_s", "tile_cost_s", "tiles"),
    [(17.5, 0.9, 4), (7.0, 0.9, 1), (10.0, 0.9, 2), (9.0, 0.005, 16), (0.1, 0.02, 1)],
)
def test_auto_keeps_each_tiles_fixed_cost_under_a_quarter_of_its_time(frame_s, tile_cost_s, tiles):
    """Measured per-tile costs: 0.9 s on the heavy example scene, 5 ms on the light one."""
    (nx, ny), reason = auto_grid(1, 8, 960, 540, frame_s, tile_cost_s)
    assert nx * ny == tiles, reason
    if tiles > 1:
        assert tile_cost_s <= MAX_TILE_COST_SHARE * frame_s / (nx * ny)
        assert ("capped" in reason) == (tiles < 16)
    else:
        assert "too little work" in reason


def test_the_border_band_marks_pixels_beside_inner_tile_edges_only():
    mask = border_band(10, 8, 2, 2, 1)  # cuts at x=5 and y=4 (rows top first: row 4)
    assert mask[:, 4:6].all() and mask[3:5, :].all()
    outside = np.ones((8, 10), dtype=bool)
    outside[:, 4:6] = False
    outside[3:5, :] = False
    assert not mask[outside].any()
    assert not border_band(10, 8, 1, 1, 3).any()

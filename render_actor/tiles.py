"""Tiling decisions: how ``tiles="auto"`` splits a frame, and where seams would show.

The grid geometry itself (``split``, ``border_fractions``) lives in
``rayfarm.render.worker.geometry``, shared with the Blender worker that renders a tile.
"""

from __future__ import annotations

import numpy as np

from rayfarm.render.worker.geometry import border_fractions, split

__all__ = [
    "MAX_TILE_COST_SHARE",
    "TILES_PER_ACTOR",
    "auto_grid",
    "border_band",
    "border_fractions",
    "split",
]

#: The most a tile's fixed cost may be of its render time under ``tiles="auto"``. Every
#: render call pays a fixed cost on top of its pixels, and it depends on the scene far
#: more than on the tile: measured with ``bench/tile_sweep.py`` (bpy 5.0.1, one core),
#: 5-11 ms on the light example scene but 0.9 s on the heavy one, whose animated
#: objects make Cycles rebuild the BVH of 2.5M triangles on every render, even of the
#: same frame. So the farm measures it per scene (``RenderActor.inspect``) instead of
#: assuming a tile size. The bound is also the most the split may add to the frame's
#: total render time: 'auto' splits only frames of jobs too short to keep every actor
#: busy, so it spends idle actors' time to finish the frame sooner, and a quarter keeps
#: the sync from dominating any tile (the heavy scene at 960x540 still splits in two).
MAX_TILE_COST_SHARE = 0.25
#: Tiles per actor ``tiles="auto"`` aims for: one each leaves the actor with the cheaper
#: half idle while the other finishes (bench/tiles.py: 2x2 beat 2x1 on two actors).
TILES_PER_ACTOR = 2
MAX_AXIS = 16


def border_band(width: int, height: int, nx: int, ny: int, band: int) -> np.ndarray:
    """A (height, width) mask, rows top first (as EXR and PNG store them): True within
    ``band`` pixels of an inner edge of the ``nx`` x ``ny`` grid, where a per-tile
    denoiser or compositor would leave a seam."""
    mask = np.zeros((height, width), dtype=bool)
    rects = split(width, height, nx, ny)
    for x in {r.x0 for r in rects} - {0}:
        mask[:, max(0, x - band) : x + band] = True
    for y in {r.y0 for r in rects} - {0}:
        row = height - y
        mask[max(0, row - band) : row + band, :] = True
    return mask


def auto_grid(
    frames: int, actors: int, width: int, height: int, frame_s: float, tile_cost_s: float
) -> tuple[tuple[int, int], str]:
    """The tiling ``tiles="auto"`` picks, and why.

    A job with at least as many frames as actors renders whole frames (frames already
    keep every actor busy, and a whole frame pays no tile cost). Otherwise each frame
    is split into ``TILES_PER_ACTOR`` tiles for every actor (so that no actor idles
    while another finishes a costlier part of the frame), but never into so many that a
    tile's fixed cost (``tile_cost_s``, measured for the scene) exceeds
    ``MAX_TILE_COST_SHARE`` of its share of the frame's render time (``frame_s``,
    estimated for one actor). Among grids with that many tiles, the one whose tiles are
    closest to square.
    """
    if frames >= actors:
        return (1, 1), f"{frames} frames for {actors} actors: whole frames"
    want = -(-actors * TILES_PER_ACTOR // frames)
    most = max(1, int(frame_s * MAX_TILE_COST_SHARE / max(tile_cost_s, 1e-3)))
    count = min(want, most)
    cost = f"a tile costs {tile_cost_s:.3f} s on top of its pixels, a frame ~{frame_s:.2f} s"
    if count <= 1:
        return (1, 1), f"too little work to split ({cost})"
    best: tuple[float, int, int] | None = None
    for nx in range(1, min(MAX_AXIS, width, count) + 1):
        ny = -(-count // nx)
        if ny > min(MAX_AXIS, height) or nx * ny > most:
            continue
        tile_w, tile_h = width / nx, height / ny
        score = (nx * ny - count) * 10 + abs(tile_w / tile_h - 1) + abs(tile_h / tile_w - 1)
        if best is None or score < best[0]:
            best = (score, nx, ny)
    if best is None:
        return (1, 1), f"no grid of {count} tiles fits a {width}x{height} frame"
    _, nx, ny = best
    reason = f"{frames} frame(s) for {actors} actors: {nx}x{ny} tiles ({cost})"
    if count < want:
        reason += f"; capped so that cost stays under {MAX_TILE_COST_SHARE:.0%} of a tile"
    return (nx, ny), reason

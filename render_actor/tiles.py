"""Tile geometry: split a frame into a grid of render borders, and place tiles back."""

from __future__ import annotations

from rayfarm.render.tasks import TileRect

__all__ = ["MIN_TILE_WORK", "auto_grid", "border_fractions", "split"]

#: The least work (pixels x samples) a tile of ``tiles="auto"`` gets. Every tile pays
#: a fixed cost on top of its pixels (scene sync for the border, kernel start, the
#: tile's EXR out and in): measured with ``bench/tiles.py`` on bpy 5.0.1, Cycles CPU,
#: one core per actor (see BENCHMARKS.md). At this much work a tile's fixed cost is
#: under a tenth of its render time.
MIN_TILE_WORK = 2_000_000
MAX_AXIS = 16


def _cuts(size: int, parts: int) -> list[int]:
    return [round(i * size / parts) for i in range(parts + 1)]


def split(width: int, height: int, nx: int, ny: int) -> list[TileRect]:
    """The tiles of a ``width`` x ``height`` frame in an ``nx`` x ``ny`` grid.

    Tiles cover the frame exactly, without overlap; index runs along x first,
    from the bottom row (Blender's border origin is bottom-left).
    """
    if nx > width or ny > height:
        raise ValueError(f"a {width}x{height} frame cannot be split into {nx}x{ny} tiles")
    xs, ys = _cuts(width, nx), _cuts(height, ny)
    return [
        TileRect(index=j * nx + i, x0=xs[i], x1=xs[i + 1], y0=ys[j], y1=ys[j + 1])
        for j in range(ny)
        for i in range(nx)
    ]


def _edge(px: int, size: int) -> float:
    # Blender turns a border fraction into pixels by truncation; aim a quarter pixel in
    # so float rounding can never land one pixel short.
    if px <= 0:
        return 0.0
    if px >= size:
        return 1.0
    return (px + 0.25) / size


def border_fractions(rect: TileRect, width: int, height: int) -> tuple[float, float, float, float]:
    """(min_x, max_x, min_y, max_y) border fractions that render exactly ``rect``."""
    return (
        _edge(rect.x0, width),
        _edge(rect.x1, width),
        _edge(rect.y0, height),
        _edge(rect.y1, height),
    )


def auto_grid(
    frames: int, actors: int, width: int, height: int, samples: int
) -> tuple[tuple[int, int], str]:
    """The tiling ``tiles="auto"`` picks, and why.

    A job with at least as many frames as actors renders whole frames (frames already
    keep every actor busy, and a whole frame pays no tile cost). Otherwise each frame
    is split so that every actor has a tile, into as few tiles as that takes and never
    into tiles with less than ``MIN_TILE_WORK`` pixel-samples; among grids with that
    many tiles, the one whose tiles are closest to square.
    """
    if frames >= actors:
        return (1, 1), f"{frames} frames for {actors} actors: whole frames"
    want = -(-actors // frames)
    most = max(1, (width * height * samples) // MIN_TILE_WORK)
    count = min(want, most)
    if count <= 1:
        return (1, 1), (
            f"a {width}x{height} frame at {samples} samples is too little work to split"
        )
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
    reason = f"{frames} frame(s) for {actors} actors: {nx}x{ny} tiles of a {width}x{height} frame"
    if count < want:
        reason += f" (capped: more tiles would be under {MIN_TILE_WORK:,} pixel-samples each)"
    return (nx, ny), reason

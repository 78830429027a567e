"""Tile geometry: a frame's grid of render borders (standard library only).

Shared by the dispatcher's side (which plans tiles) and the worker (which renders
one): a tile is the same rectangle on both sides of the process boundary.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["TileRect", "border_fractions", "split"]


@dataclass(frozen=True)
class TileRect:
    """A tile in pixels, origin bottom-left as Blender's border is: [x0, x1) x [y0, y1)."""

    index: int
    x0: int
    x1: int
    y0: int
    y1: int

    @property
    def width(self) -> int:
        return self.x1 - self.x0

    @property
    def height(self) -> int:
        return self.y1 - self.y0


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

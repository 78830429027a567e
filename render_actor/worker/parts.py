"""A frame's passes as numpy arrays, and how they cross the process boundary (numpy
only).

A tile or an assembled frame is every pass of every view layer, by part name as
Blender names a multi-layer EXR's parts (``"ViewLayer.Combined"``, ...). Between the
worker and its actor they travel as one ``.npy`` file per part in a folder plus a
listing (names, channels, how the EXR stored them) in the protocol message: written
once, read back memory-mapped, never pickled through the socket.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["Part", "load_parts", "save_parts"]


@dataclass(frozen=True)
class Part:
    """One EXR part: its channel names and its pixels, (height, width, channels) float32,
    top row first (as EXR stores them)."""

    channels: tuple[str, ...]
    pixels: np.ndarray
    stored: str = "float"  # how the file held it: "float" or "half" (read as float32)

    @property
    def size(self) -> tuple[int, int]:
        return self.pixels.shape[1], self.pixels.shape[0]


def save_parts(parts: dict[str, Part], folder: str) -> list[dict[str, Any]]:
    """Write each part to ``folder`` (``0.npy``, ``1.npy``, ...); return the listing that
    ``load_parts`` reads them back with, in order."""
    os.makedirs(folder, exist_ok=True)
    listing = []
    for index, (name, part) in enumerate(parts.items()):
        path = os.path.join(folder, f"{index}.npy")
        np.save(path, np.ascontiguousarray(part.pixels, dtype=np.float32))
        listing.append({"name": name, "channels": list(part.channels), "stored": part.stored,
                        "file": f"{index}.npy"})  # fmt: skip
    return listing


def load_parts(folder: str, listing: list[dict[str, Any]], copy: bool = True) -> dict[str, Part]:
    """The parts ``save_parts`` wrote to ``folder``. ``copy`` False maps the files instead
    of reading them (the caller keeps the folder while it uses the pixels)."""
    parts = {}
    for entry in listing:
        pixels = np.load(os.path.join(folder, entry["file"]), mmap_mode=None if copy else "r")
        parts[entry["name"]] = Part(tuple(entry["channels"]), pixels, entry["stored"])
    return parts

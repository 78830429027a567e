"""Sample slices: how a frame's samples split into subsets that render apart, and how
each pass of the parts merges back into the frame one render gives (numpy only).

Cycles renders a subset of a frame's samples exactly as the whole render would render
them (``use_sample_subset`` with the total ``samples`` kept, ``sample_offset`` and
``sample_subset_length`` per part): the same sample numbers, so the same random
sequences, light tree choices and seed. What each pass holds after a subset decides how
the parts merge; measured with bpy 5.0 (every pass a 5.0 view layer offers, 2 and 4
parts of 16 samples):

- most passes are the mean of their samples (Combined, light groups, Mist, Normal, UV,
  the colour passes, Emission, Environment, AO, Volume, AOVs, the denoiser's
  Albedo and Normal): their merge is the mean of the parts weighted by their samples
  (max difference from the whole render 2e-7 here);
- Depth, Position, Object Index and Material Index are written at a pixel's first sample
  only (the surface the camera ray hit): a part that does not start at sample 0 holds
  none of them (Depth 1e10, the rest 0), so the merge takes them from the part that
  starts at 0 (bit-identical);
- the light passes Cycles divides by their colour (Diffuse, Glossy and Transmission
  Direct and Indirect: light / colour, summed over samples) merge as
  sum(value x colour x samples) / sum(colour x samples) (max difference 6e-7); a part
  renders with the colour pass on for this even when the scene has it off, and that
  helper part (named with ``HELPER``) is dropped once merged;
- Vector (motion) is divided by the samples whose camera ray hit a surface, a count the
  file does not hold (a slice whose samples all missed the surface at a pixel reads 0
  there): merged by samples it was off by 18 pixels at a moving edge;
- Cryptomatte (ranked id/coverage pairs: the rank of equal coverages depends on the
  order samples met the ids), Shadow Catcher (a ratio of sums the file does not hold)
  and the debug passes cannot be merged from the parts' images: a sliced frame refuses
  them (``refusal``).
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = [
    "DIVIDED",
    "FIRST_SAMPLE",
    "HELPER",
    "Merge",
    "merge_of",
    "pass_of",
    "refusal",
    "sample_range",
]

#: Passes Cycles writes at a pixel's first sample only.
FIRST_SAMPLE = frozenset({"Depth", "Position", "Object Index", "Material Index"})
#: Light passes Cycles divides by a colour pass, and that pass.
DIVIDED = {
    "Diffuse Direct": "Diffuse Color",
    "Diffuse Indirect": "Diffuse Color",
    "Glossy Direct": "Glossy Color",
    "Glossy Indirect": "Glossy Color",
    "Transmission Direct": "Transmission Color",
    "Transmission Indirect": "Transmission Color",
}
#: The view layer switch of each colour pass a divided light pass needs (bpy names).
COLOUR_SWITCHES = {
    "Diffuse Color": "use_pass_diffuse_color",
    "Glossy Color": "use_pass_glossy_color",
    "Transmission Color": "use_pass_transmission_color",
}
#: The view layer switches of the light passes divided by each colour pass.
LIGHT_SWITCHES = {
    "Diffuse Color": ("use_pass_diffuse_direct", "use_pass_diffuse_indirect"),
    "Glossy Color": ("use_pass_glossy_direct", "use_pass_glossy_indirect"),
    "Transmission Color": ("use_pass_transmission_direct", "use_pass_transmission_indirect"),
}
#: Prefix of a part a slice renders only so that another pass can be merged.
HELPER = "rayfarm-helper:"


def sample_range(total: int, slices: int, index: int) -> tuple[int, int]:
    """(offset, length) of slice ``index`` of ``slices`` of a frame's ``total`` samples:
    consecutive subsets as even as can be, the longer ones first.

    >>> [sample_range(10, 4, i) for i in range(4)]
    [(0, 3), (3, 3), (6, 2), (8, 2)]
    """
    if not 1 <= slices <= total:
        raise ValueError(f"{total} samples cannot be split into {slices} slices")
    if not 0 <= index < slices:
        raise ValueError(f"slice {index} is not one of {slices}")
    base, extra = divmod(total, slices)
    return index * base + min(index, extra), base + (1 if index < extra else 0)


def pass_of(part: str) -> tuple[str, str]:
    """(view layer, pass) of a multi-layer EXR part name (``"ViewLayer.Depth"``); a view
    layer's name may hold dots, a pass's does not."""
    layer, _, name = part.removeprefix(HELPER).rpartition(".")
    return layer, name


def refusal(name: str) -> str | None:
    """Why pass ``name`` cannot be merged from sample slices, or None when it can."""
    if name.startswith("Crypto"):
        return (
            "Cryptomatte ranks ids by coverage, and the rank of equal coverages depends on "
            "the order the samples met them"
        )
    if name == "Vector":
        return (
            "Cycles divides it by the samples whose camera ray hit a surface, a count the "
            "parts' images do not hold"
        )
    if name == "Shadow Catcher":
        return "the shadow catcher pass is a ratio of sums the parts' images do not hold"
    if name.startswith("Debug"):
        return "debug passes count what one render did"
    return None


class Merge:
    """How one pass merges from slices: ``kind`` ``"mean"``, ``"first"`` or
    ``"divided"`` (by the part ``colour``)."""

    __slots__ = ("colour", "kind")

    def __init__(self, kind: str, colour: str | None = None) -> None:
        self.kind = kind
        self.colour = colour


def merge_of(part: str) -> Merge:
    """How the part named ``part`` merges (see the module's docstring)."""
    layer, name = pass_of(part)
    if name in FIRST_SAMPLE:
        return Merge("first")
    colour = DIVIDED.get(name)
    if colour is not None:
        return Merge("divided", f"{layer}.{colour}")
    return Merge("mean")


def colour_part(parts: dict[str, Any], name: str) -> Any:
    """The colour part ``name`` among ``parts``: the scene's own, or the helper a slice
    rendered for it."""
    found = parts.get(name)
    return found if found is not None else parts.get(HELPER + name)


def divide_even(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    """numerator / denominator per channel as Cycles divides a light pass by its colour
    (``safe_divide_even_color``): 0 where the colour is 0, then, for an RGB pixel, a
    channel whose colour is 0 takes the mean of the others' results (so a pure red
    surface's light still reads grey)."""
    zero = denominator == 0
    out = np.where(zero, 0, numerator / np.where(zero, 1, denominator)).astype(np.float32)
    if out.shape[-1] != 3:
        return out
    x, y, z = (out[..., i].copy() for i in range(3))
    zx, zy, zz = (zero[..., i] for i in range(3))
    # Cycles' branches, in its order: the first matching one applies.
    rx, ry, rz = x.copy(), y.copy(), z.copy()
    c = zx & zy
    rx[c], ry[c] = z[c], z[c]
    c2 = zx & ~zy & zz
    rx[c2], rz[c2] = y[c2], y[c2]
    c3 = zx & ~zy & ~zz
    rx[c3] = 0.5 * (y[c3] + z[c3])
    c4 = ~zx & zy & zz
    ry[c4], rz[c4] = x[c4], x[c4]
    c5 = ~zx & zy & ~zz
    ry[c5] = 0.5 * (x[c5] + z[c5])
    c6 = ~zx & ~zy & zz
    rz[c6] = 0.5 * (x[c6] + y[c6])
    return np.stack([rx, ry, rz], axis=-1)

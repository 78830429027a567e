"""Setting a scene up to render one sample slice of a frame (bpy objects as arguments,
no bpy import): which samples, and what exactness asks of the render (see
``samples`` for how the slices merge).

- The sample subset switch on, with the scene's total samples kept and this slice's
  offset and length: each slice renders the very samples (sample numbers, so random
  sequences, light tree choices, seed) the whole render would.
- Adaptive sampling off: it chooses a pixel's next samples from the ones before, which
  other slices render. The frame then renders all its samples, and the job says so
  once (a warning event) rather than refusing a scene an artist made for one machine.
- The colour pass of each divided light pass on, as a helper part dropped after the
  merge.
- A pass no merge can give back (Vector, Cryptomatte, Shadow Catcher, debug passes) fails the
  job at once, naming the pass and its view layer.

``Session._prepare`` sets every one of these back from the scene's own values before
the next task.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .blender import SUBSET, assign
from .errors import FATAL, RenderError
from .parts import Part
from .samples import COLOUR_SWITCHES, HELPER, LIGHT_SWITCHES, pass_of, refusal, sample_range

__all__ = ["Slice", "set_slice"]

#: The view layer switches of the passes a sliced frame refuses, by the pass they make
#: (``(holder, switch)``: holder "" is the view layer, "cycles" its Cycles settings); one
#: a Blender version lacks is skipped.
REFUSED_SWITCHES = {
    "CryptoObject": ("", "use_pass_cryptomatte_object"),
    "CryptoMaterial": ("", "use_pass_cryptomatte_material"),
    "CryptoAsset": ("", "use_pass_cryptomatte_asset"),
    "Vector": ("", "use_pass_vector"),
    "Shadow Catcher": ("cycles", "use_pass_shadow_catcher"),
    "Debug Sample Count": ("cycles", "pass_debug_sample_count"),
}


@dataclass(frozen=True)
class Slice:
    """A slice the scene is set up for: ``samples`` (offset, length, total), warnings
    for the job (``notes``), and the ``helpers`` it renders for the merge alone."""

    samples: tuple[int, int, int]
    notes: tuple[str, ...] = ()
    helpers: tuple[str, ...] = ()

    def mark(self, parts: dict[str, Part]) -> dict[str, Part]:
        """The slice's rendered parts, its helpers renamed as such (``HELPER``). A pass
        no merge gives back that the switches did not catch fails the job here."""
        for name in parts:
            layer, pass_name = pass_of(name)
            why = refusal(pass_name)
            if why is not None:
                raise _refused(layer, pass_name, why)
        return {(HELPER + n if n in self.helpers else n): part for n, part in parts.items()}


def set_slice(scene: Any, index: int, slices: int, version: tuple[int, ...]) -> Slice | None:
    """Set ``scene`` (its samples, as the task wants them, already set) to render slice
    ``index`` of ``slices``; None, and nothing changed, for a frame that is not sliced.
    ``version``: the running Blender's (``bpy.app.version``), for its refusal."""
    if slices <= 1:
        return None
    cycles = scene.cycles
    if not all(hasattr(cycles, name) for name in SUBSET):
        raise RenderError(
            f"Blender {'.'.join(map(str, version[:2]))} cannot render a subset of a frame's "
            "samples: render the job without slices",
            {FATAL: True},
        )
    total = int(cycles.samples)
    try:
        offset, length = sample_range(total, slices, index)
    except ValueError:
        raise RenderError(
            f"the frame has {total} samples: it cannot be split into {slices} slices (at "
            "most one slice per sample)",
            {FATAL: True, "samples": total, "slices": slices},
        ) from None
    layers = [v for v in scene.view_layers if v.use]
    for layer in layers:
        for name, (holder, switch) in REFUSED_SWITCHES.items():
            target = getattr(layer, holder) if holder else layer
            if getattr(target, switch, False) is True:
                raise _refused(layer.name, name, refusal(name) or "")
    notes = []
    if cycles.use_adaptive_sampling:
        assign(cycles, "use_adaptive_sampling", False)
        notes.append(
            "adaptive sampling is off for this job's sliced frames (it chooses a pixel's "
            f"samples from the ones before, which other slices render): every pixel "
            f"renders all {total} samples"
        )
    assign(cycles, "use_sample_subset", True)
    assign(cycles, "sample_offset", offset)
    assign(cycles, "sample_subset_length", length)
    helpers = []
    for layer in layers:
        for colour, switch in COLOUR_SWITCHES.items():
            lights = any(getattr(layer, s) for s in LIGHT_SWITCHES[colour])
            if lights and not getattr(layer, switch):
                assign(layer, switch, True)
                helpers.append(f"{layer.name}.{colour}")
    return Slice((offset, length, total), tuple(notes), tuple(helpers))


def _refused(layer: str, name: str, why: str) -> RenderError:
    return RenderError(
        f"view layer {layer!r} has the {name} pass on, which cannot be merged from sample "
        f"slices ({why}): render the job without slices, or turn the pass off",
        {FATAL: True, "pass": name, "view_layer": layer},
    )

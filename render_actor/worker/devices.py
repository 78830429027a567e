"""Which Cycles devices a RenderActor renders on: the best GPU backend on its node
(OptiX, then CUDA, then HIP, then oneAPI), only the GPUs Ray assigned it, and a
check that Cycles really has them active before the actor claims a GPU render
(Cycles silently renders on the CPU when no enabled device works).

The choice is a pure function of what Cycles lists, so it is tested against
listings shaped as bpy reports them; ``select`` applies it to bpy's preferences.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["BACKENDS", "Choice", "Device", "choose", "listing", "select"]

#: Cycles' GPU backends, best first.
BACKENDS = ("OPTIX", "CUDA", "HIP", "ONEAPI")


@dataclass(frozen=True)
class Device:
    """One entry of Cycles' device list (``preferences.addons["cycles"].preferences.devices``):
    ``type`` is the backend (or ``CPU``), ``id`` Cycles' own id (it holds the PCI bus)."""

    type: str
    name: str
    id: str


@dataclass(frozen=True)
class Choice:
    """What to render on: a backend and its devices, or the CPU (``backend`` None) and
    why."""

    backend: str | None
    devices: tuple[Device, ...] = ()
    reason: str = ""

    @property
    def label(self) -> str:
        """How the farm names it in events: ``GPU (OPTIX: NVIDIA L4)`` or ``CPU``."""
        if self.backend is None:
            return "CPU" + (f" ({self.reason})" if self.reason else "")
        return f"GPU ({self.backend}: {', '.join(d.name for d in self.devices)})"


def choose(listed: Mapping[str, Sequence[Device]], gpu_ids: Sequence[int | str]) -> Choice:
    """The devices for an actor Ray assigned ``gpu_ids``, given ``listed``: for each
    backend, the devices Cycles lists with that backend selected (CPU entries and all).

    Ray hides the GPUs it did not assign (``CUDA_VISIBLE_DEVICES`` and kin), so Cycles
    normally lists exactly ours; where it lists more (visibility not restricted), the
    assigned ordinals pick them.
    """
    if not gpu_ids:
        return Choice(None)
    for backend in BACKENDS:
        gpus = [d for d in listed.get(backend, ()) if d.type == backend]
        if not gpus:
            continue
        if len(gpus) > len(gpu_ids):
            ordinals = [int(i) for i in gpu_ids if str(i).isdigit() and int(i) < len(gpus)]
            gpus = [gpus[i] for i in ordinals] or gpus[: len(gpu_ids)]
        return Choice(backend, tuple(gpus))
    return Choice(None, (), "no usable GPU backend on this node")


def listing(prefs: Any) -> dict[str, list[Device]]:
    """What Cycles lists under each backend this build knows (bpy's preferences)."""
    found: dict[str, list[Device]] = {}
    for backend in BACKENDS:
        try:
            prefs.compute_device_type = backend
        except TypeError:  # a backend this build of Cycles does not have
            continue
        prefs.refresh_devices()
        found[backend] = [Device(d.type, d.name, d.id) for d in prefs.devices]
    return found


def select(prefs: Any, gpu_ids: Sequence[int | str]) -> Choice:
    """Choose, enable exactly the chosen devices (the CPU off: it would compete with the
    other actors on the node), and verify Cycles has them active; a GPU that does not
    come up falls back to the CPU, saying why."""
    choice = choose(listing(prefs) if gpu_ids else {}, gpu_ids)
    if choice.backend is None:
        try:
            prefs.compute_device_type = "NONE"
        except TypeError:
            pass
        return choice
    prefs.compute_device_type = choice.backend
    prefs.refresh_devices()
    wanted = {d.id for d in choice.devices}
    for d in prefs.devices:
        d.use = d.id in wanted
    active = {d.id for d in prefs.devices if d.use}
    if active != wanted or not prefs.has_active_device():
        prefs.compute_device_type = "NONE"
        return Choice(None, (), f"{choice.label} did not become active in Cycles")
    return choice

"""The dispatcher's render actors, kept in step with the cluster.

One RenderActor per GPU (``num_gpus=1``, or a fraction of one with
``gpu_share``), placed by Ray across nodes; on a cluster without GPUs,
``cpu_actors`` CPU actors. Each starts warm with one of the offered Blender
versions (in turn), and runs whichever version its tasks need from then on (the
dispatcher prefers an actor already running a task's version). ``reconcile`` runs
every dispatcher round: a node that joins (autoscaled or added by hand) gets actors
for its GPUs without a restart. An
actor that dies is replaced where it was; one whose node left the cluster is
dropped (its task goes back to the queue without counting as a failed attempt),
and the pool shrinks with the cluster.

On an autoscaled farm (``max_render_nodes``) the render nodes are GPU nodes that come
and go: the pool makes GPU actors only (never CPU actors waiting for a node that is not
there), no more than the farm's demand wants (``reconcile(want)``), and ``release``
lets go of actors idle for ``actor_idle_s`` beyond that want, so that a node whose
actors are gone holds nothing and Ray's autoscaler can remove it.
"""

from __future__ import annotations

import importlib
import logging
from typing import Any

import ray
from ray.exceptions import RayActorError

from rayfarm.cluster.runs import Slot
from rayfarm.cluster.settings import Settings
from rayfarm.render.actor import CONTROL

__all__ = ["Pool", "actor_died"]

log = logging.getLogger("rayfarm.pool")

#: What Ray says when an actor died with its node.
_NODE_DIED = "its node has died"


def actor_died(exc: BaseException, slot: Slot) -> bool:
    """Whether ``exc`` says ``slot``'s render actor died (not the assembler, say)."""
    if not isinstance(exc, RayActorError):
        return False
    return exc.actor_id in (None, slot.handle._actor_id.hex())


class Pool:
    """The render actors (``slots``) and the rules that create, replace and drop them."""

    def __init__(self, settings: Settings, reporter: Any = None) -> None:
        self.settings = settings
        self.reporter = reporter  # receives the actors' progress (the dispatcher)
        self.slots: list[Slot] = []
        self._next_index = 0
        #: As the last ``reconcile`` saw the cluster (one GCS call a round, not more):
        #: the actors it holds (``capacity``) and their kind of slot, ``gpu`` or ``cpu``.
        self.seen_capacity = 0
        self.seen_kind = "gpu" if settings.autoscaling else "cpu"

    @property
    def is_gpu(self) -> bool:
        """Whether the pool makes GPU actors: on an autoscaled farm always (its render
        nodes are GPU nodes, none may be up yet), else when the cluster has a GPU."""
        return self.settings.autoscaling or bool(ray.cluster_resources().get("GPU", 0))

    def capacity(self, resources: dict[str, float] | None = None) -> int:
        """How many actors the cluster (its ``resources``, fetched if not given) holds
        now: one per GPU share, else the CPU actors the farm is configured for (an
        autoscaled farm: GPU shares only, 0 with no GPU node up)."""
        resources = ray.cluster_resources() if resources is None else resources
        gpus = float(resources.get("GPU", 0))
        if gpus or self.settings.autoscaling:
            return int(gpus / self.settings.gpu_share + 1e-9)
        return max(1, self.settings.cpu_actors)

    def reconcile(self, want: int | None = None) -> list[Slot]:
        """Create actors for capacity the pool does not use yet (new nodes), up to
        ``want`` actors when given (an autoscaled farm's demand); return the new slots.
        Slots are not removed here: an actor of a lost node is dropped when its death
        is seen (``lost``), an idle one released by ``release``."""
        added = []
        resources = ray.cluster_resources()
        gpu = self.settings.autoscaling or bool(resources.get("GPU", 0))
        kind = self.seen_kind = "gpu" if gpu else "cpu"
        self.seen_capacity = self.capacity(resources)
        target = self.seen_capacity if want is None else min(self.seen_capacity, want)
        for _ in range(target - len(self.slots)):
            index = self._next_index
            version = self.settings.blender[index % len(self.settings.blender)]
            slot = Slot(index, self._new_actor(index, version), blender=version, kind=kind)
            self._next_index += 1
            self.slots.append(slot)
            added.append(slot)
        if added and len(self.slots) > len(added):
            log.warning("render pool grew to %d actors (the cluster grew)", len(self.slots))
        return added

    def _new_actor(self, index: int, blender: str | None) -> Any:
        """One RenderActor, its worker warming up with Blender ``blender``: a GPU (share)
        where the cluster has GPUs, else CPU slot ``index`` of the node, pinned to its
        share of the node's cores."""
        module, _, name = self.settings.actor_class.partition(":")
        # ``interrupt`` runs beside a render that blocks the actor's default group.
        remote = ray.remote(concurrency_groups={CONTROL: 1})(  # type: ignore[call-overload]
            getattr(importlib.import_module(module), name)
        )
        if self.is_gpu:
            return remote.options(num_gpus=self.settings.gpu_share, num_cpus=0).remote(
                reporter=self.reporter, blender=blender
            )
        n = max(1, self.settings.cpu_actors)
        return remote.options(num_cpus=1).remote(
            self.settings.actor_threads, index % n, n, self.reporter, blender=blender
        )

    def release(self, want: int, now: float) -> list[Slot]:
        """Kill the actors beyond ``want`` that have been idle for ``actor_idle_s``
        (their GPUs freed: a node without actors goes idle, and the autoscaler removes
        it after its idle timeout); return their slots, dropped from the pool. Actors on
        the nodes with the fewest busy actors go first, so that whole nodes empty."""
        surplus = len(self.slots) - max(0, want)
        idle_s = self.settings.actor_idle_s
        idle = [s for s in self.slots
                if not s.busy and s.killed is None and now - s.idle_at >= idle_s]  # fmt: skip
        if surplus <= 0 or not idle:
            return []
        busy: dict[str | None, int] = {}
        for slot in self.slots:
            busy[slot.node] = busy.get(slot.node, 0) + slot.busy
        idle.sort(key=lambda s: (busy.get(s.node, 0), s.node or "", -s.index))
        released = idle[:surplus]
        for slot in released:
            log.info("render actor %d on %s idle for %g s: released", slot.index,
                     slot.host or "a node", idle_s)  # fmt: skip
            ray.kill(slot.handle, no_restart=True)
            self.slots.remove(slot)
        return released

    def replace(self, slot: Slot) -> None:
        """A new actor in ``slot`` (the old one is killed if it still lives), warming up
        the Blender version the old one ran."""
        ray.kill(slot.handle, no_restart=True)
        slot.handle = self._new_actor(slot.index, slot.blender)
        slot.holds = slot.node = slot.host = slot.device = slot.killed = None
        slot.pid = None

    def lost(self, slot: Slot, exc: BaseException) -> bool:
        """``slot``'s actor died: drop the slot when its node left the cluster (True),
        else replace the actor (False)."""
        message = str(getattr(exc, "error_msg", "") or exc)
        if _NODE_DIED in message or (slot.node and not _node_alive(slot.node)):
            log.warning("render actor %d left with its node %s", slot.index, slot.host)
            if slot in self.slots:
                self.slots.remove(slot)
            return True
        log.warning("render actor %d died; replacing it", slot.index)
        self.replace(slot)
        return False


def _node_alive(node_id: str) -> bool:
    return any(n["NodeID"] == node_id and n["Alive"] for n in ray.nodes())

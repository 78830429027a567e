"""Finishing tiled frames: a render actor pinned to its share of the node's cores
finishes frames (denoise, compositor, format) in a worker that may use every core,
and the frame still equals bpy's own full-frame render.

The actor runs in this process, as ``bench/tile_sweep.py`` runs one, without Ray: it
pins the thread that creates it, so the test gives this process its cores back."""

from __future__ import annotations

import os

import numpy as np
import pytest

from rayfarm.render.actor import RenderActor
from rayfarm.render.assembler import TileAssembler
from rayfarm.render.inputs import Inputs
from rayfarm.render.tasks import RenderTask

from helpers.blender import TEST_BLENDER, pixels, render_reference, stored_scene


def _task(inputs: Inputs, tile: int, grid: tuple[int, int]) -> RenderTask:
    return RenderTask(
        "job", inputs.digest, 1, tile, grid, None, None, None, None, "png", 8,
        blender=TEST_BLENDER,
    )  # fmt: skip


def _allowed(pid: int) -> set[frozenset[int]]:
    """The cores each thread of process ``pid`` may run on (one set per distinct mask)."""
    masks = set()
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            masks.add(frozenset(os.sched_getaffinity(int(tid))))
        except OSError:
            pass  # the thread ended meanwhile
    return masks


@pytest.mark.slow
def test_a_pinned_actor_finishes_tiled_frames_on_every_core(make_scene, tmp_path):
    node = sorted(os.sched_getaffinity(0))
    if len(node) < 2:
        pytest.skip("an actor pinned to a share of the cores needs two cores or more")
    scene = make_scene("--width", "64", "--height", "48", "--samples", "4")
    inputs = stored_scene(scene, tmp_path / "storage")
    actor = RenderActor(slot=0, slots=2)  # the first of two actors: half the cores
    try:
        assert actor.workers.narrow and actor.workers.node_cores == node
        assert len(actor.cores) < len(node)
        assembler = TileAssembler()
        for tile in range(2):
            result, parts = actor.render(_task(inputs, tile, (2, 1)), inputs)
            assert {"start_s", "inputs_s", "open_s", "render_s", "write_s"} <= set(result.steps)
            assert result.rect is not None and result.size is not None
            assembler.add("job", 1, 2, result.size, result.rect, parts)
        frame = assembler.take("job", 1)
        result, image = actor.finish(_task(inputs, 0, (2, 1)), inputs, frame)

        info = actor.info()
        finisher = info["finisher"]
        assert finisher is not None
        assert finisher["cores"] == node and finisher["threads"] == len(node)
        assert result.worker == finisher["pid"] != info["worker_pid"]
        # Every thread of the finisher may use every core; the render worker's stay on
        # the actor's share.
        assert _allowed(finisher["pid"]) == {frozenset(node)}
        assert _allowed(info["worker_pid"]) == {frozenset(actor.cores)}
        steps = {"join_s", "handoff_s", "open_s", "denoise_s", "composite_s", "write_s"}
        assert steps <= set(result.steps)
        assert result.steps["join_s"] == round(frame.join_s, 3)

        got = tmp_path / "got.png"
        got.write_bytes(image)
        want = render_reference(scene, tmp_path / "ref", [1])[1]
        assert np.array_equal(pixels(got), pixels(want))

        # Whole frames again: the finisher (and the scene it holds) goes.
        actor.render(_task(inputs, 0, (1, 1)), inputs)
        assert actor.info()["finisher"] is None
        assert not os.path.exists(f"/proc/{finisher['pid']}/status") or _zombie(finisher["pid"])
    finally:
        actor.__del__()
        os.sched_setaffinity(0, node)


def _zombie(pid: int) -> bool:
    with open(f"/proc/{pid}/status") as f:
        return any(line.startswith("State:") and "Z" in line for line in f)

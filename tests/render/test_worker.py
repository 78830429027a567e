"""The render actor's Blender worker, without Ray: the actor in this process, its worker a
real child process of a Blender environment."""

from __future__ import annotations

import socket
import time

import pytest

from rayfarm.errors import WorkerLost
from rayfarm.render.actor import RenderActor
from rayfarm.render.worker import protocol

from helpers.blender import TEST_BLENDER


@pytest.mark.slow
def test_info_waits_for_the_workers_warm_up():
    """The actor's first ``info`` (the dispatcher's, before a slot's first task) names the
    device its worker chose, even when the warm-up is already starting the worker (it
    once answered "" then, and every event of the slot said no device)."""
    actor = RenderActor(threads=1, blender=TEST_BLENDER)
    try:
        time.sleep(0.05)  # the warm-up is inside the worker's start now (it takes ~0.7 s)
        info = actor.info()
        assert info["device"] == "CPU" and info["blender"].startswith(f"{TEST_BLENDER}.")
        assert info["worker_pid"] and info["worker_pid"] != info["pid"]
    finally:
        actor.workers.close()


@pytest.mark.slow
def test_a_stopped_worker_says_why_and_the_next_task_gets_a_new_one():
    actor = RenderActor(threads=1, blender=TEST_BLENDER)
    try:
        first = actor.info()["worker_pid"]
        assert actor.interrupt("the job was cancelled") is True
        worker = actor.workers.latest()
        assert worker is not None
        with pytest.raises(WorkerLost, match="the job was cancelled"):
            worker.call("catalogue", scene={"key": "x", "path": "/nonexistent.blend"})
        assert actor.workers.worker(TEST_BLENDER).pid != first
    finally:
        actor.workers.close()


@pytest.mark.slow
def test_messages_are_framed_json_and_a_closed_peer_is_an_error():
    a, b = socket.socketpair()
    protocol.send(a, {"kind": "stats", "line": "Sample 1/4 é"})
    assert protocol.receive(b) == {"kind": "stats", "line": "Sample 1/4 é"}
    a.sendall(b"\x00\x00\x00\x02[]")
    with pytest.raises(protocol.ProtocolError, match="JSON object"):
        protocol.receive(b)
    a.close()
    with pytest.raises(protocol.ProtocolError, match="closed"):
        protocol.receive(b)
    b.close()

"""A full stop and restart of `rayfarm up` on the same data dir loses nothing:
Redis comes back from its AOF and the frames are still served from storage."""

from __future__ import annotations

import numpy as np
import pytest

from rayfarm import Farm, JobState

from conftest import pixels, run_farm

pytestmark = pytest.mark.slow


def test_jobs_and_frames_survive_a_farm_restart(tmp_path, farm_env, small_scene):
    data_dir = tmp_path / "farm"
    env = {**farm_env, "RAYFARM_CPU_ACTORS": "1"}
    for farm in run_farm(data_dir, env):
        with Farm(farm.url) as client:
            done = client.submit(small_scene, frames="1-2")
            assert done.wait(timeout=300).state is JobState.COMPLETED
            cancelled = client.submit(small_scene, frames="1-5000", priority=0)
            cancelled.cancel()
            before = done.download(tmp_path / "before")
    assert (data_dir / "redis" / "appendonlydir").is_dir()

    for farm in run_farm(data_dir, env):
        with Farm(farm.url) as client:
            again = client.job(done.id)
            assert again.state is JobState.COMPLETED and again.frames_done == 2
            assert client.job(cancelled.id).state is JobState.CANCELLED
            assert {j.id for j in client.jobs()} == {done.id, cancelled.id}
            after = again.download(tmp_path / "after")
            for a, b in zip(before, after, strict=True):
                assert np.array_equal(pixels(a), pixels(b))
            # The restarted farm renders too.
            assert client.submit(small_scene, frames="3").wait(300).state is JobState.COMPLETED

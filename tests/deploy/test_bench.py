"""The benchmarks still run: each bench script end to end with tiny sizes (its own
local farm, as the bench starts one), so that a change cannot break one silently. No
figure is judged here (the machine running the tests is no place for that): only that
the script runs, exits 0 and reports what it measures."""

from __future__ import annotations

import json
import subprocess

import pytest

from helpers import PYTHON, ROOT

pytestmark = pytest.mark.slow

BENCH = ROOT / "bench"
#: Most a tiny bench run may take on a slow shared machine.
BENCH_TIMEOUT_S = 900


def _bench(script: str, *args: str) -> str:
    """Run ``bench/<script>`` with ``args``; its output, once it exited 0."""
    run = subprocess.run(
        [PYTHON, str(BENCH / script), *args],
        capture_output=True, text=True, timeout=BENCH_TIMEOUT_S,
    )  # fmt: skip
    assert run.returncode == 0, (
        f"{script} exited {run.returncode}:\n{run.stdout[-4000:]}\n" + (run.stderr[-4000:])
    )
    return run.stdout


def test_the_tiles_bench_runs_and_reports_the_join_and_the_finish(tmp_path):
    out = _bench(
        "tiles.py", "--width", "64", "--height", "48", "--samples", "1", "--sweep",
        "--sweep-grids", "2x2", "--out", str(tmp_path), "--json", str(tmp_path / "tiles.json"),
    )  # fmt: skip
    assert "way | grid | wall s | speedup | tiles render s | join s | join share" in out
    assert "joining 2x2 tiles:" in out and "sweep 2x2:" in out
    result = json.loads((tmp_path / "tiles.json").read_text())
    ways = {row["way"]: row for row in result["ways"]}
    assert list(ways) == ["whole", "2x2", "auto"]
    tiled = ways["2x2"]
    # The tiled frame's own steps came from its events: joined, then finished.
    assert tiled["render_s"] > 0 and tiled["join_s"] > 0 and tiled["finish_s"] > 0
    assert 0 < tiled["join_share"] < 1 and 0 < tiled["finish_share"] < 1
    assert ways["whole"]["join_s"] == ways["whole"]["finish_s"] == 0
    assert [row["grid"] for row in result["sweep"]] == ["2x2"]


def test_the_overhead_bench_runs_and_reports_each_step(tmp_path):
    out = _bench(
        "overhead.py", "--scenes", "light", "--frames", "2", "--out", str(tmp_path),
        "--json", str(tmp_path / "overhead.json"),
    )  # fmt: skip
    assert "(c)/(a), median of 1:" in out and "steps: submit = pack" in out
    light = json.loads((tmp_path / "overhead.json").read_text())["scenes"]["light"]
    steps = light["breakdown"]["c"]["steps"]
    assert steps["tasks"] == 2
    assert steps["render_s"] > 0 and steps["store_s"] > 0 and steps["hash_s"] > 0
    assert steps["catalogue_s"] > 0  # a new scene: catalogued beside its job
    cpu = light["breakdown"]["c"]["cpu"]
    assert "blender worker" not in cpu["farm_by_process"]  # counted with the render actor
    assert light["pixels_differ_from_a"] == {"(b)": [], "(c)": []}


def test_the_cpu_bench_runs_and_reports_each_role(tmp_path):
    out = _bench(
        "cpu.py", "--tiny", "--frames", "1", "--idle", "2", "--settle", "0",
        "--out", str(tmp_path), "--json", str(tmp_path / "cpu.json"),
    )  # fmt: skip
    assert "| role | shipped idle | shipped job |" in out and "| farm, per second |" in out
    shipped = json.loads((tmp_path / "cpu.json").read_text())["variants"]["shipped"]
    idle, job = shipped["idle"], shipped["job"]
    assert {"dispatcher", "render actor", "raylet", "serve controller"} <= set(idle["by_role"])
    assert idle["farm_cpu_s"] > 0 and idle["seconds"] >= 2
    # The render has a row of its own and is not counted as the farm's.
    render = job["by_role"]["render worker (Blender)"]
    assert render > 0
    others = sum(job["by_role"].values()) - render
    assert job["farm_cpu_s"] == pytest.approx(others, abs=0.05)  # each role rounded to 0.01

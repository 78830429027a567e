"""examples/notebook.ipynb: committed without outputs, and run top to bottom, as a TD would
run it, against the session's local farm in a kernel on this interpreter (the venv's)."""

from __future__ import annotations

import base64
import io
import json
import os
import re
import sys
from pathlib import Path
from typing import Any

import nbformat
import pytest
from nbclient import NotebookClient
from nbformat import NotebookNode
from PIL import Image

from rayfarm import Farm, JobState

from helpers import ADMIN_TOKEN, ROOT
from helpers.farms import LocalFarm

NOTEBOOK = ROOT / "examples" / "notebook.ipynb"
#: Longest one cell may run (the first job on a fresh farm waits for its actors).
CELL_TIMEOUT_S = 600
KERNEL = "rayfarm-venv"
WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"
WIDGET_STATE = "application/vnd.jupyter.widget-state+json"
#: Put first in the executed copy: where the kernel runs, for the test to check.
PROBE = "import json, os, sys\nprint(json.dumps([sys.executable, sys.prefix, os.getcwd()]))"


def test_committed_notebook_has_no_outputs() -> None:
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code, "the notebook has no code cells"
    dirty = [c.get("id") for c in code if c.outputs or c.execution_count is not None]
    assert not dirty, f"cells with outputs or execution counts (strip them): {dirty}"
    assert "widgets" not in nb.metadata, "saved widget state: strip it"


def _install_kernel(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Make KERNEL a kernel spec that starts ipykernel on this interpreter, found first
    (JUPYTER_PATH), so the notebook runs in the venv whatever kernels the machine has."""
    spec = tmp_path / "jupyter" / "kernels" / KERNEL
    spec.mkdir(parents=True)
    argv = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
    kernel = {"argv": argv, "display_name": "rayfarm (venv)", "language": "python"}
    (spec / "kernel.json").write_text(json.dumps(kernel))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))


def _text(cell: NotebookNode, name: str = "stdout") -> str:
    return "".join(o.text for o in cell.outputs if o.output_type == "stream" and o.name == name)


def _widget_bars(nb: NotebookNode, cell: NotebookNode) -> list[dict[str, Any]]:
    """The state of each tqdm progress bar (a FloatProgress inside an HBox) the cell shows,
    as the executed notebook saved it."""
    state = nb.metadata["widgets"][WIDGET_STATE]["state"]
    bars = []
    for out in cell.outputs:
        if out.output_type == "display_data" and WIDGET_VIEW in out.data:
            box = state[out.data[WIDGET_VIEW]["model_id"]]["state"]
            for child in box["children"]:
                model = state[child.removeprefix("IPY_MODEL_")]
                if model["model_name"] == "FloatProgressModel":
                    bars.append(model["state"])
    return bars


def _job_id(pattern: str, text: str) -> str:
    match = re.search(pattern, text)
    assert match, f"{pattern!r} not in:\n{text}"
    return match[1]


def _execute(local_farm: LocalFarm) -> NotebookNode:
    """The notebook run top to bottom in the repository root, connected to the local
    farm through RAYFARM_URL (so it starts no farm of its own)."""
    nb = nbformat.read(NOTEBOOK, as_version=4)
    probe = nbformat.v4.new_code_cell(PROBE)
    probe["id"] = "test-probe"
    nb.cells.insert(0, probe)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAYFARM_", "REDIS_URL"))}
    env["RAYFARM_URL"] = local_farm.url
    env["RAYFARM_TOKEN"] = ADMIN_TOKEN
    client = NotebookClient(
        nb,
        kernel_name=KERNEL,
        timeout=CELL_TIMEOUT_S,
        resources={"metadata": {"path": str(ROOT)}},
    )
    client.execute(env=env)  # raises CellExecutionError naming the cell that failed
    return nb


@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_notebook_runs_top_to_bottom(
    local_farm: LocalFarm, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _install_kernel(tmp_path, monkeypatch)
    executed = _execute(local_farm)
    cells = {c.get("id"): c for c in executed.cells if c.cell_type == "code"}
    assert all(c.execution_count is not None for c in cells.values())
    errors = [i for i, c in cells.items() for o in c.outputs if o.output_type == "error"]
    assert not errors, f"cells that raised: {errors}"
    noisy = {i: _text(c, "stderr") for i, c in cells.items() if _text(c, "stderr")}
    assert not noisy, f"cells that wrote to stderr: {noisy}"

    executable, prefix, cwd = json.loads(_text(cells["test-probe"]))
    assert (executable, prefix) == (sys.executable, sys.prefix)
    assert sys.prefix != sys.base_prefix, "the tests should run in the venv"
    assert Path(cwd) == ROOT

    assert _text(cells["connect"]).startswith(f"{local_farm.url}: ok")

    scene = _text(cells["scene"])
    assert "160x90 100%, CYCLES, 16 samples" in scene
    assert "textures/checker.png" in scene

    with Farm(local_farm.url) as farm:
        # 3. The job rendered, and the progress widget ended full.
        job = farm.job(_job_id(r"job (\w{16}) COMPLETED", _text(cells["submit"])))
        assert (job.state, job.frames_done, job.tiles) == (JobState.COMPLETED, 8, "2x2")
        (bar,) = _widget_bars(executed, cells["submit"])
        assert (bar["value"], bar["max"], bar["bar_style"]) == (8, 8, "success")

        # 4. Frame 1 shown inline, once; a contact sheet of the downloads.
        images = [o for o in cells["show-frame"].outputs if "image/png" in o.get("data", {})]
        assert len(images) == 1, "job.show(1) should display the frame once"
        with Image.open(io.BytesIO(base64.b64decode(images[0].data["image/png"]))) as frame:
            assert frame.size == (160, 90)
        assert "downloaded 8 frame(s)" in _text(cells["download"])
        sheet = [o for o in cells["download"].outputs if o.output_type == "execute_result"]
        assert len(sheet) == 1 and "image/png" in sheet[0].data

        # 5. The per-frame table from the events: a row for each of the 8 frames.
        table = _text(cells["events"])
        assert "32 tasks" in table
        assert len(re.findall(r"^\s*\d+ .+ on \S+ \(actor \d+\)", table, re.MULTILINE)) == 8
        # Blender's own output for the slowest task: its header, and Blender saving the
        # tile it rendered (the slowest is often, not always, the one that opened the scene).
        slowest = re.search(r"slowest (f\d{7}t\d{3})", table)
        assert slowest, table
        log = _text(cells["task-log"])
        assert log.startswith(f"===== {slowest[1]} attempt 1 =====") and "| Saved: '" in log, log

        # 6. Cancelled while rendering; retry refused.
        cancel = _text(cells["cancel"])
        cancelled = farm.job(_job_id(r"(\w{16}) CANCELLED:", cancel))
        assert cancelled.state is JobState.CANCELLED
        assert cancelled.tasks_done < cancelled.tasks_total
        assert "retry refused" in cancel

        # 7. A real failure (EEVEE), retried, failing again the same way; then fixed.
        failed = farm.job(_job_id(r"(\w{16}) FAILED again", _text(cells["retry"])))
        assert failed.state is JobState.FAILED
        assert failed.error and "BLENDER_EEVEE" in failed.error
        assert "FAILED -> PENDING" in _text(cells["retry"])
        assert "the farm queued 8 task(s)" in _text(cells["retry"])
        assert [b["bar_style"] for b in _widget_bars(executed, cells["fail"])] == ["danger"]
        fixed = farm.job(_job_id(r"(\w{16}) COMPLETED", _text(cells["fixed"])))
        assert (fixed.state, fixed.frames_done) == (JobState.COMPLETED, 8)

    # 8. It did not start a farm of its own, and removed its scratch folder.
    cleanup = _text(cells["cleanup"])
    assert "stopped the local farm" not in cleanup
    scratch = Path(cleanup.removeprefix("removed ").strip())
    assert scratch.name.startswith("rayfarm-notebook-") and not scratch.exists()

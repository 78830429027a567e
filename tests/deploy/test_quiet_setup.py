"""`make setup` (and so `make demo` and `make test`) prints progress, not the build
backend's notices: each step is one line, its output kept in a log, shown when the step
fails; pip's own warnings and errors still reach the user."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from helpers import PYTHON, ROOT

QUIETLY = ROOT / "scripts" / "quietly.sh"


def quietly(tmp_path: Path, script: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [QUIETLY, "doing a step", tmp_path / "logs" / "step.log", "bash", "-c", script],
        capture_output=True, text=True, check=False,
    )  # fmt: skip


def test_a_step_that_works_says_one_line_and_pips_own_warnings(tmp_path):
    done = quietly(
        tmp_path,
        "echo '  SetuptoolsDeprecationWarning: a screen of it'; echo 'Collecting x'; "
        "echo 'WARNING: pip says this'; echo 'WARNING: pip says this'; "
        "echo 'ERROR: pip could not resolve y, and went on' >&2",
    )
    log = tmp_path / "logs" / "step.log"
    assert done.returncode == 0
    assert done.stdout.splitlines() == [
        f"rayfarm setup: doing a step (log: {log})",
        "WARNING: pip says this",
        "ERROR: pip could not resolve y, and went on",
    ]
    assert done.stderr == ""
    assert "a screen of it" in log.read_text()  # kept, for whoever looks


def test_a_step_that_fails_shows_its_log_and_exit_status(tmp_path):
    failed = quietly(tmp_path, "seq 1 100; echo 'the reason' >&2; exit 7")
    assert failed.returncode == 7
    lines = failed.stderr.splitlines()
    assert lines[0].startswith("rayfarm setup: failed (doing a step), exit status 7")
    assert lines[1:] == [*map(str, range(62, 101)), "the reason"]  # the log's last 40 lines


@pytest.mark.slow
def test_the_package_builds_without_a_warning(tmp_path):
    """What setuptools says about our configuration (a license table, data folders it
    takes for packages) is fixed where it comes from, not hidden."""
    built = subprocess.run(
        [PYTHON, "-m", "pip", "wheel", "--no-deps", "--verbose", "-w", tmp_path, ROOT],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert built.returncode == 0, built.stdout[-3000:] + built.stderr[-3000:]
    output = built.stdout + built.stderr
    assert "Warning" not in output, output[-5000:]


@pytest.mark.slow
def test_setup_on_a_fresh_checkout_prints_progress_lines_only(tmp_path):
    """A fresh checkout (the working tree's files) set up for real by ``make setup``: pip
    upgrades itself and builds and installs rayfarm with its extras (the build backend is
    what printed screens of notices); the Blender environments are the machine's, already
    built, as for any second checkout. Its new .venv sees this one's packages (a .pth
    file), so pip finds the 1.3 GB of dependencies installed instead of unpacking them
    again (5 minutes on a 2-core machine; CI's own `make test` sets up from nothing)."""
    checkout = tmp_path / "rayfarm"
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT, capture_output=True, check=True,
    ).stdout.decode().split("\0")  # fmt: skip
    for name in filter(None, listed):
        source = ROOT / name
        if source.is_file():
            (checkout / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, checkout / name)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VIRTUAL_ENV", "MAKE"))}
    venv = checkout / ".venv"
    subprocess.run([PYTHON, "-m", "venv", venv], check=True)  # this one's Python
    (site,) = venv.glob("lib/python3.*/site-packages")
    (ours,) = (ROOT / ".venv").glob("lib/python3.*/site-packages")
    (site / "rayfarm-test-deps.pth").write_text(f"{ours}\n")
    try:
        setup = subprocess.run(
            ["make", "setup"], cwd=checkout, capture_output=True, text=True, env=env,
            timeout=1800, check=False,
        )  # fmt: skip
        assert setup.returncode == 0, setup.stdout[-3000:] + setup.stderr[-3000:]
        lines = (setup.stdout + setup.stderr).splitlines()
        steps = [line for line in lines if line.startswith("rayfarm setup: ")]
        assert [s.split(" (log: ")[0] for s in steps] == [
            "rayfarm setup: upgrading pip in .venv",
            "rayfarm setup: installing rayfarm and its extras into .venv, about 1.3 GB with "
            "Ray (minutes the first time)",
        ]
        others = [line for line in lines if line not in steps]
        # The offered Blender versions, one line each; pip's own warnings (this machine's
        # pip configuration, say) may show, never a build backend's.
        assert all(line.startswith(("Blender ", "WARNING: ", "ERROR: ")) for line in others), lines
        assert sum(line.startswith("Blender ") for line in others) == 2, lines
        installed = (checkout / "build" / "setup" / "install.log").read_text()
        assert "Successfully installed" in installed and "rayfarm" in installed, installed[-3000:]
    finally:
        shutil.rmtree(checkout, ignore_errors=True)  # 1.3 GB

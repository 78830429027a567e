"""README.md and docs/ say only what is true of this checkout: every command in them is
parsed by what would run it, the cheap ones are run, the ones that need a farm are run
against the session's local farm, and every relative link lands. How each kind of command
is checked: docs/README.md ("Commands in the docs are tested")."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from rayfarm import Farm

from helpers import ROOT
from helpers.doc_commands import (
    FARM,
    RUN,
    SHELLS,
    Block,
    blocks,
    check,
    check_inline,
    check_python,
    commands,
    doc_files,
    inline_commands,
    links,
    slugs,
)
from helpers.farms import LocalFarm

#: The example job id of the docs, replaced by the id of the job a page submitted.
EXAMPLE_JOB = "3f9c2a1b7d4e8f60"
#: Longest one command of the docs may run.
COMMAND_TIMEOUT_S = 600
README_MAX_LINES = 200

ALL_BLOCKS = [b for path in doc_files() for b in blocks(path)]
SHELL_BLOCKS = [b for b in ALL_BLOCKS if b.lang in SHELLS]
PYTHON_BLOCKS = [b for b in ALL_BLOCKS if b.lang == "python"]
FARM_PAGES = sorted({b.path for b in ALL_BLOCKS if b.mode == FARM})


def ids(items: list[Block]) -> list[str]:
    return [b.where for b in items]


def test_the_readme_is_short():
    assert len((ROOT / "README.md").read_text().splitlines()) <= README_MAX_LINES


def test_every_page_is_in_the_index_and_every_link_lands():
    index = (ROOT / "docs" / "README.md").read_text()
    pages = {p.name for p in (ROOT / "docs").glob("*.md")} - {"README.md"}
    assert {p for p in pages if f"]({p})" not in index} == set()
    broken = []
    for path in doc_files():
        for target, file, anchor in links(path):
            if not file.exists():
                broken.append(f"{path.name}: {target} (no such file)")
            elif anchor and file.suffix == ".md" and anchor not in slugs(file):
                broken.append(f"{path.name}: {target} (no such heading)")
    assert broken == []


@pytest.mark.parametrize("block", SHELL_BLOCKS, ids=ids(SHELL_BLOCKS))
def test_every_command_parses(block):
    found = commands(block)
    assert found, f"{block.where}: a shell block without a command"
    assert [p for command in found for p in check(command)] == []


@pytest.mark.parametrize("path", doc_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_inline_command_names_real_commands_and_options(path):
    problems = [f"{path.name}:{n}: {p}" for n, text in inline_commands(path)
                for p in check_inline(text)]  # fmt: skip
    assert problems == []


@pytest.mark.parametrize("block", PYTHON_BLOCKS, ids=ids(PYTHON_BLOCKS))
def test_every_python_block_compiles_and_names_real_things(block):
    assert check_python(block) == []


def test_every_setting_named_exists():
    """Each RAYFARM_* variable the docs name is read somewhere in the code (those named
    for a Python version, RAYFARM_PYTHON_3_11, are made from the version)."""
    code = "\n".join(
        p.read_text()
        for folder in ("sdk", "cluster", "render_actor", "examples", "tests", "bench")
        for p in (ROOT / folder).rglob("*.py")
    )
    named = {n for path in doc_files() for n in re.findall(r"RAYFARM_[A-Z0-9_]*[A-Z0-9]",
                                                            path.read_text())}  # fmt: skip
    unread = {n for n in named if re.sub(r"_\d+_\d+$", "_", n) not in code and n not in code}
    assert unread == set()


def shell_env(**extra: str) -> dict[str, str]:
    """The environment commands run in: this checkout's .venv first on PATH."""
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"
    return {**os.environ, "PATH": path, **extra}


RUN_BLOCKS = [b for b in SHELL_BLOCKS if b.mode == RUN]


@pytest.mark.parametrize("block", RUN_BLOCKS, ids=ids(RUN_BLOCKS))
def test_the_cheap_commands_run(block, tmp_path):
    for command in commands(block):
        done = subprocess.run(["bash", "-c", command], cwd=tmp_path, env=shell_env(),
                              capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S,
                              check=False)  # fmt: skip
        assert done.returncode == 0, f"{block.where}: {command}\n{done.stdout}{done.stderr}"


class PageSession:
    """A page's blocks run against a farm, in order, in ``folder`` (holding the scene as
    ``shot.blend``); the id of the last job a block submitted stands in for the example's."""

    def __init__(self, farm: LocalFarm, folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        self.farm, self.folder, self.job_id = farm, folder, EXAMPLE_JOB
        self.namespace: dict[str, object] = {"__name__": "__doc__"}
        monkeypatch.chdir(folder)
        monkeypatch.setenv("RAYFARM_URL", farm.url)

    def fill(self, text: str) -> str:
        return (
            text.replace("http://127.0.0.1:8000", self.farm.url)
            .replace("127.0.0.1:8000", self.farm.url.removeprefix("http://"))
            .replace("127.0.0.1:9000", self.farm.grpc_address)
            .replace(EXAMPLE_JOB, self.job_id)
        )

    def run(self, block: Block) -> None:
        if block.lang == "python":
            exec(compile(self.fill(block.text), block.where, "exec"), self.namespace)
            job = self.namespace.get("job")
            self.job_id = getattr(job, "id", self.job_id)
            return
        for command in commands(block):
            command = self.fill(command)
            done = subprocess.run(["bash", "-c", command], cwd=self.folder,
                                  env=shell_env(RAYFARM_URL=self.farm.url), capture_output=True,
                                  text=True, timeout=COMMAND_TIMEOUT_S, check=False)  # fmt: skip
            assert done.returncode == 0, (
                f"{block.where}: {command}\n{done.stdout[-3000:]}{done.stderr[-3000:]}"
            )
            submitted = re.findall(r"^([0-9a-f]{16})\s", done.stdout, re.M)
            if command.startswith("rayfarm submit") and submitted:
                self.job_id = submitted[-1]

    def close(self) -> None:
        """Close the clients the page's Python made (a script's end would)."""
        for value in self.namespace.values():
            if isinstance(value, Farm):
                value.close()


@pytest.mark.slow
@pytest.mark.parametrize("path", FARM_PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_the_farm_examples_run_on_a_local_farm(path, local_farm, small_scene, tmp_path,
                                               monkeypatch):  # fmt: skip
    shutil.copy(small_scene, tmp_path / "shot.blend")
    session = PageSession(local_farm, tmp_path, monkeypatch)
    try:
        for block in blocks(path):
            if block.mode == FARM:
                session.run(block)
    finally:
        session.close()

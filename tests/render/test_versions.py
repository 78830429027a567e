"""Which Blender renders a job (``rayfarm.versions.route``), and the Blender environments
a node builds and finds (``rayfarm.render.environments``)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from rayfarm.errors import BlenderNotOffered, BlenderUnavailable, InvalidSpec, SceneTooNew
from rayfarm.models import parse_spec
from rayfarm.render import environments
from rayfarm.versions import Route, route

from helpers import PYTHON
from helpers.blender import TEST_BLENDER

OFFERED = ("5.3", "5.0")


def test_a_file_renders_with_the_version_that_saved_it():
    assert route((5, 3), None, OFFERED) == Route("5.3")
    assert route((5, 0), None, OFFERED) == Route("5.0")


@pytest.mark.parametrize(
    ("saved", "offered", "chosen"),
    [((4, 5), OFFERED, "5.0"), ((5, 1), OFFERED, "5.3"), ((4, 4), ("4.5", "5.3"), "4.5"),
     ((2, 93), ("5.3", "4.2"), "4.2")],
)  # fmt: skip
def test_else_the_nearest_newer_offered_version_with_a_warning(saved, offered, chosen):
    got = route(saved, None, offered)
    assert got.version == chosen
    assert got.warning is not None
    assert got.warning.startswith(f"saved by Blender {saved[0]}.{saved[1]}, rendering with "
                                  f"Blender {chosen}, the nearest newer version")  # fmt: skip


def test_a_file_newer_than_every_offered_version_is_refused_naming_them():
    with pytest.raises(SceneTooNew) as err:
        route((5, 3), None, ("5.0", "4.5"))
    assert "saved by Blender 5.3" in err.value.message and "(5.0, 4.5)" in err.value.message
    assert err.value.detail == {"file_version": "5.3", "offered": ["5.0", "4.5"]}
    assert err.value.status == 422


def test_an_asked_for_version_wins_when_offered():
    assert route((4, 5), "5.3", OFFERED).version == "5.3"
    older = route((5, 3), "5.0", OFFERED)
    assert older.version == "5.0" and older.warning is not None
    assert "as the job asks" in older.warning and "older Blender" in older.warning
    assert route((5, 0), "5.0", OFFERED) == Route("5.0")


def test_an_asked_for_version_not_offered_is_refused_naming_the_offered_ones():
    with pytest.raises(BlenderNotOffered) as err:
        route((5, 0), "4.2", OFFERED)
    assert "Blender 4.2" in err.value.message and "5.3, 5.0" in err.value.message
    assert err.value.detail["offered"] == ["5.3", "5.0"] and err.value.status == 422


@pytest.mark.parametrize("bad", ["5", "5.3.1", "latest", "5.x", ""])
def test_the_spec_takes_major_minor_only(bad):
    with pytest.raises(InvalidSpec, match="blender"):
        parse_spec({"frames": "1", "blender": bad})
    assert parse_spec({"frames": "1", "blender": "4.5"}).blender == "4.5"


def test_offered_versions_are_parsed_checked_and_ordered():
    assert environments.parse_versions("5.0, 5.3,5.0") == ("5.3", "5.0")
    assert environments.parse_versions(["4.2", "5.1"]) == ("5.1", "4.2")
    with pytest.raises(InvalidSpec, match=r"MAJOR\.MINOR"):
        environments.parse_versions("5.3,five")
    with pytest.raises(Exception, match="no bpy module"):
        environments.parse_versions("3.6")


def test_each_version_line_has_its_python():
    assert [environments.python_for(v) for v in ("4.2", "4.5", "5.0", "5.1", "5.3", "5.9")] == [
        "3.11", "3.11", "3.11", "3.13", "3.13", "3.13"
    ]  # fmt: skip


def test_a_missing_interpreter_is_named_with_how_to_get_it(monkeypatch, tmp_path):
    """No CPython 3.13 anywhere it looks: the error names the version, the setting, and
    the commands that fix it. (PATH and HOME point at empty folders; pyenv is not found.)"""
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("RAYFARM_PYTHON_3_13", raising=False)
    if sys.version_info[:2] == (3, 13):
        pytest.skip("this interpreter is a CPython 3.13 itself")
    if any(Path(p).exists() for p in ("/usr/bin/python3.13", "/usr/local/bin/python3.13")):
        pytest.skip("a system CPython 3.13 is installed")
    with pytest.raises(BlenderUnavailable) as err:
        environments.find_python("3.13")
    message = err.value.message
    assert "CPython 3.13 was not found" in message and "RAYFARM_PYTHON_3_13" in message
    assert "pyenv install 3.13" in message and "uv python install 3.13" in message


def test_a_configured_interpreter_of_the_wrong_version_is_refused(monkeypatch):
    monkeypatch.setenv("RAYFARM_PYTHON_3_13", sys.executable)
    if sys.version_info[:2] == (3, 13):
        pytest.skip("this interpreter is a CPython 3.13 itself")
    with pytest.raises(BlenderUnavailable, match=r"is not a working CPython 3\.13"):
        environments.find_python("3.13")


def test_the_cli_lists_the_installed_environments():
    """`rayfarm blender list`: what `make setup` built, with the bpy each holds."""
    env = environments.install(TEST_BLENDER)  # built by make setup: nothing to do
    out = subprocess.run(
        [PYTHON, "-m", "rayfarm", "blender", "list", "--json"],
        capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    listed = json.loads(out.stdout)
    assert listed["root"] == str(environments.root())
    (row,) = [r for r in listed["environments"] if r["version"] == TEST_BLENDER]
    assert row["path"] == str(env.path) and row["bpy"].startswith(f"{TEST_BLENDER}.")
    assert row["python"].startswith(environments.python_for(TEST_BLENDER) + ".")
    text = subprocess.run(
        [PYTHON, "-m", "rayfarm", "blender", "list"], capture_output=True, text=True,
        timeout=60, check=True,
    ).stdout  # fmt: skip
    assert f"  {TEST_BLENDER}  bpy {row['bpy']}" in text


@pytest.mark.slow
def test_installing_a_version_pypi_does_not_have_fails_naming_it(tmp_path):
    """A real pip run against the package index: no bpy 4.9 exists. The error says what
    could not be installed, and nothing half-built is left marked ready."""
    env = {**os.environ, "RAYFARM_BLENDER_DIR": str(tmp_path)}
    out = subprocess.run(
        [PYTHON, "-m", "rayfarm", "blender", "install", "4.9"],
        capture_output=True, text=True, timeout=600, env=env,
    )  # fmt: skip
    assert out.returncode == 3, out.stdout + out.stderr
    assert "could not install bpy 4.9.* for CPython 3.11" in out.stderr
    assert not environments.environment("4.9", tmp_path).is_ready
    assert environments.installed(tmp_path) == []

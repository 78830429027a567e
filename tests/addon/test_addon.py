"""The Blender add-on: built, validated and installed the way Blender does, then driven
inside the bpy module (in subprocesses: this process never imports bpy) against a
farm that is down and a live local farm."""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest

from rayfarm.cluster.ports import free_port
from rayfarm.pack import pack_scene

from helpers import ADMIN_TOKEN, PYTHON, ROOT
from helpers.blender import SMALL, blender_python, pixels, render_reference

HELPER = ROOT / "tests" / "helpers" / "addon_session.py"
MODULE = "bl_ext.user_default.rayfarm"


def _load_build():  # type: ignore[no-untyped-def]
    """blender_addon/build.py as a module (it is a script, not part of a package)."""
    spec = importlib.util.spec_from_file_location(
        "addon_build", ROOT / "blender_addon" / "build.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


BUILD = _load_build()


def run_blender(home: Path, *args: str, timeout: float = 300) -> dict:
    """Run a helper command in the bpy module (an artist's Blender: the tests' Blender
    environment) with its own user folders (nothing touches the real home); the JSON
    it printed last."""
    env = {
        "PATH": "/usr/bin:/bin",
        "HOME": str(home),
        "BLENDER_USER_RESOURCES": str(home / "blender"),
        "RAYFARM_TOKEN": ADMIN_TOKEN,
    }
    out = subprocess.run(
        [blender_python(), str(HELPER), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert out.returncode == 0, f"{args[0]} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    assert "Traceback" not in out.stdout + out.stderr, out.stdout + out.stderr
    result: dict = json.loads(out.stdout.strip().splitlines()[-1])
    return result


@pytest.fixture(scope="module")
def addon_zip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`make addon`'s build, into a temp folder (the wheel cache is build/addon-wheels)."""
    out = tmp_path_factory.mktemp("dist")
    subprocess.run(
        [PYTHON, str(ROOT / "blender_addon" / "build.py"), "--out", str(out)],
        check=True, capture_output=True, timeout=300,
    )  # fmt: skip
    return out / "rayfarm-addon-0.1.0.zip"


@pytest.fixture(scope="module")
def blender_home(tmp_path_factory: pytest.TempPathFactory, addon_zip: Path) -> Path:
    """A user folder with the extension installed and enabled, preferences saved."""
    home = tmp_path_factory.mktemp("home")
    installed = run_blender(home, "install", str(addon_zip))
    assert installed["result"] == ["FINISHED"] and installed["enabled"]
    return home


def test_build_bundles_modules_manifest_and_wheel(addon_zip):
    with zipfile.ZipFile(addon_zip) as zf:
        names = set(zf.namelist())
    assert "blender_manifest.toml" in names and "__init__.py" in names
    assert {"comms.py", "operators.py", "panels.py", "preferences.py", "session.py"} <= names
    assert "wheels/blender_asset_tracer-1.23-py3-none-any.whl" in names
    assert "build.py" not in names and not any("__pycache__" in n for n in names)


def test_build_carries_the_sdks_packer_as_it_is(addon_zip):
    """The add-on packs with the SDK's own packer: the zip's vendor/ holds sdk/'s modules
    byte for byte and nothing else, and the source tree holds no copy that could drift
    (there, vendor/ reads sdk/ itself)."""
    vendored = BUILD.vendored_modules()
    assert ROOT / "sdk" / "pack.py" in vendored
    with zipfile.ZipFile(addon_zip) as zf:
        inside = {n: zf.read(n) for n in zf.namelist() if n.startswith("vendor/")}
    want = {f"vendor/{m.name}": m.read_bytes() for m in vendored}
    want["vendor/__init__.py"] = (ROOT / "blender_addon" / "vendor" / "__init__.py").read_bytes()
    assert inside == want
    assert sorted(p.name for p in (ROOT / "blender_addon" / "vendor").glob("*.py")) == [
        "__init__.py"
    ]
    source_tree = subprocess.run(
        [PYTHON, "-c", "import blender_addon.packing, blender_addon.vendor.pack as p; "
         "print(p.__file__)"],
        cwd=ROOT, capture_output=True, text=True, check=True, timeout=60,
    )  # fmt: skip
    assert source_tree.stdout.strip() == str(ROOT / "sdk" / "pack.py")


def test_build_refuses_an_sdk_module_blenders_python_cannot_import(tmp_path, monkeypatch):
    module = tmp_path / "pack.py"
    module.write_text(
        "import hashlib, zstandard\nfrom .errors import InvalidScene\nfrom . import blendfile\n"
        "def pack():\n"
        "    import pydantic\n"
        "    from rayfarm.errors import FarmError\n"
        "    from blender_asset_tracer.pack import Packer\n"
        "    from .client import Farm\n"
        "    from ..cluster import api\n"
    )
    fellows = {"errors", "blendfile", "pack"}
    assert BUILD.foreign_imports(module, fellows) == [
        "pydantic", "rayfarm.errors", ".client", "..cluster",
    ]  # fmt: skip
    (tmp_path / "errors.py").write_text("import typing\n")
    (tmp_path / "blendfile.py").write_text("from .errors import InvalidScene\n")
    monkeypatch.setattr(BUILD, "SDK", tmp_path)
    with pytest.raises(SystemExit, match=r"sdk/pack\.py goes into the add-on .* pydantic"):
        BUILD.vendored_modules()


@pytest.mark.slow
def test_manifest_passes_blenders_validation(addon_zip):
    python = Path(blender_python())
    validator = next(
        (python.parent.parent / "lib").glob(
            "python3.*/site-packages/bpy/*/scripts/addons_core/bl_pkg/cli/blender_ext.py"
        ),
        None,
    )
    if validator is None:
        pytest.skip("the bpy module's extension validator (bl_pkg) is not installed")
    out = subprocess.run(
        [str(python), str(validator), "validate", str(addon_zip)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr
    assert "Success" in out.stdout


@pytest.mark.slow
def test_installs_registers_and_preferences_persist(addon_zip, tmp_path):
    installed = run_blender(tmp_path, "install", str(addon_zip))
    assert installed["enabled"]
    assert {"submit", "cancel_upload", "test_connection", "job_cancel", "job_retry",
            "job_download"} <= set(installed["operators"])  # fmt: skip
    assert installed["panels"] == ["RAYFARM_PT_render", "RAYFARM_PT_jobs"]
    assert installed["panel_context"] == "render"
    run_blender(tmp_path, "set-prefs", "http://farm.example:8123", "s3cret", "/tmp/frames/")
    # A new process: Blender's startup reads the saved preferences back.
    prefs = run_blender(tmp_path, "get-prefs")
    assert prefs == {
        "enabled": True,
        "farm_url": "http://farm.example:8123",
        "api_token": "s3cret",
        "download_dir": "/tmp/frames/",
        "token_subtype": "PASSWORD",
    }


@pytest.mark.slow
def test_a_farm_that_is_down_is_a_clear_report(blender_home, small_scene):
    url = f"http://127.0.0.1:{free_port()}"
    got = run_blender(blender_home, "farm-down", url, str(small_scene))
    for level, text in (*got["probe"], *got["submit"]):
        assert level == "ERROR"
        assert text.startswith(f"Cannot reach the farm at {url}"), text
        assert "Is it running?" in text
    assert len(got["probe"]) == 1 and len(got["submit"]) == 1
    assert got["connection"].startswith("Connection failed: Cannot reach the farm")
    # Cancel right after Render on Farm: the upload stops, nothing reaches the farm.
    assert got["cancelled"] == [["WARNING", "rayfarm: upload cancelled"]]


@pytest.mark.slow
def test_the_addon_packs_with_the_sdks_packer_in_blender(blender_home, make_scene, tmp_path):
    """In Blender, with the extension's own copy of the packer and BAT from its wheel: the
    packs the SDK makes here, file for file and hash for hash (in place, and through
    BAT with a path rewritten), the artist's words for a missing file, and Cancel."""
    source = make_scene(*SMALL, "--texture")
    inside = tmp_path / "inside" / "shot.blend"
    shutil.copytree(source.parent / "textures", inside.parent / "textures")
    shutil.copy(source, inside)
    missing = tmp_path / "missing" / "shot.blend"
    missing.parent.mkdir()
    shutil.copy(source, missing)  # without its texture
    outside = make_scene(*SMALL, "--texture", "--abs-texture", str(tmp_path / "lib" / "cube.png"))
    got = run_blender(blender_home, "pack", str(inside), str(outside), str(missing))

    for scene, packed in zip((inside, outside), got["packs"][:2], strict=True):
        with pack_scene(scene) as sdk:
            listing = [[f.path, f.sha256, f.size] for f in sdk.files]
            assert packed == {"main": sdk.main, "files": listing}
    assert any(path.startswith("_outside_project/") for path, _, _ in got["packs"][1]["files"])
    report = got["packs"][2]
    assert report["code"] == "missing_dependencies"
    assert "checker.png" in report["error"] and "tick Allow Missing Files" in report["error"]
    assert got["cancelled"]
    packer = Path(got["packer"])
    assert packer.parts[-2:] == ("vendor", "pack.py") and packer.is_relative_to(blender_home)
    assert "/extensions/.local/" in got["bat"], "the add-on must use its bundled wheel"


@pytest.mark.slow
def test_comms_turns_the_farms_error_body_into_its_message(local_farm):
    sys.path.insert(0, str(ROOT))
    try:
        from blender_addon.comms import FarmClient, FarmError  # no bpy: stdlib only
    finally:
        sys.path.remove(str(ROOT))
    assert "bpy" not in sys.modules
    client = FarmClient(local_farm.url, ADMIN_TOKEN)
    health = client.health()
    assert health["status"] == "ok" and health["blender"] == ["5.3", "5.0"]
    with pytest.raises(FarmError) as err:
        client.submit({"frames": "1"}, "scene.blend", [{"path": "scene.blend", "sha256": "0" * 64,
                                                        "size": 1}])  # fmt: skip
    assert err.value.status == 400 and err.value.code not in ("error", "http")
    assert "scene.blend" in err.value.message


@pytest.mark.slow
def test_render_on_farm_matches_a_direct_render(blender_home, local_farm, make_scene, tmp_path):
    # A scene with a relative texture path (//textures/checker.png), copied so the
    # session's scene is never at risk; the user's file must stay byte-identical.
    source = make_scene(*SMALL, "--texture")
    project = tmp_path / "project"
    project.mkdir()
    scene = project / "shot.blend"
    shutil.copy(source, scene)
    shutil.copytree(source.parent / "textures", project / "textures")
    out = tmp_path / "out"
    out.mkdir()
    t0 = time.monotonic()
    got = run_blender(blender_home, "submit", local_farm.url, str(scene), str(out))

    assert got["result"] == ["FINISHED"]
    assert got["returned_s"] < 0.2, got["returned_s"]
    assert got["in_background"], "the upload finished before the operator returned"
    assert got["jobs_before_drain"] == 0
    assert got["longest_drain_s"] < 0.1
    assert got["submitted"], got["log"]
    assert got["state"] == "COMPLETED", got["log"]
    # The add-on announced the end of the job it submitted, once, as a Blender report.
    ends = [(level, text) for level, text in got["log"]
            if text.startswith(f"rayfarm: job {got['job_id']} (")]  # fmt: skip
    assert len(ends) == 1 and ends[0][0] == "INFO", got["log"]
    assert ends[0][1].endswith(") completed: 2/2 frame(s)"), ends
    assert got["progress"] == [2, 2]
    assert got["image_source"] == "SEQUENCE"
    assert got["unchanged"] and got["filepath"] == str(scene)
    assert "/extensions/.local/" in got["bat"], "the add-on must use its bundled wheel"
    assert [Path(p).name for p in got["frames"]] == ["0001.png", "0002.png"]

    want = render_reference(out / "changed.blend", tmp_path / "ref", [1, 2])
    original = render_reference(scene, tmp_path / "orig", [1])
    loaded = json.loads((out / "bpy_pixels.json").read_text())
    for path in map(Path, got["frames"]):
        expected = pixels(want[int(path.stem)])
        assert np.array_equal(pixels(path), expected), f"frame {path.stem} differs"
        h, w = expected.shape[:2]
        as_loaded = np.flipud(np.array(loaded[path.stem], dtype=np.uint8).reshape(h, w, 4))
        assert np.array_equal(as_loaded, expected), f"frame {path.stem} as a bpy image differs"
    # The unsaved change (a green ball) is what the farm rendered.
    assert not np.array_equal(pixels(Path(got["frames"][0])), pixels(original[1]))
    assert time.monotonic() - t0 < 150


@pytest.mark.slow
def test_never_saved_files_farm_errors_retry_and_cancel(blender_home, local_farm):
    got = run_blender(blender_home, "untitled", local_farm.url)
    # Test Connection says who the token signs in as, or that it is not valid.
    assert "Signed in as admin (admin)" in got["signed_in"], got["signed_in"]
    assert "The API token is NOT valid here" in got["wrong_token"], got["wrong_token"]
    # The farm's own message, as a Blender report.
    [(level, text)] = got["refused"]
    assert level == "ERROR" and "5-1" in text, text
    assert "EEVEE" in got["failed_error"] and got["can_retry_failed"]
    # Each end of a job submitted from Blender is a report: the failure says why.
    assert any(level == "WARNING" and "failed: " in text and "EEVEE" in text
               for level, text in got["log"]), got["log"]  # fmt: skip
    assert any(level == "WARNING" and ") cancelled: " in text and "frame(s)" in text
               for level, text in got["log"]), got["log"]  # fmt: skip
    assert any("retry: now PENDING" in text for _, text in got["log"]), got["log"]
    assert got["rendered_state"] == "COMPLETED", got["log"]
    assert got["scene_file"].endswith("untitled.blend")
    assert not got["can_retry_running"]
    assert any("cancel: now CANCELLED" in text for _, text in got["log"]), got["log"]


@pytest.mark.slow
def test_panels_draw_without_the_network(blender_home):
    """The bpy module cannot open a window, so the panels draw into a stub layout that
    checks each call against UILayout's RNA; no farm is configured or reachable."""
    got = run_blender(blender_home, "draw")
    assert got["idle_calls"] > 10
    assert got["labels"][:3] == ["Frames 1-250", "a report", "frame 1: boom"]
    assert "Processing 3/8" in got["labels"] and "Failed 0/2" in got["labels"]
    assert got["retry"]  # the selected job FAILED
    assert ["progress", None, "Uploading..."] in got["uploading"]
    assert ["operator", "rayfarm.cancel_upload", ""] in got["uploading"]
    assert not any(op == "rayfarm.submit" for _, op, _ in got["uploading"])
    # The Slices option is drawn beside Tiles and sent in the job's spec.
    assert "slices" in got["props"] and "tiles" in got["props"]
    assert got["slices"] == {"1": 1, "4": 4, "auto": "auto"}

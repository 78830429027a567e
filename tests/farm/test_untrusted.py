"""Untrusted scenes on a real local farm: a .blend cannot make a worker write outside
the job's own folders, and what it writes through compositor File Output nodes comes
back as the job's outputs, equal to what bpy writes itself; its Python runs only when
an admin says so, audited, in processes that render nothing else afterwards."""

from __future__ import annotations

import httpx
import numpy as np
import pytest

from rayfarm import Farm, Forbidden

from helpers import AUTH
from helpers.blender import pixels, render_reference
from helpers.farms import completed

pytestmark = pytest.mark.slow


def test_file_output_nodes_write_into_the_job_only(farm, local_farm, make_scene, tmp_path):
    studio = tmp_path / "studio"
    # The scene's File Output node names studio/out/ and a file name that climbs out of it.
    scene = make_scene("--width", "64", "--height", "48", "--samples", "4", "--frames", "2",
                       "--file-output", str(studio / "out"))  # fmt: skip
    job = completed(farm.submit(scene, frames="1-2"))
    assert not studio.exists(), list(studio.rglob("*"))

    listed = httpx.get(f"{local_farm.url}/jobs/{job.id}/outputs", headers=AUTH).json()
    names = sorted(o["name"] for o in listed["outputs"])
    assert names == ["files/0001/Beauty/__escaped_Image", "files/0002/Beauty/__escaped_Image"]
    warnings = [e["message"] for e in local_farm.events(job.id) if e["kind"] == "warning"]
    assert [w for w in warnings if "File Output node 'Beauty'" in w] == [
        "compositor File Output node 'Beauty' writes into the job's outputs "
        f"(files/<frame>/Beauty/), not {str(studio / 'out') + '/'!r}"
    ]

    # bpy itself, rendering frame 2, writes the node's file where the scene says.
    render_reference(scene, tmp_path / "ref", [2])
    (direct,) = studio.glob("escaped_*")
    got = tmp_path / "farm-file"
    r = httpx.get(f"{local_farm.url}/jobs/{job.id}/outputs/files/0002/Beauty/__escaped_Image",
                  headers=AUTH)  # fmt: skip
    assert r.status_code == 200
    got.write_bytes(r.content)
    assert np.array_equal(pixels(got), pixels(direct))
    # ... and it is frame 2's render layer: the frame itself, but for the PNGs' dither.
    frames = {p.name: p for p in job.download(tmp_path / "frames")}
    diff = np.abs(pixels(got).astype(int) - pixels(frames["0002.png"]).astype(int))
    assert diff.max() <= 2, diff.max()


def test_only_an_admin_runs_a_files_python_audited_in_a_process_of_its_own(
    farm, local_farm, make_scene, small_scene, tmp_path
):
    """scripts=true is an admin's override: an artist asking for it is refused (403,
    nothing stored); the admin's job runs the file's registered script on the worker
    (its marker appears), is audited, and the Blender worker processes that ran it
    render no other job (their actors do, each with a fresh worker)."""
    marker = tmp_path / "scripts-ran"
    scene = make_scene(*("--width", "32", "--height", "24", "--samples", "2"),
                       "--script-marker", str(marker))  # fmt: skip
    artist = Farm(local_farm.url, token=farm.create_token("scripter", role="artist"))
    newest = [j.id for j in farm.jobs(limit=1)]
    with artist, pytest.raises(Forbidden, match="only an admin may run a file's Python"):
        artist.submit(scene, frames="1", scripts=True)
    assert [j.id for j in farm.jobs(limit=1)] == newest and not marker.exists()

    job = completed(farm.submit(scene, frames="1-2", scripts=True))
    assert marker.read_text() == "scripts ran"
    events = local_farm.events(job.id)
    assert "the file's Python runs for this job (scripts on: an admin's override)" in [
        e["message"] for e in events if e["kind"] == "warning"
    ]
    (record,) = farm.audit(action="scripts on", job=job.id)
    assert record["who"] == farm.whoami()["user"] and record["outcome"] == "201"

    ran = {e["worker"] for e in events if e["kind"] == "task_done"}
    after = completed(farm.submit(small_scene, frames="1-4"))
    others = {e["worker"] for e in local_farm.events(after.id) if e["kind"] == "task_done"}
    assert ran and others and not ran & others
    assert "0" not in ran | others  # every task says which worker did it


_FLUID = """
import json, os, sys, bpy
from rayfarm_worker.blender import confine_outputs
folder, caches, scene_path = sys.argv[1:4]
bpy.ops.wm.read_factory_settings(use_empty=True)
domains = {}
for name, cache in [("Outside", os.path.join(folder, "..", "elsewhere")),
                    ("Inside", "//cache_fluid")]:
    obj = bpy.data.objects.new(name, bpy.data.meshes.new(name))
    bpy.context.scene.collection.objects.link(obj)
    mod = obj.modifiers.new("Fluid", "FLUID")
    mod.fluid_type = "DOMAIN"
    mod.domain_settings.cache_directory = cache
    domains[name] = mod.domain_settings
bpy.ops.wm.save_as_mainfile(filepath=scene_path)
chosen = {}
notes = confine_outputs(bpy, folder, caches, chosen)
again = confine_outputs(bpy, folder, caches, chosen)
print(json.dumps({"notes": notes, "again": again,
                  "outside": domains["Outside"].cache_directory,
                  "inside": domains["Inside"].cache_directory}), flush=True)
os._exit(0)  # Mantaflow aborts while Blender frees a domain at exit in background mode
"""


def test_fluid_caches_outside_the_scenes_folder_move_into_the_job(tmp_path):
    """A fluid domain caching outside the scene's folder (a replay cache is written while
    frames render) is pointed into the job's scratch folder; one inside stays, and a
    second task's call reports the path the file chose, not the last task's."""
    import json
    import subprocess

    from helpers.blender import blender_code

    caches = tmp_path / "caches"
    (tmp_path / "shot").mkdir()
    out = subprocess.run(
        blender_code(_FLUID, str(tmp_path / "files"), str(caches),
                     str(tmp_path / "shot" / "s.blend")),
        check=True, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["outside"] == str(caches / "Outside")
    assert got["inside"] == "//cache_fluid"
    asked = "//../elsewhere"  # saved relative to the scene's folder: climbs out of it
    assert (
        got["notes"]
        == got["again"]
        == [
            f"fluid cache of 'Outside' is written under the job's scratch folder, not {asked!r} "
            "(outside the scene's folder)"
        ]
    )

"""Drive the rayfarm extension inside the bpy module, as an artist's Blender would.

    python addon_session.py install ZIP
    python addon_session.py set-prefs URL TOKEN DOWNLOAD_DIR
    python addon_session.py get-prefs
    python addon_session.py farm-down URL SCENE
    python addon_session.py submit URL SCENE OUT_DIR
    python addon_session.py untitled URL
    python addon_session.py draw
    python addon_session.py pack SCENE...

Run with BLENDER_USER_RESOURCES (and HOME) pointing at a temporary folder: the
extension is installed there and preferences are saved there. Every command but
``install`` starts as Blender does, by reading the saved preferences (which enables
the installed extension). The bpy module has no event loop, so where Blender's timer
would call the add-on's ``session.drain``, these commands call it in a loop.
The last line printed is a JSON object with what the test checks.
"""

import hashlib
import importlib
import importlib.abc
import importlib.machinery
import json
import os
import sys
import threading
import time
from pathlib import Path

import bpy

MODULE = "bl_ext.user_default.rayfarm"


class _OnlyTheExtensionsBAT(importlib.abc.MetaPathFinder):
    """Blender's own Python has no blender-asset-tracer; the venv running this does.
    Hide the venv's copy so the add-on must use the wheel its extension installed."""

    def find_spec(self, name, path, target=None):  # type: ignore[no-untyped-def]
        if name != "blender_asset_tracer":
            return None
        for entry in sys.path:
            if "/extensions/.local/" in entry:
                spec = importlib.machinery.PathFinder.find_spec(name, [entry])
                if spec is not None:
                    return spec
        raise ImportError("blender_asset_tracer is not in Blender's Python")


sys.meta_path.insert(0, _OnlyTheExtensionsBAT())


def done(**result: object) -> None:
    print(json.dumps(result))
    sys.exit(0)


def start() -> object:
    """Blender's startup: read the saved preferences, which enable the extension."""
    bpy.ops.wm.read_userpref()
    return importlib.import_module(MODULE + ".session")


def prefs() -> object:
    return bpy.context.preferences.addons[MODULE].preferences


def drain_until(session, predicate, timeout_s: float) -> float:  # type: ignore[no-untyped-def]
    """Call drain as Blender's timer would until ``predicate()``; the longest drain."""
    longest = 0.0
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"gave up after {timeout_s} s; log: {list(session.SESSION.log)}")
        t0 = time.perf_counter()
        session.drain()
        longest = max(longest, time.perf_counter() - t0)
        time.sleep(0.05)
    return longest


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def install(zip_path: str) -> None:
    result = bpy.ops.extensions.package_install_files(
        filepath=zip_path, repo="user_default", enable_on_install=True
    )
    bpy.ops.wm.save_userpref()
    done(
        result=sorted(result),
        enabled=MODULE in bpy.context.preferences.addons,
        operators=sorted(n for n in dir(bpy.ops.rayfarm)),
        panels=[n for n in ("RAYFARM_PT_render", "RAYFARM_PT_jobs") if hasattr(bpy.types, n)],
        panel_context=bpy.types.RAYFARM_PT_render.bl_context,
    )


def set_prefs(url: str, token: str, download_dir: str) -> None:
    start()
    p = prefs()
    p.farm_url, p.api_token, p.download_dir = url, token, download_dir
    bpy.ops.wm.save_userpref()
    done(ok=True)


def get_prefs() -> None:
    start()
    p = prefs()
    done(
        enabled=MODULE in bpy.context.preferences.addons,
        farm_url=p.farm_url,
        api_token=p.api_token,
        download_dir=p.download_dir,
        token_subtype=type(p).bl_rna.properties["api_token"].subtype,
    )


def farm_down(url: str, scene: str) -> None:
    session = start()
    bpy.ops.wm.open_mainfile(filepath=scene, load_ui=False, use_scripts=False)
    prefs().farm_url = url
    prefs().api_token = os.environ.get("RAYFARM_TOKEN", "")  # the test farm's admin
    s = session.SESSION
    bpy.ops.rayfarm.test_connection()
    drain_until(session, lambda: not s.busy() and s.outbox.empty(), 30)
    probe = list(s.log)
    s.log.clear()
    bpy.ops.rayfarm.submit()
    drain_until(session, lambda: s.upload is None, 60)
    submit = list(s.log)
    s.log.clear()
    bpy.ops.rayfarm.submit()
    bpy.ops.rayfarm.cancel_upload()  # as the Cancel button (or Esc) would, mid-upload
    drain_until(session, lambda: s.upload is None, 60)
    done(probe=probe, submit=submit, cancelled=list(s.log), connection=s.connection)


def submit(url: str, scene_path: str, out_dir: str) -> None:
    session = start()
    out, scene_file = Path(out_dir), Path(scene_path)
    bpy.ops.wm.open_mainfile(filepath=scene_path, load_ui=False, use_scripts=False)
    before = sha256(scene_file)
    prefs().farm_url = url
    prefs().api_token = os.environ.get("RAYFARM_TOKEN", "")  # the test farm's admin
    # An unsaved change: the ball turns green. The reference is rendered from a copy
    # saved here (the test renders it directly with bpy).
    bsdf = bpy.data.materials["Ball"].node_tree.nodes["Principled BSDF"]
    bsdf.inputs["Base Color"].default_value = (0.1, 0.8, 0.1, 1.0)
    bpy.ops.wm.save_as_mainfile(filepath=str(out / "changed.blend"), copy=True)
    settings = bpy.context.scene.rayfarm
    settings.use_scene_frames, settings.frames = False, "1-2"
    s = session.SESSION

    t0 = time.perf_counter()
    result = bpy.ops.rayfarm.submit()
    returned_s = time.perf_counter() - t0
    in_background = s.upload is not None and s.upload.is_alive()
    jobs_before_drain = len(s.jobs)
    longest_drain = drain_until(session, lambda: s.upload is None, 120)
    submitted = [text for _, text in s.log if "submitted job" in text]
    job_id = s.jobs[0]["id"] if s.jobs else None

    def completed() -> bool:
        s.watcher.watch()  # what drawing the jobs panel does
        wm = bpy.context.window_manager
        return any(
            i.job_id == job_id and i.state in ("COMPLETED", "FAILED") for i in wm.rayfarm_jobs
        )

    drain_until(session, completed, 240)
    wm = bpy.context.window_manager
    wm.rayfarm_job_index = [i.job_id for i in wm.rayfarm_jobs].index(job_id)
    item = wm.rayfarm_jobs[wm.rayfarm_job_index]
    state, progress = item.state, (item.frames_done, item.frames_total)
    bpy.ops.rayfarm.job_download()
    drain_until(session, lambda: s.loaded or (s.download is None and s.outbox.empty()), 60)
    shown = bpy.data.images[s.loaded[-1]] if s.loaded else None
    folder = Path(bpy.path.abspath(shown.filepath)).parent if shown else None
    frames = sorted(folder.glob("*.png")) if folder else []
    arrays = {}
    for path in frames:  # each frame as a bpy image, its pixels as bytes (bottom row first)
        image = bpy.data.images.load(str(path))
        w, h = image.size
        pixels = [0.0] * (w * h * 4)
        image.pixels.foreach_get(pixels)
        arrays[path.stem] = [round(v * 255) for v in pixels]
    (out / "bpy_pixels.json").write_text(json.dumps(arrays))
    done(
        result=sorted(result),
        returned_s=returned_s,
        in_background=in_background,
        jobs_before_drain=jobs_before_drain,
        longest_drain_s=longest_drain,
        submitted=submitted,
        job_id=job_id,
        state=state,
        progress=progress,
        log=list(s.log),
        image=shown.name if shown else None,
        image_source=shown.source if shown else None,
        frames=[str(p) for p in frames],
        unchanged=sha256(scene_file) == before,
        filepath=bpy.data.filepath,
        bat=sys.modules["blender_asset_tracer"].__file__,
    )


class StubLayout:
    """Stands in for ``UILayout`` (the bpy module has no window to draw in): checks every
    call against the real UILayout's RNA (method, keyword names, properties and
    operators named) and records what would be shown."""

    def __init__(self, shown: list) -> None:  # type: ignore[type-arg]
        self.shown = shown

    def __setattr__(self, name: str, value: object) -> None:
        if name != "shown":
            assert name in bpy.types.UILayout.bl_rna.properties, name
        object.__setattr__(self, name, value)

    def __getattr__(self, name: str):  # type: ignore[no-untyped-def]
        function = bpy.types.UILayout.bl_rna.functions[name]
        params = {p.identifier for p in function.parameters}

        def call(*args, **kwargs):  # type: ignore[no-untyped-def]
            assert set(kwargs) <= params, (name, set(kwargs) - params)
            if name == "prop":
                assert args[1] in args[0].bl_rna.properties, args[1]
            if name == "operator":
                category, op = args[0].split(".")
                assert getattr(getattr(bpy.ops, category), op).get_rna_type(), args[0]
            if name == "template_list":
                assert hasattr(bpy.types, args[0]) and args[3] in args[2].bl_rna.properties
            self.shown.append((name, args[1:] if name == "prop" else args, kwargs.get("text")))
            return self if name in ("row", "column", "box", "split") else None

        return call


def draw() -> None:
    """Draw the panels, the job list and the preferences with a checking stub layout,
    idle, with jobs listed, and mid-upload."""
    session = start()
    s, wm = session.SESSION, bpy.context.window_manager
    context = bpy.context
    shown: list = []  # type: ignore[type-arg]

    def draw_all() -> None:
        for panel in (bpy.types.RAYFARM_PT_render, bpy.types.RAYFARM_PT_jobs):
            panel.draw(StubLayoutOwner(shown), context)
        for item in wm.rayfarm_jobs:
            bpy.types.RAYFARM_UL_jobs.draw_item(
                None, context, StubLayout(shown), wm, item, 0, wm, "rayfarm_job_index"
            )
        type(prefs()).draw(StubPrefs(prefs(), shown), context)

    draw_all()
    idle = len(shown)
    session._merge_jobs(
        [
            {"id": "a" * 16, "state": "PROCESSING", "frames_done": 3, "frames_total": 8,
             "scene_file": "shot.blend", "created_at": "2025-01-02T00:00:00Z"},
            {"id": "b" * 16, "state": "FAILED", "frames_done": 0, "frames_total": 2,
             "error": "frame 1: boom", "scene_file": "x.blend",
             "created_at": "2025-01-01T00:00:00Z"},
        ]
    )  # fmt: skip
    wm.rayfarm_job_index = 1
    s.log.append(("ERROR", "a report"))
    s.connection = "Connected to rayfarm 0.1.0"
    shown.clear()
    draw_all()
    labels = [text for name, _, text in shown if text]
    import threading  # an upload in flight, as the panel sees one

    s.upload = threading.Thread(target=time.sleep, args=(2,))
    s.upload.start()
    s.stage, s.fraction = "Uploading", 0.4
    shown.clear()
    draw_all()
    uploading = [(name, args[0] if args else None, text) for name, args, text in shown]
    s.upload.join()
    # The spec each choice of the Slices option sends.
    job_spec = importlib.import_module(MODULE + ".operators").job_spec
    slices = {}
    for choice in ("1", "4", "auto"):
        context.scene.rayfarm.slices = choice
        slices[choice] = job_spec(context.scene)["slices"]
    done(
        idle_calls=idle,
        labels=labels,
        retry=bpy.ops.rayfarm.job_retry.poll(),
        uploading=uploading,
        props=[args[0] for name, args, _ in shown if name == "prop" and args],
        slices=slices,
    )


class StubLayoutOwner:
    def __init__(self, shown: list) -> None:  # type: ignore[type-arg]
        self.layout = StubLayout(shown)


class StubPrefs:
    """The preferences instance's properties, with a stub layout."""

    def __init__(self, prefs: object, shown: list) -> None:  # type: ignore[type-arg]
        self._prefs, self.layout = prefs, StubLayout(shown)

    def __getattr__(self, name: str) -> object:
        return getattr(self._prefs, name)

    @property
    def bl_rna(self) -> object:
        return self._prefs.bl_rna


def untitled(url: str) -> None:
    """A never-saved file (Blender's startup scene, changed): a spec the farm refuses,
    a job the farm fails (EEVEE) and its retry, a job that renders, one cancelled."""
    session = start()
    bpy.ops.wm.read_homefile(use_empty=False)  # the default cube, never saved
    assert not bpy.data.filepath
    prefs().farm_url = url
    prefs().api_token = os.environ.get("RAYFARM_TOKEN", "")  # the test farm's admin
    scene = bpy.context.scene
    scene.render.resolution_percentage = 5  # unsaved changes: tiny and quick
    settings = scene.rayfarm
    settings.use_samples, settings.samples = True, 1
    s = session.SESSION
    wm = bpy.context.window_manager

    def state_of(job_id: str) -> str:
        s.watcher.watch()
        return next((i.state for i in wm.rayfarm_jobs if i.job_id == job_id), "")

    # Test Connection: with the farm's token, then with a wrong one.
    bpy.ops.rayfarm.test_connection()
    drain_until(session, lambda: not s.busy() and s.outbox.empty(), 30)
    signed_in = s.connection
    token, prefs().api_token = prefs().api_token, "rf_" + "x" * 43
    bpy.ops.rayfarm.test_connection()
    drain_until(session, lambda: not s.busy() and s.outbox.empty(), 30)
    wrong_token, prefs().api_token = s.connection, token
    s.log.clear()  # the reports below are the submissions'

    settings.use_scene_frames, settings.frames = False, "5-1"
    bpy.ops.rayfarm.submit()
    drain_until(session, lambda: s.upload is None, 60)
    refused = list(s.log)
    s.log.clear()

    settings.frames = "1"
    bpy.ops.rayfarm.submit()  # the startup scene renders with EEVEE: the farm fails it
    drain_until(session, lambda: s.upload is None, 60)
    failed = s.jobs[0]["id"]
    drain_until(session, lambda: state_of(failed) == "FAILED", 120)
    wm.rayfarm_job_index = [i.job_id for i in wm.rayfarm_jobs].index(failed)
    failed_error = session.selected_job()["error"]
    can_retry_failed = bpy.ops.rayfarm.job_retry.poll()
    bpy.ops.rayfarm.job_retry()
    drain_until(session, lambda: any("retry: now" in t for _, t in s.log), 30)

    scene.render.engine = "CYCLES"
    bpy.ops.rayfarm.submit()
    drain_until(session, lambda: s.upload is None, 60)
    rendered = s.jobs[0]
    drain_until(session, lambda: state_of(rendered["id"]) in ("COMPLETED", "FAILED"), 120)
    rendered_state = state_of(rendered["id"])

    settings.frames = "1-200"
    bpy.ops.rayfarm.submit()
    drain_until(session, lambda: s.upload is None, 60)
    doomed = s.jobs[0]["id"]
    drain_until(session, lambda: state_of(doomed) in ("PENDING", "PROCESSING"), 30)
    wm.rayfarm_job_index = [i.job_id for i in wm.rayfarm_jobs].index(doomed)
    can_retry = bpy.ops.rayfarm.job_retry.poll()
    bpy.ops.rayfarm.job_cancel()
    drain_until(session, lambda: state_of(doomed) == "CANCELLED", 60)
    done(
        refused=refused,
        rendered_state=rendered_state,
        scene_file=rendered["scene_file"],
        can_retry_running=can_retry,
        failed_error=failed_error,
        can_retry_failed=can_retry_failed,
        signed_in=signed_in,
        wrong_token=wrong_token,
        log=list(s.log),
    )


def pack(*scenes: str) -> None:
    """Pack each scene with the add-on's packer, as its upload thread does: the listing,
    or the report the artist would see; then one pack cancelled before it starts."""
    start()
    packing = importlib.import_module(MODULE + ".packing")
    comms = importlib.import_module(MODULE + ".comms")
    packs: list[dict[str, object]] = []
    for scene in scenes:
        try:
            with packing.pack_scene(Path(scene), False, threading.Event()) as packed:
                files = [[f.path, f.sha256, f.size] for f in packed.files]
                packs.append({"main": packed.main, "files": files})
        except comms.FarmError as exc:
            packs.append({"error": str(exc), "code": exc.code})
    cancel = threading.Event()
    cancel.set()
    try:
        packing.pack_scene(Path(scenes[0]), False, cancel)
        cancelled = False
    except comms.Cancelled:
        cancelled = True
    done(
        packs=packs,
        cancelled=cancelled,
        packer=sys.modules[MODULE + ".vendor.pack"].__file__,
        bat=sys.modules["blender_asset_tracer"].__file__,
    )


if __name__ == "__main__":
    command, *args = sys.argv[1:]
    {
        "install": install,
        "set-prefs": set_prefs,
        "get-prefs": get_prefs,
        "farm-down": farm_down,
        "submit": submit,
        "untitled": untitled,
        "draw": draw,
        "pack": pack,
    }[command](*args)

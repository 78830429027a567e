"""The add-on's operators. Each one starts background work and returns at once; the
session's timer reports the outcome. ``rayfarm.submit`` invoked from the UI also
stays modal (passing every event through) so Esc stops the upload in flight."""

from __future__ import annotations

import re
import tempfile
from pathlib import Path
from typing import Any

import bpy
from bpy.props import EnumProperty, StringProperty

from . import session, work

_FRAMES = re.compile(
    r"^\s*\d+(\s*-\s*\d+(\s*x\s*\d+)?)?(\s*,\s*\d+(\s*-\s*\d+(\s*x\s*\d+)?)?)*\s*$"
)


def job_spec(scene: bpy.types.Scene) -> dict[str, Any]:
    """The JobSpec for ``scene``'s rayfarm settings (the farm checks it again)."""
    s = scene.rayfarm
    if s.use_scene_frames:
        step = f"x{scene.frame_step}" if scene.frame_step > 1 else ""
        frames = f"{scene.frame_start}-{scene.frame_end}{step}"
    else:
        frames = s.frames.replace(" ", "")
        if not _FRAMES.match(frames):
            raise ValueError(f"Frames {s.frames!r}: write e.g. '1-250', '1,3,5-7' or '1-20x5'")
    spec: dict[str, Any] = {
        "frames": frames,
        "tiles": s.tiles if s.tiles == "auto" else (1 if s.tiles == "1" else s.tiles),
        "slices": s.slices if s.slices == "auto" else int(s.slices),
        "scene": scene.name,
        "priority": s.priority,
        "format": s.format,
    }
    if scene.camera is not None:
        spec["camera"] = scene.camera.name
    if s.use_samples:
        spec["samples"] = s.samples
    if s.allow_missing:
        spec["allow_missing"] = True
    # Render with the Blender the artist sees, unless they name another the farm offers.
    major, minor = bpy.app.version[:2]
    spec["blender"] = s.blender.strip() or f"{major}.{minor}"
    return spec


class RAYFARM_OT_submit(bpy.types.Operator):
    """Save a copy of this file, upload it with everything it uses and render it on the farm"""

    bl_idname = "rayfarm.submit"
    bl_label = "Render on Farm"

    _timer: Any = None

    @classmethod
    def poll(cls, context: bpy.types.Context) -> bool:
        return context.scene is not None and not session.SESSION.is_uploading()

    def execute(self, context: bpy.types.Context) -> set[str]:
        s = session.SESSION
        if not session.preferences().farm_url.strip():
            self.report({"ERROR"}, "rayfarm: set the Farm URL in the add-on's preferences")
            return {"CANCELLED"}
        try:
            spec = job_spec(context.scene)
        except ValueError as exc:
            self.report({"ERROR"}, f"rayfarm: {exc}")
            return {"CANCELLED"}
        # A copy of what is in memory, unsaved changes included, in a folder of its own;
        # the artist's file is neither written nor marked saved. relative_remap keeps
        # '//' paths pointing at the same files from the new folder.
        folder = Path(tempfile.mkdtemp(prefix="rayfarm-submit-"))
        name = bpy.path.basename(bpy.data.filepath) or "untitled.blend"
        copy = folder / name
        bpy.ops.wm.save_as_mainfile(filepath=str(copy), copy=True, relative_remap=True)
        s.upload = work.Submit(s.outbox, s.client(), copy, spec)
        s.stage, s.fraction = "Packing", 0.0
        s.start(s.upload)
        return {"FINISHED"}

    def invoke(self, context: bpy.types.Context, event: bpy.types.Event) -> set[str]:
        if self.execute(context) != {"FINISHED"}:
            return {"CANCELLED"}
        self._timer = context.window_manager.event_timer_add(0.2, window=context.window)
        context.window_manager.modal_handler_add(self)
        return {"RUNNING_MODAL"}

    def modal(self, context: bpy.types.Context, event: bpy.types.Event) -> set[str]:
        if not session.SESSION.is_uploading():
            context.window_manager.event_timer_remove(self._timer)
            return {"FINISHED"}
        if event.type == "ESC" and event.value == "PRESS":
            session.SESSION.upload.cancel()  # type: ignore[union-attr]
            return {"RUNNING_MODAL"}  # finishes when the thread has stopped
        return {"PASS_THROUGH"}


class RAYFARM_OT_cancel_upload(bpy.types.Operator):
    """Stop the upload in flight (nothing is queued on the farm)"""

    bl_idname = "rayfarm.cancel_upload"
    bl_label = "Cancel Upload"

    @classmethod
    def poll(cls, context: bpy.types.Context) -> bool:
        return session.SESSION.is_uploading()

    def execute(self, context: bpy.types.Context) -> set[str]:
        session.SESSION.upload.cancel()  # type: ignore[union-attr]
        return {"FINISHED"}


class RAYFARM_OT_test_connection(bpy.types.Operator):
    """Ask the farm for its version and workers"""

    bl_idname = "rayfarm.test_connection"
    bl_label = "Test Connection"

    def execute(self, context: bpy.types.Context) -> set[str]:
        s = session.SESSION
        s.connection = "Testing the connection..."
        s.start(work.Probe(s.outbox, s.client()))
        return {"FINISHED"}


class RAYFARM_OT_jobs_refresh(bpy.types.Operator):
    """Fetch the farm's recent jobs now"""

    bl_idname = "rayfarm.jobs_refresh"
    bl_label = "Refresh Jobs"

    def execute(self, context: bpy.types.Context) -> set[str]:
        watcher = session.SESSION.watcher
        if watcher is not None:
            watcher.config = (
                session.preferences().farm_url.strip(),
                session.preferences().api_token,
            )
            watcher.refresh()
        return {"FINISHED"}


class _JobOperator(bpy.types.Operator):
    states: tuple[str, ...] = ()

    @classmethod
    def poll(cls, context: bpy.types.Context) -> bool:
        job = session.selected_job()
        return job is not None and job["state"] in cls.states


class RAYFARM_OT_job_cancel(_JobOperator):
    """Cancel the selected job: queued frames are dropped, running ones stop"""

    bl_idname = "rayfarm.job_cancel"
    bl_label = "Cancel Job"
    states = ("PENDING", "PROCESSING")

    def execute(self, context: bpy.types.Context) -> set[str]:
        s, job = session.SESSION, session.selected_job()
        s.start(work.JobAction(s.outbox, s.client(), job["id"], "cancel"))  # type: ignore[index]
        return {"FINISHED"}


class RAYFARM_OT_job_retry(_JobOperator):
    """Retry the selected failed job: only the frames not yet stored render again"""

    bl_idname = "rayfarm.job_retry"
    bl_label = "Retry Job"
    states = ("FAILED",)

    def execute(self, context: bpy.types.Context) -> set[str]:
        s, job = session.SESSION, session.selected_job()
        s.start(work.JobAction(s.outbox, s.client(), job["id"], "retry"))  # type: ignore[index]
        return {"FINISHED"}


class RAYFARM_OT_job_download(_JobOperator):
    """Download the selected job's frames and open them in the Image Editor"""

    bl_idname = "rayfarm.job_download"
    bl_label = "Download and Open"
    states = ("COMPLETED", "FAILED", "CANCELLED", "PROCESSING")

    @classmethod
    def poll(cls, context: bpy.types.Context) -> bool:
        job = session.selected_job()
        return (
            super().poll(context)
            and job is not None
            and job.get("frames_done", 0) > 0
            and (session.SESSION.download is None or not session.SESSION.download.is_alive())
        )

    def execute(self, context: bpy.types.Context) -> set[str]:
        s, job = session.SESSION, session.selected_job()
        assert job is not None
        s.download = work.Download(s.outbox, s.client(), job, download_dir(job["id"]))
        s.stage, s.fraction = "Downloading", 0.0
        s.start(s.download)
        return {"FINISHED"}


def download_dir(job_id: str) -> Path:
    """The preference's folder ('//' relative to the saved .blend; the temp folder for
    a never-saved file), plus the job's id."""
    folder = session.preferences().download_dir or "//rayfarm_frames/"
    if folder.startswith("//") and not bpy.data.filepath:
        return Path(tempfile.gettempdir()) / "rayfarm_frames" / job_id
    return Path(bpy.path.abspath(folder)) / job_id


class RAYFARM_OT_report(bpy.types.Operator):
    """Internal: turns the background work's outcome into a Blender report"""

    bl_idname = "rayfarm.report"
    bl_label = "rayfarm Report"
    bl_options = {"INTERNAL"}

    level: EnumProperty(  # type: ignore[valid-type]
        items=[(x, x, "") for x in ("INFO", "WARNING", "ERROR")], default="INFO"
    )
    message: StringProperty()  # type: ignore[valid-type]

    def execute(self, context: bpy.types.Context) -> set[str]:
        self.report({self.level}, self.message)
        return {"FINISHED"}


CLASSES = (
    RAYFARM_OT_submit,
    RAYFARM_OT_cancel_upload,
    RAYFARM_OT_test_connection,
    RAYFARM_OT_jobs_refresh,
    RAYFARM_OT_job_cancel,
    RAYFARM_OT_job_retry,
    RAYFARM_OT_job_download,
    RAYFARM_OT_report,
)

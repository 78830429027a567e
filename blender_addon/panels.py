"""The Render on Farm panel in Render Properties and its job list. ``draw()`` reads
what the session holds and never touches the network; drawing the jobs list only
tells the watcher thread that someone is looking."""

from __future__ import annotations

import bpy

from . import session

_STATE_ICONS = {
    "PENDING": "TIME",
    "PROCESSING": "RENDER_ANIMATION",
    "COMPLETED": "CHECKMARK",
    "FAILED": "ERROR",
    "CANCELLED": "CANCEL",
}
_LEVEL_ICONS = {"INFO": "INFO", "WARNING": "ERROR", "ERROR": "CANCEL"}


class RAYFARM_PT_render(bpy.types.Panel):
    bl_idname = "RAYFARM_PT_render"
    bl_label = "Render on Farm"
    bl_space_type = "PROPERTIES"
    bl_region_type = "WINDOW"
    bl_context = "render"

    def draw(self, context: bpy.types.Context) -> None:
        layout, s = self.layout, context.scene.rayfarm
        layout.use_property_split = True
        layout.use_property_decorate = False
        col = layout.column()
        col.prop(s, "use_scene_frames")
        if s.use_scene_frames:
            sc = context.scene
            col.label(text=f"Frames {sc.frame_start}-{sc.frame_end}", icon="SEQUENCE")
        else:
            col.prop(s, "frames")
        col.prop(s, "tiles")
        col.prop(s, "slices")
        row = col.row(heading="Samples")
        row.prop(s, "use_samples", text="")
        sub = row.row()
        sub.active = s.use_samples
        sub.prop(s, "samples", text="")
        col.prop(s, "priority")
        col.prop(s, "format")
        major, minor = bpy.app.version[:2]
        col.prop(s, "blender", placeholder=f"{major}.{minor}")
        col.prop(s, "allow_missing")

        state = session.SESSION
        if state.is_uploading():
            row = layout.row(align=True)
            row.progress(factor=state.fraction, type="BAR", text=f"{state.stage}...")
            row.operator("rayfarm.cancel_upload", text="", icon="CANCEL")
        else:
            layout.operator("rayfarm.submit", icon="RENDER_ANIMATION")
        if state.log:
            level, text = state.log[-1]
            layout.label(text=text, icon=_LEVEL_ICONS.get(level, "INFO"))


class RAYFARM_UL_jobs(bpy.types.UIList):
    def draw_item(self, context, layout, data, item, icon, active_data, active_property):  # type: ignore[no-untyped-def]
        row = layout.row(align=True)
        row.label(text=item.job_id[:8], icon=_STATE_ICONS.get(item.state, "QUESTION"))
        row.label(text=item.name)
        total = max(item.frames_total, 1)
        row.progress(
            factor=item.frames_done / total,
            type="BAR",
            text=f"{item.state.title()} {item.frames_done}/{item.frames_total}",
        )


class RAYFARM_PT_jobs(bpy.types.Panel):
    bl_idname = "RAYFARM_PT_jobs"
    bl_label = "Farm Jobs"
    bl_space_type = "PROPERTIES"
    bl_region_type = "WINDOW"
    bl_context = "render"
    bl_parent_id = "RAYFARM_PT_render"

    def draw(self, context: bpy.types.Context) -> None:
        state = session.SESSION
        if state.watcher is not None:
            state.watcher.watch()
        layout, wm = self.layout, context.window_manager
        row = layout.row()
        row.template_list(
            "RAYFARM_UL_jobs", "", wm, "rayfarm_jobs", wm, "rayfarm_job_index", rows=4
        )
        col = row.column(align=True)
        col.operator("rayfarm.jobs_refresh", text="", icon="FILE_REFRESH")
        col.operator("rayfarm.job_cancel", text="", icon="CANCEL")
        col.operator("rayfarm.job_retry", text="", icon="RECOVER_LAST")
        layout.operator("rayfarm.job_download", icon="IMAGE")
        if state.download is not None and state.download.is_alive():
            layout.progress(factor=state.fraction, type="BAR", text="Downloading...")
        job = session.selected_job()
        if job is not None and job.get("error"):
            layout.label(text=job["error"], icon="ERROR")
        if state.jobs_error:
            layout.label(text=state.jobs_error, icon="ERROR")


CLASSES = (RAYFARM_PT_render, RAYFARM_UL_jobs, RAYFARM_PT_jobs)

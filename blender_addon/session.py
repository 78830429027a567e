"""The add-on's state while Blender runs, and ``drain``: the main-thread side of the
background work. A ``bpy.app.timers`` callback calls ``drain`` a few times a second;
it applies the workers' messages within a time budget (so Blender never stalls on
them), turns errors into Blender reports, and redraws the panels. ``draw()`` only
reads what ``drain`` left here; nothing in a panel touches the network.
"""

from __future__ import annotations

import queue
import time
from collections import deque
from pathlib import Path
from typing import Any

import bpy

from . import work
from .comms import FarmClient

#: Longest one drain may spend applying messages before yielding back to Blender.
DRAIN_BUDGET_S = 0.01
#: Timer intervals: while something runs, and idle.
BUSY_INTERVAL_S = 0.1
IDLE_INTERVAL_S = 0.5


class Session:
    """Everything the panels show; touched on the main thread only."""

    def __init__(self) -> None:
        self.outbox: queue.Queue[work.Message] = queue.Queue()
        self.tasks: list[work.Task] = []
        self.upload: work.Submit | None = None
        self.stage, self.fraction = "", 0.0
        self.download: work.Download | None = None
        self.jobs: list[dict[str, Any]] = []
        self.jobs_error = ""
        self.connection = ""  # the last Test connection's answer
        self.log: deque[tuple[str, str]] = deque(maxlen=20)
        self.loaded: list[str] = []  # names of images loaded from downloaded frames
        self.watcher: work.Watcher | None = None
        # Jobs submitted from this Blender, by id, with their last known state: each one's
        # end (completed, failed, cancelled) is announced once, as a Blender report.
        self.submitted: dict[str, str] = {}

    def client(self) -> FarmClient:
        prefs = preferences()
        return FarmClient(prefs.farm_url, prefs.api_token)

    def start(self, task: work.Task) -> work.Task:
        self.tasks.append(task)
        task.start()
        return task

    def is_uploading(self) -> bool:
        return self.upload is not None and self.upload.is_alive()

    def busy(self) -> bool:
        return any(t.is_alive() for t in self.tasks)


SESSION = Session()


def preferences() -> Any:
    return bpy.context.preferences.addons[__package__].preferences


def report(level: str, text: str) -> None:
    """A Blender report (status bar and Info editor; stdout in background mode), kept
    in the panel too. Reports made outside an operator go through ``rayfarm.report``."""
    SESSION.log.append((level, text))
    try:
        bpy.ops.rayfarm.report(level=level, message=text)
    except RuntimeError:
        pass  # an ERROR report raises in scripts and background mode; it was reported


def drain(budget_s: float = DRAIN_BUDGET_S) -> bool:
    """Apply queued messages for at most ``budget_s``; True if anything changed."""
    s = SESSION
    if s.watcher is not None:
        prefs = preferences()
        s.watcher.config = (prefs.farm_url.strip(), prefs.api_token)
    deadline = time.monotonic() + budget_s
    changed = False
    while time.monotonic() < deadline:
        try:
            message = s.outbox.get_nowait()
        except queue.Empty:
            break
        changed = True
        _apply(message)
    s.tasks = [t for t in s.tasks if t.is_alive() or not t.outbox.empty()]
    if changed:
        _redraw()
    return changed


def _apply(m: work.Message) -> None:
    s, data = SESSION, m.data
    if m.kind == "progress":
        if m.task is s.upload or m.task is s.download:
            s.stage, s.fraction = data["stage"], data["fraction"]
    elif m.kind == "report":
        if isinstance(m.task, work.Probe):
            s.connection = f"Connection failed: {data['text']}"
        report(data["level"], data["text"])
    elif m.kind == "health":
        s.connection = describe_health(
            data["url"], data["health"], data.get("user"), data.get("refused")
        )
        report("INFO", s.connection)
    elif m.kind == "job":
        job = data["job"]
        _merge_jobs([job])
        if "action" in data:
            report("INFO", f"rayfarm: job {job['id']} {data['action']}: now {job['state']}")
            _announce_ends([job])
        else:
            report(
                "INFO",
                f"rayfarm: submitted job {job['id']} ({job['frames_total']} frame(s)); sent "
                f"{data['files_sent']} of {data['files']} file(s), {data['bytes_sent']} bytes",
            )
            s.submitted[job["id"]] = job["state"]
            if s.watcher is not None:
                s.watcher.track(job["id"])
        if s.watcher is not None:
            s.watcher.has_active = True
            s.watcher.refresh()
    elif m.kind == "jobs":
        if "error" in data:
            s.jobs_error = data["error"]
        else:
            s.jobs_error = ""
            s.jobs = data["jobs"]
            _sync_list()
            _announce_ends(data["jobs"])
    elif m.kind == "frames":
        show_frames(data["job_id"], [Path(p) for p in data["paths"]])
    elif m.kind == "done":
        if m.task is s.upload:
            s.upload, s.stage, s.fraction = None, "", 0.0
        if m.task is s.download:
            s.download, s.stage, s.fraction = None, "", 0.0


def _announce_ends(jobs: list[dict[str, Any]]) -> None:
    """A Blender report for each job submitted from here that has just ended: INFO when
    it completed, WARNING when it failed (with why) or was cancelled."""
    for job in jobs:
        before = SESSION.submitted.get(job["id"])
        state = job.get("state", "")
        if before is None or before == state:
            continue
        SESSION.submitted[job["id"]] = state
        if before not in work.ACTIVE_STATES or state in work.ACTIVE_STATES:
            continue  # not an end (a retry starts it again: its next end is announced)
        name = job.get("scene_file") or job["id"]
        frames = f"{job.get('frames_done', 0)}/{job.get('frames_total', 0)} frame(s)"
        if state == "COMPLETED":
            report("INFO", f"rayfarm: job {job['id']} ({name}) completed: {frames}")
        elif state == "FAILED":
            report("WARNING", f"rayfarm: job {job['id']} ({name}) failed: {job.get('error')}")
        else:
            report("WARNING", f"rayfarm: job {job['id']} ({name}) {state.lower()}: {frames}")


def describe_health(
    url: str,
    health: dict[str, Any],
    user: dict[str, Any] | None = None,
    refused: str | None = None,
) -> str:
    workers = health.get("workers")
    if workers:
        devices = ", ".join(f"{n} x {d}" for d, n in sorted(workers.get("devices", {}).items()))
        crew = f"{workers['count']} worker(s) ({devices}), {workers['busy']} busy"
    else:
        crew = "workers not reporting yet (the dispatcher is starting)"
    if user is not None:
        signed = f"Signed in as {user['user']} ({user['role']})."
    else:
        signed = f"The API token is NOT valid here: {refused or 'refused'}"
    return (
        f"Connected to rayfarm {health.get('version')} at {url}: Blender "
        f"{_versions(health.get('blender'))}, {crew}. {signed}"
    )


def _versions(offered: Any) -> str:
    """The Blender versions a farm offers, as its /healthz says them (a list; a single
    string from a farm older than version routing)."""
    if isinstance(offered, list):
        return ", ".join(str(v) for v in offered)
    return str(offered)


def _merge_jobs(updated: list[dict[str, Any]]) -> None:
    by_id = {j["id"]: j for j in SESSION.jobs}
    for job in updated:
        by_id[job["id"]] = {**by_id.get(job["id"], {}), **job}
    SESSION.jobs = sorted(by_id.values(), key=lambda j: j.get("created_at", ""), reverse=True)
    _sync_list()


def _sync_list() -> None:
    """Mirror ``SESSION.jobs`` into the window manager's collection the UIList shows,
    keeping the selected job selected."""
    wm = bpy.context.window_manager
    items = wm.rayfarm_jobs
    selected = items[wm.rayfarm_job_index].job_id if 0 <= wm.rayfarm_job_index < len(items) else ""
    items.clear()
    for job in SESSION.jobs:
        item = items.add()
        item.job_id = job["id"]
        item.state = job["state"]
        item.frames_done = job.get("frames_done", 0)
        item.frames_total = job.get("frames_total", 0)
        item.error = job.get("error") or ""
        item.name = job.get("scene_file") or job["id"]
    ids = [j["id"] for j in SESSION.jobs]
    wm.rayfarm_job_index = ids.index(selected) if selected in ids else min(0, len(ids) - 1)


def selected_job() -> dict[str, Any] | None:
    wm = bpy.context.window_manager
    if 0 <= wm.rayfarm_job_index < len(wm.rayfarm_jobs):
        job_id = wm.rayfarm_jobs[wm.rayfarm_job_index].job_id
        return next((j for j in SESSION.jobs if j["id"] == job_id), None)
    return None


def show_frames(job_id: str, paths: list[Path]) -> bpy.types.Image:
    """Load downloaded frames as one image (a sequence when there are several) and show
    it in an Image Editor: one already open, or the render view Blender opens."""
    image = bpy.data.images.load(str(paths[0]), check_existing=True)
    image.name = f"rayfarm {job_id}"
    if len(paths) > 1:
        image.source = "SEQUENCE"
    image.reload()
    SESSION.loaded.append(image.name)
    report("INFO", f"rayfarm: downloaded {len(paths)} frame(s) to {paths[0].parent}")
    if not _show_in_image_editor(image, len(paths), int(paths[0].stem)):
        try:
            window = bpy.context.window_manager.windows[0]
            with bpy.context.temp_override(window=window):
                bpy.ops.render.view_show("INVOKE_DEFAULT")
            _show_in_image_editor(image, len(paths), int(paths[0].stem))
        except (IndexError, RuntimeError):
            pass  # no window (background mode): the image is loaded, nothing to show it in
    return image


def _show_in_image_editor(image: bpy.types.Image, count: int, first: int) -> bool:
    for window in bpy.context.window_manager.windows:
        for area in window.screen.areas:
            if area.type == "IMAGE_EDITOR":
                space = area.spaces.active
                space.image = image
                if count > 1:
                    space.image_user.frame_start = first
                    space.image_user.frame_offset = first - 1
                    space.image_user.frame_duration = count
                    space.image_user.use_auto_refresh = True
                area.tag_redraw()
                return True
    return False


def _redraw() -> None:
    for window in bpy.context.window_manager.windows:
        for area in window.screen.areas:
            if area.type in {"PROPERTIES", "PREFERENCES"}:
                area.tag_redraw()


def _timer() -> float:
    try:
        drain()
    except Exception as exc:  # never let the timer die: Blender would drop it
        print(f"rayfarm: {exc!r}")
    return BUSY_INTERVAL_S if SESSION.busy() else IDLE_INTERVAL_S


def register() -> None:
    global SESSION
    SESSION = Session()
    SESSION.watcher = work.Watcher(SESSION.outbox)
    SESSION.watcher.start()
    bpy.app.timers.register(_timer, first_interval=IDLE_INTERVAL_S, persistent=True)


def unregister() -> None:
    if bpy.app.timers.is_registered(_timer):
        bpy.app.timers.unregister(_timer)
    for task in SESSION.tasks:
        task.cancel()
    if SESSION.watcher is not None:
        SESSION.watcher.stop()

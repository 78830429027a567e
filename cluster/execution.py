"""The dispatcher's part that runs tasks on render actors and records what comes back.

A whole frame comes back stored by the actor's call; a tile or a slice goes to the
TileAssembler, and the actor that rendered a frame's last part finishes it (denoise,
compositor, colour, format). While a sliced frame's slices land, previews of the merge
so far are stored. A batch of short frames is one actor call. Each outcome is recorded
in one thread hop to storage and one Redis script; the job completes (post-processing,
manifest) when its last frame is stored. A failure goes to ``failures.Failures``.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import time
from collections.abc import Callable
from typing import Any

from ray.exceptions import RayActorError

from rayfarm.cluster import storage as layout
from rayfarm.cluster.dispatch_state import DispatchState, slot_fields
from rayfarm.cluster.event_log import now_iso
from rayfarm.cluster.post import encode_video
from rayfarm.cluster.progress import NOT_PROCESSING, Finished
from rayfarm.cluster.runs import Run, Slot, task_key
from rayfarm.cluster.slicing import FrameSamples
from rayfarm.errors import InvalidTransition
from rayfarm.models import JobState
from rayfarm.render.inputs import check_path
from rayfarm.render.tasks import BatchResult, RenderTask, TaskResult

__all__ = ["Execution"]

log = logging.getLogger("rayfarm.dispatcher")


class Execution(DispatchState):
    """Runs tasks and batches on render actors and records their outcomes (see the module)."""

    def _releaser(self, slot: Slot, run: Run, tasks: list[RenderTask]) -> Callable[[], None]:
        """A call that frees ``slot`` once (later calls do nothing): the actor's part is
        done, so it takes its next task or batch while this one's frames are stored, and
        never idles on storage or Redis between them."""
        assert self._wake is not None
        wake = self._wake
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                slot.killed, slot.killed_at = None, 0.0  # its worker is stopped; it goes on
                slot.busy, slot.run, slot.user, slot.project = False, None, None, None
                slot.idle_at = time.monotonic()
                for task in tasks:
                    key = (run.id, task.frame, task.tile, task.slice)
                    if self._doing.get(key) is slot:  # not already the task's next attempt
                        del self._doing[key]
                wake.set()

        return release

    async def _execute(self, slot: Slot, run: Run, task: RenderTask) -> None:
        release = self._releaser(slot, run, [task])
        try:
            await self._started(slot, run, [task])
            meta_ref, payload_ref = slot.handle.render.options(num_returns=2).remote(
                task, run.inputs
            )
            meta: TaskResult = await meta_ref
            slot.holds = task.scene_hash
            if run.stopped:
                return
            if not task.is_part:
                release()
                await self._report_device(run, meta)
                image = await payload_ref
                run.frame_s.append(meta.seconds)
                for failed, error, log_text in await self._record(run, slot, [(task, meta, image)]):
                    await self._task_failed(slot, run, failed, error, output=log_text)
                return
            await self._report_device(run, meta)
            try:
                have = await self.assembler.add.remote(
                    run.id, task.frame, task.parts, meta.size, meta.rect, payload_ref,
                    meta.samples,
                )  # fmt: skip
            except RayActorError as exc:  # restarted empty: the frame's other parts are gone
                release()
                await self._task_failed(slot, run, task, exc, whole_frame=True)
                return
            del payload_ref  # the assembler has merged the part: let the object store free it
            run.render_s[task.frame] = run.render_s.get(task.frame, 0.0) + meta.seconds
            _landed(run, task, meta)
            await self._record(run, slot, [(task, meta, None)])
            if run.stopped:
                return
            if have < task.parts:
                if task.is_sliced:
                    await self._preview(slot, run, task)
                return
            try:
                # Finishing (denoise, compositor) reports no samples: the watch counts anew.
                slot.sign_at = time.monotonic()
                frame_ref = self.assembler.take.remote(run.id, task.frame)
                meta_ref, image_ref = slot.handle.finish.options(num_returns=2).remote(
                    task, run.inputs, frame_ref
                )
                meta = await meta_ref
                image = await image_ref
                release()
                if not run.stopped:
                    for _, error, _ in await self._record(run, slot, [(task, meta, image)], True):
                        raise error
                    if task.is_sliced:
                        await self._forget_preview(run, task.frame)
            except Exception as exc:
                await self._task_failed(slot, run, task, exc, whole_frame=True)
        except Exception as exc:
            await self._task_failed(slot, run, task, exc)
        finally:
            release()

    async def _preview(self, slot: Slot, run: Run, task: RenderTask) -> None:
        """A slice of a frame landed: when every pixel of the frame now has more of its
        samples than its stored preview shows, ``slot`` (whose actor holds the scene)
        makes a new one from the assembler's merge so far (``TileAssembler.peek``), and
        it is stored with a ``preview`` event saying the share of samples it holds. A
        preview that cannot be made is logged, never a failure of the job."""
        sampled = run.sampled.get(task.frame)
        if sampled is None or sampled.everywhere <= run.previewed.get(task.frame, 0.0):
            return
        try:
            slot.sign_at = time.monotonic()  # previewing reports no samples
            peek = self.assembler.peek.remote(run.id, task.frame)
            image, fraction, steps = await slot.handle.preview.remote(task, run.inputs, peek)
        except Exception:
            log.warning("job %s: no preview of frame %d", run.id, task.frame, exc_info=True)
            return
        async with self._previewing:  # a slower, older preview never overwrites a newer
            # Every sample already (the last slice landed while this preview was made):
            # the frame is being finished, and the finished frame is what is shown next.
            if run.stopped or fraction >= 1.0 or fraction <= run.previewed.get(task.frame, 0.0):
                return
            run.previewed[task.frame] = fraction
            key = layout.preview_key(run.id, task.frame)
            await asyncio.to_thread(self.storage.put_bytes, key, image)
            await self.store.set_preview_share(run.id, task.frame, fraction)
            # Inside the lock: the log shows the previews in the order they were stored.
            await self.store.event(
                run.id, "preview", frame=task.frame, fraction=f"{fraction:.4f}",
                preview_s=f"{steps.get('preview_s', 0.0):.3f}", **slot_fields(slot),
            )  # fmt: skip

    async def _forget_preview(self, run: Run, frame: int) -> None:
        """A sliced frame is stored whole: its preview in progress goes (the frame's own
        thumbnail replaces it), and no preview still being made is stored after."""
        async with self._previewing:
            run.previewed[frame] = 1.0
            run.sampled.pop(frame, None)
            await self.store.forget_preview(run.id, frame)
            await asyncio.to_thread(self.storage.delete, layout.preview_key(run.id, frame))

    async def _execute_batch(self, slot: Slot, run: Run, tasks: list[RenderTask]) -> None:
        """Render a batch of short whole-frame tasks in one actor call (see the module's
        docstring for what a failure inside it does)."""
        release = self._releaser(slot, run, tasks)
        try:
            try:
                await self._started(slot, run, tasks)
                batch: BatchResult = await slot.handle.render_batch.remote(tasks, run.inputs)
            except Exception as exc:
                await self._batch_lost(slot, run, tasks, exc)
                return
            slot.holds = run.scene_hash
            release()
            if run.stopped:
                return
            finished = len(batch.results)
            if finished:
                await self._report_device(run, batch.results[0][0])
                run.frame_s.extend(meta.seconds for meta, _ in batch.results)
                items = [
                    (t, meta, image) for t, (meta, image) in zip(tasks, batch.results, strict=False)
                ]
                for failed, error, log_text in await self._record(run, slot, items):
                    await self._task_failed(slot, run, failed, error, output=log_text)
            if batch.error is None:
                return
            cause = batch.error if isinstance(batch.error, Exception) else RuntimeError(batch.error)
            await self._task_failed(slot, run, tasks[finished], cause, output=batch.log)
            await self._requeue_unstarted(run, tasks[finished + 1 :])
        except Exception:
            log.exception("job %s: a batch of %d tasks failed to record", run.id, len(tasks))
            try:  # render again what is not recorded as done
                done = await self.store.tasks_done(run.id)
                await self._requeue_unstarted(run, [t for t in tasks if task_key(t) not in done])
            except Exception:
                log.exception("job %s: could not queue a failed batch again", run.id)
        finally:
            release()

    async def _started(self, slot: Slot, run: Run, tasks: list[RenderTask]) -> None:
        """Learn the actor's node and device (once; it answers after loading Blender)
        and log the tasks' start (a batch's all at once, when it is handed over)."""
        if slot.node is None:
            info = await slot.handle.info.remote()
            slot.node, slot.host, slot.device = info["node_id"], info["host"], info["device"]
            slot.pid = info.get("pid")
            slot.sign_at = time.monotonic()  # the hang watch does not count its start-up
        named = [(task_key(t), t.frame, t.tile, *((t.slice,) if t.is_sliced else ()))
                 for t in tasks]  # fmt: skip
        attempts = await self.store.start_tasks(run.id, named, **slot_fields(slot))
        run.tries.update((str(t[0]), n) for t, n in zip(named, attempts, strict=True))

    async def _record(
        self,
        run: Run,
        slot: Slot,
        items: list[tuple[RenderTask, TaskResult, bytes | None]],
        finishing: bool = False,
    ) -> list[tuple[RenderTask, Exception, str]]:
        """Record what an actor call finished, in one thread hop to storage and one Redis
        script: whole frames (task done, frame stored), a tile (``image`` None: task done)
        or, ``finishing``, a tiled frame (stored). Each task's log is kept in storage.
        Returns the (task, error, log) of frames that could not be stored, for the
        caller's failure path; the rest are recorded."""
        put = self.storage.put_bytes

        def write() -> list[tuple[str, int, float] | Exception]:
            outcomes: list[tuple[str, int, float] | Exception] = []
            for task, meta, image in items:
                key = task_key(task)
                if meta.log and not finishing:
                    where = layout.task_log_key(run.id, key, run.tries.get(key, 1))
                    try:
                        put(where, meta.log.encode())
                    except Exception:
                        log.warning("job %s: could not store the log of %s", run.id, key,
                                    exc_info=True)  # fmt: skip
                if image is None:
                    outcomes.append(("", 0, 0.0))
                    continue
                try:
                    storing = time.perf_counter()
                    if meta.preview:
                        put(layout.thumbnail_key(run.id, task.frame), meta.preview)
                    put(layout.frame_key(run.id, task.frame, run.job.spec.extension), image)
                    for name, data in meta.files.items():
                        put(layout.file_output_key(run.id, task.frame, check_path(name)), data)
                    digest = hashlib.sha256(image).hexdigest()
                    outcomes.append((digest, len(image), time.perf_counter() - storing))
                except Exception as exc:
                    outcomes.append(exc)
            return outcomes

        outcomes = await asyncio.to_thread(write)
        failures: list[tuple[RenderTask, Exception, str]] = []
        records: list[Finished] = []
        for (task, meta, image), outcome in zip(items, outcomes, strict=True):
            if isinstance(outcome, Exception):
                failures.append((task, outcome, meta.log))
                continue
            key = task_key(task)
            done: dict[str, Any] = {}
            # Where the actor's seconds went (open, render, write, ...; bench/overhead.py).
            steps = {name: f"{seconds:.3f}" for name, seconds in meta.steps.items()}
            if not finishing:
                done = {"frame": task.frame, "tile": task.tile, "attempt": run.tries.get(key, 1),
                        **slot_fields(slot), "worker": meta.worker, **steps,
                        **_slice_fields(run, task, meta)}  # fmt: skip
            stored: dict[str, Any] = {}
            if image is not None:
                # Render seconds of the frame: its task, or its tiles and the finish step.
                seconds = run.render_s.pop(task.frame, 0.0) + meta.seconds
                sha256, size, store_s = outcome
                stored = {
                    "object_key": layout.frame_key(run.id, task.frame, run.job.spec.extension),
                    "meta": {"sha256": sha256, "size": size, "render_s": round(seconds, 3),
                             "device": meta.device},
                    # A tiled frame's finish (denoise, compositor, format) is timed on its own.
                    "frame_event": {
                        **({"finish_s": f"{meta.seconds:.3f}", **steps} if finishing else {}),
                        "store_s": f"{store_s:.3f}",
                    },
                }  # fmt: skip
            records.append(Finished(
                task.frame, None if finishing else key, meta.seconds, done, **stored
            ))  # fmt: skip
        if not records:
            return failures
        count = await self.store.finish_tasks(run.id, records)
        if count == NOT_PROCESSING:
            return []  # cancelled or failed meanwhile: nothing more to do for these
        for task, meta, _ in items:
            for warning in meta.warnings:
                if warning not in run.warned:
                    run.warned.add(warning)
                    key = task_key(task)
                    await self.store.event(run.id, "warning", message=warning, task=key)
        if count >= run.job.frames_total and not run.stopped:
            await self._complete(run)
        return failures

    async def _keep_log(self, run: Run, key: str, attempt: int, text: str) -> None:
        """Store Blender's output for one attempt at a task (``GET .../tasks/{key}/log``)."""
        if not text:
            return
        where = layout.task_log_key(run.id, key, attempt)
        try:
            await asyncio.to_thread(self.storage.put_bytes, where, text.encode())
        except Exception:
            log.warning("job %s: could not store the log of %s", run.id, key, exc_info=True)

    async def _complete(self, run: Run) -> None:
        """Every frame is stored: post-process (video), write the manifest, COMPLETED.
        A post-processing failure fails the job with its message; the frames stay."""
        frames = await self.store.frames_done(run.id)
        meta = await self.store.frame_meta(run.id)
        outputs: dict[str, str] = {}
        video = run.job.spec.post.video if run.job.spec.post else None
        if video is not None and not run.stopped:
            await self.store.event(run.id, "post", step="video", frames=len(frames))
            try:
                key, count, seconds = await asyncio.to_thread(
                    encode_video, self.storage, run.id, frames, video
                )
            except Exception as exc:
                log.warning("job %s: video encoding failed: %s", run.id, exc)
                self._stop(run)
                await self._fail(run.id, f"video encoding failed (frames kept): {exc}")
                return
            outputs["video"] = key
            await self.store.event(
                run.id, "output", name="video", key=key, frames=count, seconds=f"{seconds:.2f}"
            )
        manifest = {
            "job": run.id,
            "spec": run.job.spec.model_dump(mode="json"),
            "frames": {str(k): frames[k] for k in sorted(frames)},
            "files": {
                frames[k]: meta.get(k, {}) for k in sorted(frames)
            },  # key -> {"sha256", "size", "render_s", "device"}
            "outputs": outputs,
            "completed_at": now_iso(),
        }
        await asyncio.to_thread(
            self.storage.put_bytes,
            layout.manifest_key(run.id),
            json.dumps(manifest, indent=2).encode(),
        )
        try:
            await self.store.transition(run.id, JobState.COMPLETED)
        except InvalidTransition:
            pass  # cancelled at the last moment: the cancel stands
        self._stop(run)

    async def _report_device(self, run: Run, meta: TaskResult) -> None:
        if run.device_reported:
            return
        run.device_reported = True
        await self.store.set_fields(run.id, device=meta.device)
        await self.store.event(run.id, "device", device=meta.device)


def _landed(run: Run, task: RenderTask, meta: TaskResult) -> None:
    """Count a landed slice's samples in its frame's (``FrameSamples``)."""
    if not task.is_sliced or meta.samples is None or meta.rect is None or meta.size is None:
        return
    nx, ny = task.tiles
    sampled = run.sampled.setdefault(task.frame, FrameSamples(nx * ny))
    width, height = meta.size
    area = meta.rect.width * meta.rect.height / max(1, width * height)
    sampled.land(task.tile, area, meta.samples)


def _slice_fields(run: Run, task: RenderTask, meta: TaskResult) -> dict[str, Any]:
    """A slice's fields in its ``task_done`` event: which slice, its samples (``subset``:
    first-last of the frame's) and the share of the frame's samples landed now."""
    if not task.is_sliced:
        return {}
    fields: dict[str, Any] = {"slice": task.slice, "slices": task.slices}
    if meta.samples is not None:
        offset, length, total = meta.samples
        fields["subset"] = f"{offset}-{offset + length - 1} of {total}"
        sampled = run.sampled.get(task.frame)
        after = None if sampled is None else sampled.after.get((task.tile, offset))
        if after is not None:
            fields["fraction"] = f"{after:.4f}"
    return fields

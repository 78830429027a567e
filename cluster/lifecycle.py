"""What a job's owner (or an admin) does to a job after submitting it: cancel and retry,
the same for every ingress (``POST /jobs/{id}/cancel`` and gRPC ``CancelJob`` call
``cancel_job``; ``POST /jobs/{id}/retry`` calls ``retry_job``).

Each checks who may change the job (404 for a job the caller may not see, 403 for one
it sees but may not change), makes the change atomically in the job store, wakes the
dispatcher and answers the job as it is now.
"""

from __future__ import annotations

from rayfarm.cluster.auth import Principal
from rayfarm.cluster.context import AppContext, check_may_change
from rayfarm.models import JobRecord, JobState, check_transition

__all__ = ["cancel_job", "retry_job"]


async def cancel_job(ctx: AppContext, who: Principal, job_id: str) -> JobRecord:
    """PENDING or PROCESSING -> CANCELLED; the dispatcher stops its queued tasks and its
    renders in progress. ``InvalidTransition`` (409) from any other state."""
    await check_may_change(ctx, who, job_id)
    await ctx.store.transition(job_id, JobState.CANCELLED)
    ctx.nudge()
    return await ctx.store.get(job_id)


async def retry_job(ctx: AppContext, who: Principal, job_id: str) -> JobRecord:
    """FAILED -> PENDING; only frames not yet stored are rendered again (tile tasks of
    frames not stored are forgotten first). ``InvalidTransition`` (409) from any other
    state, before anything is changed."""
    await check_may_change(ctx, who, job_id)
    status = await ctx.store.status(job_id)
    check_transition(job_id, status.state, JobState.PENDING)
    await ctx.store.reset_incomplete(job_id)
    await ctx.store.transition(job_id, JobState.PENDING)
    ctx.nudge()
    return await ctx.store.get(job_id)

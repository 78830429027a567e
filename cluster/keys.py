"""Every Redis key name rayfarm uses, built in one place.

``job:{id}``            hash: id, state, owner, spec (JSON), counters, timestamps, error,
                        state_event (id of the event that set the current state)
``job:{id}:tasks``      hash: task key ("f0000001t003", "f0000001t003s02" for a slice)
                        -> "done"
``job:{id}:frames``     hash: frame number -> stored object key
``job:{id}:attempts``   hash: task key -> failed attempts so far (reset by a retry)
``job:{id}:tries``      hash: task key -> times started, ever (numbers its logs)
``job:{id}:events``     stream: the execution log (state changes, task events, progress)
``job:{id}:previews``   hash: frame -> the share of its samples its preview holds, while
                        its sample slices render
``jobs``                sorted set: every job id by creation time (listing)
``jobs:{STATE}``        sorted set: the job ids in one state, by creation time
``jobs:owner:{user}``   sorted set: a user's job ids, by creation time (listings)
``jobs:project:{name}`` sorted set: a project's job ids, by creation time (listings)
``indexes``             string: the version of the owner and project indexes built
``changes``             stream: job id, owner, project and new state at each job's
                        creation and state change (what the web page's list follows)
``queue``               sorted set: PENDING job ids by priority, then submission time
``metrics``             hash: farm-wide counters (tasks, render seconds, uploads)
``users``               hash: user name -> {"role", "projects", "created_at"} (JSON)
``tokens``              hash: SHA-256 of an API token -> {"user", "label", "created_at"}
``audit``               stream: who did what to which job, from where, with what outcome
``blob:{sha}``          hash: an indexed blob's size, state ("live", or "dying" while its
                        object is deleted) and when it was first indexed
``blob:{sha}:refs``     sorted set: what keeps a blob: job ids (score +inf), ``up:{user}``
                        (an upload no job of that user's uses yet) and ``hold:{token}`` (a
                        submission being checked), scored by when they lapse
``uploads:{user}``      sorted set: a user's blobs no job of theirs uses yet, by when they
                        lapse (the upload quota counts them)
``upload_bytes``        hash: user -> bytes of ``uploads:{user}``
``blobs``               hash: ``count`` and ``bytes`` of the blobs indexed
``blobs:due``           sorted set: blobs to look at when a reference lapses, by when
``blobs:dying``         sorted set: blobs whose objects are being deleted, by since when
``blobs:indexed``       string: the version of the blob references built over older jobs
``deleted``             sorted set: ids of deleted jobs, by when (late writes are swept)
``sweep``               hash: the last housekeeping sweep (when, what it did)
``sweep:lock``          string: held by the replica sweeping now
``usage``               hash: storage bytes and objects, by area, as the last sweep measured
``limit:{kind}:{who}``  hash: a rate limit's token bucket (``auth``, ``submit``, ``record``)
``limit:tally:{kind}:{address}`` hash: refused anonymous requests not yet in the audit log
``streams:{user}``      sorted set: the user's open event streams (lease id -> expiry, ms)
``shares``              hash: project -> its fair-share weight (admins set it; default 1)
``quotas``              hash: ``user:{name}`` / ``project:{name}`` -> most slots at once,
                        ``{"gpu": n, "cpu": n}`` (JSON; a kind left out has no limit)
``webhooks``            hash: user -> ``{"url", "secret"}`` (JSON): their jobs' webhook
``webhooks:due``        sorted set: webhook deliveries to try again (JSON), by when
"""

from __future__ import annotations

PREFIX = "rayfarm:"


def job(job_id: str) -> str:
    return f"{PREFIX}job:{job_id}"


def tasks(job_id: str) -> str:
    return f"{PREFIX}job:{job_id}:tasks"


def frames(job_id: str) -> str:
    return f"{PREFIX}job:{job_id}:frames"


def frame_meta(job_id: str) -> str:
    """Per stored frame: its SHA-256 and size, as JSON."""
    return f"{PREFIX}job:{job_id}:frame_meta"


def attempts(job_id: str) -> str:
    return f"{PREFIX}job:{job_id}:attempts"


def tries(job_id: str) -> str:
    return f"{PREFIX}job:{job_id}:tries"


def events(job_id: str) -> str:
    return f"{PREFIX}job:{job_id}:events"


def scene(scene_id: str) -> str:
    """The catalogue entry of an uploaded scene (JSON), by its folder digest."""
    return f"{PREFIX}scene:{scene_id}"


def all_jobs() -> str:
    return f"{PREFIX}jobs"


def jobs_in(state: str) -> str:
    """Job ids in ``state`` by creation time (kept by the transition script)."""
    return f"{PREFIX}jobs:{state}"


def jobs_of(owner: str) -> str:
    """A user's job ids by creation time (what a non-admin's listing reads)."""
    return f"{PREFIX}jobs:owner:{owner}"


def jobs_in_project(project: str) -> str:
    """A project's job ids by creation time."""
    return f"{PREFIX}jobs:project:{project}"


def indexes() -> str:
    """The version of the owner/project indexes built over the jobs stored before them."""
    return f"{PREFIX}indexes"


def scratch(name: str) -> str:
    """A short-lived key of one request's (a listing's set algebra)."""
    return f"{PREFIX}scratch:{name}"


def changes() -> str:
    """Every job's creation and state changes, farm-wide (``job``, ``owner``,
    ``project``, ``state``): what a list of jobs follows to stay current."""
    return f"{PREFIX}changes"


def metrics() -> str:
    return f"{PREFIX}metrics"


def users() -> str:
    return f"{PREFIX}users"


def tokens() -> str:
    return f"{PREFIX}tokens"


def audit() -> str:
    return f"{PREFIX}audit"


def streams(user: str) -> str:
    """The event streams ``user`` holds open, farm-wide (``rayfarm.cluster.streams``)."""
    return f"{PREFIX}streams:{user}"


def queue() -> str:
    return f"{PREFIX}queue"


def blob(sha256: str) -> str:
    return f"{PREFIX}blob:{sha256}"


def blob_refs(sha256: str) -> str:
    return f"{PREFIX}blob:{sha256}:refs"


def uploads_of(user: str) -> str:
    return f"{PREFIX}uploads:{user}"


def upload_bytes() -> str:
    return f"{PREFIX}upload_bytes"


def blob_stats() -> str:
    return f"{PREFIX}blobs"


def blobs_due() -> str:
    return f"{PREFIX}blobs:due"


def blobs_dying() -> str:
    return f"{PREFIX}blobs:dying"


def blobs_indexed() -> str:
    return f"{PREFIX}blobs:indexed"


def deleted() -> str:
    return f"{PREFIX}deleted"


def sweep() -> str:
    return f"{PREFIX}sweep"


def sweep_lock() -> str:
    return f"{PREFIX}sweep:lock"


def usage() -> str:
    return f"{PREFIX}usage"


def limit(kind: str, who: str) -> str:
    """A token bucket: ``kind`` is ``auth`` (failed sign-ins of an address), ``submit``
    (a user's submissions) or ``record`` (audit records of refusals; ``who`` ``*`` is
    the farm-wide one)."""
    return f"{PREFIX}limit:{kind}:{who}"


def tally(kind: str, address: str) -> str:
    """Refused anonymous requests of one kind from ``address`` not yet audited."""
    return f"{PREFIX}limit:tally:{kind}:{address}"


def shares() -> str:
    return f"{PREFIX}shares"


def quotas() -> str:
    return f"{PREFIX}quotas"


def webhooks() -> str:
    return f"{PREFIX}webhooks"


def webhooks_due() -> str:
    return f"{PREFIX}webhooks:due"


def task_key(frame: int, tile: int, slice: int | None = None) -> str:
    """A task's key: ``f0000012t003`` (frame 12, tile 3), and for a frame split into
    sample slices ``f0000012t003s01`` (its slice 1)."""
    return f"f{frame:07d}t{tile:03d}" + ("" if slice is None else f"s{slice:02d}")


def previews(job_id: str) -> str:
    """Per frame still rendering its sample slices: the share of its samples its stored
    preview holds."""
    return f"{PREFIX}job:{job_id}:previews"

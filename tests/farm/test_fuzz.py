"""The HTTP API fuzzed from its own OpenAPI schema with schemathesis: whatever a client
sends — malformed bodies, absurd numbers, odd path segments — the farm answers with a
status below 500, and stays up.

Requests carry the admin's token (without one every answer would be a 401). Path
parameters naming a job are mostly replaced by a real, completed job's id, so the
generated frames, tasks, output names and query parameters reach the code behind the
lookup instead of stopping at a 404; the rest keep their generated ids (the 404 path).
Each operation is driven by Hypothesis directly (schemathesis' pytest plugin does not
load under pytest 9).
"""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error

from rayfarm import Farm

from helpers import AUTH
from helpers.farms import completed

pytestmark = pytest.mark.slow

#: Generated requests per operation.
EXAMPLES = 40


@pytest.fixture(scope="module")
def done_job(farm: Farm, small_scene):
    return completed(farm.submit(small_scene, frames="1-2"))


@pytest.fixture(scope="module")
def api_schema(local_farm):
    return schemathesis.openapi.from_url(f"{local_farm.url}/openapi.json")


def _operations(schema):
    return [result.ok() for result in schema.get_all_operations()]


def test_the_schema_lists_every_route(api_schema):
    labels = {op.label for op in _operations(api_schema)}
    assert {"POST /jobs", "GET /jobs/{job_id}/status", "GET /jobs/{job_id}/events",
            "PUT /blobs/{sha256}", "GET /metrics"} <= labels, labels  # fmt: skip


def _fuzz(operation, job_id: str) -> int:
    """Send ``EXAMPLES`` generated requests to one operation; how many were sent."""
    sent = 0

    @given(case=operation.as_strategy())
    @settings(
        max_examples=EXAMPLES, deadline=None, database=None, suppress_health_check=list(HealthCheck)
    )
    def send(case):
        nonlocal sent
        params = case.path_parameters or {}
        # Not for DELETE: the finished job would be gone for the operations after it.
        deleting = operation.method.upper() == "DELETE"
        if "job_id" in params and len(repr(sorted(params.items()))) % 4 and not deleting:
            params["job_id"] = job_id
        if case.query and "wait_s" in case.query:
            case.query["wait_s"] = 0  # a long-poll on a finished job answers at once anyway
        case.call_and_validate(headers=AUTH, checks=[not_a_server_error])
        sent += 1

    send()
    return sent


#: Streams that never end (a request would wait forever for the whole body); each takes
#: no parameter and no body, so there is nothing to generate. Tested in test_web.py.
ENDLESS = {"GET /watch/list"}


def test_no_request_gets_a_server_error(api_schema, done_job, farm):
    for operation in _operations(api_schema):
        if operation.label in ENDLESS:
            assert not operation.path_parameters and not operation.query, operation.label
            assert not operation.body, operation.label
            continue
        assert _fuzz(operation, done_job.id) > 0, operation.label
        assert farm.health()["status"] == "ok", operation.label

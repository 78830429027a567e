"""The farm's web page.

The session and CSRF rules are tested over HTTP on the ASGI app (real Redis, real file
storage). The page itself is driven in a real headless Chromium (Debian's, through
Playwright) against a real local farm: sign in, submit a scene through the form and
watch it complete, open a frame, play the video, cancel a job, see a refusal, and check
that a viewer sees exactly what the API lets it see. Screenshots go to
``$RAYFARM_WEB_SHOTS`` (docs/'s are made so: docs/web.md) or pytest's temporary folder.
"""

from __future__ import annotations

import json
import os
import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient
from playwright.sync_api import Browser, Page, expect, sync_playwright

from rayfarm.cluster.api import AppContext, create_app
from rayfarm.cluster.auth import PRINCIPAL_TTL_S
from rayfarm.cluster.context import CSRF_HEADER, SESSION_COOKIE
from rayfarm.cluster.local import bootstrap_admin
from rayfarm.cluster.settings import Settings

from helpers import ADMIN_TOKEN, AUTH
from helpers.farms import WAIT_S

#: The page's own header for state-changing requests.
PAGE = {CSRF_HEADER: "1"}
#: Chromium as the tests launch it (the machine's network is closed: nothing to fetch).
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]  # fmt: skip
#: Playwright's auto-waiting limit for what a render decides (milliseconds).
RENDER_MS = WAIT_S * 1000
#: ... and for what the page shows without waiting on a render.
PAGE_MS = 30_000
LAPTOP = {"width": 1280, "height": 800}
expect.set_options(timeout=PAGE_MS)
PHONE = {"width": 390, "height": 844}


# -- the session cookie and CSRF rules, over HTTP --------------------------------------------


@pytest.fixture
def app(redis_url, tmp_path) -> Iterator[TestClient]:
    """The API as an ASGI app, with a client that sends no token of its own."""
    settings = Settings(
        redis_url=redis_url,
        storage=(tmp_path / "storage").as_uri(),
        data_dir=str(tmp_path),
        blender=("5.0",),
    )
    bootstrap_admin(redis_url, ADMIN_TOKEN)
    with TestClient(
        create_app(AppContext.build(settings)), raise_server_exceptions=False
    ) as client:
        client.storage_dir = tmp_path / "storage"  # type: ignore[attr-defined]
        yield client


def _user(client: TestClient, user: str, role: str, projects: list[str] | None = None) -> str:
    body = {"user": user, "role": role, **({"projects": projects} if projects else {})}
    r = client.post("/tokens", json=body, headers=AUTH)
    assert r.status_code == 201, r.text
    return r.json()["token"]


def _error(response: httpx.Response, status: int, code: str, fragment: str) -> None:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == code and fragment in error["message"], error


def _sign_ins_failed(client: TestClient) -> int:
    r = client.get("/audit", params={"action": "sign-in failed", "limit": 1000}, headers=AUTH)
    return len(r.json()["records"])


def test_the_page_and_its_files_are_served_with_a_strict_policy(app):
    page = app.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    policy = page.headers["content-security-policy"]
    assert "script-src 'self'" in policy and "frame-ancestors 'none'" in policy
    assert "'unsafe-inline'" not in policy
    for asset in ("app.js", "app.css"):
        assert f"/ui/{asset}?v=" in page.text
        assert app.get(f"/ui/{asset}").status_code == 200
    assert app.get("/ui/nothing.js").status_code == 404
    # The page is not part of the API's schema (the fuzz test reads that schema).
    paths = app.get("/openapi.json").json()["paths"]
    assert "/" not in paths and {"/session", "/watch", "/farm"} <= set(paths)


def test_sign_in_sets_an_httponly_strict_cookie_that_signs_requests_in(app):
    token = _user(app, "ana", "artist", ["p1"])
    failed = _sign_ins_failed(app)
    _error(app.post("/session", json={"token": "rf_" + "A" * 43}, headers=PAGE), 401,
           "unauthorized", "unknown or malformed token")  # fmt: skip
    _error(app.post("/session", json={"token": ""}, headers=PAGE), 401, "unauthorized", "")
    # Audited as any bad token is: aggregated per address, the first recorded at once,
    # the second counted into the address's next record (and in the metrics).
    assert _sign_ins_failed(app) == failed + 1
    assert "rayfarm_refused_sign_in_total 2.0" in app.get("/metrics").text
    for body in (b"not json", b'{"token": 1}', b'{"token": "x", "more": 1}', b"[]"):
        r = app.post("/session", content=body, headers=PAGE)
        _error(r, 400, "invalid_request", "")
    assert SESSION_COOKIE not in app.cookies

    r = app.post("/session", json={"token": token}, headers=PAGE)
    assert r.status_code == 200, r.text
    assert r.json() == {"user": "ana", "role": "artist", "projects": ["p1"], "may_submit": True,
                        "accounts": True}  # fmt: skip
    cookie = r.headers["set-cookie"]
    assert cookie.startswith(f"{SESSION_COOKIE}={token};")
    parts = {p.strip().lower() for p in cookie.split(";")}
    assert {"httponly", "path=/", "samesite=strict"} <= parts and "secure" not in parts
    assert not any(p.startswith(("max-age", "expires")) for p in parts)  # a browser session
    # The cookie alone signs reads in, with the token's rights.
    assert app.get("/whoami").json()["user"] == "ana"
    assert app.get("/session").json()["may_submit"] is True
    _error(app.get("/users"), 403, "forbidden", "for admins")
    # Behind a proxy that terminated TLS, the cookie is Secure.
    r = app.post("/session", json={"token": token},
                 headers={**PAGE, "X-Forwarded-Proto": "https"})  # fmt: skip
    assert "secure" in {p.strip().lower() for p in r.headers["set-cookie"].split(";")}
    records = app.get("/audit", params={"user": "ana"}, headers=AUTH).json()["records"]
    assert [(r["action"], r["outcome"]) for r in records[:2]] == [("POST /session", "200")] * 2


def test_a_cookie_without_the_page_header_cannot_change_anything(app, small_scene):
    token = _user(app, "ana", "artist")
    app.cookies.set(SESSION_COOKIE, token)
    form = {"scene": ("shot.blend", small_scene.read_bytes())}
    spec = {"spec": json.dumps({"frames": "1"})}
    # What a form on another site could make the browser send: refused, nothing stored.
    _error(app.post("/jobs", files=form, data=spec), 403, "forbidden", CSRF_HEADER)
    assert app.get("/jobs").json()["total"] == 0
    assert not any(p.is_file() for p in app.storage_dir.rglob("*"))
    _error(app.post("/session", json={"token": token}), 403, "forbidden", CSRF_HEADER)
    _error(app.delete("/session"), 403, "forbidden", CSRF_HEADER)
    # The page's own request, with the header, goes through and can cancel.
    job = app.post("/jobs", files=form, data=spec, headers=PAGE).json()
    assert job["owner"] == "ana"
    _error(app.post(f"/jobs/{job['id']}/cancel"), 403, "forbidden", CSRF_HEADER)
    assert app.get(f"/jobs/{job['id']}").json()["state"] == "PENDING"
    assert app.post(f"/jobs/{job['id']}/cancel", headers=PAGE).json()["state"] == "CANCELLED"
    refusals = app.get("/audit", params={"user": "ana"}, headers=AUTH).json()["records"]
    assert ("POST /jobs", "403") in [(r["action"], r["outcome"]) for r in refusals]
    # API clients are unchanged: the Authorization header needs no page header, and wins
    # over a cookie.
    r = app.post("/blobs/missing", json={"hashes": []}, headers=AUTH)
    assert r.status_code == 200, r.text
    assert app.get("/whoami", headers=AUTH).json()["user"] == "admin"


def test_sign_out_clears_the_cookie_and_a_bad_cookie_is_401(app):
    token = _user(app, "ana", "artist")
    assert app.post("/session", json={"token": token}, headers=PAGE).status_code == 200
    r = app.delete("/session", headers=PAGE)
    assert r.status_code == 204
    cleared = r.headers["set-cookie"]
    assert cleared.startswith(f'{SESSION_COOKIE}="";')
    assert "max-age=0" in {p.strip().lower() for p in cleared.split(";")}
    assert SESSION_COOKIE not in app.cookies
    _error(app.get("/whoami"), 401, "unauthorized", "no token")
    assert app.delete("/session", headers=PAGE).status_code == 204  # signed out already
    app.cookies.set(SESSION_COOKIE, "rf_" + "B" * 43)
    _error(app.get("/jobs"), 401, "unauthorized", "unknown or malformed token")
    records = app.get("/audit", params={"user": "ana"}, headers=AUTH).json()["records"]
    assert records[0]["action"] == "DELETE /session"  # the audit names who signed out


def test_a_farm_without_accounts_needs_no_sign_in(redis_url, tmp_path):
    settings = Settings(redis_url=redis_url, storage=(tmp_path / "s").as_uri(),
                        data_dir=str(tmp_path), auth=False)  # fmt: skip
    # Such a farm answers its own machine's names only (Host: no DNS rebinding).
    app = create_app(AppContext.build(settings))
    with TestClient(app, base_url="http://127.0.0.1", raise_server_exceptions=False) as client:
        me = {"user": "local", "role": "admin", "projects": [], "may_submit": True,
              "accounts": False}  # fmt: skip
        assert client.get("/session").json() == me
        r = client.post("/session", json={"token": "anything"}, headers=PAGE)
        assert r.status_code == 200 and r.json() == me and "set-cookie" not in r.headers


def test_watch_and_farm_answer_bad_input_precisely(app, small_scene):
    ana = {"Authorization": f"Bearer {_user(app, 'ana', 'artist')}"}
    bo = {"Authorization": f"Bearer {_user(app, 'bo', 'artist')}"}
    form = {"scene": ("shot.blend", small_scene.read_bytes())}
    job = app.post("/jobs", files=form, data={"spec": '{"frames": "1"}'}, headers=ana).json()
    _error(app.get("/watch", headers=ana), 400, "invalid_request", "jobs")
    _error(app.get("/watch", params={"jobs": " , "}, headers=ana), 400, "invalid_request",
           "at least one")  # fmt: skip
    many = ",".join(f"{i:016x}" for i in range(101))
    _error(app.get("/watch", params={"jobs": many}, headers=ana), 400, "invalid_request",
           "at most 100")  # fmt: skip
    _error(app.get("/watch", params={"jobs": "../etc"}, headers=ana), 404, "job_not_found", "")
    # Another's job is as unknown as a made-up id, whichever place it has in the list.
    for ids in (job["id"], f"{job['id']},{'0' * 16}", f"{'0' * 16},{job['id']}"):
        _error(app.get("/watch", params={"jobs": ids}, headers=bo), 404, "job_not_found", "")
    _error(app.get("/watch", params={"jobs": job["id"]}), 401, "unauthorized", "no token")
    # A job in a terminal state: its record once, then the end.
    app.post(f"/jobs/{job['id']}/cancel", headers=ana)
    r = app.get("/watch", params={"jobs": f"{job['id']},{job['id']}"}, headers=ana)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    messages = [m for m in r.text.split("\n\n") if m.startswith("event:")]
    assert len(messages) == 2 and messages[1].startswith("event: end")
    data = json.loads(messages[0].split("data: ", 1)[1])
    assert data["job"]["id"] == job["id"] and data["job"]["state"] == "CANCELLED"
    assert data["actions"] == {"change": True, "cancel": False, "retry": False}
    # The farm: any signed-in user; no dispatcher here, so no actors.
    farm = app.get("/farm", headers=bo).json()
    assert farm["dispatcher"] is False and farm["actors"] == [] and farm["tasks_pending"] is None
    assert farm["scaling"] is None
    assert farm["jobs"]["CANCELLED"] == 1 and farm["queue_depth"] == 0
    _error(app.get("/farm"), 401, "unauthorized", "no token")
    _error(app.get("/watch/list"), 401, "unauthorized", "no token")


# -- the page in a real browser, against a real farm -----------------------------------------


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    executable = os.environ.get("RAYFARM_CHROMIUM", "/usr/bin/chromium")
    assert Path(executable).exists(), (
        f"{executable} is missing: make setup installs it (scripts/install-system.sh)"
    )
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


@pytest.fixture(scope="module")
def shots(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where screenshots go: ``$RAYFARM_WEB_SHOTS`` or a temporary folder."""
    given = os.environ.get("RAYFARM_WEB_SHOTS")
    if given:
        Path(given).mkdir(parents=True, exist_ok=True)
        return Path(given)
    return tmp_path_factory.mktemp("web-shots")


class Users:
    """Accounts of the page's tests on the session's farm (its admin makes them)."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.tokens: dict[str, str] = {}

    def make(self, user: str, role: str, projects: list[str] | None = None) -> str:
        body = {"user": user, "role": role, "projects": projects or []}
        r = httpx.post(f"{self.url}/tokens", json=body, headers=AUTH, timeout=30)
        assert r.status_code == 201, r.text
        self.tokens[user] = r.json()["token"]
        return self.tokens[user]

    def headers(self, user: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.tokens[user]}"}

    def submit(
        self, user: str, scene: Path, name: str = "shot.blend", **spec: object
    ) -> dict[str, object]:
        form = {"scene": (name, scene.read_bytes())}
        r = httpx.post(f"{self.url}/jobs", files=form, data={"spec": json.dumps(spec)},
                       headers=self.headers(user), timeout=60)  # fmt: skip
        assert r.status_code == 201, r.text
        return r.json()


@pytest.fixture(scope="module")
def users(local_farm) -> Users:
    accounts = Users(local_farm.url)
    accounts.make("web-ana", "artist", ["web-p"])
    accounts.make("web-vic", "viewer", ["web-p"])
    accounts.make("web-eve", "artist", ["web-p"])
    return accounts


def _page(browser: Browser, size: dict[str, int] = LAPTOP) -> Page:
    page = browser.new_context(viewport=size).new_page()
    page.set_default_timeout(PAGE_MS)
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.errors = errors  # type: ignore[attr-defined]
    return page


def _sign_in(page: Page, url: str, token: str, who: str) -> None:
    page.goto(url)
    expect(page.get_by_role("heading", name="Sign in")).to_be_visible()
    # By keyboard: the token field has the focus; Enter submits the form.
    expect(page.get_by_label("API token")).to_be_focused()
    page.keyboard.type(token)
    page.keyboard.press("Enter")
    expect(page.get_by_role("heading", name="Jobs")).to_be_visible()
    expect(page.locator("#who-name")).to_have_text(who)


def _long_job(users: Users, user: str, scene: Path, **spec: object) -> str:
    """A job that stays in PENDING or PROCESSING until it is cancelled."""
    job = users.submit(user, scene, "turntable.blend", frames="1-2000", **spec)
    return str(job["id"])


def _cancel(local_farm, job_id: str) -> None:
    httpx.post(f"{local_farm.url}/jobs/{job_id}/cancel", headers=AUTH, timeout=30)


class ChangeFollower:
    """One user's ``GET /watch/list``, read in a thread until a given change comes."""

    def __init__(self, url: str, token: str) -> None:
        self.url, self.token = url, token
        self.told: list[dict] = []
        self.ready = threading.Event()
        self.until: tuple[str, str] = ("", "")
        self.done = threading.Event()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._read, daemon=True)

    def start(self, last_job: str, last_state: str) -> ChangeFollower:
        """Follow until ``last_job`` is told to be in ``last_state``; return once the
        farm said `ready`."""
        self.until = (last_job, last_state)
        self.thread.start()
        assert self.ready.wait(PAGE_MS / 1000), self.error or "no `ready` from /watch/list"
        return self

    def result(self) -> list[dict]:
        """Everything told before and up to that change (the stream keeps order)."""
        assert self.done.wait(RENDER_MS / 1000), f"not told {self.until}: {self.told}"
        if self.error is not None:
            raise self.error
        return self.told

    def _read(self) -> None:
        headers = {"Authorization": f"Bearer {self.token}", "Accept": "text/event-stream"}
        try:
            with httpx.stream("GET", f"{self.url}/watch/list", headers=headers,
                              timeout=30) as r:  # fmt: skip
                assert r.headers["content-type"].startswith("text/event-stream"), r.status_code
                kind = ""
                for line in r.iter_lines():
                    if line.startswith("event: "):
                        kind = line.removeprefix("event: ")
                    elif line.startswith("data: "):
                        self.told.append({"kind": kind, **json.loads(line[len("data: ") :])})
                        self.ready.set()
                        last = self.told[-1]
                        if (last.get("job"), last.get("state")) == self.until:
                            return
        except BaseException as exc:  # handed to the test's thread
            self.error = exc
        finally:
            self.ready.set()
            self.done.set()


def _told(follower: ChangeFollower) -> dict[str, list[str]]:
    """Each job's states as a follower was told them, in order."""
    told = follower.result()
    assert told[0] == {"kind": "ready"}
    assert {c["kind"] for c in told[1:]} == {"change"}
    states: dict[str, list[str]] = {}
    for change in told[1:]:
        states.setdefault(change["job"], []).append(change["state"])
    return states


@pytest.mark.slow
def test_a_list_is_told_of_the_jobs_it_may_see_as_they_come_and_change(
    local_farm, users, small_scene
):
    """``/watch/list``: a viewer of a project is told of that project's jobs, an artist of
    his own, each from submission to its end; nobody of jobs they may not see."""
    bo = users.make("web-bo", "artist")  # no project: his own jobs alone
    jobs: list[str] = []
    try:
        # The last changes each follower is told: known before they start.
        marker = _long_job(users, "web-ana", small_scene, samples=1, project="web-p")
        own = _long_job(users, "web-bo", small_scene, samples=1)
        jobs += [marker, own]
        vic = ChangeFollower(local_farm.url, users.tokens["web-vic"]).start(marker, "CANCELLED")
        bos = ChangeFollower(local_farm.url, bo).start(own, "CANCELLED")
        private = _long_job(users, "web-ana", small_scene, samples=1)
        shared = _long_job(users, "web-ana", small_scene, samples=1, project="web-p")
        jobs += [private, shared]
        for job_id in (private, shared, marker, own):
            _cancel(local_farm, job_id)
        vic_states, bo_states = _told(vic), _told(bos)
        # Submitted before the streams began: told of from their next change on.
        assert set(vic_states) == {shared, marker} and set(bo_states) == {own}
        assert vic_states[shared][0] == "PENDING" and vic_states[shared][-1] == "CANCELLED"
        assert vic_states[marker][-1] == bo_states[own][-1] == "CANCELLED"
        assert len(vic_states[marker]) <= 2 and len(bo_states[own]) <= 2  # PROCESSING?
    finally:
        for job_id in jobs:
            _cancel(local_farm, job_id)


@pytest.mark.slow
def test_sign_in_submit_watch_it_complete_and_open_a_frame(
    browser, local_farm, users, small_scene, shots
):
    page = _page(browser)
    page.goto(local_farm.url)
    # A wrong token: the farm's answer, and still signed out.
    page.get_by_label("API token").fill("rf_" + "Z" * 43)
    page.get_by_role("button", name="Sign in").click()
    expect(page.locator("#signin-error")).to_contain_text("unknown or malformed token")
    _sign_in(page, local_farm.url, users.tokens["web-ana"], "web-ana (artist)")

    # A reload keeps the session. From the top of the page the first Tab reaches the skip
    # link, which leads to the content and leaves the view as it is.
    page.reload()
    expect(page.get_by_role("heading", name="Jobs")).to_be_visible()
    expect(page.locator("#who-name")).to_have_text("web-ana (artist)")
    page.keyboard.press("Tab")
    expect(page.get_by_role("link", name="Skip to content")).to_be_focused()
    page.keyboard.press("Enter")
    expect(page.locator("main")).to_be_focused()
    expect(page.get_by_role("heading", name="Jobs")).to_be_visible()
    page.get_by_role("link", name="Submit").click()
    expect(page.get_by_role("heading", name="Submit a job")).to_be_focused()
    unlabelled = page.locator("#submit-form input, #submit-form select").evaluate_all(
        "fields => fields.filter(f => f.labels.length === 0).map(f => f.id)"
    )
    assert unlabelled == []
    # A bad frame spec: the farm's own message, and no job.
    scene = {"name": "shot.blend", "mimeType": "application/octet-stream",
             "buffer": small_scene.read_bytes()}  # fmt: skip
    page.get_by_label("Scene (.blend)").set_input_files(scene)
    page.get_by_role("textbox", name="Frames", exact=True).fill("1-")
    page.get_by_role("button", name="Submit", exact=True).click()
    expect(page.locator("#submit-error")).to_contain_text("frame")
    page.get_by_role("textbox", name="Frames", exact=True).fill("1-3")
    page.get_by_label("Tiles").fill("2x1")
    page.get_by_label("Samples").fill("2")
    page.get_by_label("Encode the frames to an MP4").check()
    page.get_by_label("Frames per second").fill("4")
    page.get_by_label("Blender").fill("5.3")  # the scene was saved by 5.0; 5.3 asked for
    page.get_by_role("button", name="Submit", exact=True).click()

    expect(page).to_have_url(re.compile(r"#/jobs/[0-9a-f]{16}$"))
    job_id = page.url.rsplit("/", 1)[1]
    state = page.locator("#job-state")
    expect(state).to_have_text(re.compile("COMPLETED|FAILED|CANCELLED"), timeout=RENDER_MS)
    assert state.text_content() == "COMPLETED", page.locator("#job-error").text_content()
    expect(page.locator("#frames li")).to_have_count(3)
    expect(page.locator("#job-frames")).to_have_text("3 of 3")
    expect(page.locator("#job-blender")).to_have_text("5.3 (saved by 5.0)")
    tasks = page.locator("#tasks-body tr")
    expect(tasks).to_have_count(6)  # 3 frames x 2 tiles, each with where it ran
    expect(tasks.filter(has_text="f0000003t001")).to_contain_text("done")
    expect(tasks.filter(has_text="f0000003t001").locator('td[data-label="Device"]')).to_have_text(
        "CPU"
    )
    expect(page.locator("#log")).to_contain_text("PROCESSING -> COMPLETED")
    video = page.locator("#outputs video")
    expect(video).to_be_visible()
    # The browser reads the MP4 (through the session cookie) and knows its length.
    page.wait_for_function("() => document.querySelector('#outputs video').readyState >= 1")
    assert video.evaluate("v => v.duration") > 0
    # Owner of a completed job: the buttons are there, and the state disables them.
    expect(page.get_by_role("button", name="Cancel job")).to_be_disabled()
    expect(page.get_by_role("button", name="Retry job")).to_be_disabled()
    expect(page.locator("#job-rights")).to_have_text(
        "A completed job can be neither cancelled nor retried."
    )
    # Every thumbnail loaded (through the session cookie).
    page.wait_for_function(
        "() => [...document.querySelectorAll('#frames img')].every(i => i.naturalWidth > 0)"
    )
    page.screenshot(path=str(shots / "web-job.png"), full_page=True)

    # A click opens the full frame, the farm's own bytes; Escape closes it.
    page.get_by_role("button", name="Open frame 2").click()
    viewer = page.get_by_role("dialog", name="Frame 2")
    expect(viewer).to_be_visible()
    image = viewer.locator("img")
    expect(image).to_have_attribute("src", f"/jobs/{job_id}/frames/2")
    page.wait_for_function("() => document.querySelector('#viewer-image').naturalWidth > 0")
    assert image.evaluate("i => [i.naturalWidth, i.naturalHeight]") == [64, 48]
    page.keyboard.press("Escape")
    expect(viewer).to_be_hidden()

    # The list shows it, with its progress and times.
    page.get_by_role("link", name="Jobs", exact=True).click()
    row = page.locator(f'tr[data-job="{job_id}"]')
    expect(row).to_contain_text("COMPLETED")
    expect(row).to_contain_text("3/3 frames")
    expect(row.locator("time")).to_have_count(3)
    assert page.errors == []  # type: ignore[attr-defined]


@pytest.mark.slow
def test_cancel_from_the_page_and_the_list_follows(browser, local_farm, users, small_scene, shots):
    job_id = _long_job(users, "web-ana", small_scene, samples=1)
    try:
        watching = _page(browser)
        _sign_in(watching, local_farm.url, users.tokens["web-ana"], "web-ana (artist)")
        row = watching.locator(f'tr[data-job="{job_id}"]')
        expect(row).to_contain_text("2000 frames")
        expect(row.locator(".state")).to_have_text(re.compile("PENDING|PROCESSING"))

        page = _page(browser)
        _sign_in(page, local_farm.url, users.tokens["web-ana"], "web-ana (artist)")
        page.goto(f"{local_farm.url}/#/jobs/{job_id}")
        cancel = page.get_by_role("button", name="Cancel job")
        expect(cancel).to_be_enabled()
        expect(page.get_by_role("button", name="Retry job")).to_be_disabled()
        page.once("dialog", lambda dialog: dialog.accept())
        cancel.click()
        expect(page.locator("#job-answer")).to_contain_text("Cancelled")
        expect(page.locator("#job-state")).to_have_text("CANCELLED")
        expect(cancel).to_be_disabled()
        # The other page, left alone, follows.
        expect(row.locator(".state")).to_have_text("CANCELLED")
        expect(row.locator('td[data-label="Finished"] time')).to_have_count(1)
        watching.screenshot(path=str(shots / "web-jobs.png"))
        # At phone width the list is one card per job, each value labelled.
        watching.set_viewport_size(PHONE)
        expect(row.locator('td[data-label="State"]')).to_be_visible()
        assert watching.evaluate("document.documentElement.scrollWidth") <= PHONE["width"]
        watching.screenshot(path=str(shots / "web-jobs-phone.png"))
    finally:
        _cancel(local_farm, job_id)


@pytest.mark.slow
def test_a_job_submitted_after_another_says_it_waits_and_fails_with_it(
    browser, local_farm, users, small_scene
):
    blocker = _long_job(users, "web-ana", small_scene, samples=1)
    try:
        page = _page(browser)
        _sign_in(page, local_farm.url, users.tokens["web-ana"], "web-ana (artist)")
        page.get_by_role("link", name="Submit").click()
        scene = {"name": "shot.blend", "mimeType": "application/octet-stream",
                 "buffer": small_scene.read_bytes()}  # fmt: skip
        page.get_by_label("Scene (.blend)").set_input_files(scene)
        page.get_by_role("textbox", name="Frames", exact=True).fill("1-3")
        page.get_by_label("Frame order").select_option("preview")
        page.get_by_label("After jobs").fill(f" {blocker}, ")
        page.get_by_role("button", name="Submit", exact=True).click()
        expect(page).to_have_url(re.compile(r"#/jobs/[0-9a-f]{16}$"))
        job_id = page.url.rsplit("/", 1)[1]
        expect(page.locator("#job-after a")).to_have_text(blocker)
        expect(page.locator("#job-detail")).to_contain_text(f"Waiting: blocked by {blocker} (")
        spec = httpx.get(f"{local_farm.url}/jobs/{job_id}", headers=AUTH).json()["spec"]
        assert (spec["order"], spec["depends_on"]) == ("preview", [blocker])
    finally:
        _cancel(local_farm, blocker)
    # The job it waited for was cancelled: it fails, naming it, and waits no more.
    expect(page.locator("#job-state")).to_have_text("FAILED", timeout=RENDER_MS)
    expect(page.locator("#job-error")).to_have_text(
        f"job {blocker}, which this job depends on, was cancelled"
    )
    expect(page.locator("#job-detail")).to_be_hidden()
    assert page.errors == []  # type: ignore[attr-defined]


@pytest.mark.slow
def test_a_viewer_sees_what_the_api_shows_it_and_changes_nothing(
    browser, local_farm, users, small_scene
):
    private = users.submit("web-ana", small_scene, frames="1", samples=1)
    shared = users.submit("web-ana", small_scene, frames="1", samples=1, project="web-p")
    page = _page(browser)
    _sign_in(page, local_farm.url, users.tokens["web-vic"], "web-vic (viewer)")
    expect(page.locator(f'tr[data-job="{shared["id"]}"]')).to_be_visible()
    expect(page.locator(f'tr[data-job="{private["id"]}"]')).to_have_count(0)
    # Filtered by owner: the API's visibility still decides.
    page.get_by_label("Owner").fill("web-ana")
    page.get_by_label("Owner").press("Enter")
    expect(page).to_have_url(re.compile(r"owner=web-ana"))
    expect(page.locator(f'tr[data-job="{shared["id"]}"]')).to_be_visible()
    expect(page.locator(f'tr[data-job="{private["id"]}"]')).to_have_count(0)

    # Another's job by its URL: the API's 404, nothing of it shown.
    page.goto(f"{local_farm.url}/#/jobs/{private['id']}")
    expect(page.get_by_role("heading", name="Not here")).to_be_visible()
    expect(page.locator("#missing-text")).to_have_text(f"no job {private['id']}")
    # The project's job: readable, with no buttons, and why.
    page.goto(f"{local_farm.url}/#/jobs/{shared['id']}")
    expect(page.locator("#job-state")).to_have_text("COMPLETED", timeout=RENDER_MS)
    expect(page.get_by_role("button", name="Cancel job")).to_be_hidden()
    expect(page.get_by_role("button", name="Retry job")).to_be_hidden()
    expect(page.locator("#job-rights")).to_contain_text("Only web-ana or an admin")
    expect(page.locator("#frames li")).to_have_count(1)
    # No submitting either: the link is gone and the form says why.
    expect(page.get_by_role("link", name="Submit")).to_be_hidden()
    page.goto(f"{local_farm.url}/#/submit")
    expect(page.locator("#submit-refused")).to_have_text(
        "web-vic is a viewer: only artists and admins submit jobs."
    )
    expect(page.locator("#submit-form")).to_be_hidden()

    # The farm page: workers by node and device, and the queue.
    page.get_by_role("link", name="Farm", exact=True).click()
    expect(page.locator("#farm-actors")).to_have_text("2")
    expect(page.locator("#farm-size")).to_have_text("1 render node (a fixed cluster)")
    expect(page.locator("#farm-nodes tbody tr")).to_have_count(2)
    expect(page.locator("#farm-queue")).to_have_text(re.compile(r"^\d+$"))

    # The viewer's browser session cannot reach the other job's stream either.
    cookies = {c["name"]: c["value"] for c in page.context.cookies()}
    r = httpx.get(f"{local_farm.url}/watch", params={"jobs": private["id"]}, cookies=cookies)
    assert r.status_code == 404 and r.json()["error"]["code"] == "job_not_found"

    # Signing out ends the session for every page of this browser.
    page.get_by_role("button", name="Sign out").click()
    expect(page.get_by_role("heading", name="Sign in")).to_be_visible()
    expect(page.locator("#signin-error")).to_have_text("You have signed out.")
    assert SESSION_COOKIE not in {c["name"] for c in page.context.cookies()}
    assert page.errors == []  # type: ignore[attr-defined]


@pytest.mark.slow
def test_retry_a_failed_job_from_the_page(browser, local_farm, users, make_scene):
    # More tiles than pixels: the job fails at once, with the reason, and again on retry.
    scene = make_scene("--width", "8", "--height", "6", "--samples", "1")
    job = users.submit("web-ana", scene, frames="1", tiles="16x16")
    page = _page(browser)
    _sign_in(page, local_farm.url, users.tokens["web-ana"], "web-ana (artist)")
    page.goto(f"{local_farm.url}/#/jobs/{job['id']}")
    expect(page.locator("#job-state")).to_have_text("FAILED", timeout=RENDER_MS)
    expect(page.locator("#job-error")).to_contain_text("cannot be split into 16x16 tiles")
    expect(page.get_by_role("button", name="Cancel job")).to_be_disabled()
    retry = page.get_by_role("button", name="Retry job")
    expect(retry).to_be_enabled()
    retry.click()
    expect(page.locator("#job-answer")).to_have_text("Queued again: the job is PENDING.")
    # The page follows the retried job: its log goes on, and it fails the same way.
    log = page.locator("#log")
    expect(log).to_contain_text("FAILED -> PENDING", timeout=RENDER_MS)
    expect(log).to_have_text(re.compile(r"FAILED -> PENDING.*PROCESSING -> FAILED", re.S),
                             timeout=RENDER_MS)  # fmt: skip
    expect(page.locator("#job-state")).to_have_text("FAILED")
    expect(retry).to_be_enabled()
    # Retried elsewhere (the SDK, another page): this page, quiet since the job ended,
    # follows it again.
    r = httpx.post(f"{local_farm.url}/jobs/{job['id']}/retry", headers=users.headers("web-ana"),
                   timeout=30)  # fmt: skip
    assert r.status_code == 200, r.text
    expect(log).to_have_text(
        re.compile(r"FAILED -> PENDING.*FAILED -> PENDING.*PROCESSING -> FAILED", re.S),
        timeout=RENDER_MS,
    )
    expect(page.locator("#job-state")).to_have_text("FAILED")
    expect(retry).to_be_enabled()
    assert page.errors == []  # type: ignore[attr-defined]


@pytest.mark.slow
def test_the_list_takes_in_jobs_from_elsewhere_without_a_reload(
    browser, local_farm, users, small_scene
):
    page = _page(browser)
    _sign_in(page, local_farm.url, users.tokens["web-ana"], "web-ana (artist)")
    expect(page.locator("#jobs-summary")).not_to_have_text("Loading jobs…")
    job_id = _long_job(users, "web-ana", small_scene, samples=1)
    try:
        row = page.locator(f'tr[data-job="{job_id}"]')
        expect(row).to_be_visible()  # submitted through the API, not this page
        # A list of cancelled jobs takes the job in when it is cancelled elsewhere.
        page.goto(f"{local_farm.url}/#/?state=CANCELLED")
        expect(page.locator("#filter-state")).to_have_value("CANCELLED")
        expect(page.locator("#jobs-summary")).not_to_have_text("Loading jobs…")
        expect(row).to_have_count(0)
        _cancel(local_farm, job_id)
        expect(row.locator(".state")).to_have_text("CANCELLED")
    finally:
        _cancel(local_farm, job_id)
    assert page.errors == []  # type: ignore[attr-defined]


@pytest.mark.slow
def test_a_refusal_shows_the_farms_answer(browser, local_farm, users, small_scene):
    job_id = _long_job(users, "web-eve", small_scene, samples=1, project="web-p")
    try:
        page = _page(browser)
        _sign_in(page, local_farm.url, users.tokens["web-eve"], "web-eve (artist)")
        page.goto(f"{local_farm.url}/#/jobs/{job_id}")
        cancel = page.get_by_role("button", name="Cancel job")
        expect(cancel).to_be_enabled()
        # Meanwhile an admin makes eve a viewer of her project: the page still offers
        # Cancel, the farm refuses it, and the page says what the farm said.
        users.make("web-eve", "viewer", ["web-p"])
        time.sleep(PRINCIPAL_TTL_S)  # what any replica knew of her old role has expired
        page.once("dialog", lambda dialog: dialog.accept())
        cancel.click()
        answer = page.locator("#job-answer")
        expect(answer).to_contain_text("The farm refused")
        expect(answer).to_contain_text("web-eve (viewer) may not change it")
        expect(cancel).to_be_enabled()  # nothing changed: it may be tried again
        status = httpx.get(f"{local_farm.url}/jobs/{job_id}", headers=AUTH, timeout=30).json()
        assert status["state"] in ("PENDING", "PROCESSING")
    finally:
        _cancel(local_farm, job_id)

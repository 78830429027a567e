"""The farm's web page, served by the same app as the API.

What a browser gets:

- ``GET /`` — one HTML page (``static/index.html``); ``/ui/app.js`` and ``/ui/app.css``
  are the rest of it: plain JavaScript and CSS shipped as package data, no build step.
  The page routes in the URL's fragment (``#/jobs/{id}``), so every URL the API owns
  stays the API's.
- ``POST /session`` / ``DELETE /session`` (``session``) — sign in with an API token and
  out again. The token goes into an HttpOnly cookie, and ``authenticate`` takes that
  cookie where a request has no ``Authorization`` header: the page then calls the API
  itself (``/jobs``, ``/jobs/{id}/events``, frames, thumbnails, cancel, retry) with
  exactly the API's rights and visibility, and ``<img>``, ``<video>`` and
  ``EventSource`` work without any token in script reach.
- ``GET /watch?jobs=…`` and ``GET /farm`` (``live``) — the two things the API lacked for
  a page: one event stream over the jobs on screen (a stream per job would exhaust the
  browser's six HTTP/1.1 connections per host), and the workers and queue as JSON.
"""

from __future__ import annotations

from fastapi import APIRouter, FastAPI

from rayfarm.cluster.web import live, page, session

__all__ = ["install", "router"]

router = APIRouter()
router.include_router(session.router)
router.include_router(live.router)
router.include_router(page.router)


def install(app: FastAPI) -> None:
    """Add the page, its static files and its routes to ``app``."""
    app.include_router(router)
    page.mount_static(app)

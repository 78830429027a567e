"""The page itself: ``GET /`` and its static files under ``/ui``.

The HTML is read once per process; the script and stylesheet are referenced with a
digest of their content (``/ui/app.js?v=…``), so a browser may cache them and still
never runs an old script against a new farm. The page carries a strict Content
Security Policy: its own script and style only, no inline code, images and media from
the farm only, and no framing (clickjacking).
"""

from __future__ import annotations

import functools
import hashlib
from pathlib import Path

from fastapi import APIRouter, FastAPI
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles

__all__ = ["STATIC_DIR", "mount_static", "router"]

STATIC_DIR = Path(__file__).resolve().parent / "static"
#: Where the static files are served from.
STATIC_PATH = "/ui"

router = APIRouter()

_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "media-src 'self'; connect-src 'self'; form-action 'self'; base-uri 'none'; "
        "frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-cache",
}


@functools.cache
def _html() -> str:
    html = (STATIC_DIR / "index.html").read_text()
    for name in ("app.js", "app.css"):
        digest = hashlib.sha256((STATIC_DIR / name).read_bytes()).hexdigest()[:12]
        html = html.replace(f"{STATIC_PATH}/{name}", f"{STATIC_PATH}/{name}?v={digest}")
    return html


@router.get("/", include_in_schema=False, response_class=HTMLResponse)
async def index() -> HTMLResponse:
    """The web page: sign in, jobs, a job, submit, the farm (routed in the fragment)."""
    return HTMLResponse(_html(), headers=_HEADERS)


def mount_static(app: FastAPI) -> None:
    app.mount(STATIC_PATH, StaticFiles(directory=STATIC_DIR), name="ui")

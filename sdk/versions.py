"""Which Blender renders a job: the routing rule shared by the farm and the SDK.

A farm offers several Blender versions at once. A job renders with:

1. the version it asks for (``JobSpec.blender``), which must be offered: studios pin a
   version per show. Asking for a version other than the file's is allowed, with a
   warning on the job;
2. else the version that saved its file, read from the .blend header, when offered;
3. else the nearest newer offered version, with a warning ("saved by 4.4, rendering
   with 4.5"): a newer Blender opens an older file;
4. else nothing: a file newer than every offered version is refused (``SceneTooNew``),
   naming the offered versions. So is a request for a version not offered
   (``BlenderNotOffered``).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from rayfarm.errors import BlenderNotOffered, InvalidSpec, SceneTooNew

__all__ = ["Route", "format_version", "route", "version_key"]

_VERSION = re.compile(r"^(\d{1,2})\.(\d{1,2})$")


def version_key(version: str) -> tuple[int, int]:
    """``"5.3"`` as ``(5, 3)``; ``InvalidSpec`` for anything not ``MAJOR.MINOR``."""
    m = _VERSION.match(version.strip()) if isinstance(version, str) else None
    if m is None:
        raise InvalidSpec(
            f"Blender version {version!r} is not MAJOR.MINOR (such as 5.3 or 4.5)",
            {"version": version},
        )
    return int(m[1]), int(m[2])


def format_version(key: tuple[int, int]) -> str:
    return f"{key[0]}.{key[1]}"


@dataclass(frozen=True)
class Route:
    """The Blender a job renders with, and the warning the job carries when that is not
    the version that saved its file."""

    version: str
    warning: str | None = None


def route(saved_by: tuple[int, int], requested: str | None, offered: Sequence[str]) -> Route:
    """Apply the routing rule (see the module) to a file saved by Blender ``saved_by``."""
    saved = format_version(saved_by)
    listed = ", ".join(offered)
    if requested is not None:
        want = format_version(version_key(requested))
        if want not in offered:
            raise BlenderNotOffered(
                f"the job asks for Blender {want}, which this farm does not offer (it offers "
                f"{listed})",
                {"requested": want, "offered": list(offered), "file_version": saved},
            )
        if want == saved:
            return Route(want)
        older = version_key(want) < saved_by
        why = "an older Blender may not read everything a newer one saved" if older else ""
        return Route(
            want,
            f"saved by Blender {saved}, rendering with Blender {want} as the job asks"
            + (f" ({why})" if why else ""),
        )
    if saved in offered:
        return Route(saved)
    newer = sorted(version_key(v) for v in offered if version_key(v) > saved_by)
    if newer:
        chosen = format_version(newer[0])
        return Route(
            chosen,
            f"saved by Blender {saved}, rendering with Blender {chosen}, the nearest newer "
            f"version this farm offers (it offers {listed})",
        )
    raise SceneTooNew(
        f"the scene was saved by Blender {saved}, newer than every Blender this farm offers "
        f"({listed}): save it from one of those, or ask the farm's admin to offer {saved} "
        "(RAYFARM_BLENDER)",
        {"file_version": saved, "offered": list(offered)},
    )

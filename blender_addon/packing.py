"""Pack a saved copy of the scene with the SDK's packer (``vendor.pack``: ``rayfarm.pack``
itself, carried in the extension; see ``vendor``).

What is the add-on's own is only what Blender's Python needs around it: finding the
bundled blender-asset-tracer wheel, and turning the SDK's errors into the add-on's
(``FarmError``, ``Cancelled``) with words for the artist. The scene copy sits alone in
a temp folder, so BAT packs every file it uses under ``_outside_project/`` and
rewrites the copy's paths; every file is hashed, so only what the farm lacks is
uploaded. No ``bpy`` here: it runs in the upload thread.
"""

from __future__ import annotations

import sys
import threading
from pathlib import Path

from .comms import Cancelled, FarmError
from .vendor import errors
from .vendor.pack import Pack, PackCancelled
from .vendor.pack import pack_scene as sdk_pack_scene

__all__ = ["Pack", "pack_scene"]

#: How many missing files a report names before "...".
SHOWN_MISSING = 10


def pack_scene(blend: Path, allow_missing: bool, cancel: threading.Event) -> Pack:
    """Pack ``blend`` (the saved copy; its folder is the project) into a new temp folder;
    ``cancel`` stops it between files (``Cancelled``)."""
    _import_bat()
    try:
        return sdk_pack_scene(blend, allow_missing=allow_missing, cancel=cancel)
    except PackCancelled:
        raise Cancelled() from None
    except errors.MissingDependencies as exc:
        missing = list(exc.detail.get("missing", []))
        shown = ", ".join(missing[:SHOWN_MISSING]) + (" ..." if missing[SHOWN_MISSING:] else "")
        raise FarmError(
            f"{len(missing)} file(s) the scene uses are missing: {shown} "
            "(fix the paths, or tick Allow Missing Files to render anyway)",
            exc.code,
            exc.detail,
        ) from None
    except errors.FarmError as exc:  # a scene BAT cannot trace, a .blend cut short
        raise FarmError(str(exc), exc.code, exc.detail) from None


def _import_bat() -> None:
    """As an extension, Blender installs the bundled wheel; as a legacy add-on (a zip
    installed the pre-4.2 way) it does not, but a pure-Python wheel is importable from
    ``sys.path`` as it is."""
    try:
        import blender_asset_tracer
    except ImportError:
        for wheel in sorted((Path(__file__).parent / "wheels").glob("blender_asset_tracer-*.whl")):
            sys.path.append(str(wheel))
        import blender_asset_tracer  # noqa: F401

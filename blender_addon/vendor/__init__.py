"""The SDK's packer, carried by the add-on: ``rayfarm.pack`` with the two modules it
imports (``rayfarm.blendfile``, ``rayfarm.errors``), so that the add-on packs a scene
with the SDK's own code, not a copy of it.

Blender's Python has no rayfarm (nor the pydantic and httpx the rest of the SDK needs),
and an extension cannot pip-install it. So ``build.py`` copies the ``MODULES`` below
from ``sdk/`` into this package in the extension's zip, byte for byte (the add-on
tests check), and refuses one that imports anything but the standard library,
blender-asset-tracer, zstandard and its fellow modules (relatively).

Nothing is copied into the source tree, so there is no second copy to drift: run from
the repository (the tests import ``blender_addon`` from it), this package reads the
same files from ``sdk/`` itself.
"""

from pathlib import Path

#: The SDK modules this package holds, as named in sdk/ (build.py copies exactly these).
MODULES = ("errors.py", "blendfile.py", "pack.py")

_ADDON = Path(__file__).resolve().parent.parent
if (_ADDON / "build.py").is_file():  # the source tree: build.py never goes into the zip
    __path__.append(str(_ADDON.parent / "sdk"))

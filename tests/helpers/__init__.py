"""What the tests share beside their fixtures (tests/conftest.py): the checkout, the
admin token every test farm starts with, and, in modules by what they touch, the helpers
for Blender (``helpers.blender``), the API as an ASGI app (``helpers.api``) and whole
local farms (``helpers.farms``). The scripts here (``render_reference.py``,
``addon_session.py``) run inside a Blender environment, not in the test process."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from rayfarm.cluster.auth import new_token

ROOT = Path(__file__).resolve().parent.parent.parent
PYTHON = sys.executable

#: Every test farm's first admin (``RAYFARM_ADMIN_TOKEN``). The SDK reads
#: ``RAYFARM_TOKEN``, so every ``Farm()`` in the tests (and the notebook's kernel) sends it.
ADMIN_TOKEN = new_token()
os.environ["RAYFARM_TOKEN"] = ADMIN_TOKEN
#: Headers for raw HTTP requests to a test farm, as its admin.
AUTH = {"Authorization": f"Bearer {ADMIN_TOKEN}"}

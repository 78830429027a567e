"""The add-on's preferences: where the farm is, the token, where frames go."""

from __future__ import annotations

import bpy
from bpy.props import StringProperty

from . import session
from .comms import DEFAULT_URL


class RayfarmPreferences(bpy.types.AddonPreferences):
    bl_idname = __package__

    farm_url: StringProperty(  # type: ignore[valid-type]
        name="Farm URL",
        description="The rayfarm service, e.g. http://farm:8000",
        default=DEFAULT_URL,
    )
    api_token: StringProperty(  # type: ignore[valid-type]
        name="API Token",
        description="Sent to the farm as 'Authorization: Bearer'; this farm does not check "
        "tokens yet (accounts are planned)",
        subtype="PASSWORD",
    )
    download_dir: StringProperty(  # type: ignore[valid-type]
        name="Download Folder",
        description="Where a job's frames go, in a folder per job ('//' is the .blend's "
        "folder; unsaved files use the temporary folder)",
        default="//rayfarm_frames/",
        subtype="DIR_PATH",
    )

    def draw(self, context: bpy.types.Context) -> None:
        layout = self.layout
        layout.prop(self, "farm_url")
        layout.prop(self, "api_token")
        layout.prop(self, "download_dir")
        row = layout.row()
        row.operator("rayfarm.test_connection", icon="URL")
        if session.SESSION.connection:
            box = layout.box()
            for line in _wrap(session.SESSION.connection, 90):
                box.label(text=line)


def _wrap(text: str, width: int) -> list[str]:
    lines, line = [], ""
    for word in text.split():
        if line and len(line) + len(word) + 1 > width:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}".strip()
    return [*lines, line] if line else lines


CLASSES = (RayfarmPreferences,)

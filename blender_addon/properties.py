"""What the artist sets per scene (saved in the .blend, like other render settings),
and the recent-jobs list the panel shows (runtime only, on the window manager)."""

from __future__ import annotations

import bpy
from bpy.props import (
    BoolProperty,
    CollectionProperty,
    EnumProperty,
    IntProperty,
    PointerProperty,
    StringProperty,
)


class RayfarmSceneSettings(bpy.types.PropertyGroup):
    use_scene_frames: BoolProperty(  # type: ignore[valid-type]
        name="Scene Frame Range",
        description="Render the scene's frame range (start, end and step)",
        default=True,
    )
    frames: StringProperty(  # type: ignore[valid-type]
        name="Frames",
        description="Frames to render: '1-250', '1,3,5-7', '1-20x5' (every 5th)",
        default="1",
    )
    tiles: EnumProperty(  # type: ignore[valid-type]
        name="Tiles",
        description="Split each frame into tiles rendered in parallel",
        items=[
            ("1", "Whole Frames", "One task per frame"),
            ("2x2", "2x2", "Four tiles per frame"),
            ("3x3", "3x3", "Nine tiles per frame"),
            ("4x4", "4x4", "Sixteen tiles per frame"),
            ("auto", "Auto", "The farm splits frames when there are fewer frames than workers"),
        ],
        default="1",
    )
    slices: EnumProperty(  # type: ignore[valid-type]
        name="Slices",
        description="Split each frame's samples into slices rendered in parallel on the farm "
        "and merged exactly (a long frame spreads over several workers, and shows a whole, "
        "noisier preview after its first slice)",
        items=[
            ("1", "Whole Samples", "One task renders all of a frame's samples"),
            ("2", "2", "Two slices per frame"),
            ("4", "4", "Four slices per frame"),
            ("8", "8", "Eight slices per frame"),
            (
                "auto",
                "Auto",
                "The farm picks slices so that no task runs longer than its "
                "target time, never more than its free workers can use",
            ),
        ],
        default="1",
    )
    use_samples: BoolProperty(  # type: ignore[valid-type]
        name="Override Samples", description="Render with a different sample count"
    )
    samples: IntProperty(  # type: ignore[valid-type]
        name="Samples", description="Cycles samples on the farm", default=64, min=1, max=65536
    )
    priority: IntProperty(  # type: ignore[valid-type]
        name="Priority", description="Higher renders first", default=50, min=0, max=100
    )
    format: EnumProperty(  # type: ignore[valid-type]
        name="Format",
        items=[
            ("png", "PNG", "8-bit PNG frames"),
            ("exr", "OpenEXR", "Multi-layer OpenEXR with every enabled pass"),
        ],
        default="png",
    )
    blender: StringProperty(  # type: ignore[valid-type]
        name="Blender",
        description="The Blender version the farm renders with, such as 4.5 (one it offers). "
        "Empty: this Blender's own version",
        default="",
    )
    allow_missing: BoolProperty(  # type: ignore[valid-type]
        name="Allow Missing Files",
        description="Render even when files the scene uses are missing (they render pink)",
    )


class RayfarmJobItem(bpy.types.PropertyGroup):
    job_id: StringProperty()  # type: ignore[valid-type]
    state: StringProperty()  # type: ignore[valid-type]
    frames_done: IntProperty()  # type: ignore[valid-type]
    frames_total: IntProperty()  # type: ignore[valid-type]
    error: StringProperty()  # type: ignore[valid-type]


CLASSES = (RayfarmSceneSettings, RayfarmJobItem)


def register() -> None:
    bpy.types.Scene.rayfarm = PointerProperty(type=RayfarmSceneSettings)
    bpy.types.WindowManager.rayfarm_jobs = CollectionProperty(type=RayfarmJobItem)
    bpy.types.WindowManager.rayfarm_job_index = IntProperty(name="Job", default=-1)


def unregister() -> None:
    del bpy.types.WindowManager.rayfarm_job_index
    del bpy.types.WindowManager.rayfarm_jobs
    del bpy.types.Scene.rayfarm

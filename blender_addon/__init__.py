"""rayfarm for Blender: Render on Farm from the Render properties.

This module only registers. The parts: ``preferences`` (farm URL, token),
``properties`` (per-scene settings, the jobs list), ``operators``, ``panels``,
``session`` (state and the timer that drains background work), ``work`` (the
threads), ``comms`` (HTTP over urllib) and ``packing`` (the SDK's packer, which
``vendor`` carries).
Submodules are imported in ``register`` so that ``comms``, ``packing`` and ``work``
stay importable without ``bpy`` (the test suite does).
"""

# For Blender < 4.2 (a zip installed as a legacy add-on); 4.2+ reads blender_manifest.toml.
bl_info = {
    "name": "rayfarm",
    "description": "Render on a rayfarm render farm from the Render properties",
    "author": "rayfarm developers",
    "version": (0, 1, 0),
    "blender": (4, 2, 0),
    "location": "Properties > Render > Render on Farm",
    "category": "Render",
}


def _modules():  # type: ignore[no-untyped-def]
    from . import operators, panels, preferences, properties, session

    return properties, session, preferences, operators, panels


def register() -> None:
    import bpy

    for module in _modules():
        for cls in getattr(module, "CLASSES", ()):
            bpy.utils.register_class(cls)
        if hasattr(module, "register"):
            module.register()


def unregister() -> None:
    import bpy

    for module in reversed(_modules()):
        if hasattr(module, "unregister"):
            module.unregister()
        for cls in reversed(getattr(module, "CLASSES", ())):
            bpy.utils.unregister_class(cls)

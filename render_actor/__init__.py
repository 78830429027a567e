"""The render side of rayfarm: RenderActors that render frames and tiles with bpy.

Importing this package does not import bpy; a ``RenderActor`` imports it in its
constructor, inside the Ray worker process that hosts it.
"""

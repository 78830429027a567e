"""The render side of rayfarm: RenderActors that render frames and tiles with Blender.

Nothing here imports bpy: each ``RenderActor`` supervises a Blender worker process
(``rayfarm.render.worker``, run by a Blender environment's own Python, the one place
bpy is loaded) and speaks to it over a socket.
"""

"""The Blender worker: a process run by a Blender environment's own Python (bpy X.Y),
owned by one render actor, that opens scenes and renders frames and tiles.

Everything in this package imports only the standard library, bpy and numpy, and its
modules import one another relatively: the worker process loads the package from its
folder under a private name (``rayfarm_worker``, see ``supervisor.BOOT``), without
the ``rayfarm`` package (whose SDK needs pydantic and httpx) and under CPython 3.11 or
3.13 alike. The render actor imports its bpy-free modules (``protocol``, ``parts``,
``geometry``, ``files``, ``devices``) as ``rayfarm.render.worker.*``.

- ``main``: the process's entry and request loop;
- ``session``: the open scene, and every render step (frame, tile, finish, probe,
  catalogue);
- ``blender``, ``composite``, ``exr``: helpers over bpy data, the compositor trees that
  finish tiled frames, and multi-part EXR through the OpenImageIO bpy ships;
- ``protocol``: the messages between actor and worker.
"""

"""Build a small animated Cycles scene with bpy, so no binary .blend is committed.

    python examples/make_scene.py shot.blend                    # 320x240, 8 frames
    python examples/make_scene.py shot.blend --width 96 --height 72 --samples 4
    python examples/make_scene.py heavy.blend --heavy           # ~2.5M triangles at render

``--texture`` gives the ground a checker image texture saved beside the scene in
``textures/checker.png`` (a relative ``//textures/...`` path); ``--abs-texture PATH``
gives the cube one saved at PATH, referenced by its absolute path; ``--texture-dir
DIR`` puts every PNG in DIR on a small plane of its own (relative paths: DIR should
be beside the scene); ``--library PATH`` saves a prop (a torus with its own
material) to the .blend at PATH and links it into the scene. ``--denoise``
turns Cycles' denoiser (OpenImageDenoise) on. ``--glare`` adds a bright emissive
lamp and a compositor whose Glare (bloom) node spreads it over neighbouring
pixels. ``--passes`` enables extra passes (depth, normal, diffuse colour) and the
denoising data passes. ``--all-passes`` enables every pass sample slices can merge, of
each kind (means, first-sample passes, light passes divided by a colour pass, with and
without that colour pass, light groups, an AOV, object and material indexes), and a
glass ball. ``--lights N`` adds N small coloured point lights (Cycles picks among many
lights with its light tree). ``--adaptive`` turns adaptive sampling on;
``--animated-seed`` Cycles' animated seed (a frame's noise depends on its number);
``--cryptomatte`` the Cryptomatte object pass; ``--vector`` the Vector (motion) pass.
``--grade`` sets a graded look (AgX Punchy, exposure, gamma, an RGB curve,
transparent film). ``--heavy`` adds a dense mesh whose Subdivision Surface modifier is evaluated at
render time (about 2.5 million triangles) and animates the camera, so every
frame needs a real scene sync. ``--script-marker PATH`` adds a registered
Python text block that would create PATH if Blender ever ran it (the farm must
not: scenes open with auto-execution off). ``--py-driver`` gives the cube a driver
whose expression needs Python (the farm warns that it evaluates to 0).
``--file-output DIR`` adds a compositor File Output node that writes the render
layer as PNG into DIR, with a file name that climbs out of it (``../escaped_``): a
scene writing where it pleases (the farm confines it to the job's outputs).
"""

from __future__ import annotations

import argparse
import math
import os
from pathlib import Path


def _material(bpy, name: str, color: tuple[float, float, float]) -> object:
    mat = bpy.data.materials.new(name)
    mat.use_nodes = True
    bsdf = mat.node_tree.nodes.get("Principled BSDF")
    bsdf.inputs["Base Color"].default_value = (*color, 1.0)
    bsdf.inputs["Roughness"].default_value = 0.4
    return mat


def _checker(bpy, path: Path, color: tuple[float, float, float]) -> Path:
    """Save a 64x64 checker PNG at ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    image = bpy.data.images.new(path.stem, 64, 64)
    pixels = []
    for y in range(64):
        for x in range(64):
            on = (x // 8 + y // 8) % 2
            pixels.extend((*color, 1.0) if on else (0.05, 0.05, 0.05, 1.0))
    image.pixels.foreach_set(pixels)
    image.filepath_raw = str(path)
    image.file_format = "PNG"
    image.save()
    bpy.data.images.remove(image)
    return path


def _textured(bpy, material, file: Path, filepath: str) -> None:
    """Feed ``material``'s base colour from the image at ``file``, named as ``filepath``."""
    nodes = material.node_tree.nodes
    tex = nodes.new("ShaderNodeTexImage")
    tex.image = bpy.data.images.load(str(file))
    tex.image.filepath = filepath
    material.node_tree.links.new(
        tex.outputs["Color"], nodes["Principled BSDF"].inputs["Base Color"]
    )


def _all_passes(bpy, scene, ball) -> None:
    """Every kind of pass a sliced frame merges, and a glass ball for the transmission
    passes."""
    layer = scene.view_layers[0]
    for name in (
        "use_pass_z", "use_pass_mist", "use_pass_position", "use_pass_normal",
        "use_pass_uv", "use_pass_object_index", "use_pass_material_index",
        "use_pass_diffuse_direct", "use_pass_diffuse_indirect", "use_pass_glossy_direct",
        "use_pass_glossy_color", "use_pass_transmission_direct", "use_pass_emit",
        "use_pass_environment", "use_pass_ambient_occlusion",
    ):  # fmt: skip
        setattr(layer, name, True)
    layer.cycles.denoising_store_passes = True
    for i, obj in enumerate(bpy.data.objects):
        obj.pass_index = i + 1
    for i, material in enumerate(bpy.data.materials):
        material.pass_index = i + 1
    bpy.ops.mesh.primitive_uv_sphere_add(radius=0.45, location=(-0.6, -2.2, -0.4))
    glass = bpy.data.materials.new("Glass")
    glass.use_nodes = True
    glass.node_tree.nodes["Principled BSDF"].inputs["Transmission Weight"].default_value = 1.0
    bpy.context.object.data.materials.append(glass)
    group = layer.lightgroups.add(name="key")
    next(o for o in bpy.data.objects if o.type == "LIGHT").lightgroup = group.name
    aov = layer.aovs.add()
    aov.name, aov.type = "noise", "COLOR"
    tree = ball.data.materials[0].node_tree
    out = tree.nodes.new("ShaderNodeOutputAOV")
    out.aov_name = "noise"
    tree.links.new(tree.nodes.new("ShaderNodeTexWhiteNoise").outputs["Color"], out.inputs["Color"])


def _make_library(bpy, path: Path) -> None:
    """A .blend holding one object, "Prop": a torus with a material of its own."""
    bpy.ops.wm.read_factory_settings(use_empty=True)
    bpy.ops.mesh.primitive_torus_add(location=(-0.2, -1.2, -0.4), major_radius=0.5)
    prop = bpy.context.object
    prop.name = "Prop"
    prop.data.materials.append(_material(bpy, "PropPaint", (0.9, 0.85, 0.2)))
    path.parent.mkdir(parents=True, exist_ok=True)
    bpy.ops.wm.save_as_mainfile(filepath=str(path))


def build(
    path: str | Path,
    width: int = 320,
    height: int = 240,
    samples: int = 16,
    frames: int = 8,
    heavy: bool = False,
    script_marker: str | None = None,
    compress: bool = False,
    grade: bool = False,
    denoise: bool = False,
    glare: bool = False,
    passes: bool = False,
    texture: bool = False,
    abs_texture: str | None = None,
    texture_dir: str | None = None,
    library: str | None = None,
    py_driver: bool = False,
    file_output: str | None = None,
    all_passes: bool = False,
    lights: int = 0,
    adaptive: bool = False,
    cryptomatte: bool = False,
    animated_seed: bool = False,
    vector: bool = False,
) -> Path:
    import bpy

    if library:
        _make_library(bpy, Path(library))

    bpy.ops.wm.read_factory_settings(use_empty=True)
    bpy.context.preferences.filepaths.save_version = 0  # no shot.blend1 backups on re-runs
    scene = bpy.context.scene
    scene.name = "Shot"
    scene.render.engine = "CYCLES"
    scene.cycles.device = "CPU"
    scene.cycles.samples = samples
    scene.cycles.use_denoising = denoise
    scene.cycles.use_adaptive_sampling = adaptive
    scene.cycles.use_animated_seed = animated_seed
    scene.render.resolution_x, scene.render.resolution_y = width, height
    scene.render.resolution_percentage = 100
    scene.frame_start, scene.frame_end = 1, frames
    scene.render.image_settings.file_format = "PNG"

    world = bpy.data.worlds.new("World")
    world.use_nodes = True
    world.node_tree.nodes["Background"].inputs["Color"].default_value = (0.05, 0.06, 0.08, 1)
    scene.world = world

    bpy.ops.mesh.primitive_plane_add(size=20, location=(0, 0, -1))
    ground = _material(bpy, "Ground", (0.5, 0.5, 0.45))
    bpy.context.object.data.materials.append(ground)
    if texture:
        target = Path(path).resolve().parent / "textures" / "checker.png"
        _textured(bpy, ground, _checker(bpy, target, (0.9, 0.6, 0.1)), "//textures/checker.png")

    bpy.ops.mesh.primitive_uv_sphere_add(radius=0.8, location=(-1.5, 0, 0))
    ball = bpy.context.object
    ball.data.materials.append(_material(bpy, "Ball", (0.8, 0.15, 0.1)))
    ball.keyframe_insert("location", frame=1)
    ball.location = (1.5, 0.5, 0.3)
    ball.keyframe_insert("location", frame=frames)

    bpy.ops.mesh.primitive_cube_add(size=1.0, location=(0.5, 1.5, -0.3))
    cube = bpy.context.object
    cube_material = _material(bpy, "Cube", (0.1, 0.3, 0.8))
    cube.data.materials.append(cube_material)
    if abs_texture:
        target = Path(abs_texture).resolve()
        _textured(bpy, cube_material, _checker(bpy, target, (0.1, 0.8, 0.3)), str(target))
    cube.keyframe_insert("rotation_euler", frame=1)
    cube.rotation_euler = (0, 0, math.pi / 2)
    cube.keyframe_insert("rotation_euler", frame=frames)

    bpy.ops.object.light_add(type="SUN", location=(4, -3, 6))
    bpy.context.object.data.energy = 3.0
    bpy.ops.object.light_add(type="POINT", location=(-3, -2, 3))
    bpy.context.object.data.energy = 300.0

    bpy.ops.object.camera_add(location=(0, -7, 2.5), rotation=(math.radians(72), 0, 0))
    camera = bpy.context.object
    camera.name = "MainCam"
    scene.camera = camera

    if heavy:
        # ~625k triangles in the viewport, ~2.5M after the render-time subdivision.
        bpy.ops.mesh.primitive_grid_add(
            x_subdivisions=560, y_subdivisions=560, size=6, location=(0, 2.5, 0.5)
        )
        grid = bpy.context.object
        grid.rotation_euler = (math.radians(80), 0, 0)
        grid.data.materials.append(_material(bpy, "Dense", (0.6, 0.6, 0.2)))
        sub = grid.modifiers.new("Subdivision", "SUBSURF")
        sub.levels = 0
        sub.render_levels = 1
        camera.keyframe_insert("location", frame=1)
        camera.location = (1.5, -6.5, 2.8)
        camera.keyframe_insert("location", frame=frames)

    if grade:
        # A graded look: every colour management setting a frame's conversion must honour.
        view = scene.view_settings
        view.view_transform = "AgX"
        view.look = "AgX - Punchy"
        view.exposure = 0.4
        view.gamma = 1.15
        view.use_curve_mapping = True
        curve = view.curve_mapping.curves[3]  # the combined (C) curve
        curve.points.new(0.5, 0.62)
        view.curve_mapping.update()
        scene.render.film_transparent = True

    for i, png in enumerate(sorted(Path(texture_dir).glob("*.png")) if texture_dir else []):
        bpy.ops.mesh.primitive_plane_add(size=0.4, location=(-3 + 0.45 * i, 2.5, 1.5))
        card = _material(bpy, f"Card{i}", (0.5, 0.5, 0.5))
        bpy.context.object.data.materials.append(card)
        rel = os.path.relpath(png.resolve(), Path(path).resolve().parent)
        _textured(bpy, card, png, "//" + Path(rel).as_posix())

    if library:
        with bpy.data.libraries.load(str(Path(library).resolve()), link=True) as (_, linked):
            linked.objects = ["Prop"]
        for obj in linked.objects:
            scene.collection.objects.link(obj)

    if glare:
        bpy.ops.mesh.primitive_uv_sphere_add(radius=0.25, location=(0.2, -1.5, 0.6))
        lamp = bpy.context.object
        glow = bpy.data.materials.new("Glow")
        glow.use_nodes = True
        nodes = glow.node_tree.nodes
        nodes.remove(nodes["Principled BSDF"])
        emit = nodes.new("ShaderNodeEmission")
        emit.inputs["Strength"].default_value = 40.0
        glow.node_tree.links.new(emit.outputs[0], nodes["Material Output"].inputs["Surface"])
        lamp.data.materials.append(glow)
        tree = bpy.data.node_groups.new("Compositing", "CompositorNodeTree")
        tree.interface.new_socket("Image", in_out="OUTPUT", socket_type="NodeSocketColor")
        layers = tree.nodes.new("CompositorNodeRLayers")
        layers.scene = scene
        node = tree.nodes.new("CompositorNodeGlare")
        node.inputs["Type"].default_value = "Bloom"
        node.inputs["Size"].default_value = 0.6
        out = tree.nodes.new("NodeGroupOutput")
        tree.links.new(layers.outputs["Image"], node.inputs["Image"])
        tree.links.new(node.outputs["Image"], out.inputs[0])
        scene.compositing_node_group = tree
        scene.render.use_compositing = True

    if file_output:
        tree = scene.compositing_node_group
        if tree is None:
            tree = bpy.data.node_groups.new("Compositing", "CompositorNodeTree")
            tree.interface.new_socket("Image", in_out="OUTPUT", socket_type="NodeSocketColor")
            layers = tree.nodes.new("CompositorNodeRLayers")
            layers.scene = scene
            out = tree.nodes.new("NodeGroupOutput")
            tree.links.new(layers.outputs["Image"], out.inputs[0])
            scene.compositing_node_group = tree
            scene.render.use_compositing = True
        layers = next(n for n in tree.nodes if n.bl_idname == "CompositorNodeRLayers")
        node = tree.nodes.new("CompositorNodeOutputFile")
        node.name = "Beauty"
        node.directory = str(Path(file_output).resolve()) + os.sep
        node.file_name = "../escaped_"
        node.format.media_type = "IMAGE"
        node.format.file_format = "PNG"
        item = node.file_output_items.new("RGBA", "Image")
        tree.links.new(layers.outputs["Image"], node.inputs[item.name])

    if passes:
        layer = scene.view_layers[0]
        layer.use_pass_z = True
        layer.use_pass_normal = True
        layer.use_pass_diffuse_color = True
        layer.cycles.denoising_store_passes = True

    for i in range(lights):
        angle = 2 * math.pi * i / lights
        where = (3 * math.cos(angle), 3 * math.sin(angle), 1.5)
        bpy.ops.object.light_add(type="POINT", location=where)
        light = bpy.context.object.data
        light.energy = 40.0
        light.color = (0.5 + 0.5 * math.cos(angle), 0.5 + 0.5 * math.sin(angle), 0.6)

    if all_passes:
        _all_passes(bpy, scene, ball)

    if cryptomatte:
        scene.view_layers[0].use_pass_cryptomatte_object = True
    if vector:
        scene.render.use_motion_blur = False  # the Vector pass needs it off
        scene.view_layers[0].use_pass_vector = True

    if py_driver:
        # A driver whose expression needs Python: with scripts off it evaluates to 0.
        fcurve = cube.driver_add("location", 2)
        fcurve.driver.type = "SCRIPTED"
        fcurve.driver.expression = "__import__('math').sin(frame) * 0.1"

    if script_marker:
        text = bpy.data.texts.new("farm_autorun.py")
        text.write(f"open({script_marker!r}, 'w').write('scripts ran')\n")
        text.use_module = True  # registered: runs on load when auto-execution is on

    bpy.ops.wm.save_as_mainfile(filepath=str(path), compress=compress)
    return Path(path)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("path")
    p.add_argument("--width", type=int, default=320)
    p.add_argument("--height", type=int, default=240)
    p.add_argument("--samples", type=int, default=16)
    p.add_argument("--frames", type=int, default=8)
    p.add_argument("--heavy", action="store_true")
    p.add_argument("--script-marker")
    p.add_argument("--compress", action="store_true")
    p.add_argument("--grade", action="store_true", help="AgX Punchy look, exposure, curves")
    p.add_argument("--denoise", action="store_true", help="Cycles denoising on (OIDN)")
    p.add_argument("--glare", action="store_true", help="a bright lamp and a Glare compositor")
    p.add_argument("--passes", action="store_true", help="depth, normal, diffuse colour passes")
    p.add_argument("--texture", action="store_true", help="a relative image texture")
    p.add_argument("--abs-texture", help="an image texture saved here, by absolute path")
    p.add_argument("--texture-dir", help="put every PNG in this folder on a plane")
    p.add_argument("--library", help="save a prop to this .blend and link it in")
    p.add_argument("--py-driver", action="store_true", help="a driver that needs Python")
    p.add_argument("--file-output", help="a File Output node writing PNGs to (and out of) DIR")
    p.add_argument("--all-passes", action="store_true", help="every pass slices merge")
    p.add_argument("--lights", type=int, default=0, help="this many more point lights")
    p.add_argument("--adaptive", action="store_true", help="adaptive sampling on")
    p.add_argument("--cryptomatte", action="store_true", help="the Cryptomatte object pass")
    p.add_argument("--animated-seed", action="store_true", help="a seed per frame")
    p.add_argument("--vector", action="store_true", help="the Vector (motion) pass")
    a = p.parse_args()
    out = build(
        a.path, a.width, a.height, a.samples, a.frames, a.heavy, a.script_marker, a.compress,
        a.grade, a.denoise, a.glare, a.passes, a.texture, a.abs_texture, a.texture_dir,
        a.library, a.py_driver, a.file_output, a.all_passes, a.lights, a.adaptive,
        a.cryptomatte, a.animated_seed, a.vector,
    )  # fmt: skip
    print(out)


if __name__ == "__main__":
    main()

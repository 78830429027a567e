"""Split-frame rendering on a real local farm, compared with full-frame bpy renders
made in the same run: denoised tiles without seams, the compositor run once on the
assembled frame, multi-layer EXR passes, and tiles="auto"."""

from __future__ import annotations

import numpy as np
import pytest

from rayfarm.render.tiles import border_band

from helpers.blender import exr_parts, pixels, render_reference
from helpers.farms import completed

pytestmark = pytest.mark.slow

#: The band around tile borders where a per-tile denoiser or compositor leaves seams.
BAND = 4
#: Target for denoised tiles vs Cycles' full-frame denoise (max abs difference).
DENOISE_TOLERANCE = 1e-3
#: Passes `make_scene.py --passes --denoise` enables on top of the combined image.
EXTRA_PASSES = {
    "ViewLayer.Depth",
    "ViewLayer.Normal",
    "ViewLayer.Diffuse Color",
    "ViewLayer.Denoising Albedo",
    "ViewLayer.Noisy Image",
}


def test_denoised_tiles_equal_the_full_frame_denoise_without_seams(farm, make_scene, tmp_path):
    w, h = 161, 121
    scene = make_scene("--width", str(w), "--height", str(h), "--samples", "8", "--denoise")
    job = completed(farm.submit(scene, frames="3", tiles="3x3", format="exr"))
    (got,) = job.download(tmp_path / "farm")
    want = render_reference(scene, tmp_path / "ref", [3], exr=True)[3]
    farm_parts, ref_parts = exr_parts(got), exr_parts(want)
    assert list(farm_parts) == list(ref_parts) == ["ViewLayer.Combined", "ViewLayer.Noisy Image"]
    combined = farm_parts["ViewLayer.Combined"][1]
    error = np.abs(combined - ref_parts["ViewLayer.Combined"][1]).max(axis=2)
    band = border_band(w, h, 3, 3, BAND)
    print(f"denoised 3x3 tiles vs full frame: max {error.max():.2e}, "
          f"border band {error[band].max():.2e}, interior {error[~band].max():.2e}")  # fmt: skip
    assert error.max() <= DENOISE_TOLERANCE
    assert error[band].max() <= error[~band].max()
    # The denoiser really ran (on the whole frame): the result is far from the noisy image.
    noisy = farm_parts["ViewLayer.Noisy Image"][1]
    assert np.array_equal(noisy, ref_parts["ViewLayer.Noisy Image"][1])
    assert np.abs(combined - noisy).max() > 0.05


def test_denoise_override_applies_to_tiled_png(farm, make_scene, tmp_path):
    """The spec turns denoising on for a scene that has it off; the PNG equals bpy's own
    denoised full-frame render to within one 8-bit level (the float result differs by
    at most DENOISE_TOLERANCE)."""
    scene = make_scene("--width", "96", "--height", "72", "--samples", "8")
    job = completed(farm.submit(scene, frames="1", tiles="2x2", denoise=True))
    (got,) = job.download(tmp_path / "farm")
    denoised = make_scene("--width", "96", "--height", "72", "--samples", "8", "--denoise")
    want = render_reference(denoised, tmp_path / "ref", [1])[1]
    noisy = render_reference(scene, tmp_path / "noisy", [1])[1]
    diff = np.abs(pixels(got).astype(int) - pixels(want).astype(int))
    assert diff.max() <= 1
    assert np.abs(pixels(got).astype(int) - pixels(noisy).astype(int)).max() > 10


def test_the_compositor_runs_once_on_the_assembled_frame(farm, make_scene, tmp_path):
    """A bloom (Glare) spreads a bright lamp across tile borders: composited per tile it
    would stop at each border; on the assembled frame it equals the full render."""
    w, h = 160, 120
    scene = make_scene("--width", str(w), "--height", str(h), "--samples", "4", "--glare")
    png = completed(farm.submit(scene, frames="1", tiles="2x2"))
    exr = completed(farm.submit(scene, frames="1", tiles="2x2", format="exr"))
    (got_png,) = png.download(tmp_path / "png")
    (got_exr,) = exr.download(tmp_path / "exr")
    want_png = render_reference(scene, tmp_path / "ref", [1])[1]
    want_exr = render_reference(scene, tmp_path / "ref", [1], exr=True)[1]
    assert np.array_equal(pixels(got_png), pixels(want_png))
    farm_parts, ref_parts = exr_parts(got_exr), exr_parts(want_exr)
    assert list(farm_parts) == list(ref_parts) == ["Composite.Combined", "ViewLayer.Combined"]
    for name in farm_parts:
        assert np.array_equal(farm_parts[name][1], ref_parts[name][1]), name
    # The glare reaches across the tile borders (so a per-tile compositor would cut it).
    glow = np.abs(farm_parts["Composite.Combined"][1] - farm_parts["ViewLayer.Combined"][1])
    assert glow[border_band(w, h, 2, 2, BAND)].max() > 0.01


@pytest.mark.parametrize(("tiles", "depth"), [("2x2", 32), (1, 32), ("2x2", 16)])
def test_multilayer_exr_holds_every_pass_of_the_full_render(
    farm, make_scene, tmp_path, tiles, depth
):
    """Every pass, in Blender's order, with Blender's channel names and storage (half
    depth keeps data passes float, as Blender does)."""
    scene = make_scene(
        "--width", "80", "--height", "60", "--samples", "4", "--passes", "--denoise", "--glare"
    )  # fmt: skip
    job = completed(farm.submit(scene, frames="2,4", tiles=tiles, format="exr", color_depth=depth))
    got = job.download(tmp_path / "farm")
    want = render_reference(scene, tmp_path / "ref", [2, 4], exr=True, depth=depth)
    for path in got:
        farm_parts, ref_parts = exr_parts(path), exr_parts(want[int(path.stem)])
        assert list(farm_parts) == list(ref_parts)
        assert set(farm_parts) >= EXTRA_PASSES
        for name, (channels, values, stored) in farm_parts.items():
            ref_channels, ref_values, ref_stored = ref_parts[name]
            assert (channels, stored) == (ref_channels, ref_stored), name
            assert values.shape == ref_values.shape, name
            # Half floats: the denoised float values (within DENOISE_TOLERANCE of Cycles')
            # may round to neighbouring halves, a step of up to 2^-10 of the value.
            bound = DENOISE_TOLERANCE + (2**-10 * np.abs(ref_values) if depth == 16 else 0)
            excess = (np.abs(values - ref_values) - bound).max()
            assert excess <= 0, f"{name}: off by {excess} more than allowed"
        if depth == 16:
            assert farm_parts["ViewLayer.Depth"][2] == "float"
            assert farm_parts["ViewLayer.Combined"][2] == "half"


def test_auto_splits_a_short_job_and_renders_a_long_one_whole(
    farm, local_farm, make_scene, tmp_path
):
    """Two actors: one frame with plenty of work for its per-tile cost splits into two
    tiles an actor, decided from the actor's measurements; as many frames as actors
    render whole."""
    scene = make_scene("--width", "200", "--height", "150", "--samples", "64")
    one = completed(farm.submit(scene, frames="4", tiles="auto"))
    (decision,) = [e for e in local_farm.events(one.id) if e["kind"] == "tiles"]
    assert (one.tiles, one.tasks_total, one.tasks_done) == ("2x2", 4, 4), decision["reason"]
    assert "a tile costs" in decision["reason"]
    many = completed(farm.submit(scene, frames="1-2", tiles="auto"))
    assert (many.tiles, many.tasks_total) == ("1", 2)
    (got,) = one.download(tmp_path / "farm")
    want = render_reference(scene, tmp_path / "ref", [4])[4]
    assert np.array_equal(pixels(got), pixels(want))

"""Sample-sliced frames without a farm: the split of a frame's samples, how each kind of
pass merges, what ``slices="auto"`` picks, which failures lose a slot, the spec and the
API; and the Blender worker rendering slices for real (a render actor in this process,
its worker a real Blender process), merged by the assembler and finished, against
bpy's own unsliced render of the same frame.

The farm end to end is in ``test_slices_farm.py``."""

from __future__ import annotations

import itertools
import json
import signal
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from rayfarm import JobSpec
from rayfarm.cluster import keys
from rayfarm.cluster.runs import expand, task_key
from rayfarm.cluster.slicing import FrameSamples, auto_slices, lost_slot
from rayfarm.errors import InvalidSpec, RenderError, WorkerLost
from rayfarm.models import MAX_SLICES, JobRecord, JobState, parse_spec
from rayfarm.render.actor import RenderActor
from rayfarm.render.assembler import TileAssembler
from rayfarm.render.inputs import Inputs
from rayfarm.render.tasks import RenderTask, TileRect
from rayfarm.render.worker.parts import Part
from rayfarm.render.worker.samples import HELPER, divide_even, merge_of, sample_range

from helpers.api import api_client
from helpers.blender import TEST_BLENDER, exr_parts, render_reference, stored_scene

#: The issue's bound for a merged float pass against the unsliced render.
EXR_BOUND = 1e-4


# -- the split and the merge, in numbers ---------------------------------------------------


@given(st.integers(1, 4096), st.data())
def test_slices_cover_every_sample_once_in_order(total, data):
    slices = data.draw(st.integers(1, min(total, MAX_SLICES)))
    ranges = [sample_range(total, slices, i) for i in range(slices)]
    assert ranges[0][0] == 0
    for (offset, length), (after, _) in itertools.pairwise(ranges):
        assert offset + length == after
    assert sum(length for _, length in ranges) == total
    assert max(n for _, n in ranges) - min(n for _, n in ranges) <= 1


def test_more_slices_than_samples_is_refused():
    with pytest.raises(ValueError, match="4 samples cannot be split into 5 slices"):
        sample_range(4, 5, 0)


@pytest.mark.parametrize(
    ("part", "kind", "colour"),
    [
        ("ViewLayer.Combined", "mean", None),
        ("ViewLayer.Combined_key", "mean", None),  # a light group
        ("ViewLayer.Normal", "mean", None),
        ("ViewLayer.Depth", "first", None),
        ("My.Layer.Object Index", "first", None),  # a view layer name with dots
        ("ViewLayer.Diffuse Direct", "divided", "ViewLayer.Diffuse Color"),
        ("BG.plate.Glossy Indirect", "divided", "BG.plate.Glossy Color"),
        ("ViewLayer.Transmission Direct", "divided", "ViewLayer.Transmission Color"),
    ],
)
def test_each_pass_merges_by_its_kind(part, kind, colour):
    merge = merge_of(part)
    assert (merge.kind, merge.colour) == (kind, colour)


def test_a_light_pass_is_divided_as_cycles_divides_it():
    """0 where the colour is 0; an RGB pixel's channel with no colour takes the others'
    mean (Cycles' safe_divide_even_color)."""
    num = np.array([[[2.0, 0.0, 6.0], [0.0, 0.0, 0.0], [4.0, 0.0, 0.0], [1.0, 1.0, 1.0]]])
    den = np.array([[[2.0, 0.0, 3.0], [0.0, 0.0, 0.0], [2.0, 0.0, 0.0], [1.0, 2.0, 4.0]]])
    got = divide_even(num, den)
    assert got.tolist() == [[[1.0, 1.5, 2.0], [0.0, 0.0, 0.0], [2.0, 2.0, 2.0], [1.0, 0.5, 0.25]]]


def _part(name: str, values: np.ndarray) -> Part:
    channels = tuple(f"{name}.{c}" for c in "RGBA"[: values.shape[2]])
    return Part(channels, values.astype(np.float32))


def test_the_assembler_merges_each_kind_of_pass_and_drops_helpers():
    """Two slices of 3 and 1 samples of a 2x1 frame: a mean weighted by samples, the
    depth of the slice that starts at sample 0, a light pass divided by its colour summed
    over both (the colour a helper, dropped once merged), whatever their order."""
    rect, size = TileRect(0, 0, 2, 0, 1), (2, 1)
    first = {
        "L.Combined": _part("L.Combined", np.array([[[1.0] * 4, [2.0] * 4]])),
        "L.Depth": _part("L.Depth", np.array([[[5.0], [6.0]]])),
        "L.Diffuse Direct": _part("L.Diffuse Direct", np.array([[[1.0] * 3, [0.0] * 3]])),
        HELPER + "L.Diffuse Color": _part("L.Diffuse Color", np.array([[[0.5] * 3, [0.0] * 3]])),
    }
    second = {
        "L.Combined": _part("L.Combined", np.array([[[5.0] * 4, [2.0] * 4]])),
        "L.Depth": _part("L.Depth", np.array([[[1e10], [1e10]]])),
        "L.Diffuse Direct": _part("L.Diffuse Direct", np.array([[[3.0] * 3, [0.0] * 3]])),
        HELPER + "L.Diffuse Color": _part("L.Diffuse Color", np.array([[[1.0] * 3, [0.0] * 3]])),
    }
    for order in ([(first, (0, 3, 4)), (second, (3, 1, 4))],
                  [(second, (3, 1, 4)), (first, (0, 3, 4))]):  # fmt: skip
        asm = TileAssembler()
        counts = [asm.add("j", 1, 2, size, rect, parts, samples) for parts, samples in order]
        assert counts == [1, 2]
        frame = asm.take("j", 1)
        assert list(frame.parts) == ["L.Combined", "L.Depth", "L.Diffuse Direct"]
        np.testing.assert_allclose(frame.parts["L.Combined"].pixels[0, :, 0], [2.0, 2.0])
        np.testing.assert_array_equal(frame.parts["L.Depth"].pixels[0, :, 0], [5.0, 6.0])
        # (1 x 0.5 x 3 + 3 x 1 x 1) / (0.5 x 3 + 1 x 1) = 4.5 / 2.5; no colour: 0
        np.testing.assert_allclose(frame.parts["L.Diffuse Direct"].pixels[0, :, 0], [1.8, 0.0])


def test_a_slice_delivered_twice_counts_once_and_peek_shows_the_merge_so_far():
    asm = TileAssembler()
    left, right = TileRect(0, 0, 1, 0, 1), TileRect(1, 1, 2, 0, 1)
    combined = {"L.Combined": _part("L.Combined", np.array([[[4.0] * 4]]))}
    assert asm.add("j", 1, 4, (2, 1), left, combined, (0, 2, 4)) == 1
    assert asm.add("j", 1, 4, (2, 1), left, combined, (0, 2, 4)) == 1  # again: ignored
    peek = asm.peek("j", 1)
    assert peek.fraction == 0.0  # the right half has no samples yet
    np.testing.assert_array_equal(peek.parts["L.Combined"].pixels[0, :, 0], [4.0, 0.0])
    asm.add("j", 1, 4, (2, 1), right, combined, (2, 2, 4))
    assert asm.peek("j", 1).fraction == 0.5
    with pytest.raises(RenderError, match="2 of 4 parts"):
        asm.take("j", 1)


# -- the dispatcher's side -----------------------------------------------------------------


@given(
    frames=st.integers(1, 50), free=st.integers(1, 64), tiles=st.integers(1, 16),
    frame_s=st.floats(0.01, 1e5), cost=st.floats(0.0, 10.0), samples=st.integers(1, 65536),
    target=st.floats(0.1, 3600.0),
)  # fmt: skip
def test_auto_slices_stay_within_the_free_slots_and_the_samples(
    frames, free, tiles, frame_s, cost, samples, target
):
    count, reason = auto_slices(frames, free, tiles, frame_s, cost, samples, target)
    assert 1 <= count <= min(samples, MAX_SLICES)
    assert count <= max(1, free // (frames * tiles))
    assert reason
    work = max(0.0, frame_s - cost) / tiles
    if count > 1:  # the fewest that meet the target: one fewer would not
        assert work / (count - 1) + cost > target


def test_auto_slices_pick_the_fewest_that_keep_each_task_under_the_target():
    # A 1000 s frame (1 s of it per task) for 8 free slots, one frame, target 300 s.
    assert auto_slices(1, 8, 1, 1000.0, 1.0, 4096, 300.0)[0] == 4
    count, reason = auto_slices(1, 2, 1, 1000.0, 1.0, 4096, 300.0)  # only 2 free slots
    assert count == 2 and "2 free slot(s)" in reason
    assert auto_slices(1, 8, 1, 100.0, 1.0, 4096, 300.0)[0] == 1  # short enough whole
    assert auto_slices(4, 8, 1, 1000.0, 1.0, 4096, 300.0)[0] == 2  # 4 frames share 8 slots
    assert auto_slices(1, 64, 1, 1e5, 0.0, 3, 300.0)[0] == 3  # no more than the samples


def test_a_frames_samples_landed_by_tile_and_slice():
    sampled = FrameSamples(tiles=2)
    assert sampled.land(0, 0.5, (0, 2, 4))
    assert not sampled.land(0, 0.5, (0, 2, 4))  # counted once
    assert (sampled.fraction, sampled.everywhere) == (0.25, 0.0)
    sampled.land(1, 0.5, (0, 2, 4))
    sampled.land(1, 0.5, (2, 2, 4))
    assert (sampled.fraction, sampled.everywhere) == (0.75, 0.5)


def _lost(exit_code: int, stopped: bool = False) -> WorkerLost:
    detail: dict[str, object] = {"blender": "5.0", "exit": exit_code}
    if stopped:
        detail["stopped"] = True
    return WorkerLost("the worker died", detail)


def test_a_slot_is_lost_to_a_kill_from_outside_not_to_a_crash():
    assert (
        lost_slot(_lost(-signal.SIGKILL), died=False) == "its Blender worker was killed (SIGKILL)"
    )
    assert lost_slot(_lost(-signal.SIGTERM), died=False) is not None
    assert lost_slot(_lost(-signal.SIGSEGV), died=False) is None  # Blender crashed
    assert lost_slot(_lost(-signal.SIGKILL, stopped=True), died=False) is None  # we stopped it
    assert lost_slot(RenderError("bad scene"), died=False) is None
    assert lost_slot(RenderError("gone"), died=True) == "its render actor died"


def test_task_keys_and_order_of_a_sliced_frame():
    spec = JobSpec(frames="3", tiles="2x1", slices=2, samples=8)
    job = JobRecord(id="a" * 16, state=JobState.PROCESSING, owner="ana", spec=spec,
              scene_file="s.blend", frames_total=1, tasks_total=4,
              created_at="2026-01-01T00:00:00Z")  # fmt: skip
    tasks = list(expand(job, "h", set(), (2, 1), 2))
    # The first slice of every tile first: the frame's first whole preview comes soonest.
    assert [(t.tile, t.slice) for t in tasks] == [(0, 0), (1, 0), (0, 1), (1, 1)]
    assert [task_key(t) for t in tasks[:2]] == ["f0000003t000s00", "f0000003t001s00"]
    assert keys.task_key(3, 1) == "f0000003t001"  # unsliced keys are as they were
    assert all(t.is_part and t.parts == 4 for t in tasks)


# -- the spec and the API ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "want"), [(1, 1), (4, 4), ("8", 8), ("auto", "auto"), (" AUTO ", "auto")]
)
def test_slices_in_the_spec(value, want):
    assert JobSpec(frames="1", slices=value).slices == want


@pytest.mark.parametrize(
    ("spec", "fragment"),
    [
        ({"slices": 0}, "slices 0: slices must be a whole number from 1 to 64, or 'auto'"),
        ({"slices": MAX_SLICES + 1}, "slices 65:"),
        ({"slices": True}, "slices must be a whole number"),
        ({"slices": "2x2"}, "slices '2x2':"),
        ({"slices": 1.5}, "slices 1.5:"),
        ({"slices": 8, "samples": 4}, "slices 8 is more than the 4 samples of a frame"),
    ],
)
def test_bad_slices_are_refused_by_name(spec, fragment):
    with pytest.raises(InvalidSpec, match="slices") as caught:
        parse_spec({"frames": "1", **spec})
    assert fragment in caught.value.message


def test_the_api_counts_tiles_times_slices_and_refuses_bad_slices(redis_url, tmp_path, small_scene):
    data = small_scene.read_bytes()
    with api_client(redis_url, tmp_path, lambda: None, max_tasks=100) as api:
        spec = {"frames": "1-2", "tiles": "2x2", "slices": 3}
        r = api.post("/jobs", files={"scene": ("s.blend", data)},
                     data={"spec": json.dumps(spec)})  # fmt: skip
        assert r.status_code == 201, r.text
        job = r.json()
        assert (job["tasks_total"], job["slices"], job["spec"]["slices"]) == (24, 3, 3)
        r = api.post("/jobs", files={"scene": ("s.blend", data)},
                     data={"spec": json.dumps({"frames": "1", "slices": "auto"})})  # fmt: skip
        assert r.status_code == 201 and r.json()["slices"] is None  # the farm will choose
        for spec, status, fragment in [
            ({"frames": "1-9", "tiles": "2x2", "slices": 4}, 422, "9 frames x 4 tiles x 4 slices"),
            ({"frames": "1", "slices": 3, "samples": 2}, 422, "slices 3 is more than the 2"),
            ({"frames": "1", "slices": "many"}, 422, "slices 'many'"),
        ]:
            before = api.get("/jobs").json()["total"]
            r = api.post("/jobs", files={"scene": ("s.blend", data)},
                         data={"spec": json.dumps(spec)})  # fmt: skip
            assert r.status_code == status and fragment in r.json()["error"]["message"], r.text
            assert api.get("/jobs").json()["total"] == before  # nothing stored


# -- the Blender worker, for real ------------------------------------------------------------


def _task(inputs: Inputs, fmt: str, grid: tuple[int, int], slices: int, tile: int = 0,
          index: int = 0, frame: int = 1) -> RenderTask:  # fmt: skip
    return RenderTask(
        "job", inputs.digest, frame, tile, grid, None, None, None, None, fmt,
        32 if fmt == "exr" else 8, blender=TEST_BLENDER, slice=index, slices=slices,
    )  # fmt: skip


def _render_sliced(
    actor: RenderActor, inputs: Inputs, fmt: str, grid: tuple[int, int], slices: int,
    frame: int = 1,
) -> tuple[bytes, list[str], list[tuple[int, int, int]]]:  # fmt: skip
    """A frame rendered as tiles x slices parts in this actor, merged by an assembler and
    finished; its bytes, the parts' warnings, and the samples each part rendered."""
    asm = TileAssembler()
    total = grid[0] * grid[1] * slices
    warnings, samples = [], []
    for index in range(slices):
        for tile in range(grid[0] * grid[1]):
            task = _task(inputs, fmt, grid, slices, tile, index, frame)
            result, parts = actor.render(task, inputs)
            assert result.samples is not None and result.rect is not None
            assert result.size is not None
            warnings.extend(result.warnings)
            samples.append(result.samples)
            asm.add("job", frame, total, result.size, result.rect, parts, result.samples)
    _, image = actor.finish(_task(inputs, fmt, grid, slices, frame=frame), inputs,
                            asm.take("job", frame))  # fmt: skip
    return image, warnings, samples


@pytest.fixture(scope="module")
def actor():
    actor = RenderActor(threads=2, blender=TEST_BLENDER)
    yield actor
    actor.__del__()


def _assert_passes_equal(got: Path, want: Path) -> None:
    farm, ref = exr_parts(got), exr_parts(want)
    assert list(farm) == list(ref)  # every pass, in Blender's order, no helper left
    for name, (channels, values, stored) in farm.items():
        ref_channels, ref_values, ref_stored = ref[name]
        assert (channels, stored) == (ref_channels, ref_stored), name
        error = float(np.abs(values - ref_values).max())
        assert error <= EXR_BOUND, f"{name}: off by {error:.2e}"


@pytest.mark.slow
def test_every_pass_of_a_sliced_frame_equals_the_unsliced_render(actor, make_scene, tmp_path):
    """Every kind of pass (means, first-sample passes, light passes divided by a colour
    pass the scene has and ones it lacks, a light group, an AOV), with twelve more lights
    for Cycles' light tree to choose among and the seed animated, in 2 tiles x 3 uneven
    slices (5, 4 and 3 samples): the merged slices equal bpy's own render of the frame
    within 1e-4 on every pass. (2 and 4 slices, with and without tiles, PNG and EXR, go
    through the farm in ``test_slices_farm.py``.)"""
    grid, slices = (2, 1), 3
    scene = make_scene("--width", "48", "--height", "36", "--samples", "12", "--all-passes",
                       "--lights", "12", "--frames", "2", "--animated-seed")  # fmt: skip
    inputs = stored_scene(scene, tmp_path / "storage")
    image, warnings, samples = _render_sliced(actor, inputs, "exr", grid, slices, frame=2)
    assert sorted({s for s in samples}) == [
        (*sample_range(12, slices, i), 12) for i in range(slices)
    ]
    assert not [w for w in warnings if "adaptive" in w]
    got = tmp_path / "got.exr"
    got.write_bytes(image)
    want = render_reference(scene, tmp_path / "ref", [2], exr=True)[2]
    _assert_passes_equal(got, want)
    names = exr_parts(got)
    assert {"ViewLayer.Depth", "ViewLayer.Object Index", "ViewLayer.Diffuse Direct",
            "ViewLayer.Transmission Direct", "ViewLayer.Combined_key"} <= set(names)  # fmt: skip
    assert "ViewLayer.Diffuse Color" not in names  # the helper the merge needed went


@pytest.mark.slow
def test_light_tree_choices_and_the_animated_seed_are_the_same_in_every_slice(
    actor, make_scene, tmp_path
):
    """Per-render randomness: with 24 lights, Cycles' light tree picks a light per sample
    from the sample's random numbers, and the seed moves with the frame. Were a slice to
    draw other numbers than the whole render does for its samples, the merge would
    differ by the noise itself; the float frame is within 1e-4 of bpy's instead."""
    scene = make_scene("--width", "40", "--height", "30", "--samples", "8", "--lights", "24",
                       "--animated-seed", "--frames", "3")  # fmt: skip
    inputs = stored_scene(scene, tmp_path / "storage")
    exr, _, _ = _render_sliced(actor, inputs, "exr", (1, 1), 4, frame=3)
    (tmp_path / "got.exr").write_bytes(exr)
    _assert_passes_equal(
        tmp_path / "got.exr", render_reference(scene, tmp_path / "r", [3], exr=True)[3]
    )
    # ... and the slices really differ from one another: noise, not four copies.
    asm_parts = [actor.render(_task(inputs, "exr", (1, 1), 4, index=i, frame=3), inputs)[1]
                 for i in range(2)]  # fmt: skip
    a, b = (p["ViewLayer.Combined"].pixels for p in asm_parts)
    assert np.abs(a - b).max() > 0.01


@pytest.mark.slow
def test_adaptive_sampling_goes_off_for_a_sliced_frame_and_the_job_is_told(
    actor, make_scene, tmp_path
):
    adaptive = make_scene("--width", "32", "--height", "24", "--samples", "8", "--adaptive")
    plain = make_scene("--width", "32", "--height", "24", "--samples", "8")
    inputs = stored_scene(adaptive, tmp_path / "storage")
    image, warnings, _ = _render_sliced(actor, inputs, "exr", (1, 1), 2)
    assert any("adaptive sampling is off for this job's sliced frames" in w for w in warnings)
    (tmp_path / "got.exr").write_bytes(image)
    # It equals the same scene rendered with adaptive sampling off, unsliced.
    _assert_passes_equal(
        tmp_path / "got.exr", render_reference(plain, tmp_path / "ref", [1], exr=True)[1]
    )
    # The next, unsliced task of the same open scene samples adaptively again.
    result, _ = actor.render(_task(inputs, "exr", (2, 1), 1), inputs)
    assert result.samples is None and not any("adaptive" in w for w in result.warnings)


@pytest.mark.slow
def test_passes_no_merge_gives_back_and_too_many_slices_fail_at_once(actor, make_scene, tmp_path):
    for flag, name in (("--cryptomatte", "CryptoObject"), ("--vector", "Vector")):
        scene = make_scene("--width", "16", "--height", "12", "--samples", "4", flag)
        inputs = stored_scene(scene, tmp_path / "storage")
        with pytest.raises(RenderError, match=f"{name} pass on, which cannot be merged") as caught:
            actor.render(_task(inputs, "exr", (1, 1), 2), inputs)
        assert caught.value.detail["fatal"] and caught.value.detail["pass"] == name
        assert "render the job without slices, or turn the pass off" in caught.value.message
    small = make_scene("--width", "16", "--height", "12", "--samples", "4")
    inputs = stored_scene(small, tmp_path / "storage")
    with pytest.raises(RenderError, match="4 samples: it cannot be split into 5 slices"):
        actor.render(_task(inputs, "png", (1, 1), 5), inputs)

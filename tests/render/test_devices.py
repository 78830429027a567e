"""Device selection: the choice against listings shaped as Cycles reports them (ids
as bpy 5.0 spells them), and what bpy on this CPU-only machine really lists."""

import json
import subprocess

import pytest

from rayfarm.render.worker.devices import Choice, Device, choose

from helpers.blender import blender_code

CPU = Device("CPU", "AMD EPYC 7R13 Processor", "CPU")


def _nvidia(n: int) -> dict[str, list[Device]]:
    """What Cycles lists on a node with ``n`` visible NVIDIA GPUs, per backend."""
    names = [f"NVIDIA L4 #{i}" for i in range(n)]
    return {
        "OPTIX": [CPU] + [Device("OPTIX", m, f"CUDA_{m}_0000:00:1{i}_OptiX")
                          for i, m in enumerate(names)],
        "CUDA": [CPU] + [Device("CUDA", m, f"CUDA_{m}_0000:00:1{i}") for i, m in enumerate(names)],
        "HIP": [CPU],
        "ONEAPI": [CPU],
    }  # fmt: skip


def test_a_cpu_actor_renders_on_the_cpu():
    assert choose(_nvidia(1), []) == Choice(None)
    assert Choice(None).label == "CPU"


def test_optix_first_and_only_the_assigned_gpu():
    choice = choose(_nvidia(1), [0])
    assert choice.backend == "OPTIX" and [d.type for d in choice.devices] == ["OPTIX"]
    assert choice.label == "GPU (OPTIX: NVIDIA L4 #0)"
    assert CPU not in choice.devices  # the CPU would compete with the node's other actors


def test_cuda_when_the_build_has_no_optix_devices():
    listed = _nvidia(1)
    listed["OPTIX"] = [CPU]  # e.g. a driver too old for OptiX
    assert choose(listed, [0]).backend == "CUDA"


def test_hip_for_amd_and_oneapi_for_intel():
    radeon = Device("HIP", "AMD Radeon PRO W7900", "HIP_AMD Radeon PRO W7900_0000:03:00")
    amd = {"OPTIX": [CPU], "CUDA": [CPU], "HIP": [CPU, radeon]}
    assert choose(amd, [0]).label == "GPU (HIP: AMD Radeon PRO W7900)"
    intel = {"ONEAPI": [CPU, Device("ONEAPI", "Intel Arc A770", "ONEAPI_Intel Arc A770_0")]}
    assert choose(intel, [0]).backend == "ONEAPI"


def test_visible_gpus_beyond_the_assignment_are_picked_by_ordinal():
    """Ray normally hides unassigned GPUs; where the process sees all four, an actor
    assigned GPU 2 takes the third, not the first."""
    choice = choose(_nvidia(4), [2])
    assert [d.name for d in choice.devices] == ["NVIDIA L4 #2"]
    two = choose(_nvidia(4), [1, 3])
    assert [d.name for d in two.devices] == ["NVIDIA L4 #1", "NVIDIA L4 #3"]
    # Exactly what Ray assigned is visible: all of it is ours.
    assert len(choose(_nvidia(2), [5, 6]).devices) == 2


def test_no_gpu_backend_says_so():
    only_cpu = {b: [CPU] for b in ("OPTIX", "CUDA", "HIP", "ONEAPI")}
    choice = choose(only_cpu, [0])
    assert choice.backend is None
    assert choice.label == "CPU (no usable GPU backend on this node)"


@pytest.mark.slow
def test_bpy_here_lists_no_gpu_and_an_assigned_gpu_falls_back_to_the_cpu():
    """The real thing on this CPU-only machine: bpy's own listing, and ``select`` as an
    actor assigned a GPU would run it (Cycles finds no GPU, so the actor says CPU)."""
    code = (
        "import json, bpy\n"
        "from rayfarm_worker.devices import listing, select\n"
        "prefs = bpy.context.preferences.addons['cycles'].preferences\n"
        "found = {k: [d.type for d in v] for k, v in listing(prefs).items()}\n"
        "print(json.dumps({'listed': found, 'label': select(prefs, [0]).label,\n"
        "                  'cpu': select(prefs, []).label}))\n"
    )
    out = subprocess.run(blender_code(code), capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert set(result["listed"]) == {"OPTIX", "CUDA", "HIP", "ONEAPI"}
    assert all(types == ["CPU"] for types in result["listed"].values())
    assert result["label"] == "CPU (no usable GPU backend on this node)"
    assert result["cpu"] == "CPU"

"""Scene upload: first submit vs unchanged re-submit vs one texture changed.

The bench writes ``--textures`` incompressible PNG textures (random pixels; default 12
of 2048x2048 RGBA, about 200 MB) into ``textures/`` beside a scene built with
``examples/make_scene.py --texture-dir``, starts a local farm, and submits the scene
three times with ``Farm.submit`` (which packs it with blender-asset-tracer, hashes
every file, asks the farm which it lacks and uploads only those):

1. first: the farm has nothing;
2. unchanged: the same scene again;
3. one changed: one texture rewritten with new pixels.

For each: the wall time of ``Farm.submit`` (pack, hash, upload, queue), the files and
bytes packed, and the files and bytes actually sent (``Farm.last_upload``). Targets:
the unchanged re-submit sends 0 bytes; the changed one sends only that texture.

    python bench/upload.py                       # make bench-upload
    python bench/upload.py --textures 12 --size 2048 --out /tmp/bu --json /tmp/bu/upload.json

Exit status: 0 when the measurement ran, 1 when something broke, 130 on Ctrl-C.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

import rayfarm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # what the benches share
    BenchError,
    LocalFarm,
    Processes,
    add_output_options,
    machine,
    make_scene,
    run_bench,
)
from _report import pass_fail, print_pipe_table


def _texture(path: Path, size: int, seed: int) -> None:
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 4), dtype=np.uint8)
    Image.fromarray(pixels, "RGBA").save(path, compress_level=1)


def measure(args: argparse.Namespace, procs: Processes, out: Path) -> dict[str, Any]:
    project = out / "project"
    textures = project / "textures"
    textures.mkdir(parents=True, exist_ok=True)
    for i in range(args.textures):
        _texture(textures / f"tex{i:02d}.png", args.size, i)
    scene = make_scene(
        procs,
        project / "shot.blend",
        ["--width", "32", "--height", "24", "--samples", "1", "--texture-dir", str(textures)],
    )
    result: dict[str, Any] = {"machine": machine(), "args": {**vars(args), "out": str(out)}}
    farm = LocalFarm(procs, out / "farm", out / "farm.log")
    rows = []
    try:
        client = farm.start()
        for name in ("first", "unchanged", "one changed"):
            if name == "one changed":
                _texture(textures / "tex00.png", args.size, 1000)
            started = time.perf_counter()
            job = client.submit(scene, frames="1")
            seconds = time.perf_counter() - started
            up = client.last_upload
            assert up is not None
            rows.append({
                "submit": name, "seconds": seconds, "files": up.files,
                "bytes_total": up.bytes_total, "files_sent": up.files_sent,
                "bytes_sent": up.bytes_sent,
            })  # fmt: skip
            if job.wait(timeout=600).state is not rayfarm.JobState.COMPLETED:
                raise BenchError(f"job {job.id} failed: {job.refresh().error}")
    finally:
        farm.stop()
    result["rows"] = rows
    result["changed_bytes"] = (textures / "tex00.png").stat().st_size
    return result


def report(result: dict[str, Any]) -> None:
    a, m = result["args"], result["machine"]
    print(f"\n{a['textures']} textures of {a['size']}x{a['size']} RGBA (random pixels)")
    print(f"{m['nproc']} CPUs ({m['cpu_model']}), rayfarm {m['rayfarm']}\n")
    head = ("submit", "wall s", "files", "MB packed", "files sent", "MB sent")
    print_pipe_table(head, [
        (r["submit"], f"{r['seconds']:.2f}", str(r["files"]), f"{r['bytes_total'] / 1e6:.1f}",
         str(r["files_sent"]), f"{r['bytes_sent'] / 1e6:.2f}")
        for r in result["rows"]
    ])  # fmt: skip
    unchanged = result["rows"][1]["bytes_sent"] == 0
    changed = result["rows"][2]
    only_one = changed["files_sent"] == 1 and changed["bytes_sent"] == result["changed_bytes"]
    print(f"\nunchanged re-submit sends 0 bytes: {pass_fail(unchanged)}")
    print(f"one changed texture sends only it: {pass_fail(only_one)}")


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--textures", type=int, default=12)
    p.add_argument("--size", type=int, default=2048, help="texture width and height")
    add_output_options(p)
    args = p.parse_args(argv)

    def work(procs: Processes, out: Path) -> dict[str, Any]:
        result = measure(args, procs, out)
        report(result)
        return result

    return run_bench(args.out, args.json, "rayfarm-upload-", work)


if __name__ == "__main__":
    sys.exit(main())

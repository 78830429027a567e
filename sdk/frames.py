"""Frame specs: ``"1-8"``, ``"1,3,5-7"``, ``"1-20x5"``, ``"1-10,20,30-40x2"``.

A spec is a comma-separated list of items; an item is a frame ``N``, a range
``A-B`` (inclusive) or a stepped range ``A-BxS``. The result is sorted and
unique. Specs are bounded so a typo cannot expand into millions of tasks.
"""

from __future__ import annotations

import re
from collections import deque

from rayfarm.errors import InvalidSpec

__all__ = ["MAX_FRAME", "MAX_FRAMES_PER_JOB", "parse_frames", "preview_order"]

#: Blender's own upper bound for a frame number (MAXFRAME).
MAX_FRAME = 1_048_574
#: The most frames one job may ask for.
MAX_FRAMES_PER_JOB = 100_000
_MAX_SPEC_CHARS = 4096

_ITEM = re.compile(r"^(?P<a>\d+)(?:-(?P<b>\d+)(?:x(?P<s>\d+))?)?$")


def parse_frames(spec: str | int) -> list[int]:
    """Expand a frame spec into a sorted list of unique frame numbers.

    >>> parse_frames("1-5,9,20-30x5")
    [1, 2, 3, 4, 5, 9, 20, 25, 30]

    Raises ``InvalidSpec`` naming the offending item.
    """
    if isinstance(spec, bool):
        raise InvalidSpec("frames must be a frame spec such as '1-8', not a boolean")
    if isinstance(spec, int):
        spec = str(spec)
    if not isinstance(spec, str):
        raise InvalidSpec(f"frames must be a string such as '1-8', not {type(spec).__name__}")
    if len(spec) > _MAX_SPEC_CHARS:
        raise InvalidSpec(f"frames spec is longer than {_MAX_SPEC_CHARS} characters")
    text = spec.replace(" ", "")
    if not text:
        raise InvalidSpec("frames is empty: give frames such as '1-8' or '1,3,5-7'")
    frames: set[int] = set()
    for item in text.split(","):
        m = _ITEM.match(item)
        if m is None:
            raise InvalidSpec(
                f"frames item {item!r} is not N, A-B or A-BxSTEP (e.g. '1-8', '1-20x5')",
                {"field": "frames", "item": item},
            )
        a = int(m["a"])
        b = int(m["b"]) if m["b"] is not None else a
        step = int(m["s"]) if m["s"] is not None else 1
        if b < a:
            raise InvalidSpec(
                f"frames range {item!r} runs backwards", {"field": "frames", "item": item}
            )
        if step < 1:
            raise InvalidSpec(
                f"frames step in {item!r} must be at least 1", {"field": "frames", "item": item}
            )
        if b > MAX_FRAME:
            raise InvalidSpec(
                f"frame {b} in {item!r} is above Blender's maximum frame {MAX_FRAME}",
                {"field": "frames", "item": item},
            )
        if (b - a) // step + 1 + len(frames) > MAX_FRAMES_PER_JOB:
            raise InvalidSpec(
                f"frames spec expands to more than {MAX_FRAMES_PER_JOB} frames",
                {"field": "frames"},
            )
        frames.update(range(a, b + 1, step))
    return sorted(frames)


def preview_order(frames: list[int]) -> list[int]:
    """``frames`` in the order a preview wants them: the first, the last, the middle one,
    then the middles of each half, and so on (the gaps halve at each pass), so the whole
    shot can be looked at early and in ever finer steps.

    >>> preview_order([1, 2, 3, 4, 5, 6, 7, 8, 9])
    [1, 9, 5, 3, 7, 2, 4, 6, 8]
    """
    n = len(frames)
    if n <= 2:
        return list(frames)
    order = [0, n - 1]
    gaps = deque([(0, n - 1)])  # breadth first: every gap of one size before the next
    while gaps:
        lo, hi = gaps.popleft()
        mid = (lo + hi) // 2
        if lo < mid < hi:
            order.append(mid)
            gaps.append((lo, mid))
            gaps.append((mid, hi))
    return [frames[i] for i in order]

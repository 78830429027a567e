"""How the benches report: one percentile formula, the two kinds of table they print,
and the word for a check.

Tables are either aligned columns (``print_columns``: a header and rows, each column
with its own format spec) or rows of cells joined by `` | `` under a line of dashes
(``print_pipe_table``, ready to paste into BENCHMARKS.md).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

#: What a column's title keeps of its values' format spec: the alignment and width.
_ALIGN_WIDTH = re.compile(r"[<>^]?\d*")


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0-100) of ``values``, nearest rank; NaN when empty. The
    one formula of every bench, so that their p50 and p99 compare."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def pass_fail(ok: bool) -> str:
    """The word every bench prints for a check."""
    return "PASS" if ok else "FAIL"


def print_columns(
    columns: Sequence[tuple[str, str]], rows: Iterable[Sequence[object]], indent: str = "  "
) -> None:
    """A header of each column's title, then ``rows``: column by column, each value in
    its column's format spec (``">9.1f"``); the title takes the spec's alignment and
    width. A row may be shorter than the header (a figure it has not)."""
    head = (format(title, _title_spec(spec)) for title, spec in columns)
    print(indent + " ".join(head))
    for row in rows:
        cells = zip(row, (spec for _, spec in columns), strict=False)
        print(indent + " ".join(format(value, spec) for value, spec in cells))


def _title_spec(spec: str) -> str:
    match = _ALIGN_WIDTH.match(spec)
    return match[0] if match else ""


def print_pipe_table(head: Sequence[str], rows: Iterable[Sequence[str]]) -> None:
    """``head``, a line of dashes as wide as each title, and ``rows``, cells joined by
    `` | ``."""
    print(" | ".join(head))
    print(" | ".join("-" * len(h) for h in head))
    for row in rows:
        print(" | ".join(row))

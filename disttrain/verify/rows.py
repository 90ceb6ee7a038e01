"""Which rows of a long per-step (or per-segment) table the console shows: a run of 1,000 steps is not read as
1,000 lines. The first and last rows and the largest differences are kept, in order, with a line where rows are
left out; ``--json`` still has every row.
"""

from __future__ import annotations

from collections.abc import Sequence

MAX_ROWS = 40  # up to this many rows, every one is shown
EDGE = 10  # rows kept at each end of a longer table
WORST = 10  # and the rows with the largest values


def shown_rows(values: Sequence[float], max_rows: int = MAX_ROWS) -> list[int]:
    """Indices of the rows to show, in order: all of them up to ``max_rows``, else the first and last ``EDGE`` and
    the ``WORST`` largest ``values`` (NaN counts as largest)."""
    n = len(values)
    if n <= max_rows:
        return list(range(n))
    def largest_first(i: int) -> tuple[bool, float]:
        v = values[i]
        return v != v, v if v == v else 0.0  # NaN (v != v) before every number

    worst = sorted(range(n), key=largest_first, reverse=True)[:WORST]
    return sorted(set(range(EDGE)) | set(range(n - EDGE, n)) | set(worst))


def with_gaps(indices: list[int], total: int, lines: list[str], what: str, largest: str = "difference") -> list[str]:
    """``lines`` (one per index) with a line for each run of left-out rows, and a closing note when any are."""
    out, previous = [], -1
    for i, line in zip(indices, lines, strict=True):
        if i > previous + 1:
            out.append(f"{'...':>5}  ({i - previous - 1} {what}s left out)")
        out.append(line)
        previous = i
    if len(indices) < total:
        out.append(f"({len(indices)} of {total} {what}s shown: the first {EDGE}, the last {EDGE} and the {WORST} "
                   "with the "
                   f"largest {largest}; --json has every one)")
    return out


__all__ = ["shown_rows", "with_gaps", "MAX_ROWS"]

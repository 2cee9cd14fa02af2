"""Plain-text tables of the benchmarks: numbers as short strings, aligned columns."""
from __future__ import annotations

import math


def fmt(v) -> str:
    """A number as a short string (4 significant digits, no exponent for usual ranges)."""
    if v is None:
        return "-"
    if isinstance(v, bool) or isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if not math.isfinite(v):
            return "nan" if math.isnan(v) else ("inf" if v > 0 else "-inf")
        a = abs(v)
        if a >= 1000:
            return f"{v:.0f}"
        if a >= 100:
            return f"{v:.1f}"
        if a >= 1:
            return f"{v:.2f}"
        return f"{v:.3g}"
    return str(v)


def format_table(headers: list[str], rows: list[list], title: str | None = None) -> str:
    """A plain-text table with aligned columns (numbers right-aligned)."""
    cells = [[fmt(c) for c in row] for row in rows]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]
    numeric = [bool(rows) and all(isinstance(row[i], (int, float)) or row[i] is None
                                  for row in rows) for i in range(len(headers))]

    def line(items):
        return "  ".join(s.rjust(w) if numeric[i] else s.ljust(w)
                         for i, (s, w) in enumerate(zip(items, widths))).rstrip()

    out = [title] if title else []
    out += [line(headers), line(["-" * w for w in widths])] + [line(r) for r in cells]
    return "\n".join(out)


def print_table(ctx, headers, rows, title=None) -> None:
    """Print ``format_table`` (on rank 0 when a ``common.BenchContext`` is given)."""
    if ctx is None or ctx.rank == 0:
        print(format_table(headers, rows, title), flush=True)


def figures_table(ctx, figures: dict, per_rank: dict, title: str) -> None:
    """Print one row per figure: mean over ranks, and the lowest and highest rank's value."""
    rows = [[k, v, min(per_rank[k]), max(per_rank[k])] for k, v in figures.items()]
    print_table(ctx, ["figure", "mean", "min rank", "max rank"], rows, title)

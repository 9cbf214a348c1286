"""What the op benchmarks (bench_int8_matmul.py, bench_int4_matmul.py) print: a progress line per
timed shape and M, and the markdown table of median ms per call that RESULTS.md quotes."""

from __future__ import annotations

import datetime
from collections.abc import Callable, Sequence


def progress_line(k: int, n: int, m: int, times: dict) -> str:
    """`K=.. N=.. M=.. name=..ms ...` of one shape and M; a None time (the op failed) is left out."""
    return f"K={k:5d} N={n:5d} M={m:4d} " + " ".join(
        f"{name}={seconds * 1e3:.4f}ms" for name, seconds in times.items() if seconds is not None)


def print_markdown(rows: Sequence[tuple], columns: Sequence[tuple[str, str]], extra_titles: Sequence[str],
                   extra_cells: Callable[[tuple], Sequence[str]], *, digits: int, timed_columns_only: bool = False):
    """One markdown table: a title line (device kind, jax version, date), then per row its K x N,
    M, the columns' times in ms ("-" where a row has none) and extra_cells(row).

    rows: (k, n, m, times, ...) with times a dict from column key to seconds (None: not timed).
    columns: (key, title) pairs; timed_columns_only leaves out those no row has a time under.
    """
    import jax

    print(f"\n{jax.devices()[0].device_kind}, jax {jax.__version__}, {datetime.date.today().isoformat()}; "
          "median ms per call\n")
    if timed_columns_only:
        columns = [(key, title) for key, title in columns if any(key in row[3] for row in rows)]
    titles = ["K x N", "M", *(title for _, title in columns), *extra_titles]
    print("| " + " | ".join(titles) + " |")
    print("|" + "---|" * len(titles))
    for row in rows:
        k, n, m, times = row[:4]
        cells = ["-" if times.get(key) is None else f"{times[key] * 1e3:.{digits}f}" for key, _ in columns]
        print("| " + " | ".join([f"{k}x{n}", str(m), *cells, *extra_cells(row)]) + " |")

"""Tiles and routes of the Pallas 4-bit matmul kernels (pallas_triton.py), per GPU, as data.

A Config names the route and its tiles:
- route "fused": one kernel streams the packed codes, dequantizes each weight tile in registers
  and multiplies it into float32 accumulators; any M (decode and prefill tiles differ only in
  block_m / dot).
- route "xla_dot": a Pallas kernel writes the dequantized [N, K] weight in the compute dtype,
  then XLA's own dot (cuBLAS) multiplies: the reference's dot exactly, for large M where the
  fused kernel re-dequantizes every weight tile once per M tile.

Tables: data/<device>.json (device_table_name: "nvidia_h100", "nvidia_h200", ...), or a file
int4_<device>.json in the directory JINT8_KERNEL_TABLES names (searched first), hold
{"entries": [{"min_m": M0, "max_m": M1, "k": K, "n": N, "config": {...}}, ...]}; "k"/"n" may be
left out (any shape), "min_m" (default 1) too. The first entry (sorted by max_m, exact shapes
before shape-less ones) whose [min_m, max_m] holds the call's M, whose k/n match and whose config
can run M rows gives the Config; benchmarks/bench_int4_matmul.py --sweep
prints such entries (--write-table writes a whole table; data/nvidia_h100.json came from it, at
M = 1 and 16 on the Llama-3-8B shapes). Shapes and GPUs without an entry get default_config, a
heuristic.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import pathlib
from typing import Optional

from jint8.errors import InvalidConfigError

_DATA_DIR = pathlib.Path(__file__).parent / "data"
TABLES_ENV_VAR = "JINT8_KERNEL_TABLES"  # shared with int8_matmul: one directory for every op
ROUTES = ("fused", "xla_dot")
LOOKUPS = ("gather", "select")
DOTS = ("mma", "mma_swapped", "fma")
# Programs wanted at decode: an H100 / H200 has 132 SMs, and one 4-warp program per SM keeps too
# few loads in flight to stream the weight (the dequantization's table loads depend on the code
# loads, so the pipeline alone does not hide them): about two per SM. Output tiles are narrowed,
# then K is split, until about this many programs run. An estimate until a table says.
_TARGET_PROGRAMS = 256
# Largest M run with decode tiles (one block_m of all rows); the prefill tiles take larger M.
DECODE_MAX_M = 16
# Largest M whose default tiles are spread like decode ones (one M tile of all rows, block_n
# narrowed and K split to ~_TARGET_PROGRAMS programs): batched decode, still weight-bound.
SKINNY_MAX_M = 64


def _check_pow2(name: str, value, lo: int, hi: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi or value & (value - 1):
        raise InvalidConfigError(f"int4 Config.{name}={value!r} must be a power of two in [{lo}, {hi}]")


@dataclasses.dataclass(frozen=True, kw_only=True)
class Config:
    """One program computes out[block_m, block_n], K in block_k steps of codes.

    block_k: codes per K step (block_k / 2 bytes of each weight row); inside a step the kernel
      works in sub-blocks of min(block_k, blocksize) codes, one absmax each.
    dot: "mma" (tl.dot on tensor cores, x as the A operand; block_m >= 16), "mma_swapped" (the
      dequantized weight tile as the A operand, out.T = w @ x.T), "fma" (M = 1 only: float32
      multiply-adds on the CUDA cores, block_m = 1, no tensor cores).
    lookup: how a 4-bit code becomes its code book value: "gather" (a load from the 16-entry
      table, which stays in L1) or "select" (a tree of 15 selects between constants).
    split_k: programs per output tile, each summing a K slice; their float32 partials
      [split_k, M, N] are summed by XLA after the kernel (with the bias and the casts).
    route: "fused" or "xla_dot" (module docstring); xla_dot uses block_n / block_k / warps for
      its dequantization kernel and ignores block_m, dot and split_k.
    """

    block_m: int
    block_n: int
    block_k: int
    num_warps: int = 4
    num_stages: int = 3
    split_k: int = 1
    dot: str = "mma"
    lookup: str = "gather"
    route: str = "fused"

    def __post_init__(self):
        _check_pow2("block_m", self.block_m, 1, 256)
        _check_pow2("block_n", self.block_n, 16, 512)
        _check_pow2("block_k", self.block_k, 32, 4096)
        _check_pow2("num_warps", self.num_warps, 1, 16)
        if isinstance(self.num_stages, bool) or not isinstance(self.num_stages, int) or not 1 <= self.num_stages <= 8:
            raise InvalidConfigError(f"int4 Config.num_stages={self.num_stages!r} must be in [1, 8]")
        if isinstance(self.split_k, bool) or not isinstance(self.split_k, int) or not 1 <= self.split_k <= 64:
            raise InvalidConfigError(f"int4 Config.split_k={self.split_k!r} must be in [1, 64]")
        for name, allowed in (("dot", DOTS), ("lookup", LOOKUPS), ("route", ROUTES)):
            if getattr(self, name) not in allowed:
                raise InvalidConfigError(f"int4 Config.{name}={getattr(self, name)!r} must be one of {allowed}")
        if self.dot == "fma" and self.block_m != 1:
            raise InvalidConfigError(f"int4 Config: dot='fma' runs one row (block_m=1), got block_m={self.block_m}")
        if self.dot != "fma" and self.block_m < 16:
            raise InvalidConfigError(f"int4 Config: dot={self.dot!r} needs block_m >= 16 (the MMA's rows), "
                                     f"got {self.block_m}")

    def fits(self, m: int) -> Optional[str]:
        """Why this config cannot run M rows (None if it can)."""
        if self.dot == "fma" and m != 1 and self.route == "fused":
            return f"dot='fma' runs M = 1 only, got M={m}"
        return None


def sub_block(config: Config, blocksize: int) -> int:
    """Codes the kernel dequantizes with one absmax: min(block_k, blocksize)."""
    return min(config.block_k, blocksize)


def fit_to_shape(config: Config, m: int, k: int, n: int, blocksize: int) -> Config:
    """The config with block_k a divisor of K (halved until it divides; K is a multiple of the
    blocksize, so this stops at min(block_k, blocksize) at the latest) and split_k no larger than
    the number of K steps; block_m covers all M rows for decode tiles."""
    block_k = config.block_k
    while k % block_k:
        block_k //= 2
    steps = k // block_k
    split_k = max(1, min(config.split_k, steps))
    block_m = config.block_m
    if config.route == "fused" and config.dot != "fma" and m <= DECODE_MAX_M:
        block_m = max(16, 1 << (m - 1).bit_length())
    return dataclasses.replace(config, block_k=max(block_k, 32), split_k=split_k, block_m=block_m)


def default_config(m: int, k: int, n: int, blocksize: int) -> Config:
    """Heuristic tiles for GPUs without a tuned table (and shapes a table does not list).

    Decode (M <= 64): the one-row FMA path at M = 1, MMA tiles of all rows above; block_n
    narrowed and K split until ~_TARGET_PROGRAMS programs stream the weight (N = 4096 at M = 1:
    128 tiles of 32 rows, split 2). Prefill (M > 64): the xla_dot route, one dequantization pass
    and XLA's GEMM. The fused kernel's MMA tiles dequantize every weight tile once per M tile,
    and with 128 x 128 tiles they were far slower: a Llama-3-8B-shaped NF4 model's prefill(512)
    took 312 ms through them on an H100, against 24 ms for bf16 (benchmarks/RESULTS.md).
    """
    if m <= SKINNY_MAX_M:  # streaming the weight dominates: spread it over the SMs
        base = Config(block_m=1, block_n=128, block_k=256, num_warps=4, num_stages=4, dot="fma") if m == 1 else \
            Config(block_m=max(16, 1 << (m - 1).bit_length()), block_n=128, block_k=256, num_warps=4, num_stages=4,
                   dot="mma")
        return spread_programs(fit_to_shape(base, m, k, n, blocksize), k, n)
    return fit_to_shape(Config(block_m=128, block_n=128, block_k=256, num_warps=4, num_stages=2, route="xla_dot"),
                        m, k, n, blocksize)


def spread_programs(config: Config, k: int, n: int) -> Config:
    """Decode: narrow block_n (to 32 at least), then split K (>= 4 steps per program), until about
    _TARGET_PROGRAMS programs run."""
    block_n = config.block_n
    while block_n > 32 and -(-n // block_n) < _TARGET_PROGRAMS:
        block_n //= 2
    tiles, steps, split_k = -(-n // block_n), k // config.block_k, 1
    while tiles * split_k < _TARGET_PROGRAMS and steps // (2 * split_k) >= 4:
        split_k *= 2
    return dataclasses.replace(config, block_n=block_n, split_k=split_k)


def device_table_name(device_kind: str) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'nvidia_h100' (int8_matmul's naming; H100 and H200 variants share)."""
    import re

    kind = device_kind.lower()
    for name in ("h100", "h200"):
        if name in kind:
            return f"nvidia_{name}"
    return re.sub(r"[^a-z0-9]+", "_", kind).strip("_")


def table_path(name: str) -> Optional[pathlib.Path]:
    """JINT8_KERNEL_TABLES/int4_<name>.json, else jint8's data/<name>.json; None if neither."""
    env = os.environ.get(TABLES_ENV_VAR)
    for path in ([pathlib.Path(env) / f"int4_{name}.json"] if env else []) + [_DATA_DIR / f"{name}.json"]:
        if path.is_file():
            return path
    return None


@functools.cache
def _read_table(name: str) -> tuple[dict, ...]:
    path = table_path(name)
    if path is None:
        return ()
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise InvalidConfigError(f"int4 kernel table {path}: not readable JSON: {error}") from None
    entries = data.get("entries") if isinstance(data, dict) else None
    if not isinstance(entries, list):
        raise InvalidConfigError(f"int4 kernel table {path}: must be an object with an 'entries' list")
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict) or "max_m" not in entry or "config" not in entry:
            raise InvalidConfigError(f"int4 kernel table {path}: entries[{i}] needs 'max_m' and 'config'")
        try:
            Config(**entry["config"])
        except (InvalidConfigError, TypeError) as error:
            raise InvalidConfigError(f"int4 kernel table {path}: entries[{i}]: {error}") from None
    # exact shapes first, then by max_m
    return tuple(sorted(entries, key=lambda e: ("k" not in e, e["max_m"])))


def config_for(device_kind: str, m: int, k: int, n: int, blocksize: int) -> Config:
    """The tuned Config of this GPU for the shape (fitted to it), else default_config."""
    for entry in _read_table(device_table_name(device_kind)):
        if m <= entry["max_m"] and entry.get("min_m", 1) <= m and entry.get("k", k) == k and entry.get("n", n) == n:
            config = Config(**entry["config"])
            if config.fits(m) is None:
                return fit_to_shape(config, m, k, n, blocksize)
    return default_config(m, k, n, blocksize)


def clear_cache() -> None:
    """Forget loaded tables (after editing one, or JINT8_KERNEL_TABLES, in a running process)."""
    _read_table.cache_clear()

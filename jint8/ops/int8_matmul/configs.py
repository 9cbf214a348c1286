"""Tile configurations of the Pallas int8 matmul kernels, per shape bucket and GPU, as data.

The tuned tables live in data/<device>.json (one file per GPU kind, written from measurements on
that GPU; see benchmarks/NOTES_int8_matmul.md), with one bucket list for the op's wq[K, N]
("buckets") and one for K-major weights wq.T[N, K] ("buckets_nk"). Buckets are ordered by `max_m`;
the first bucket whose `max_m` covers the call's M gives the GEMM tiles (split-K is added for
shapes with too few output tiles unless the bucket says "auto_split_k": false), the
activation-pass tiles (optional; by default they follow K) and the `gemm_path`: "pallas" (our fused kernel) or "xla" (XLA's own int8 GEMM with the
dequant epilogue fused by XLA, kept only where it measured faster). GPUs without a table get
`default_configs`, a heuristic that is safe (small tiles, modest shared memory) everywhere.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import pathlib
from typing import Optional

from jint8.errors import InvalidConfigError

_DATA_DIR = pathlib.Path(__file__).parent / "data"
# Split K only while fewer than ~half the SMs of an H100/H200 (132) would get an output tile:
# measured on K=8192, N=28672 (112 tiles of 256 columns), split_k=2 was slower than 1.
_MIN_PROGRAMS = 66


def _check_pow2(name: str, value: int, lo: int, hi: int) -> None:
    if not isinstance(value, int) or value < lo or value > hi or value & (value - 1):
        raise InvalidConfigError(f"{name}={value!r} must be a power of two in [{lo}, {hi}]")


@dataclasses.dataclass(frozen=True, kw_only=True)
class Config:
    """Tiles of the int8 GEMM kernel: out[block_m, block_n] per program, K in block_k steps.

    split_k > 1 splits the K loop over programs (skinny M, too few output tiles to fill the GPU);
    their float32 partials are summed outside the kernel.
    weight_layout: "kn" for wq[K, N] (the op's contract), "nk" for a K-major wq.T[N, K].
    swap_ab: compute each tile transposed (weight as the MMA's A operand).
    """

    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int
    split_k: int = 1
    weight_layout: str = "kn"
    swap_ab: bool = False

    def __post_init__(self):
        # tl.dot on int8 needs M >= 16, N >= 16 and K >= 32 (mma.m16n8k32).
        _check_pow2("block_m", self.block_m, 16, 256)
        _check_pow2("block_n", self.block_n, 16, 512)
        _check_pow2("block_k", self.block_k, 32, 1024)
        _check_pow2("num_warps", self.num_warps, 1, 16)
        if not isinstance(self.num_stages, int) or not 1 <= self.num_stages <= 8:
            raise InvalidConfigError(f"num_stages={self.num_stages!r} must be in [1, 8]")
        if not isinstance(self.split_k, int) or not 1 <= self.split_k <= 64:
            raise InvalidConfigError(f"split_k={self.split_k!r} must be in [1, 64]")
        if self.weight_layout not in ("kn", "nk"):
            raise InvalidConfigError(f"weight_layout={self.weight_layout!r} must be 'kn' or 'nk'")
        if not isinstance(self.swap_ab, bool):
            raise InvalidConfigError(f"swap_ab={self.swap_ab!r} must be a bool")


@dataclasses.dataclass(frozen=True, kw_only=True)
class QuantizeConfig:
    """Tiles of the activation pass: block_rows rows per program, K in block_cols steps."""

    block_rows: int
    block_cols: int
    num_warps: int

    def __post_init__(self):
        _check_pow2("block_rows", self.block_rows, 1, 256)
        _check_pow2("block_cols", self.block_cols, 16, 16384)
        _check_pow2("num_warps", self.num_warps, 1, 16)


@dataclasses.dataclass(frozen=True, kw_only=True)
class KernelPlan:
    """Everything one call needs: activation tiles, GEMM tiles and which GEMM runs."""

    quantize: QuantizeConfig
    gemm: Config
    gemm_path: str = "pallas"

    def __post_init__(self):
        if self.gemm_path not in ("pallas", "xla"):
            raise InvalidConfigError(f"gemm_path={self.gemm_path!r} must be 'pallas' or 'xla'")


def default_plan(m: int, k: int, n: int) -> KernelPlan:
    """Heuristic plan for GPUs without a tuned table: small, always-compilable tiles."""
    if m <= 16:
        gemm = Config(block_m=16, block_n=64, block_k=256, num_warps=4, num_stages=4)
    elif m <= 64:
        gemm = Config(block_m=64, block_n=64, block_k=128, num_warps=4, num_stages=4)
    else:
        gemm = Config(block_m=128, block_n=128, block_k=64, num_warps=8, num_stages=3)
    return KernelPlan(quantize=_default_quantize(m, k), gemm=_fit_split_k(gemm, m, k, n))


def _default_quantize(m: int, k: int) -> QuantizeConfig:
    # Skinny M: one program per row holding the whole row (one load of X); else 4 rows in
    # 2048-column chunks, whose second sweep re-reads the block from L2.
    whole_row = max(16, 1 << (k - 1).bit_length())
    if m <= 64 and whole_row <= 16384:
        return QuantizeConfig(block_rows=1, block_cols=whole_row,
                              num_warps=max(4, min(16, whole_row // 1024)))
    return QuantizeConfig(block_rows=4, block_cols=min(2048, whole_row), num_warps=4)


def _fit_split_k(config: Config, m: int, k: int, n: int) -> Config:
    """Split K while fewer than _MIN_PROGRAMS programs run, keeping >= 4 K steps per program."""
    if config.split_k != 1:
        return config
    tiles = math.ceil(m / config.block_m) * math.ceil(n / config.block_n)
    k_steps = math.ceil(k / config.block_k)
    split_k = 1
    while tiles * split_k < _MIN_PROGRAMS and k_steps // (split_k * 2) >= 4:
        split_k *= 2
    return dataclasses.replace(config, split_k=split_k)


def device_table_name(device_kind: str) -> Optional[str]:
    """'NVIDIA H100 80GB HBM3' -> 'nvidia_h100'; None for GPUs without a tuned table."""
    kind = device_kind.lower()
    for name in ("h100", "h200"):
        if name in kind:
            return f"nvidia_{name}"
    return None


@functools.cache
def _load_table(name: str, weight_layout: str) -> tuple[dict, ...]:
    path = _DATA_DIR / f"{name}.json"
    if not path.exists():
        return ()
    buckets = json.loads(path.read_text())["buckets" if weight_layout == "kn" else "buckets_nk"]
    return tuple(sorted(buckets, key=lambda b: b["max_m"]))


def plan_for(device_kind: str, m: int, k: int, n: int, weight_layout: str = "kn") -> KernelPlan:
    """The tuned plan for this GPU, shape bucket and weight layout, else default_plan."""
    name = device_table_name(device_kind)
    table = _load_table(name, weight_layout) if name else ()
    for bucket in table:
        if m <= bucket["max_m"]:
            gemm = Config(**bucket["gemm"])
            quantize = bucket.get("quantize")
            return KernelPlan(
                # The activation pass's tiles follow K (whole rows when they fit), not a table.
                quantize=QuantizeConfig(**quantize) if quantize else _default_quantize(m, k),
                gemm=_fit_split_k(gemm, m, k, n) if bucket.get("auto_split_k", True) else gemm,
                gemm_path=bucket.get("gemm_path", "pallas"),
            )
    plan = default_plan(m, k, n)
    if weight_layout == "nk":
        return dataclasses.replace(
            plan, gemm=dataclasses.replace(plan.gemm, weight_layout="nk"))
    return plan


def clear_cache() -> None:
    """Forget loaded tables (after editing data/*.json in a running process)."""
    _load_table.cache_clear()

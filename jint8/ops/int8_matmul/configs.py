"""Tile configurations of the Pallas int8 matmul kernels, per shape bucket and GPU, as data.

The tuned tables live in data/<device>.json (one file per GPU kind, written from measurements on
that GPU; see benchmarks/NOTES_int8_matmul.md). A table is a list of buckets ordered by `max_m`;
the first bucket whose `max_m` covers the call's M gives the GEMM tiles, the activation-pass
tiles and the `gemm_path`: "pallas" (our fused kernel) or "xla" (XLA's own int8 GEMM with the
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
# Programs wanted in flight for a memory-bound skinny GEMM: about two waves on an H100/H200
# (132 SMs), so that the weight stream keeps every SM's loads busy.
_TARGET_PROGRAMS = 264


def _check_pow2(name: str, value: int, lo: int, hi: int) -> None:
    if not isinstance(value, int) or value < lo or value > hi or value & (value - 1):
        raise InvalidConfigError(f"{name}={value!r} must be a power of two in [{lo}, {hi}]")


@dataclasses.dataclass(frozen=True, kw_only=True)
class Config:
    """Tiles of the int8 GEMM kernel: out[block_m, block_n] per program, K in block_k steps.

    split_k > 1 splits the K loop over programs (skinny M, too few output tiles to fill the GPU);
    their float32 partials are summed outside the kernel.
    """

    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int
    split_k: int = 1

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


@dataclasses.dataclass(frozen=True, kw_only=True)
class QuantizeConfig:
    """Tiles of the activation pass: block_rows rows per program, K in block_cols steps."""

    block_rows: int
    block_cols: int
    num_warps: int

    def __post_init__(self):
        _check_pow2("block_rows", self.block_rows, 1, 256)
        _check_pow2("block_cols", self.block_cols, 16, 8192)
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
    block_rows = 1 if m <= 16 else 4
    block_cols = min(2048, max(16, 1 << (k - 1).bit_length()))
    return QuantizeConfig(block_rows=block_rows, block_cols=block_cols, num_warps=4)


def _fit_split_k(config: Config, m: int, k: int, n: int) -> Config:
    """Split K until about _TARGET_PROGRAMS programs run, keeping >= 4 K steps per program."""
    if config.split_k != 1:
        return config
    tiles = math.ceil(m / config.block_m) * math.ceil(n / config.block_n)
    k_steps = math.ceil(k / config.block_k)
    split_k = 1
    while tiles * split_k * 2 <= _TARGET_PROGRAMS and k_steps // (split_k * 2) >= 4:
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
def _load_table(name: str) -> tuple[dict, ...]:
    path = _DATA_DIR / f"{name}.json"
    if not path.exists():
        return ()
    buckets = json.loads(path.read_text())["buckets"]
    return tuple(sorted(buckets, key=lambda b: b["max_m"]))


def plan_for(device_kind: str, m: int, k: int, n: int) -> KernelPlan:
    """The tuned plan for this GPU and shape bucket, else default_plan."""
    name = device_table_name(device_kind)
    table = _load_table(name) if name else ()
    for bucket in table:
        if m <= bucket["max_m"]:
            gemm = Config(**bucket["gemm"])
            return KernelPlan(
                quantize=QuantizeConfig(**bucket["quantize"]),
                gemm=_fit_split_k(gemm, m, k, n) if bucket.get("auto_split_k", True) else gemm,
                gemm_path=bucket.get("gemm_path", "pallas"),
            )
    return default_plan(m, k, n)


def clear_cache() -> None:
    """Forget loaded tables (after editing data/*.json in a running process)."""
    _load_table.cache_clear()

"""Tile configurations of the Pallas int8 matmul kernels, per shape bucket and GPU, as data.

The tuned tables live in data/<device>.json (one file per GPU kind, written from measurements on
that GPU; docs/decisions.md records why each entry is what it is): per-shape entries
("shapes_nk", exact K x N) first, then M buckets for the op's wq[K, N] ("buckets") and for
K-major weights wq.T[N, K] ("buckets_nk"). Each entry gives the route
(`gemm_path`: "fused", "pallas" or "xla_gemm"), the tiles of the kernel that runs it ("gemm",
read into that kernel's config: FusedConfig or GemmConfig, route_config), optionally the activation-pass tiles, and for
[K, N] weights whether to transpose them first (`transpose_weight`). One schema serves every
section; it is written out, with its defaults, above `_Entry` below, and `_parse_entry` checks
it. GPUs without a table get `default_plan`, a heuristic that is safe (small tiles, modest
shared memory) everywhere.

Tables of your own: a directory named by the JINT8_KERNEL_TABLES environment variable is
searched first, for <name>.json where name is device_table_name(device kind) ("nvidia_h100",
"nvidia_h200", else the kind in lower case with non-alphanumerics as "_", e.g.
"nvidia_a100_sxm4_80gb"): a table tuned on another GPU (tools/tune_decode_shapes.py
--write-table writes one), or an H100 table with other tiles for an A/B run. Set it before the
first int8 call, or call clear_cache() after changing it.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import pathlib
import re
from typing import Optional

import jax.numpy as jnp

from jint8.errors import InvalidConfigError

_DATA_DIR = pathlib.Path(__file__).parent / "data"
# Split K only while fewer than ~half the SMs of an H100/H200 (132) would get an output tile:
# measured on K=8192, N=28672 (112 tiles of 256 columns), split_k=2 was slower than 1.
_MIN_PROGRAMS = 66
# Largest M the one-launch fused kernel takes: one program holds all M rows (flags need them).
# Measured on the H100 (8192x28672, docs/decisions.md D3): fused 0.095 / 0.101 / 0.121 ms at
# M = 1 / 8 / 16 against 0.113 / 0.115 / 0.116 for the two-kernel route, 0.26-0.29 against
# 0.12 at M = 32 / 64 (each program re-reads all M rows of x from L2).
FUSED_MAX_M = 16
# Largest M (rows) for which int8_matmul hands an InputNorm (norm=) to its backend, whose decode
# kernel folds it into its prologue; above it the op applies the norm first (api._routed_prologue).
# The fused kernel itself takes a norm at any M. Folding speeds up batch-1 decode and slows batch 8,
# where every program sweeps 8 rows twice before its first weight load (docs/decisions.md D12).
FUSED_NORM_MAX_M = 1
# Largest M for which int8_matmul hands an InputGate (gate=: silu(gate) * up of a fused gate_up
# output, down_proj's input) to its backend; above it the op applies the gate first. 0: folding
# is slower at M = 1 too, since the absmax sweep before the first weight load then reads gate and
# up and computes silu, which costs more than the multiply kernel it removes (D13).
FUSED_GATE_MAX_M = 0


def _check_pow2(name: str, value: int, lo: int, hi: int) -> None:
    if not isinstance(value, int) or value < lo or value > hi or value & (value - 1):
        raise InvalidConfigError(f"{name}={value!r} must be a power of two in [{lo}, {hi}]")


@dataclasses.dataclass(frozen=True, kw_only=True)
class KernelTiles:
    """The tiles both matmul kernels take: out[block_m, block_n] per program, K in block_k steps.

    split_k > 1 splits the K loop over programs (skinny M, too few output tiles to fill the GPU);
    their float32 partials are summed outside the kernel.
    weight_layout: "kn" for wq[K, N], "nk" for K-major wq[N, K] (what Int8Weight stores).
    """

    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int
    split_k: int = 1
    weight_layout: str = "kn"

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


@dataclasses.dataclass(frozen=True, kw_only=True)
class GemmConfig(KernelTiles):
    """The GEMM kernel's config (pallas_triton.gemm, the "pallas" and "xla_gemm" routes): its
    tiles and nothing else (KernelTiles)."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class FusedConfig(KernelTiles):
    """The one-launch decode kernel's config (pallas_triton.fused, the "fused" route): its tiles
    (KernelTiles; block_m covers all M rows) and how it computes three of the recipe's steps.

    split_partials: whether a caller may take the split_k > 1 float32 partials [S, M, N]
      unsummed (int8_matmul(split_partials=True)) and sum them where it reads them: Llama's
      q|k|v projection at decode, whose partials the decode-attention kernel adds where it
      loads q, k and v, so no reduction kernel runs between the two (docs/decisions.md). False:
      an XLA reduction after the kernel sums them, for every caller.
    outlier_mode: how the kernel adds the outlier stream in its K loop: "branch" (a lax.cond per
      K step, taken only in steps holding an outlier column) or "dense" (branch-free: every step
      runs the 16-bit dot on the masked x tile).
    row_scales: where the kernel gets each row's absmax: "kernel" (every program sweeps all of x
      first: M x K elements read from L2 per program, before its first weight load) or "input"
      (one XLA reduction before the kernel, read once; the same bits, a max is exact in any
      order). Calls with an InputNorm or InputGate sweep in the kernel either way. At M = 1
      "input" costs one more launch, slower by more than the sweep it saves (docs/decisions.md
      D6); at M = 8 the sweep reads 8 rows per program (down_proj: 229 KB x 256 programs of L2
      traffic, as much as its weights), which "input" avoids: faster on every Llama-3-8B decode
      shape at M = 8 on the H100 and the H200, so the tables take it for M = 2-16.
    """

    split_partials: bool = False
    outlier_mode: str = "branch"
    row_scales: str = "kernel"

    def __post_init__(self):
        super().__post_init__()
        if not isinstance(self.split_partials, bool):
            raise InvalidConfigError(f"split_partials={self.split_partials!r} must be a bool")
        if self.outlier_mode not in ("branch", "dense"):
            raise InvalidConfigError(
                f"outlier_mode={self.outlier_mode!r} must be 'branch' or 'dense'")
        if self.row_scales not in ("kernel", "input"):
            raise InvalidConfigError(
                f"row_scales={self.row_scales!r} must be 'kernel' or 'input'")


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


GEMM_PATHS = ("fused", "pallas", "xla_gemm")


def route_config(gemm_path: str, fields) -> "FusedConfig | GemmConfig":
    """The config of the kernel that runs gemm_path ("fused": FusedConfig, else GemmConfig) from
    a table entry's "gemm" fields (a dict, older spellings read too: schema below) or from another
    route's config. Every field is checked as a table entry's is; fields the route's kernel does
    not read (a "pallas" entry's outlier_mode, say) are dropped, as the kernels always ignored them."""
    if gemm_path not in GEMM_PATHS:
        raise InvalidConfigError(f"gemm_path={gemm_path!r} must be one of {GEMM_PATHS}")
    if isinstance(fields, KernelTiles):
        fields = dataclasses.asdict(fields)
    every_field = FusedConfig(**_current_spelling(fields))
    if gemm_path == "fused":
        return every_field
    return GemmConfig(**{f.name: getattr(every_field, f.name) for f in dataclasses.fields(GemmConfig)})


@dataclasses.dataclass(frozen=True, kw_only=True)
class KernelPlan:
    """Everything one call needs: which kernels run, and their configs.

    gemm: the matmul kernel's config: FusedConfig on the "fused" route, GemmConfig on the others.
    quantize: the activation pass's tiles (the two-kernel routes; kept on a "fused" plan too, for
      tools that time its shape on those routes).

    gemm_path: "fused" (one kernel: activation pass, int8 GEMM, outlier stream and epilogue,
      for M <= FUSED_MAX_M; `quantize` is unused), "pallas" (activation-pass kernel, then the
      fused-epilogue GEMM kernel, any M) or "xla_gemm" (activation-pass kernel, XLA's int8
      GEMM, then the GEMM kernel's epilogue alone on its int32 result; needs split_k == 1).
    transpose_weight: the call's wq is [K, N] but the GEMM reads it K-major: XLA transposes it
      first (one extra read + write of the weight, still faster than the [K, N] GEMM at
      M > 64, where Triton's int8 MMA wants K-major operands). Needs gemm.weight_layout "nk".
    """

    quantize: QuantizeConfig
    gemm: "FusedConfig | GemmConfig"
    gemm_path: str = "pallas"
    transpose_weight: bool = False

    def __post_init__(self):
        if self.gemm_path not in GEMM_PATHS:
            raise InvalidConfigError(f"gemm_path={self.gemm_path!r} must be one of {GEMM_PATHS}")
        wanted = FusedConfig if self.gemm_path == "fused" else GemmConfig
        if type(self.gemm) is not wanted:
            raise InvalidConfigError(
                f"gemm_path={self.gemm_path!r} runs a kernel configured by {wanted.__name__}, got "
                f"gemm={type(self.gemm).__name__} (route_config converts one route's config)")
        if self.gemm_path == "xla_gemm" and self.gemm.split_k != 1:
            raise InvalidConfigError(
                f"gemm_path='xla_gemm' runs no K loop: split_k={self.gemm.split_k} must be 1")
        if self.transpose_weight and self.gemm.weight_layout != "nk":
            raise InvalidConfigError(
                f"transpose_weight=True needs gemm.weight_layout='nk', got "
                f"{self.gemm.weight_layout!r}")

    def reads_layout(self) -> str:
        """The layout of the wq this plan takes from the caller."""
        return "kn" if self.transpose_weight else self.gemm.weight_layout


def default_plan(m: int, k: int, n: int, weight_layout: str = "kn") -> KernelPlan:
    """Heuristic plan for GPUs without a tuned table: small, always-compilable tiles."""
    if m <= FUSED_MAX_M:
        gemm = FusedConfig(block_m=fused_block_m(m), block_n=128, block_k=128, num_warps=4,
                           num_stages=4, weight_layout=weight_layout)
        return KernelPlan(quantize=_default_quantize(m, k), gemm=_fit_fused(gemm, k, n),
                          gemm_path="fused")
    gemm = GemmConfig(block_m=128, block_n=128, block_k=64, num_warps=8, num_stages=3,
                      weight_layout="nk")
    return KernelPlan(quantize=_default_quantize(m, k), gemm=_fit_split_k(gemm, m, k, n),
                      transpose_weight=weight_layout == "kn")


def fused_block_m(m: int) -> int:
    """The fused kernel's rows per program: all M rows (>= 16, the int8 MMA's minimum)."""
    return max(16, 1 << (m - 1).bit_length())


def _default_quantize(m: int, k: int) -> QuantizeConfig:
    # M <= 256: one program per row holding the whole row (one load of X); else 4 rows in
    # 2048-column chunks, whose second sweep re-reads the block from L2. At M = 256 on the
    # H100 (8192x28672) whole rows took the op from 0.200 to
    # 0.193 ms (the pass ran 64 programs of 4 rows, 10.9 us); at M = 4096 the two were even.
    whole_row = max(16, 1 << (k - 1).bit_length())
    if m <= 256 and whole_row <= 16384:
        return QuantizeConfig(block_rows=1, block_cols=whole_row,
                              num_warps=max(4, min(16, whole_row // 1024)))
    return QuantizeConfig(block_rows=4, block_cols=min(2048, whole_row), num_warps=4)


def _fit_fused(config: FusedConfig, k: int, n: int) -> FusedConfig:
    """The fused kernel's tiles for this shape: block_n narrowed (to 64 at least) until about
    _MIN_PROGRAMS programs run, then K split while still too few (keeping >= 8 K steps each).

    Measured in one jit on the H100: with block_n = 32 and no split the
    4096-wide Llama layers ran 0.03-0.07 ms at M = 1 (long serial K loops, 1.5x bf16); split-K
    costs one small XLA reduction of the [S, M, N] float32 partials.
    """
    block_n = config.block_n
    while block_n > 64 and -(-n // block_n) < _MIN_PROGRAMS:
        block_n //= 2
    tiles = -(-n // block_n)
    k_steps = -(-k // config.block_k)
    split_k = 1
    while tiles * split_k < _MIN_PROGRAMS and k_steps // (split_k * 2) >= 8:
        split_k *= 2
    warps = config.num_warps if block_n >= 128 else min(config.num_warps, 4)
    return dataclasses.replace(config, block_n=block_n, num_warps=warps, split_k=split_k)


def _fit_split_k(config: GemmConfig, m: int, k: int, n: int) -> GemmConfig:
    """Split K while fewer than _MIN_PROGRAMS programs run, keeping >= 4 K steps per program."""
    if config.split_k != 1:
        return config
    tiles = math.ceil(m / config.block_m) * math.ceil(n / config.block_n)
    k_steps = math.ceil(k / config.block_k)
    split_k = 1
    while tiles * split_k < _MIN_PROGRAMS and k_steps // (split_k * 2) >= 4:
        split_k *= 2
    return dataclasses.replace(config, split_k=split_k)


TABLES_ENV_VAR = "JINT8_KERNEL_TABLES"


# Output tiles of the two-kernel routes with 32-bit activations: the outlier stream's x and
# weight tiles are then twice a 16-bit table plan's shared memory. The H100 table's 128 x 128 /
# 3-stage plan at M > 256 (D18) asked for 289 KiB with float32 x (the H100 has 227 KiB); 64 x 64
# is the tile those routes ran before D18 with every dtype.
WIDE_ACTIVATION_MAX_TILE = 64 * 64


def fit_to_activations(plan: "KernelPlan", dtype) -> "KernelPlan":
    """The plan, its GEMM tiles cut to 64 x 64 for activations wider than 16 bits on the
    two-kernel routes (the tables are tuned for 16-bit activations)."""
    gemm = plan.gemm
    if (plan.gemm_path == "fused" or jnp.dtype(dtype).itemsize <= 2
            or gemm.block_m * gemm.block_n <= WIDE_ACTIVATION_MAX_TILE):
        return plan
    return dataclasses.replace(plan, gemm=dataclasses.replace(
        gemm, block_m=min(gemm.block_m, 64), block_n=min(gemm.block_n, 64)))


def device_table_name(device_kind: str) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'nvidia_h100' (H100 and H200 share their variants' tables);
    any other GPU: its kind in lower case, non-alphanumerics as '_' ('nvidia_a100_sxm4_80gb')."""
    kind = device_kind.lower()
    for name in ("h100", "h200"):
        if name in kind:
            return f"nvidia_{name}"
    return re.sub(r"[^a-z0-9]+", "_", kind).strip("_")


def table_path(name: str) -> Optional[pathlib.Path]:
    """The table <name>.json that plan_for reads: from JINT8_KERNEL_TABLES first, then jint8's
    own; None if neither has one."""
    for directory in (os.environ.get(TABLES_ENV_VAR), _DATA_DIR):
        if directory and (pathlib.Path(directory) / f"{name}.json").is_file():
            return pathlib.Path(directory) / f"{name}.json"
    return None


# The table schema, one for every section of data/<device>.json (and tables of your own):
#   top level: "buckets" (entries for wq [K, N]) and "buckets_nk" (for K-major wq [N, K]), each
#     matched by M (the first entry, by max_m, whose max_m >= M); "shapes_nk" (K-major, one
#     K x N each: "k", "n", and M from "min_m" to "max_m"), matched first. Other top-level keys
#     (device_kind, jax, date, source) describe the table.
#   an entry: "max_m" (required); "gemm" (required: FusedConfig's fields and defaults; an entry
#     whose route is "pallas" or "xla_gemm" gets a GemmConfig, its fused-only fields checked and
#     dropped: route_config);
#     "min_m" (default 1); "gemm_path" (default "fused" where max_m <= FUSED_MAX_M, else
#     "pallas"); "quantize" (QuantizeConfig's fields; default: tiles that follow K);
#     "transpose_weight" (default false); "auto_split_k" (default true). Bucket entries are
#     fitted to the call's shape ("fused": block_n narrowed and K split for small N; "pallas":
#     K split while too few programs run, unless auto_split_k is false); a shape's entry gives
#     its tiles exactly (tuned on that shape).
#   "measured" (optional, one spelling for every section): {"m": M, "us": microseconds} of the
#     whole op at M rows on the entry's K x N (a bucket's, measured on one layer: "k", "n" too);
#     "note": why the entry is what it is. The plan reads neither.
# Older tables' spellings are still read: gemm "split_reduce" "xla" (= split_partials false)
# or "consumer" (= split_partials true), "swap_ab": false; their timings (measured_ms,
# measured_us_m<M>) are left alone like any other field the plan does not read.
_SECTIONS = {"buckets": "kn", "buckets_nk": "nk", "shapes_nk": "nk"}
_REQUIRED = {"buckets": ("max_m", "gemm"), "buckets_nk": ("max_m", "gemm"),
             "shapes_nk": ("k", "n", "max_m", "gemm")}


@dataclasses.dataclass(frozen=True)
class _Entry:
    """One checked table entry (the schema above), its defaults filled in."""

    min_m: int
    max_m: int
    shape: Optional[tuple[int, int]]  # (K, N) of a "shapes_nk" entry, None for a bucket
    gemm: "FusedConfig | GemmConfig"  # route_config(gemm_path, the entry's "gemm")
    gemm_path: str
    quantize: Optional[QuantizeConfig]
    transpose_weight: bool
    auto_split_k: bool

    def plan(self, m: int, k: int, n: int) -> KernelPlan:
        gemm, quantize = self.gemm, self.quantize or _default_quantize(m, k)
        if self.gemm_path == "fused":
            gemm = dataclasses.replace(gemm, block_m=fused_block_m(m))
            if self.shape is None:
                gemm = _fit_fused(gemm, k, n)
        elif self.gemm_path == "pallas" and self.shape is None and self.auto_split_k:
            gemm = _fit_split_k(gemm, m, k, n)
        return KernelPlan(quantize=quantize, gemm=gemm, gemm_path=self.gemm_path,
                          transpose_weight=self.transpose_weight)


def _current_spelling(fields: dict) -> dict:
    """A table entry's "gemm" fields with the older spellings (schema above) read as the current ones."""
    fields = dict(fields)
    if "split_reduce" in fields:
        reduce = fields.pop("split_reduce")
        if reduce not in ("xla", "consumer"):
            raise InvalidConfigError(f"split_reduce={reduce!r} is no longer supported: use "
                                     f"split_partials (false: summed by XLA; true: by the caller)")
        fields.setdefault("split_partials", reduce == "consumer")
    if "swap_ab" in fields:
        if fields.pop("swap_ab") is not False:
            raise InvalidConfigError("swap_ab is no longer supported (no table used it)")
    return fields


def _parse_entry(entry, section: str) -> _Entry:
    missing = [f for f in _REQUIRED[section] if not isinstance(entry, dict) or f not in entry]
    if missing:
        raise InvalidConfigError(f"lacks {missing}")
    gemm_path = entry.get("gemm_path", "fused" if entry["max_m"] <= FUSED_MAX_M else "pallas")
    gemm = route_config(gemm_path, entry["gemm"])
    quantize = entry.get("quantize")
    parsed = _Entry(
        min_m=entry.get("min_m", 1), max_m=entry["max_m"],
        shape=(entry["k"], entry["n"]) if section == "shapes_nk" else None, gemm=gemm,
        gemm_path=gemm_path,
        quantize=QuantizeConfig(**quantize) if quantize else None,
        transpose_weight=entry.get("transpose_weight", False),
        auto_split_k=entry.get("auto_split_k", True))
    KernelPlan(quantize=_default_quantize(1, 64), gemm=gemm, gemm_path=parsed.gemm_path,
               transpose_weight=parsed.transpose_weight)  # checks the route against the tiles
    return parsed


@functools.cache
def _read_table(name: str) -> dict[str, tuple[_Entry, ...]]:
    """The parsed, checked table by section ({} without one), each section sorted by max_m.
    Every entry must follow the schema above; a bad one raises InvalidConfigError naming the
    file and the entry."""
    path = table_path(name)
    if path is None:
        return {}
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise InvalidConfigError(f"int8 kernel table {path}: not readable JSON: {error}") from None
    if not isinstance(data, dict):
        raise InvalidConfigError(f"int8 kernel table {path}: must be a JSON object")
    sections = {}
    for section in _SECTIONS:
        entries = []
        for i, entry in enumerate(data.get(section, ())):
            try:
                entries.append(_parse_entry(entry, section))
            except (InvalidConfigError, TypeError) as error:
                raise InvalidConfigError(
                    f"int8 kernel table {path}: {section}[{i}]: {error}".replace(": lacks", " lacks")
                ) from None
        sections[section] = tuple(sorted(entries, key=lambda e: e.max_m))
    return sections


def plan_for(device_kind: str, m: int, k: int, n: int, weight_layout: str = "kn") -> KernelPlan:
    """The tuned plan for this GPU, shape and weight layout, else default_plan.

    A shape's entry ("shapes_nk": exact K x N, tuned on the decode shapes of real models by
    tools/tune_decode_shapes.py) wins over the M buckets. A "fused" entry's block_m is set to
    cover all M rows (fused_block_m; its table block_m is ignored); a bucket's tiles are fitted
    to the shape (_Entry.plan).
    """
    table = _read_table(device_table_name(device_kind))
    if weight_layout == "nk":
        for entry in table.get("shapes_nk", ()):
            if entry.min_m <= m <= entry.max_m and (k, n) == entry.shape:
                return entry.plan(m, k, n)
    for entry in table.get("buckets" if weight_layout == "kn" else "buckets_nk", ()):
        if m <= entry.max_m:
            return entry.plan(m, k, n)
    return default_plan(m, k, n, weight_layout)


def clear_cache() -> None:
    """Forget loaded tables (after editing a table, or JINT8_KERNEL_TABLES, in a running process)."""
    _read_table.cache_clear()

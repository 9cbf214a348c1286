"""Lists the kernels of one compiled decode step, to attribute a profile's small kernels.

    python3 tools/decode_step_kernels.py [--layers 2] [--variant int8|bf16] [--fuse]

Builds the Llama-3-8B-shaped model of benchmarks/bench_generate.py from abstract params (nothing is
materialised, so 2 layers compile in seconds), compiles one one-token step over a static KV cache
on the default device, and prints every kernel XLA emits for it in program order: fusions (kind
and root op: "loop multiply", "input reduce", ...), custom calls (the Pallas kernels, cuBLAS) and
copies, then a count per kind and per layer. A profile names kernels by the same fusion kinds
(profile_summary.py), so the two together say what each small kernel computes. Run it on the
GPU: XLA:CPU fuses differently.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import pathlib
import re
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
# bench_generate's model shape
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "benchmarks"))

# A result shape is one array shape (with its layout) or a tuple of them in parentheses (a
# multi-output custom call such as the decode-attention kernel's).
_INSTRUCTION = re.compile(r"^\s*(ROOT\s+)?%?(?P<name>[\w.\-]+)\s*=\s*"
                          r"(?P<shape>\([^()]*\)|\S+(?:\s*\{[^}]*\})?)\s+(?P<op>[\w\-]+)\(")
_COMPUTATION = re.compile(r"^\s*(ENTRY\s+)?%?(?P<name>[\w.\-]+)\s.*\{\s*$")
_KERNEL_OPS = ("fusion", "custom-call", "copy", "copy-start", "dynamic-update-slice", "scatter",
               "reduce", "sort", "all-reduce", "all-gather")


@dataclasses.dataclass(frozen=True)
class Kernel:
    name: str
    op: str  # fusion, custom-call, ...
    detail: str  # fusion: "<kind> <root op>"; custom-call: its target
    shape: str

    @property
    def label(self) -> str:
        return f"{self.op} {self.detail}".strip()


def kernels_of(hlo_text: str) -> list[Kernel]:
    """The kernels of an optimised HLO module (compiled.as_text()), in program order.

    Instructions inside fused computations are parts of their fusion's kernel, not kernels.
    """
    computations: dict[str, list[str]] = {}
    current = None
    for line in hlo_text.splitlines():
        header = _COMPUTATION.match(line)
        if header and "=" not in line.split("{")[0]:
            current = header.group("name")
            computations[current] = []
        elif current is not None:
            computations[current].append(line)
    fused = set(re.findall(r"calls=%?([\w.\-]+)", " ".join(
        line for lines in computations.values() for line in lines if " fusion(" in line)))
    kernels = []
    for name, lines in computations.items():
        if name in fused:
            continue
        for line in lines:
            match = _INSTRUCTION.match(line)
            if not match or match.group("op") not in _KERNEL_OPS:
                continue
            op, detail = match.group("op"), ""
            if op == "fusion":
                kind = re.search(r"kind=(\w+)", line)
                callee = re.search(r"calls=%?([\w.\-]+)", line)
                root = _root_op(computations.get(callee.group(1), [])) if callee else "?"
                detail = f"{kind.group(1) if kind else '?'} {root}"
            elif op == "custom-call":
                target = re.search(r'custom_call_target="([^"]+)"', line)
                detail = target.group(1) if target else "?"
                kernel_name = re.search(r'"name":\s*"([^"]+)"', line)
                if kernel_name:
                    detail += f" {kernel_name.group(1)}"
            kernels.append(Kernel(match.group("name"), op, detail, match.group("shape")))
    return kernels


def _root_op(lines: list[str]) -> str:
    for line in lines:
        if line.lstrip().startswith("ROOT"):
            match = _INSTRUCTION.match(line)
            return match.group("op") if match else "?"
    return "?"


def decode_step_hlo(args) -> str:
    """Optimised HLO of one batch x 1-token step over a cache of args.slots slots."""
    import jax
    import jax.numpy as jnp

    import jint8
    from bench_generate import model_config
    from jint8.models import LlamaForCausalLM
    from jint8.models.common import init_cache

    config = model_config(args)
    model = LlamaForCausalLM(config)

    def make_params():
        params = model.init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32))["params"]
        if args.fuse:
            params = jint8.fuse_projections(params)
        if args.variant == "int8":
            params = jint8.quantize_params(params, jint8.Int8Config(quantize_embeddings=True))
        return params

    params = jax.eval_shape(make_params)
    cache = jax.eval_shape(lambda: init_cache(config, args.batch, args.slots, jnp.bfloat16))

    def step(params, cache, ids, index):
        logits, cache = model.apply({"params": params}, ids, cache=cache, cache_index=index)
        return logits, cache

    ids = jax.ShapeDtypeStruct((args.batch, 1), jnp.int32)
    index = jax.ShapeDtypeStruct((), jnp.int32)
    return jax.jit(step, donate_argnums=1).lower(params, cache, ids, index).compile().as_text()


def main(argv=None) -> int:
    from bench_generate import add_shape_arguments

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_shape_arguments(parser, layers=2)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--slots", type=int, default=640)
    parser.add_argument("--variant", choices=("int8", "bf16"), default="int8")
    parser.add_argument("--fuse", action="store_true", help="jint8.fuse_projections first")
    parser.add_argument("--hlo", help="also write the optimised HLO text here")
    args = parser.parse_args(argv)

    import jax

    text = decode_step_hlo(args)
    if args.hlo:
        pathlib.Path(args.hlo).write_text(text)
    kernels = kernels_of(text)
    print(f"{jax.devices()[0].device_kind}, jax {jax.__version__}: {args.variant}"
          f"{' fused' if args.fuse else ''}, {args.layers} layers, batch {args.batch}, "
          f"{len(kernels)} kernels per step")
    for i, kernel in enumerate(kernels):
        print(f"{i:4d} {kernel.label:60s} {kernel.shape:28s} {kernel.name}")
    print("\n| kernel | per step | per layer |\n|---|---|---|")
    for label, count in collections.Counter(k.label for k in kernels).most_common():
        print(f"| {label} | {count} | {count / args.layers:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

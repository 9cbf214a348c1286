"""jint8's GPU path against bitsandbytes' CUDA kernels, on the same GPU and the same weights.

    python3 benchmarks/bnb_gpu_parity.py [--json OUT]

Needs torch with CUDA and bitsandbytes (0.50.2 was used); jax sees the same GPU. Per shape and
outlier pattern, with fp16 activations (bitsandbytes' dtype):
  1. activation quantization: bnb.functional.int8_vectorwise_quant (CUDA kernel) against
     jint8.functional.int8_vectorwise_quant (XLA on the GPU): int8 values, row stats, outlier
     columns — count of differing int8 entries and the largest difference;
  2. int32 accumulators: bnb.functional.int8_linear_matmul (cuBLASLt) against the Pallas GEMM's
     accumulator and XLA's int8 dot on the same int8 operands: must be equal;
  3. layer output: bnb.nn.Linear8bitLt(has_fp16_weights=False, threshold) against Int8Dense with
     the pallas_triton backend on the same fp16 weight (quantized by each library: int8 weights
     compared too), and both against a float64 evaluation of the recipe on jint8's own int8
     operands: max |difference| relative to max |y|.
Prints a table and, with --json, one JSON line per case.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # torch shares the GPU
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

SHAPES = [(1, 4096, 4096), (16, 4096, 14336), (256, 4096, 1024), (33, 1031, 517), (1024, 8192, 4096)]
PATTERNS = ("none", "columns")


def activations(rng, m, k, pattern):
    import numpy as np

    a = rng.standard_normal((m, k)).astype(np.float32)
    if pattern == "columns":  # eight outlier features, as in real LLM activations
        cols = rng.choice(k, size=8, replace=False)
        a[:, cols] *= rng.uniform(8, 40, size=8).astype(np.float32)
    return a.astype(np.float16)


def run_case(m, k, n, pattern, threshold, rng):
    import bitsandbytes as bnb
    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch

    import jint8
    from jint8 import functional as F
    from jint8.ops.int8_matmul import reference

    a16 = activations(rng, m, k, pattern)
    w16 = (rng.standard_normal((n, k)) * 0.02).astype(np.float16)  # torch layout [out, in]
    device = "cuda" if torch.cuda.is_available() else "cpu"  # cpu: a smoke run of this script
    ta, tw = torch.from_numpy(a16).to(device), torch.from_numpy(w16).to(device)
    ja, jw = jnp.asarray(a16), jnp.asarray(w16)
    backend = "pallas_triton" if jax.devices()[0].platform == "gpu" else "xla"
    row = {"M": m, "K": k, "N": n, "pattern": pattern, "threshold": threshold, "backend": backend}

    # 1. activation quantization
    CA, SCA, cols = bnb.functional.int8_vectorwise_quant(ta.clone(), threshold)
    ca, sca, our_cols = F.int8_vectorwise_quant(ja, threshold)
    diff = np.abs(np.asarray(ca, np.int32) - CA.cpu().numpy().astype(np.int32))
    row["act_int8_differ"] = int((diff > 0).sum())
    row["act_int8_max_diff"] = int(diff.max())
    row["row_stats_equal"] = bool(np.array_equal(np.asarray(sca), SCA.cpu().numpy()))
    theirs = set() if cols is None else set(cols.cpu().numpy().tolist())
    ours = set() if our_cols is None else set(np.asarray(our_cols).tolist())
    row["outlier_cols_equal"] = theirs == ours

    # 2. int32 accumulators on the same int8 operands (bnb's CA without decomposition, bnb's CB):
    # every nonzero row of CA0 reaches +-127, so the float rows CA0 quantize back to exactly CA0.
    CA0, _, _ = bnb.functional.int8_vectorwise_quant(ta.clone(), 0.0)
    CB, SCB, _ = bnb.functional.int8_vectorwise_quant(tw.clone())
    acc_bnb = bnb.functional.int8_linear_matmul(CA0, CB).cpu().numpy()
    ca_j, cb_j = jnp.asarray(CA0.cpu().numpy()), jnp.asarray(CB.cpu().numpy())
    acc_xla = np.asarray(reference.int8_dot(ca_j, cb_j, "nk"))
    row["acc_xla_equal"] = bool(np.array_equal(acc_xla, acc_bnb))
    try:
        from jint8.ops.int8_matmul.pallas_triton import int8_accumulator_pallas
        from jint8.ops.int8_matmul.configs import plan_for

        plan = plan_for(jax.devices()[0].device_kind, m, k, n, "nk")
        x_exact = jnp.asarray(CA0.cpu().numpy().astype(np.float32))
        acc_pallas = np.asarray(int8_accumulator_pallas(x_exact, cb_j, threshold=0.0, plan=plan))
        row["acc_pallas_equal"] = bool(np.array_equal(acc_pallas, acc_bnb))
    except Exception as error:  # the accumulator hook is a checks-only API
        row["acc_pallas_equal"] = f"not checked: {type(error).__name__}: {error}"[:120]

    # 3. layer outputs
    layer = bnb.nn.Linear8bitLt(k, n, bias=False, has_fp16_weights=False, threshold=threshold)
    layer.weight = bnb.nn.Int8Params(tw.cpu().clone(), requires_grad=False, has_fp16_weights=False)
    layer = layer.to(device).eval()
    with torch.no_grad():
        y_bnb = layer(ta).float().cpu().numpy()
    kernel = jint8.quantize_params({"kernel": jw.T}, jint8.Int8Config(threshold=threshold, min_size=0,
                                                                      outlier_capacity=64))["kernel"]
    row["weights_int8_equal"] = bool(np.array_equal(np.asarray(kernel.qvalue), layer.state.CB.cpu().numpy()))
    y_ours = np.asarray(jint8.int8_matmul(ja, kernel.qvalue, kernel.scale, threshold=threshold,
                                          outlier_capacity=64, weight_layout="nk",
                                          backend=backend)).astype(np.float32)
    y64 = _float64_recipe(a16, np.asarray(kernel.qvalue), np.asarray(kernel.scale), threshold)
    scale = float(np.abs(y64).max()) or 1.0
    row["bnb_vs_jint8"] = float(np.abs(y_bnb - y_ours).max() / scale)
    row["jint8_vs_f64"] = float(np.abs(y_ours - y64).max() / scale)
    row["bnb_vs_f64"] = float(np.abs(y_bnb - y64).max() / scale)
    if device == "cuda":
        torch.cuda.empty_cache()
    return row


def _float64_recipe(a16, wq, s_w, threshold):
    """The LLM.int8 recipe in float64 on fp16 inputs: the truth both libraries approximate."""
    import numpy as np

    x = a16.astype(np.float64)
    outlier = np.abs(x) >= threshold if threshold > 0 else np.zeros_like(x, bool)
    cols = outlier.any(axis=0)
    s_x = np.where(outlier, 0, np.abs(x)).max(axis=1)
    mult = np.where(s_x > 0, 127.0 / np.where(s_x > 0, s_x, 1), 0)
    xq = np.round(x * mult[:, None])
    xq[:, cols] = 0
    y = (xq @ wq.astype(np.float64).T) * s_x[:, None] * s_w[None, :] / 127.0**2
    w_deq = wq.astype(np.float64) * s_w[:, None] / 127.0
    return y + x[:, cols] @ w_deq[:, cols].T


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", help="append one JSON line per case here")
    parser.add_argument("--threshold", type=float, nargs="+", default=[6.0, 0.0])
    parser.add_argument("--small", action="store_true", help="small shapes only (a CPU smoke run)")
    args = parser.parse_args(argv)
    import bitsandbytes
    import jax
    import numpy as np
    import torch

    print(f"device: {jax.devices()[0].device_kind}; jax {jax.__version__}, torch {torch.__version__}, "
          f"bitsandbytes {bitsandbytes.__version__}")
    rng = np.random.default_rng()
    rows = []
    for m, k, n in [(3, 64, 40), (1, 33, 17)] if args.small else SHAPES:
        for pattern in PATTERNS:
            for threshold in args.threshold:
                row = run_case(m, k, n, pattern, threshold, rng)
                rows.append(row)
                print(json.dumps(row), flush=True)
                if args.json:
                    with open(args.json, "a") as f:
                        f.write(json.dumps(row) + "\n")
    keys = ["act_int8_differ", "row_stats_equal", "outlier_cols_equal", "acc_xla_equal", "acc_pallas_equal",
            "weights_int8_equal", "bnb_vs_jint8", "jint8_vs_f64", "bnb_vs_f64"]
    print("| M | K | N | outliers | t | " + " | ".join(keys) + " |")
    print("|" + "---|" * (5 + len(keys)))
    for r in rows:
        cells = [f"{r[key]:.2e}" if isinstance(r[key], float) else str(r[key]) for key in keys]
        print(f"| {r['M']} | {r['K']} | {r['N']} | {r['pattern']} | {r['threshold']:g} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()

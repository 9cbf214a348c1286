"""GPU check and timing of the decode-attention kernel (jint8/ops/attention).

    python3 benchmarks/gpu_check_attention.py

For Llama-3-8B's decode shapes (32/8 heads, head_dim 128, a 640-slot cache, batch 1 and 8) and a
few odd ones: the kernel's output against the jnp reference (max error relative to max |out|),
then the time per call of the kernel and of the XLA attention it replaces (the models' path:
jax.nn.dot_product_attention over the layer's cache), each in a jitted loop of 32 layers.
Then a tiny bf16 Llama (3 left-padded sequences, a prefill and 8 one-token decode steps): its
decode logits with the kernel and with JINT8_BACKEND=xla (XLA attention) must agree. Exits 1 if any check fails.
"""

from __future__ import annotations

import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from jint8.ops.attention import decode_attention_reference, unsupported_reason  # noqa: E402
from jint8.ops.attention.pallas_triton import decode_attention_pallas  # noqa: E402

CASES = [  # batch, heads, kv heads, head_dim, slots, slots in use, left padding of sequence 0
    (1, 32, 8, 128, 640, 600, 0), (8, 32, 8, 128, 640, 513, 7), (1, 9, 3, 64, 2048, 77, 3),
    (4, 16, 16, 64, 300, 300, 0), (2, 12, 2, 128, 4096, 1000, 100),
]
LAYERS = 32


def main():
    print(f"jax {jax.__version__} on {jax.devices()[0].device_kind}", flush=True)
    rng = np.random.default_rng(int(time.time_ns() % 2**31))
    failures = 0
    for b, n, kv, h, s, used, pad in CASES:
        q = jnp.asarray(rng.standard_normal((b, n, h)), jnp.bfloat16)
        k = jnp.asarray(rng.standard_normal((2, b, s, kv, h)), jnp.bfloat16)
        v = jnp.asarray(rng.standard_normal((2, b, s, kv, h)), jnp.bfloat16)
        valid = np.broadcast_to(np.arange(s) < used, (b, s)).copy()
        valid[0, :pad] = False
        valid = jnp.asarray(valid)
        reason = unsupported_reason(q, k)
        got = decode_attention_pallas(q, k, v, valid, jnp.int32(used), layer=1, scale=h ** -0.5)
        want = decode_attention_reference(q, k, v, valid, layer=1, scale=h ** -0.5)
        err = float(jnp.max(jnp.abs(got.astype(jnp.float32) - want.astype(jnp.float32)))
                    / jnp.max(jnp.abs(want.astype(jnp.float32))))
        failures += not err <= 2e-2
        print(f"B={b} N={n} K={kv} H={h} S={s} used={used}: err {err:.2e} "
              f"{'ok' if err <= 2e-2 else 'FAIL'} (dispatch: {reason or 'kernel'})", flush=True)
    for b in (1, 8):
        n, kv, h, s, used = 32, 8, 128, 640, 600
        q = jnp.asarray(rng.standard_normal((b, n, h)), jnp.bfloat16)
        k = jnp.asarray(rng.standard_normal((LAYERS, b, s, kv, h)), jnp.bfloat16)
        v = jnp.asarray(rng.standard_normal((LAYERS, b, s, kv, h)), jnp.bfloat16)
        valid = jnp.broadcast_to(jnp.arange(s) < used, (b, s))

        def xla(q, layer):
            mask = valid[:, None, None, :]
            return jax.nn.dot_product_attention(q[:, None], k[layer], v[layer], mask=mask,
                                                scale=h ** -0.5)[:, 0]

        def kernel(q, layer):
            return decode_attention_pallas(q, k, v, valid, jnp.int32(used), layer=layer,
                                           scale=h ** -0.5)

        for name, fn in (("xla", xla), ("kernel", kernel)):
            @jax.jit
            def loop(q, fn=fn):
                def body(_, q):
                    for layer in range(LAYERS):
                        q = fn(q, layer)
                    return q
                return jax.lax.fori_loop(0, 10, body, q)

            jax.block_until_ready(loop(q))
            times = []
            for _ in range(5):
                start = time.perf_counter()
                jax.block_until_ready(loop(q))
                times.append((time.perf_counter() - start) / (10 * LAYERS))
            print(f"decode attention B={b} S={s} used={used}: {name} {np.median(times) * 1e6:.1f} us "
                  f"per layer", flush=True)
    failures += model_check(rng)
    print(f"{failures} failures")
    sys.exit(1 if failures else 0)


def model_check(rng) -> int:
    """Decode logits of a tiny bf16 Llama (left-padded batch) with the kernel and with XLA
    attention, each against the same model in float32 (XLA): the kernel must be as close."""
    import dataclasses

    from jint8.models import LlamaConfig, LlamaForCausalLM
    from jint8.models.common import init_cache

    config = LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=512, num_layers=4,
                         num_heads=8, num_kv_heads=2, head_dim=32, max_position_embeddings=256,
                         dtype=jnp.bfloat16)
    params = LlamaForCausalLM(config).init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"]
    params = jax.tree.map(lambda x: x * 3.0 if x.ndim == 2 else x, params)
    ids = jnp.asarray(rng.integers(1, 512, (3, 40)), jnp.int32)
    next_ids = jnp.asarray(rng.integers(1, 512, (3, 8)), jnp.int32)  # the same tokens every run
    mask = jnp.ones((3, 40), jnp.int32).at[1, :9].set(0).at[2, :25].set(0)
    kv_mask = jnp.ones((3, 128), jnp.int32).at[:, :40].set(mask)
    logits = {}
    for path, dtype in (("xla", jnp.bfloat16), ("kernel", jnp.bfloat16), ("float32", jnp.float32)):
        os.environ.pop("JINT8_BACKEND", None)
        if path != "kernel":
            os.environ["JINT8_BACKEND"] = "xla"
        model = LlamaForCausalLM(dataclasses.replace(config, dtype=dtype))
        run_params = jax.tree.map(lambda x: x.astype(dtype), params)

        @jax.jit
        def run(params, model=model, dtype=dtype):
            _, cache = model.apply({"params": params}, ids, cache=init_cache(model.config, 3, 128, dtype),
                                   cache_index=0, kv_mask=kv_mask)
            outs = []
            for step in range(8):  # decode steps: one token each, the path under test
                out, cache = model.apply({"params": params}, next_ids[:, step:step + 1],
                                         cache=cache, cache_index=40 + step, kv_mask=kv_mask)
                outs.append(out[:, -1])
            return jnp.stack(outs, 1)

        logits[path] = np.asarray(run(run_params), np.float32)
    os.environ.pop("JINT8_BACKEND", None)
    exact = logits["float32"]
    errors = {path: np.max(np.abs(logits[path] - exact), axis=(1, 2)) / np.max(np.abs(exact))
              for path in ("xla", "kernel")}
    ok = bool(np.all(errors["kernel"] <= 1.5 * errors["xla"] + 1e-3))
    for path in ("xla", "kernel"):
        same = np.mean(np.argmax(logits[path], -1) == np.argmax(exact, -1))
        print(f"tiny Llama, bf16 with {path} attention vs float32: max logit error per sequence "
              f"{np.array2string(errors[path], precision=4)}, argmax equal {same:.0%}", flush=True)
    print(f"kernel as close to float32 as XLA attention (within 1.5x): {'ok' if ok else 'FAIL'}")
    return int(not ok)


if __name__ == "__main__":
    main()

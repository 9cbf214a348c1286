"""GPU check and timing of the decode-attention kernel (jint8/ops/attention).

    python3 tools/gpu_check_attention.py

For Llama-3-8B's decode shapes (32/8 heads, head_dim 128, a 640-slot cache, batch 1 and 8) and a
few odd ones: the decode step (RoPE of q and k, the cache writes, attention) against
decode_step_reference (output: max error relative to max |out|; cache: the written key within
RoPE's roundings, everything else equal), then the time per layer of the kernel's step and of the
XLA step it replaces (the models' path: RoPE, two dynamic_update_slices,
jax.nn.dot_product_attention over the layer's cache), each in a jitted loop of 32 layers.
Then a tiny bf16 Llama (3 left-padded sequences, a prefill and 8 one-token decode steps): its
decode logits with the kernel (separate and fused q|k|v projections) and with JINT8_BACKEND=xla
(XLA attention) must agree. Exits 1 if any check fails.
"""

from __future__ import annotations

import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from jint8.ops.attention import (  # noqa: E402
    decode_attention_step, decode_step_reference, rotate, unsupported_reason,
)

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
        k_new, v_new = (jnp.asarray(rng.standard_normal((b, kv, h)), jnp.bfloat16) for _ in range(2))
        k = jnp.asarray(rng.standard_normal((2, b, s, kv, h)), jnp.bfloat16)
        v = jnp.asarray(rng.standard_normal((2, b, s, kv, h)), jnp.bfloat16)
        cos, sin = _rope_tables(rng.uniform(0, 500, b), h)
        valid = np.broadcast_to(np.arange(s) < used, (b, s)).copy()
        valid[0, :pad] = False
        valid, index = jnp.asarray(valid), jnp.int32(used - 1)
        reason = unsupported_reason(q, k)
        packed = jnp.concatenate([a.reshape(b, -1) for a in (q, k_new, v_new)], -1)
        got, got_k, got_v = decode_attention_step(q, k_new, v_new, k, v, valid, index, layer=1,
                                                  scale=h ** -0.5, rope=(cos, sin), packed=packed)
        want, want_k, want_v = decode_step_reference(q, k_new, v_new, k, v, valid, index, cos, sin,
                                                     layer=1, scale=h ** -0.5)
        err = float(jnp.max(jnp.abs(got.astype(jnp.float32) - want.astype(jnp.float32)))
                    / jnp.max(jnp.abs(want.astype(jnp.float32))))
        # the cache: equal but for RoPE's roundings in the written key (XLA may skip them)
        cache_err = float(jnp.max(jnp.abs(got_k.astype(jnp.float32) - want_k.astype(jnp.float32))))
        cache_ok = cache_err <= 2 ** -6 * float(jnp.max(jnp.abs(k_new.astype(jnp.float32)))) and bool(
            jnp.array_equal(got_v, want_v))
        ok = err <= 2e-2 and cache_ok
        failures += not ok
        print(f"B={b} N={n} K={kv} H={h} S={s} slot={used - 1}: err {err:.2e}, cache key err "
              f"{cache_err:.2e} {'ok' if ok else 'FAIL'} (dispatch: {reason or 'kernel'})", flush=True)
        # A q|k|v projection's float32 split-K partials (Config.split_partials): the kernel
        # adds them in order where it loads q, k, v; bit-equal to reading their rounded sum.
        partials = jnp.asarray(rng.standard_normal((8, *packed.shape)), jnp.float32)
        summed = partials[0]
        for part in partials[1:]:
            summed = summed + part
        q_s, k_s, v_s = (a.reshape(b, -1, h) for a in jnp.split(
            summed.astype(jnp.bfloat16), [n * h, (n + kv) * h], axis=-1))
        runs = [decode_attention_step(q_s, k_s, v_s, k, v, valid, index, layer=1, scale=h ** -0.5,
                                      rope=(cos, sin), packed=source)
                for source in (partials, summed.astype(jnp.bfloat16))]
        same = all(bool(jnp.array_equal(x, y)) for x, y in zip(*runs))
        failures += not same
        print(f"  8 float32 partials of q|k|v summed in the kernel: "
              f"{'bit-equal to' if same else 'FAIL: differs from'} the summed array's result", flush=True)
    for b in (1, 8):
        n, kv, h, s, used = 32, 8, 128, 640, 600
        qkv = jnp.asarray(rng.standard_normal((b, (n + 2 * kv) * h)), jnp.bfloat16)
        k = jnp.asarray(rng.standard_normal((LAYERS, b, s, kv, h)), jnp.bfloat16)
        v = jnp.asarray(rng.standard_normal((LAYERS, b, s, kv, h)), jnp.bfloat16)
        valid = jnp.broadcast_to(jnp.arange(s) < used, (b, s))
        rope = _rope_tables(np.full(b, used - 1.0), h)

        def split(qkv):
            q, k_new, v_new = jnp.split(qkv, [n * h, (n + kv) * h], axis=-1)
            return q.reshape(b, n, h), k_new.reshape(b, kv, h), v_new.reshape(b, kv, h)

        def xla(qkv, caches, layer):  # the model's XLA path: RoPE, two cache updates, attention
            q, k_new, v_new = split(qkv)
            q, k_new = rotate(q, *rope), rotate(k_new, *rope)
            start = (layer, 0, used - 1, 0, 0)
            caches = tuple(jax.lax.dynamic_update_slice(c, x[None, :, None], start)
                           for c, x in zip(caches, (k_new, v_new)))
            out = jax.nn.dot_product_attention(q[:, None], caches[0][layer], caches[1][layer],
                                               mask=valid[:, None, None, :], scale=h ** -0.5)[:, 0]
            return out, caches

        def kernel(qkv, caches, layer):
            out, *caches = decode_attention_step(*split(qkv), *caches, valid, jnp.int32(used - 1),
                                                 layer=layer, scale=h ** -0.5, rope=rope, packed=qkv)
            return out, tuple(caches)

        for name, fn in (("xla", xla), ("kernel", kernel)):
            @jax.jit
            def loop(qkv, caches, fn=fn):
                def body(_, carry):
                    qkv, caches = carry
                    for layer in range(LAYERS):
                        out, caches = fn(qkv, caches, layer)
                        qkv = qkv + (out[:, :1, :1] * 0).reshape(b, 1).astype(qkv.dtype)
                    return qkv, caches
                return jax.lax.fori_loop(0, 10, body, (qkv, caches))

            jax.block_until_ready(loop(qkv, (k, v)))
            times = []
            for _ in range(5):
                start = time.perf_counter()
                jax.block_until_ready(loop(qkv, (k, v)))
                times.append((time.perf_counter() - start) / (10 * LAYERS))
            print(f"decode step attention (RoPE, cache writes, attention) B={b} S={s} used={used}: "
                  f"{name} {np.median(times) * 1e6:.1f} us per layer", flush=True)
    failures += model_check(rng)
    print(f"{failures} failures")
    sys.exit(1 if failures else 0)


def _rope_tables(positions, h):
    """cos, sin [B, H] in bf16 for positions [B] (Llama's default frequencies)."""
    angles = np.asarray(positions, np.float64)[:, None] / 500000.0 ** (np.arange(0, h, 2) / h)
    angles = np.concatenate([angles, angles], -1)
    return jnp.asarray(np.cos(angles), jnp.bfloat16), jnp.asarray(np.sin(angles), jnp.bfloat16)


def model_check(rng) -> int:
    """Decode logits of a tiny bf16 Llama (left-padded batch) with the kernel and with XLA
    attention, each against the same model in float32 (XLA): the kernel must be as close."""
    import dataclasses

    from jint8.models import LlamaConfig, LlamaForCausalLM, fuse_projections
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
    paths = (("xla", jnp.bfloat16), ("kernel", jnp.bfloat16), ("kernel fused", jnp.bfloat16),
             ("float32", jnp.float32))
    for path, dtype in paths:
        os.environ.pop("JINT8_BACKEND", None)
        if not path.startswith("kernel"):
            os.environ["JINT8_BACKEND"] = "xla"
        model = LlamaForCausalLM(dataclasses.replace(config, dtype=dtype))
        run_params = jax.tree.map(lambda x: x.astype(dtype), params)
        run_params = fuse_projections(run_params) if path == "kernel fused" else run_params

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
              for path in ("xla", "kernel", "kernel fused")}
    ok = all(np.all(errors[path] <= 1.5 * errors["xla"] + 1e-3) for path in ("kernel", "kernel fused"))
    for path in errors:
        same = np.mean(np.argmax(logits[path], -1) == np.argmax(exact, -1))
        print(f"tiny Llama, bf16 with {path} attention vs float32: max logit error per sequence "
              f"{np.array2string(errors[path], precision=4)}, argmax equal {same:.0%}", flush=True)
    print(f"kernel as close to float32 as XLA attention (within 1.5x): {'ok' if ok else 'FAIL'}")
    return int(not ok)


if __name__ == "__main__":
    main()

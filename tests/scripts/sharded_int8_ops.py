"""Run with 8 fake CPU devices: int8_matmul on sharded operands against the unsharded call, on
Explicit and Auto mesh axes, for column-parallel, row-parallel, fused q|k|v and gate|up
(output gate) and gated down_proj (input gate) layers, with the rule of
jint8/ops/int8_matmul/sharded.py: bitwise, except the float32 outlier stream of a K split whose
outlier columns lie on several shards (regrouped: float32 reassociation only).

usage: python sharded_int8_ops.py (prints "OK" last)
"""

import functools
import os

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P  # noqa: E402

import jint8  # noqa: E402
from jint8.ops.int8_matmul import Backend, InputGate, InputNorm, OutputGate, layout_for, register_backend  # noqa: E402
from jint8.ops.int8_matmul import configs  # noqa: E402
from jint8.ops.int8_matmul.pallas_triton import int8_matmul_pallas  # noqa: E402

assert jax.device_count() == 8, jax.devices()
RNG = np.random.default_rng(0)
M, K, N = 8, 256, 128  # model=4: 64 columns of K per shard


def weight(k, n):
    q = jint8.quantize_params({"w": {"kernel": jnp.asarray(RNG.standard_normal((k, n)).astype(np.float32))}},
                              jint8.Int8Config(min_size=0))
    return q["w"]["kernel"].as_matrix()  # [N, K] int8, [N] float32


def activations(k, outlier_cols=(), outlier_rows=None, dtype=np.float32):
    x = RNG.standard_normal((M, k)).astype(np.float32)
    for c in outlier_cols:
        x[slice(None) if outlier_rows is None else outlier_rows, c] = 30.0
    return jnp.asarray(x.astype(dtype))


_JITTED = {}


def jitted(route, layout=None, **kwargs):
    """The jitted int8_matmul of one route and these options, one per (route, options): jax.jit
    caches its compilations on the function, and many cases repeat options under new shardings or
    inputs, which compiled afresh with a new lambda per call. Options holding arrays (an
    InputNorm's scale) are not hashable: those get a function per call."""
    def call(x, w, s, b):
        return jint8.int8_matmul(x, w, s, b, weight_layout="nk", return_stats=True,
                                 **({} if layout is None else dict(layout=layout)), **kwargs)

    try:
        key = (route, layout, tuple(sorted(kwargs.items())))
        hash(key)
    except TypeError:
        return jax.jit(call)
    if key not in _JITTED:
        _JITTED[key] = jax.jit(call)
    return _JITTED[key]


def put(mesh, a, *spec):
    return jax.device_put(a, NamedSharding(mesh, P(*spec)))


def run(mesh, explicit_types, x, w, s, bias, x_spec, w_spec, **kwargs):
    """The sharded call: on an Explicit mesh the layout comes from the types; on an Auto mesh it is
    given (layout=), and also run plainly under GSPMD (the XLA backend partitioned by XLA)."""
    args = (put(mesh, x, *x_spec), put(mesh, w, *w_spec), put(mesh, s, w_spec[0]),
            None if bias is None else put(mesh, bias, w_spec[0]))
    if explicit_types:
        with jax.set_mesh(mesh):
            return [("types", jitted("types", **kwargs)(*args))]
    layout = layout_for(mesh, P(*x_spec), P(*w_spec))
    return [("layout", jitted("layout", layout, **kwargs)(*args)), ("gspmd", jitted("gspmd", **kwargs)(*args))]


def check(name, mesh, explicit_types, x, w, s, bias, x_spec, w_spec, *, bitwise=True, **kwargs):
    expected, stats = jitted("one device", **kwargs)(x, w, s, bias)
    expected = np.asarray(expected)
    for route, (got, got_stats) in run(mesh, explicit_types, x, w, s, bias, x_spec, w_spec, **kwargs):
        assert int(got_stats.num_outlier_columns) == int(stats.num_outlier_columns), (name, got_stats, stats)
        got = np.asarray(got)
        # XLA's own partitioning of the reference (GSPMD) sums an RMSNorm's squares over a split K
        # in shard-sized partial sums: float32 reassociation there too
        regrouped = route == "gspmd" and "norm" in kwargs and x_spec[1] is not None
        if bitwise and not regrouped:
            np.testing.assert_array_equal(got, expected, err_msg=f"{name} ({route})")
        else:  # the outlier stream regrouped by K shard: float32 reassociation of |y| ~ 1e2
            np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-6 * np.abs(expected).max(), err_msg=f"{name} ({route})")
    return expected


def op_cases(mesh, explicit_types):
    kind = "explicit" if explicit_types else "auto"
    wq, s = weight(K, N)  # column-parallel (N split) and row-parallel (K split) of one weight
    bias = jnp.asarray(RNG.standard_normal(N).astype(np.float32))
    for threshold, cols in ((0.0, ()), (6.0, ()), (6.0, (7, 20)), (6.0, (7, 100, 200))):
        x = activations(K, cols)
        spread = len({c // (K // 4) for c in cols}) > 1
        tag = f"{kind} threshold={threshold} outliers={cols}"
        # column-parallel, batch over "data": the outlier set is the whole batch's
        check(f"column {tag}", mesh, explicit_types, x, wq, s, bias, ("data", None), ("model", None),
              threshold=threshold)
        # row-parallel: row scales all-reduced over K, int32 accumulators psum'd
        check(f"row {tag}", mesh, explicit_types, x, wq, s, bias, ("data", "model"), (None, "model"),
              threshold=threshold, bitwise=not spread)
    # outliers in rows of one data shard only: the other shard's rows still take them out
    x = activations(K, (7, 30), outlier_rows=0)
    check(f"column {kind}, outliers in one data shard", mesh, explicit_types, x, wq, s, bias, ("data", None),
          ("model", None))
    check(f"row {kind}, outliers in one data shard", mesh, explicit_types, x, wq, s, bias, ("data", "model"),
          (None, "model"))
    # bf16 activations, no bias
    x16 = activations(K, (3,), dtype=jnp.bfloat16)
    check(f"row {kind} bf16", mesh, explicit_types, x16, wq, s, None, (None, "model"), (None, "model"))
    # fused q|k|v (q 64 + k 32 + v 32 output features, column-parallel) with an RMSNorm folded in
    wqkv, sqkv = weight(K, 128)
    norm = InputNorm(jnp.asarray(RNG.uniform(0.5, 1.5, K).astype(np.float32)), 1e-6)
    check(f"qkv {kind} + norm", mesh, explicit_types, activations(K, (9,)), wqkv, sqkv, None, (None, None),
          ("model", None), norm=norm)
    # fused gate|up (2 x 64) with the output gate: gate and up columns on different devices
    wgu, sgu = weight(K, 128)
    check(f"gate_up {kind} + output gate", mesh, explicit_types, activations(K, (9,)), wgu, sgu, None,
          (None, None), ("model", None), output_gate=OutputGate("silu"))
    # down_proj on the gated gate|up output [M, 2 * 64], K = 64 split over "model"
    wd, sd = weight(64, N)
    check(f"down {kind} + input gate", mesh, explicit_types, activations(128, (5,)), wd, sd, None,
          (None, "model"), (None, "model"), gate=InputGate("silu"))
    # a norm over a split K: gathered, applied whole, sliced
    check(f"row {kind} + norm", mesh, explicit_types, activations(K), wq, s, None, (None, "model"),
          (None, "model"), norm=norm)


def layer_cases(mesh):
    """Int8Dense (the models' layer) with an Int8Weight kernel placed column- and row-parallel."""
    kernel = jnp.asarray(RNG.standard_normal((K, N)).astype(np.float32))
    q = jint8.quantize_params({"kernel": kernel}, jint8.Int8Config(min_size=0))["kernel"]
    x = activations(K, (11, 150))
    for name, q_spec, x_spec in (("column", ("model", None), ("data", None)), ("row", (None, "model"), ("data", "model"))):
        dense = jint8.Int8Dense(N, use_bias=False, output_gate="silu" if name == "column" else None)
        expected = np.asarray(jax.jit(lambda p, x: dense.apply({"params": p}, x))({"kernel": q}, x))
        placed = {"kernel": q.replace(qvalue=put(mesh, q.qvalue, *q_spec), scale=put(mesh, q.scale, q_spec[0]))}
        with jax.set_mesh(mesh):
            got = np.asarray(jax.jit(lambda p, x: dense.apply({"params": p}, x))(placed, put(mesh, x, *x_spec)))
        np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-6 * np.abs(expected).max(), err_msg=name)
        if name == "column":
            np.testing.assert_array_equal(got, expected)


def pallas_cases(mesh):
    """The Pallas kernels (interpret mode) as the backend: column-parallel shards run the kernel on
    each device's shard; a row-parallel call takes the global recipe around it."""
    def impl(x, wq, col_scales, bias, **kwargs):
        m, (n, k) = x.shape[0], wq.shape
        return int8_matmul_pallas(x, wq, col_scales, bias, plan=configs.default_plan(m, k, n, "nk"),
                                  interpret=True, **kwargs)

    calls = []
    register_backend(Backend("pallas_interpret", lambda *a, **kw: calls.append(1) or impl(*a, **kw),
                             lambda x, w: None))
    wq, s = weight(K, N)
    x = activations(K, (7, 100))
    check("pallas column", mesh, True, x, wq, s, None, (None, None), ("model", None), backend="pallas_interpret")
    assert calls, "the kernel backend did not run"
    check("pallas row", mesh, True, x, wq, s, None, (None, "model"), (None, "model"), backend="pallas_interpret",
          bitwise=False)


def main():
    for axis_type in (AxisType.Explicit, AxisType.Auto):
        mesh = jax.make_mesh((2, 4), ("data", "model"), axis_types=(axis_type,) * 2)
        op_cases(mesh, axis_type == AxisType.Explicit)
        print(f"{axis_type}: ops OK", flush=True)
    layer_cases(jax.make_mesh((2, 4), ("data", "model"), axis_types=(AxisType.Explicit,) * 2))
    print("layers OK", flush=True)
    pallas_cases(jax.make_mesh((1, 8), ("data", "model"), axis_types=(AxisType.Explicit,) * 2))
    print("pallas OK", flush=True)
    print("OK")


if __name__ == "__main__":
    main()

"""Int8Dense (Linen), Int8Linear (NNX) and intercept() for unmodified Linen models.

The layers are thin shells: a float kernel behaves exactly like nn.Dense / nnx.Linear; an
Int8Weight kernel (from quantize_params) runs jint8.ops.int8_matmul, an Int4Weight kernel (NF4 /
FP4, Int4Config) jint8.ops.int4_matmul.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import nnx

from jint8.errors import ShapeError
from jint8.ops.int4_matmul import int4_matmul
from jint8.numerics import INV_127
from jint8.ops.int8_matmul import InputGate, InputNorm, Int8MatmulStats, OutputGate, int8_matmul
from jint8.ops.int8_matmul.sharded import MatmulLayout
from jint8.quant4 import Int4Weight, dequantize_4bit_rows
from jint8.quantize import Int8Weight

STATS_COLLECTION = "int8_stats"


@functools.partial(jax.tree_util.register_dataclass, data_fields=["x", "norm"],
                   meta_fields=["dtype"])
@dataclasses.dataclass(frozen=True)
class NormedInput:
    """Activations with an RMSNorm still to apply (RMSNorm(defer=True)): rms_norm(x) in dtype.

    Int8Dense folds the norm into int8_matmul (InputNorm), so the decode kernel normalises the
    x it loads anyway and no separate normalisation kernel runs; anything else calls apply().
    """

    x: jax.Array
    norm: InputNorm
    dtype: Any

    @property
    def shape(self):
        return self.x.shape

    def apply(self) -> jax.Array:
        return self.norm(self.x, self.dtype)


@functools.partial(jax.tree_util.register_dataclass, data_fields=["x", "gate"],
                   meta_fields=["dtype"])
@dataclasses.dataclass(frozen=True)
class GatedInput:
    """A fused gate_up projection's output [..., 2K] with its gated activation still to apply:
    act(gate) * up [..., K] in dtype (InputGate's roundings).

    Int8Dense folds the gate into int8_matmul (InputGate), so down_proj's decode kernel forms
    act(gate) * up from the x it loads and no separate multiply kernel runs; anything else calls
    apply().
    """

    x: jax.Array  # [..., 2K]: gate | up
    gate: InputGate
    dtype: Any

    @property
    def shape(self):
        """The shape of the layer's input, apply()'s: [..., K]."""
        return (*self.x.shape[:-1], self.x.shape[-1] // 2)

    def apply(self) -> jax.Array:
        return self.gate(self.x, self.dtype)


def as_array(inputs) -> jax.Array:
    """A layer input as an array: a NormedInput or GatedInput applied, anything else as given."""
    return inputs.apply() if isinstance(inputs, (NormedInput, GatedInput)) else inputs


def int8_weight_apply(
    x: jax.Array,
    weight: Int8Weight,
    bias: Optional[jax.Array] = None,
    *,
    dtype=None,
    backend: Optional[str] = None,
    norm: Optional[InputNorm] = None,
    gate: Optional[InputGate] = None,
    output_gate: Optional[OutputGate] = None,
    split_partials: bool = False,
    layout: Optional[MatmulLayout] = None,
) -> tuple[jax.Array, Int8MatmulStats]:
    """x [..., *in_shape] contracted with an Int8Weight -> [..., *out_shape] in dtype (default x's).

    norm: an RMSNorm over x's last axis applied first (in dtype), folded into the int8 op.
    gate: x is [..., 2K] = gate | up for a kernel of input shape (K,); the op's input is
      act(gate) * up (in dtype), folded into the int8 op.
    output_gate: the kernel is a fused gate|up projection (out_shape (2I,)); the result is
      act(gate) * up [..., I], formed in the int8 op's epilogue.
    split_partials: return [S, ..., *out_shape] (int8_matmul(split_partials=True)): summed over
      S in float32 and cast to dtype it is the result.
    layout: int8_matmul's (a split over a mesh, tensor_parallel_layout).
    """
    in_shape, out_shape = weight.in_shape, weight.out_shape
    if output_gate is not None:
        if len(out_shape) != 1 or out_shape[0] % 2:
            raise ShapeError(f"output_gate= needs a kernel with one, even output axis (gate | up), "
                             f"got output shape {out_shape}")
        out_shape = (out_shape[0] // 2,)
    if gate is not None:
        if len(in_shape) != 1:
            raise ShapeError(f"gate= needs a kernel with one input axis, got input shape {in_shape}")
        in_shape = (2 * in_shape[0],)  # gate | up
    if tuple(x.shape[x.ndim - len(in_shape) :]) != in_shape:
        raise ShapeError(f"input shape {x.shape} does not end with the kernel's input shape {in_shape}")
    dtype = dtype or x.dtype
    batch_shape = x.shape[: x.ndim - len(in_shape)]
    wq, col_scales = weight.as_matrix()
    flat_bias = None if bias is None else jnp.reshape(bias, (-1,))
    y, stats = int8_matmul(
        x.reshape(*batch_shape, math.prod(in_shape)).astype(dtype),
        wq,
        col_scales,
        flat_bias,
        threshold=weight.threshold,
        outlier_capacity=weight.outlier_capacity,
        out_dtype=dtype,
        weight_layout="nk",  # Int8Weight stores [N, K]
        backend=backend,
        return_stats=True,
        norm=norm,
        gate=gate,
        output_gate=output_gate,
        split_partials=split_partials,
        layout=layout,
    )
    return y.reshape(*y.shape[:y.ndim - len(batch_shape) - 1], *batch_shape, *out_shape), stats


def int4_weight_apply(x: jax.Array, weight: Int4Weight, bias: Optional[jax.Array] = None, *, dtype=None,
                      backend: Optional[str] = None, layout: Optional[MatmulLayout] = None) -> jax.Array:
    """x [..., K] times an Int4Weight of a kernel [K, N] (stored as [N, K]) -> [..., N] in dtype
    (default x's): bitsandbytes' Linear4bit, computed in weight.compute_dtype if set, else dtype.
    layout: int4_matmul's (a split along N over a mesh, tensor_parallel_layout)."""
    n, k = weight.shape
    if x.shape[-1:] != (k,):
        raise ShapeError(f"input shape {x.shape} does not end with the kernel's input size {k} "
                         f"(Int4Weight of [out, in] = {weight.shape})")
    dtype = dtype or x.dtype
    flat_bias = None if bias is None else jnp.reshape(bias, (-1,))
    return int4_matmul(x.astype(dtype), weight, flat_bias, dtype=weight.compute_dtype or dtype, out_dtype=dtype,
                       backend=backend, layout=layout)


def _check_int4_kernel(name: str, kernel: Int4Weight, in_features: int, features: int) -> None:
    if kernel.shape != (features, in_features):
        raise ShapeError(f"{name}: Int4Weight stands for a kernel of shape {kernel.shape[::-1]} ([in, out]; "
                         f"stored [out, in] = {kernel.shape}), this layer needs {(in_features, features)}")


def _folded_prologue(inputs, kernel: Int8Weight, dtype) -> dict:
    """int8_matmul's norm= or gate= for a deferred input the op can take, else {}: same dtype in
    and out of the norm or gate (the op's prologue computes in x.dtype) and a 1-D input feature
    axis. Whether the kernel folds it or the op applies it first is the op's choice (by rows:
    configs.FUSED_NORM_MAX_M, FUSED_GATE_MAX_M)."""
    if isinstance(inputs, NormedInput):
        prologue = {"norm": inputs.norm}
    elif isinstance(inputs, GatedInput):
        prologue = {"gate": inputs.gate}
    else:
        return {}
    folds = len(kernel.in_shape) == 1 and inputs.x.dtype == inputs.dtype == (dtype or inputs.dtype)
    return prologue if folds else {}


def tensor_parallel_layout(name: str, kernel, rows: int, *, embedding: bool = False) -> Optional[MatmulLayout]:
    """The int8 op's layout for the layer `name` under jax.set_mesh(mesh) with Auto axes and a
    "model" axis of more than one device: the split loading.kernel_spec gives its kernel by the
    module's name (column-parallel q/k/v/gate/up/lm_head: N over "model"; row-parallel o/down: K
    over "model"), the batch rows over "data" where they divide. With it each device runs the
    int8 kernel on its own shard (ops/int8_matmul/sharded.py); XLA alone cannot split a kernel's
    custom call. kernel: an Int8Weight, or an Int4Weight (column-parallel only, where
    quant4.int4_weight_specs splits it; else None: XLA runs the replicated weight). embedding: an
    int8 table [V, H] in a tied head's attend() (vocab-parallel: V is its N). None without
    such a mesh, on Explicit axes (the op reads the operands' types), or for kernels with several
    input or output axes."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or "model" not in mesh.axis_names or int(mesh.shape["model"]) == 1:
        return None
    if any(t == jax.sharding.AxisType.Explicit for t in mesh.axis_types) or len(kernel.shape) != 2:
        return None
    from jint8.loading.sharding import DATA_AXIS, kernel_spec  # the loader's rules (it imports the models)

    if embedding:  # the table [V, H] is the op's [N, K]
        n_axis, k_axis = kernel_spec(("", name, "embedding"), kernel.qvalue.shape, mesh)
    else:
        shape = tuple(kernel.shape[::-1]) if isinstance(kernel, Int4Weight) else kernel.shape  # the float [K, N]
        k_axis, n_axis = kernel_spec(("", name, "kernel"), shape, mesh)
    if k_axis is None and n_axis is None:
        return None
    if isinstance(kernel, Int4Weight):
        from jint8.quant4 import int4_weight_specs

        if k_axis is not None or int4_weight_specs((None, n_axis), kernel, mesh.shape)[1] is not None:
            return None
    data = int(mesh.shape.get(DATA_AXIS, 1))
    m = (DATA_AXIS,) if data > 1 and rows % data == 0 else ()
    return MatmulLayout(mesh, m, (k_axis,) if k_axis else (), (n_axis,) if n_axis else ())


def _sow_stats(module: nn.Module, stats: Int8MatmulStats) -> None:
    """Count capacity overflows and the largest outlier-column count, if int8_stats is mutable."""
    module.sow(
        STATS_COLLECTION,
        "capacity_overflows",
        stats.capacity_overflow.astype(jnp.int32),
        init_fn=lambda: jnp.zeros((), jnp.int32),
        reduce_fn=lambda total, new: total + new,
    )
    module.sow(
        STATS_COLLECTION,
        "max_outlier_columns",
        stats.num_outlier_columns,
        init_fn=lambda: jnp.zeros((), jnp.int32),
        reduce_fn=jnp.maximum,
    )


class Int8Dense(nn.Module):
    """nn.Dense with the same signature and param names; runs LLM.int8() on an Int8Weight kernel.

    output_gate: a transformers hidden_act name (one of GATE_ACTIVATIONS) for a fused gate|up
    projection: features is 2I (gate's first) and the layer returns act(gate) * up [..., I]
    (reference.gated_activation's roundings on the 2I outputs in dtype). The int8 decode kernel
    gates in its epilogue; a float kernel gates after its dot.
    """

    features: int
    use_bias: bool = True
    dtype: Optional[Any] = None
    param_dtype: Any = jnp.float32
    precision: Any = None
    kernel_init: Any = nn.initializers.lecun_normal()
    bias_init: Any = nn.initializers.zeros_init()
    backend: Optional[str] = None
    output_gate: Optional[str] = None

    @nn.compact
    def __call__(self, inputs, *, split_partials: bool = False) -> jax.Array:
        """inputs: an array, or a NormedInput / GatedInput (an RMSNorm / a gated activation the
        int8 path folds into its kernel). split_partials: return [S, ..., features] whose sum
        over S in float32, cast to dtype, is the result (int8_matmul(split_partials=True): the
        int8 decode kernel's split-K partials where its plan leaves them to the consumer, else
        the result as S = 1)."""
        if self.has_variable("params", "kernel") and isinstance(self.get_variable("params", "kernel"), Int4Weight):
            kernel = self.get_variable("params", "kernel")  # stored [out, in]: Flax's param() would refuse it
            _check_int4_kernel(self.name, kernel, jnp.shape(inputs)[-1], self.features)
        elif self.has_variable("params", "kernel") and isinstance(self.get_variable("params", "kernel"), Int8Weight):
            # Flax's param() would compare the init shape [K, N] with qvalue's K-major [N, K].
            kernel = self.get_variable("params", "kernel")
            if kernel.shape != (jnp.shape(inputs)[-1], self.features):
                raise ShapeError(
                    f"{self.name}: Int8Weight stands for a kernel of shape {kernel.shape}, this layer "
                    f"needs {(jnp.shape(inputs)[-1], self.features)}"
                )
        else:
            kernel = self.param("kernel", self.kernel_init, (jnp.shape(inputs)[-1], self.features), self.param_dtype)
        bias = self.param("bias", self.bias_init, (self.features,), self.param_dtype) if self.use_bias else None
        if self.output_gate is not None and self.features % 2:
            raise ShapeError(f"{self.name}: output_gate={self.output_gate!r} needs an even features "
                             f"(gate | up), got {self.features}")
        if isinstance(kernel, Int8Weight):
            prologue = _folded_prologue(inputs, kernel, self.dtype)
            x = inputs.x if prologue else as_array(inputs)  # the op applies it (InputNorm, InputGate)
            output_gate = None if self.output_gate is None else OutputGate(self.output_gate)
            layout = tensor_parallel_layout(self.name or "", kernel, math.prod(jnp.shape(x)[:-1]))
            y, stats = int8_weight_apply(x, kernel, bias, dtype=self.dtype, backend=self.backend,
                                         output_gate=output_gate, split_partials=split_partials,
                                         layout=layout, **prologue)
            _sow_stats(self, stats)
            return y
        if isinstance(kernel, Int4Weight):
            # the 4-bit op has no folded norm, gate or split-K partials: apply them around it
            x = as_array(inputs)
            layout = tensor_parallel_layout(self.name or "", kernel, math.prod(jnp.shape(x)[:-1]))
            y = int4_weight_apply(x, kernel, bias, dtype=self.dtype, backend=self.backend, layout=layout)
            y = y if self.output_gate is None else OutputGate(self.output_gate)(y)
            return y[None] if split_partials else y
        inputs = as_array(inputs)
        inputs, kernel, bias = nn.dtypes.promote_dtype(inputs, kernel, bias, dtype=self.dtype)
        y = jax.lax.dot_general(inputs, kernel, (((inputs.ndim - 1,), (0,)), ((), ())), precision=self.precision)
        y = y if bias is None else y + jnp.reshape(bias, (1,) * (y.ndim - 1) + (-1,))
        y = y if self.output_gate is None else OutputGate(self.output_gate)(y)
        return y[None] if split_partials else y


class Int8Linear(nnx.Module):
    """nnx.Linear with the same signature and attribute names; int8 path for an Int8Weight kernel."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        use_bias: bool = True,
        dtype: Optional[Any] = None,
        param_dtype: Any = jnp.float32,
        precision: Any = None,
        kernel_init: Any = nnx.initializers.lecun_normal(),
        bias_init: Any = nnx.initializers.zeros_init(),
        backend: Optional[str] = None,
        rngs: nnx.Rngs,
    ):
        self.in_features, self.out_features = in_features, out_features
        self.use_bias, self.dtype, self.precision, self.backend = use_bias, dtype, precision, backend
        self.kernel = nnx.Param(kernel_init(rngs.params(), (in_features, out_features), param_dtype))
        self.bias = nnx.Param(bias_init(rngs.params(), (out_features,), param_dtype)) if use_bias else None

    def __call__(self, inputs: jax.Array) -> jax.Array:
        kernel = self.kernel.value
        bias = None if self.bias is None else self.bias.value
        if isinstance(kernel, Int8Weight):
            y, _ = int8_weight_apply(inputs, kernel, bias, dtype=self.dtype, backend=self.backend)
            return y
        if isinstance(kernel, Int4Weight):
            _check_int4_kernel(type(self).__name__, kernel, self.in_features, self.out_features)
            return int4_weight_apply(inputs, kernel, bias, dtype=self.dtype, backend=self.backend)
        inputs, kernel, bias = nn.dtypes.promote_dtype(inputs, kernel, bias, dtype=self.dtype)
        y = jax.lax.dot_general(inputs, kernel, (((inputs.ndim - 1,), (0,)), ((), ())), precision=self.precision)
        return y if bias is None else y + bias


def _explicit_spec(array) -> Optional[tuple]:
    """The PartitionSpec entries (one per axis) of an array whose type carries a sharding over
    Explicit mesh axes, else None (no mesh, Auto axes, inside a shard_map)."""
    sharding = getattr(jax.typeof(array), "sharding", None)
    if not isinstance(sharding, jax.sharding.NamedSharding) or sharding.mesh.empty:
        return None
    if not any(t == jax.sharding.AxisType.Explicit for t in sharding.mesh.axis_types):
        return None
    spec = tuple(sharding.spec)
    return spec + (None,) * (array.ndim - len(spec))


def gather_rows(table: jax.Array, ids: jax.Array) -> jax.Array:
    """table [V, *rest] rows at ids [...] -> [..., *rest], as jnp.take(table, ids, axis=0).

    On Explicit mesh axes with a vocab-parallel table (V over "model") jax cannot infer the
    gather's output sharding and asks for one: the rows follow the ids' split (the batch over
    "data") with the table's other axes kept, so XLA gathers each row from the shard that holds
    it and all-reduces the masked partial lookups over "model"."""
    table_spec = _explicit_spec(table)
    if table_spec is None:
        return jnp.take(table, ids, axis=0)
    ids_spec = _explicit_spec(ids) or (None,) * ids.ndim

    def axes(entry):
        return set() if entry is None else {entry} if isinstance(entry, str) else set(entry)

    used = set().union(*(axes(e) for e in ids_spec))
    rest = tuple(e if not axes(e) & used else None for e in table_spec[1:])
    out_spec = jax.sharding.PartitionSpec(*ids_spec, *rest)
    return table.at[ids].get(mode="fill", out_sharding=out_spec)


class Int8Embed(nn.Module):
    """nn.Embed with the same fields and param name; an Int8Weight table (Int8Config
    quantize_embeddings) is gathered in int8 and dequantized per row, and attend() runs LLM.int8();
    an Int4Weight table (Int4Config quantize_embeddings) dequantizes only the looked-up rows
    (bitsandbytes' Embedding4bit values), and attend() runs int4_matmul on it as a Linear4bit
    weight [V, H] = [out, in]."""

    num_embeddings: int
    features: int
    dtype: Optional[Any] = None
    param_dtype: Any = jnp.float32
    embedding_init: Any = nn.initializers.variance_scaling(1.0, "fan_in", "normal", out_axis=0)

    def setup(self):
        shape = (self.num_embeddings, self.features)
        if self.has_variable("params", "embedding") and isinstance(self.get_variable("params", "embedding"), Int4Weight):
            table = self.get_variable("params", "embedding")  # packed codes: Flax's param() would refuse the shape
            if table.shape != shape:
                raise ShapeError(f"{self.name}: Int4Weight stands for a table of shape {table.shape}, this "
                                 f"embedding needs {shape}")
            self.embedding = table
            return
        self.embedding = self.param("embedding", self.embedding_init, shape, self.param_dtype)

    def __call__(self, inputs: jax.Array) -> jax.Array:
        if not jnp.issubdtype(inputs.dtype, jnp.integer):
            raise ValueError(f"{self.name}: input type must be an integer, got {inputs.dtype}")
        table = self.embedding
        if isinstance(table, Int8Weight):
            rows = gather_rows(table.qvalue, inputs).astype(jnp.float32)
            scale = gather_rows(table.scale, inputs)[..., None]
            return (rows * scale * INV_127).astype(self.dtype or self.param_dtype)  # = dequantize_embedding
        if isinstance(table, Int4Weight):
            return dequantize_4bit_rows(table, inputs, self.dtype or self.param_dtype)
        (table,) = nn.dtypes.promote_dtype(table, dtype=self.dtype, inexact=False)
        return gather_rows(table, inputs)

    def attend(self, query: jax.Array) -> jax.Array:
        """query [..., features] @ table.T -> [..., num_embeddings] (a tied output head)."""
        table = self.embedding
        if isinstance(table, Int8Weight):
            layout = tensor_parallel_layout(self.name or "", table, math.prod(query.shape[:-1]), embedding=True)
            y, stats = int8_weight_apply(query, table, dtype=self.dtype or query.dtype, layout=layout)
            _sow_stats(self, stats)
            return y
        if isinstance(table, Int4Weight):  # replicated on a mesh (quantize_params keeps 4-bit tables whole)
            return int4_weight_apply(query, table, dtype=self.dtype or query.dtype)
        query, table = nn.dtypes.promote_dtype(query, table, dtype=self.dtype)
        return jnp.dot(query, table.T)


# ----------------------------------------------------------------------------- intercept


def _quantized_kernel(module: nn.Module):
    """The module's Int8Weight or Int4Weight kernel, else None."""
    if not module.has_variable("params", "kernel"):
        return None
    kernel = module.get_variable("params", "kernel")
    return kernel if isinstance(kernel, (Int8Weight, Int4Weight)) else None


def _dense_general_in_ndim(module: nn.DenseGeneral, x: jax.Array, weight: Int8Weight) -> None:
    axes = module.axis if isinstance(module.axis, tuple) else (module.axis,)
    axes = tuple(sorted(a % x.ndim for a in axes))
    if module.batch_dims:
        raise ShapeError(f"{module.name}: int8 DenseGeneral does not support batch_dims={module.batch_dims}")
    if axes != tuple(range(x.ndim - len(axes), x.ndim)) or len(axes) != weight.in_ndim:
        raise ShapeError(
            f"{module.name}: DenseGeneral contracts axes {module.axis} of input {x.shape}, but its "
            f"Int8Weight was quantized with in_ndim={weight.in_ndim} (set Int8Config.in_ndim_overrides)"
        )


def _int8_interceptor(next_fun, args, kwargs, context):
    module = context.module
    if context.method_name != "__call__" or isinstance(module, Int8Dense):
        return next_fun(*args, **kwargs)
    if not isinstance(module, (nn.Dense, nn.DenseGeneral)):
        return next_fun(*args, **kwargs)
    weight = _quantized_kernel(module)
    if weight is None:
        return next_fun(*args, **kwargs)
    (x,) = args
    bias = module.get_variable("params", "bias") if module.use_bias else None
    if isinstance(weight, Int4Weight):
        axes = module.axis if isinstance(getattr(module, "axis", -1), tuple) else (getattr(module, "axis", -1),)
        if isinstance(module, nn.DenseGeneral) and (module.batch_dims or tuple(a % x.ndim for a in axes) != (x.ndim - 1,)):
            raise ShapeError(f"{module.name}: a 4-bit DenseGeneral must contract the last input axis only, "
                             f"got axis={module.axis}, batch_dims={module.batch_dims}")
        features = module.features if isinstance(module.features, tuple) else (module.features,)
        _check_int4_kernel(module.name, weight, x.shape[-1], math.prod(features))
        y = int4_weight_apply(x, weight, bias, dtype=module.dtype or jnp.result_type(x))
        return y.reshape(*y.shape[:-1], *features)
    if isinstance(module, nn.DenseGeneral):
        _dense_general_in_ndim(module, x, weight)
    y, stats = int8_weight_apply(x, weight, bias, dtype=module.dtype or jnp.result_type(x))
    _sow_stats(module, stats)
    return y


@contextlib.contextmanager
def intercept():
    """Run any Linen model's nn.Dense / nn.DenseGeneral with Int8Weight params through int8_matmul
    (Int4Weight params through int4_matmul).

        with jint8.intercept():
            logits = model.apply({"params": quantize_params(params)}, ids)
    """
    with nn.intercept_methods(_int8_interceptor):
        yield

"""What int8_matmul does to x before the recipe and to its result after it, in XLA.

InputNorm (an RMSNorm), InputGate (act(gate) * up of a fused gate_up output) and OutputGate
(act(gate) * up of the op's own gate|up result) are small pytrees the op takes as norm=,
gate= and output_gate=. Their __call__ is the plain-jnp meaning every route computes: the
fused decode kernel forms the same values in its prologue / epilogue, every other route calls
them in XLA (op_input for the two prologues).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Optional

import jax
import jax.numpy as jnp

from jint8.errors import InvalidConfigError
from jint8.numerics import GATE_ACTIVATIONS, gated_activation, rms_norm


@functools.partial(jax.tree_util.register_dataclass, data_fields=["scale"],
                   meta_fields=["eps", "unit_offset"])
@dataclasses.dataclass(frozen=True)
class InputNorm:
    """An RMSNorm the op applies to x before the recipe: int8_matmul(x, ..., norm=n) computes
    int8_matmul(n(x), ...). The fused decode kernel does it on the x it loads anyway (no
    separate normalisation kernel); every other route calls n(x) first."""

    scale: jax.Array  # [K], the norm's weight
    eps: float
    unit_offset: bool = False  # Gemma: x / rms(x) * (1 + scale)

    def __call__(self, x: jax.Array, dtype=None) -> jax.Array:
        """rms_norm(x) in dtype (default x.dtype, what int8_matmul's norm= computes)."""
        return rms_norm(x, self.scale, eps=self.eps, unit_offset=self.unit_offset,
                        dtype=dtype or x.dtype)


@functools.partial(jax.tree_util.register_dataclass, data_fields=[], meta_fields=["activation"])
@dataclasses.dataclass(frozen=True)
class InputGate:
    """A gated activation the op applies to x before the recipe: x [..., 2K] holds gate | up
    (a fused gate_up projection's output) and int8_matmul(x, ..., gate=g) computes
    int8_matmul(g(x), ...) on the [..., K] act(gate) * up. The fused decode kernel does it on
    the x it loads anyway (no separate multiply kernel); every other route calls g(x) first."""

    activation: str = "silu"  # a transformers hidden_act name, one of GATE_ACTIVATIONS

    def __post_init__(self):
        if self.activation not in GATE_ACTIVATIONS:
            raise InvalidConfigError(f"InputGate.activation={self.activation!r} must be one of "
                                     f"{sorted(GATE_ACTIVATIONS)}")

    def __call__(self, x: jax.Array, dtype=None) -> jax.Array:
        """act(gate) * up of x [..., 2K] -> [..., K] in dtype (default x.dtype, what
        int8_matmul's gate= computes)."""
        gate, up = jnp.split(x, 2, axis=-1)
        return gated_activation(gate, up, self.activation, dtype or x.dtype)


@functools.partial(jax.tree_util.register_dataclass, data_fields=[], meta_fields=["activation"])
@dataclasses.dataclass(frozen=True)
class OutputGate:
    """A gated activation the op applies to its result: the weight is a fused gate|up projection
    (N = 2I output features, gate's first), and int8_matmul(x, ..., output_gate=g) returns
    g(int8_matmul(x, ...)) = act(gate) * up [..., I], in the output dtype. The fused decode
    kernel does it in its epilogue on the gate and up tiles of its own result (a program owns
    the same I-columns of both), so neither the [..., 2I] product nor a multiply kernel exists;
    every other route applies g to the product, where XLA fuses it into the split-K sum."""

    activation: str = "silu"  # a transformers hidden_act name, one of GATE_ACTIVATIONS

    def __post_init__(self):
        if self.activation not in GATE_ACTIVATIONS:
            raise InvalidConfigError(f"OutputGate.activation={self.activation!r} must be one of "
                                     f"{sorted(GATE_ACTIVATIONS)}")

    def __call__(self, y: jax.Array) -> jax.Array:
        """act(gate) * up of y [..., 2I] -> [..., I] in y.dtype."""
        gate, up = jnp.split(y, 2, axis=-1)
        return gated_activation(gate, up, self.activation, y.dtype)


def op_input(x: jax.Array, norm: Optional[InputNorm] = None,
             gate: Optional[InputGate] = None) -> jax.Array:
    """What the recipe quantizes: x through the call's InputNorm or InputGate (x without)."""
    if norm is not None:
        return norm(x)
    return x if gate is None else gate(x)

"""What every op asks before it picks a kernel: can Pallas' Triton lowering run here, and did the
user force a backend with JINT8_BACKEND. Imports nothing from the ops, so each op depends on this
module rather than on another op."""

from __future__ import annotations

import inspect
import os
import sys
import types
from typing import Optional

import jax

BACKEND_ENV_VAR = "JINT8_BACKEND"


def requested_backend() -> Optional[str]:
    """The backend JINT8_BACKEND names, or None when it is unset or empty."""
    return os.environ.get(BACKEND_ENV_VAR) or None


def triton_gpu_unsupported_reason() -> Optional[str]:
    """None when the default device can run Pallas Triton kernels (an NVIDIA GPU with the
    lowering importable), else why not."""
    try:
        device = jax.devices()[0]
    except RuntimeError as error:  # no backend initialised at all
        return f"not a GPU: {error}"
    if device.platform != "gpu":
        return f"not a GPU (default device platform is {device.platform!r})"
    if "nvidia" not in device.device_kind.lower() and not _is_cuda(device):
        return f"not an NVIDIA GPU ({device.device_kind}); Triton lowering needs CUDA"
    try:
        from jax.experimental.pallas import triton as _  # noqa: F401
    except ImportError as error:
        return f"needs jax with Pallas Triton GPU lowering: {error}"
    return None


def _is_cuda(device) -> bool:
    return device.client.platform_version.lower().startswith("cuda")


class _CallablePackage(types.ModuleType):
    """An op package that is also its op: `jint8.ops.int8_matmul(x, ...)` calls the op, while
    `jint8.ops.int8_matmul.pallas_triton` (and `import jint8.ops.int8_matmul.pallas_triton as
    p`) still reach the package's modules, which a function bound to the package's name in
    jint8.ops would hide."""

    def __call__(self, *args, **kwargs):
        return self.__op__(*args, **kwargs)


def make_callable(package_name: str, op) -> None:
    """Make the package sys.modules[package_name] callable as op (its __init__ calls this)."""
    package = sys.modules[package_name]
    package.__op__ = op
    package.__signature__ = inspect.signature(op)
    package.__class__ = _CallablePackage

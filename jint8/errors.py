"""Every exception jint8 raises on bad input, in one place.

Messages name the parameter path, tensor or file and the offending values.
"""


class Jint8Error(Exception):
    """Base class of jint8's errors."""


class InvalidConfigError(Jint8Error, ValueError):
    """A configuration field has a value outside its domain."""


class QuantizationError(Jint8Error, ValueError):
    """A parameter cannot be quantized (NaN/Inf, wrong dtype, wrong rank)."""


class ShapeError(Jint8Error, ValueError):
    """Arrays passed to an op or layer have incompatible shapes."""


class BackendUnavailableError(Jint8Error, RuntimeError):
    """The requested matmul backend cannot run here (platform, shape or missing package)."""

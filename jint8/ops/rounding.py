"""Rounding float32 to a 16-bit float that no compiler drops; defined in jint8.numerics (the layer
every op, kernel and model shares) and importable here for the kernels that use it."""

from jint8.numerics import round_to

__all__ = ["round_to"]

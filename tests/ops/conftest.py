"""Fixtures of the kernel tests: fresh random inputs per run, the seed in every failure message."""

import time

import numpy as np
import pytest


class SeededRng:
    """A numpy Generator that remembers its seed for failure messages."""

    def __init__(self, seed):
        self.seed_value = seed
        self._generator = np.random.default_rng(seed)

    def __getattr__(self, name):
        return getattr(self._generator, name)


@pytest.fixture
def rng():
    return SeededRng(time.time_ns() % 2**31)

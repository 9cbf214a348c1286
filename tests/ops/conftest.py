"""Fixtures of the kernel tests: fresh random inputs per run, the seed in every failure message."""

import os
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
    """Fresh per run; JINT8_TEST_SEED=<seed from a failure message> replays a failure."""
    seed = os.environ.get("JINT8_TEST_SEED")
    return SeededRng(int(seed) if seed else time.time_ns() % 2**31)

import os
import sys
import time

import numpy as np
import pytest

# Tests run on the CPU (CI has no GPU); keep jax from probing for accelerators.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(__file__))

SEED_ENV_VAR = "JINT8_TEST_SEED"


class SeededRng:
    """A numpy Generator that remembers its seed for failure messages."""

    def __init__(self, seed):
        self.seed_value = seed
        self._generator = np.random.default_rng(seed)

    def __getattr__(self, name):
        return getattr(self._generator, name)


@pytest.fixture
def rng(request):
    """Fresh random inputs per run; a failing test's report names its seed, and
    JINT8_TEST_SEED=<that seed> replays it."""
    seed = os.environ.get(SEED_ENV_VAR)
    seed = int(seed) if seed else time.time_ns() % 2**31
    request.node.jint8_seed = seed
    return SeededRng(seed)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    report = (yield).get_result()
    seed = getattr(item, "jint8_seed", None)
    if report.failed and seed is not None:
        report.sections.append(("random inputs", f"replay with {SEED_ENV_VAR}={seed}"))

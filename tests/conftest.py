import os
import sys

# Tests run on the CPU (CI has no GPU); keep jax from probing for accelerators.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(__file__))

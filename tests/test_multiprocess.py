"""Multi-process SPMD (jax.distributed): two CPU processes on this machine, a coordinator on
127.0.0.1, load a tiny random checkpoint onto a 2-process mesh through from_pretrained (each
process reading only its own blocks of each tensor) and generate the same tokens as one process
(tests/scripts/multiprocess_generate.py is one process). Bounded: every wait has a timeout, and
the processes are killed if they overrun."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from reference import require_module

import jint8

SCRIPT = Path(__file__).parent / "scripts" / "multiprocess_generate.py"
TIMEOUT_S = 240  # for both; each takes ~15 s of CPU time (a busy 2-core machine stretches the wall clock)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tiny_checkpoint(directory: Path) -> None:
    """A random 2-layer Llama whose greedy tokens vary (initializer_range 0.2: the default 0.02
    makes a tiny random model repeat one token)."""
    import torch
    import transformers as tf

    torch.manual_seed(0)
    config = tf.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                            num_key_value_heads=2, vocab_size=256, initializer_range=0.2)
    tf.LlamaForCausalLM(config).eval().save_pretrained(directory, safe_serialization=True)


def _prompt():
    ids = np.random.RandomState(0).randint(0, 256, (2, 7)).astype(np.int32)
    mask = np.ones_like(ids, bool)
    mask[1, :2] = False
    return ids, mask


def test_two_processes_load_a_sharded_model_and_generate_the_tokens_of_one(tmp_path):
    require_module("torch")
    _tiny_checkpoint(tmp_path / "ckpt")
    root = Path(jint8.__file__).resolve().parent.parent
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one CPU device a process
    env.update(JAX_PLATFORMS="cpu", PYTHONPATH=os.pathsep.join([str(root), env.get("PYTHONPATH", "")]))
    port, started = _free_port(), time.monotonic()
    processes = [subprocess.Popen([sys.executable, str(SCRIPT), str(i), "2", str(port), str(tmp_path / "ckpt"),
                                   str(tmp_path / f"out{i}.npz")], env=env, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True) for i in range(2)]
    try:
        # one process's answer, computed here while the two run
        ids, mask = _prompt()
        model, params = jint8.from_pretrained(tmp_path / "ckpt", quantization=jint8.Int8Config(min_size=0),
                                              dtype=jnp.float32, progress=False)
        expected = jint8.generate(model, params, ids, mask, jint8.GenerationConfig(max_new_tokens=6)).sequences
        expected_logits = np.asarray(model.apply({"params": params}, jnp.asarray(ids))[0])
        outputs = [p.communicate(timeout=max(1.0, TIMEOUT_S - (time.monotonic() - started)))[0] for p in processes]
    finally:
        for p in processes:
            if p.poll() is None:
                p.kill()
                p.wait()
    for p, output in zip(processes, outputs):
        assert p.returncode == 0 and output.strip().endswith("OK"), output
    assert len(set(expected[0, 7:].tolist())) > 1, expected  # tokens that vary: a real comparison
    for i in range(2):
        got = np.load(tmp_path / f"out{i}.npz")
        np.testing.assert_array_equal(got["sequences"], expected)
        # the same int8 weights; the sharded projections and lm_head only regroup float32 sums
        np.testing.assert_allclose(got["logits"], expected_logits, rtol=1e-5, atol=1e-5)

"""The paged cache mode in families other than Llama: Gemma 2 (sliding window, attention and
final logit soft-capping, GQA) and GPT-2 (learned positions, no RoPE). The engine's greedy
tokens equal jint8.generate's over the static cache, with prompts longer than a chunk and the
sliding window."""

import os
import sys

import jax
import jax.numpy as jnp
import pytest
from reference import require_module

import jint8
from jint8.models import config_from_hf, model_class_for
from jint8.serve import Engine, EngineConfig, SamplingOptions

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "models"))
from tiny_checkpoints import hf_config  # noqa: E402

PROMPTS = [[5, 9, 13, 200, 7], [(11 * i) % 256 for i in range(21)]]


@pytest.mark.parametrize("family", ["gemma2", "gpt2"])
def test_engine_greedy_equals_generate_in_other_families(family):
    require_module("transformers")
    hf = hf_config(family)
    model = model_class_for(hf)(config_from_hf(hf, jnp.float32))
    init = jax.jit(lambda key: jax.tree.map(lambda x: x * 3.0 if x.ndim == 2 else x,
                                            model.init(key, jnp.zeros((1, 4), jnp.int32))["params"]))
    params = init(jax.random.key(0))
    engine = Engine(model, params, EngineConfig(max_batch=2, batch_buckets=(2,), prefill_chunk=8,
                                                chunk_buckets=(8,), max_context=48)).start()
    try:
        got = engine.generate(PROMPTS, SamplingOptions(max_tokens=10), timeout=120)
    finally:
        engine.shutdown(cancel=True)
    config = jint8.GenerationConfig(max_new_tokens=10, prompt_length_bucket=32, new_tokens_bucket=16)
    for prompt, tokens in zip(PROMPTS, got):
        expected = jint8.generate(model, params, [prompt], config=config).sequences[0][len(prompt):]
        assert tokens == [int(t) for t in expected], family

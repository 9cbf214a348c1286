"""jint8.generate: exactness against transformers and against plain greedy, batching, bucketing,
sampling, streaming, speculative and prompt-lookup decoding, and the errors on bad input.

Models are tiny (2 layers, hidden 64, vocab 101) so the whole file stays well under 3 minutes on
two CPU cores; the compiled programs are shared between tests by keeping batch size and buckets
equal where the behaviour under test allows it.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from reference import require_module

import jint8
from jint8 import GenerationConfig, generate
from jint8.errors import (
    AssistantMismatchError,
    ContextLengthError,
    EmptyPromptError,
    InvalidConfigError,
    PromptPaddingError,
)
from jint8.generation import SamplingParams, clear_compiled_programs, compile_count, filter_logits
from jint8.generation.drafting import _lookup_drafts, _verify
from jint8.generation.state import _Plan
from jint8.models import LlamaConfig, LlamaForCausalLM

VOCAB = 101
CONTEXT = 256
PROMPTS = [[5, 9, 13, 5, 9, 22, 7], [3, 14, 15, 92, 65], [17, 2, 71, 8, 28, 18, 28, 45, 90, 45, 23]]
REPEATING = [11, 12, 13, 14, 11, 12, 13, 14, 11, 12]


def _tiny_config(num_layers=2, dtype=jnp.float32, vocab=VOCAB):
    return LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_layers=num_layers,
                       num_heads=4, num_kv_heads=2, head_dim=16, max_position_embeddings=CONTEXT, dtype=dtype)


def _random_model(seed=0, num_layers=2, vocab=VOCAB):
    """A jint8 Llama with weights scaled up so its logits are peaked (no near-ties in argmax)."""
    model = LlamaForCausalLM(_tiny_config(num_layers, vocab=vocab))
    params = model.init(jax.random.key(seed), jnp.zeros((1, 4), jnp.int32))["params"]
    return model, jax.tree.map(lambda x: x * 3.0 if x.ndim == 2 else x, params)


@pytest.fixture(scope="module")
def tiny():
    return _random_model(0)


@pytest.fixture(scope="module")
def draft():
    return _random_model(1, num_layers=1)


def _naive_greedy(model, params, prompt, n):
    """Argmax decoding by re-running the whole sequence without a cache: the definition."""
    width = 64  # one compiled forward; right padding cannot reach earlier positions (causal)

    @jax.jit
    def logits_at(ids, position):
        return model.apply({"params": params}, ids)[0][0, position]

    ids = list(prompt)
    for _ in range(n):
        buffer = np.zeros((1, width), np.int32)
        buffer[0, : len(ids)] = ids
        ids.append(int(jnp.argmax(logits_at(buffer, len(ids) - 1))))
    return ids


def _left_pad(prompts, pad=0):
    width = max(map(len, prompts))
    ids = np.full((len(prompts), width), pad, np.int32)
    mask = np.zeros((len(prompts), width), np.int32)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt) :], mask[row, width - len(prompt) :] = prompt, 1
    return ids, mask


# ----------------------------------------------------------------------------- against transformers


@pytest.fixture(scope="module")
def hf_llama(tmp_path_factory):
    """A tiny random transformers Llama saved with save_pretrained, and jint8's load of it."""
    torch = require_module("torch")
    transformers = require_module("transformers")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=CONTEXT,
        initializer_range=0.1, bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False,
    )
    hf_model = transformers.LlamaForCausalLM(config).eval()
    path = tmp_path_factory.mktemp("tiny_llama")
    hf_model.save_pretrained(path)
    return torch, hf_model, path


def _hf_greedy(torch, hf_model, ids, mask, max_new_tokens):
    with torch.no_grad():
        out = hf_model.generate(torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask),
                                max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=2, pad_token_id=0)
    return out.numpy()


def test_greedy_equals_transformers_generate_float32(hf_llama):
    torch, hf_model, path = hf_llama
    model, params = jint8.from_pretrained(path, dtype=jnp.float32)
    ids, mask = _left_pad(PROMPTS)
    expected = _hf_greedy(torch, hf_model, ids, mask, 20)
    result = generate(model, params, ids, mask, GenerationConfig(max_new_tokens=20, eos_token_id=2, pad_token_id=0))
    # transformers stops the batch once every row hit eos; jint8 pads to max_new_tokens
    np.testing.assert_array_equal(result.sequences[:, : expected.shape[1]], expected)
    assert np.all(result.sequences[:, expected.shape[1] :] == 0)


def test_bfloat16_greedy_equals_transformers_bfloat16_where_the_margin_is_clear(hf_llama):
    """bf16 implementations round differently (fused ops, accumulation order), so token-for-token
    equality is required only up to the first step where float32's top-2 logit margin is below
    0.25, several times the bf16 logit error of this model (~0.05)."""
    torch, hf_model, path = hf_llama
    model, params = jint8.from_pretrained(path, dtype=jnp.bfloat16)
    model32, params32 = jint8.from_pretrained(path, dtype=jnp.float32)
    hf_bf16 = hf_model.to(torch.bfloat16)
    try:
        for prompt in PROMPTS:
            expected = _hf_greedy(torch, hf_bf16, [prompt], [[1] * len(prompt)], 12)[0]
            got = generate(model, params, [prompt], config=GenerationConfig(max_new_tokens=12, eos_token_id=2,
                                                                             pad_token_id=0)).sequences[0]
            clear = _clear_steps(model32, params32, got, len(prompt))
            np.testing.assert_array_equal(got[len(prompt) : len(prompt) + clear],
                                          expected[len(prompt) : len(prompt) + clear])
    finally:
        hf_model.to(torch.float32)


def _clear_steps(model, params, sequence, prompt_len, margin=0.25):
    """How many leading new tokens of `sequence` were chosen with a float32 top-2 margin >= margin
    (at least 1: the first token is always compared)."""
    logits = np.asarray(model.apply({"params": params}, jnp.asarray(sequence[None]))[0][0])
    top2 = np.sort(logits, axis=-1)[:, -2:]
    margins = (top2[:, 1] - top2[:, 0])[prompt_len - 1 : -1]
    return max(1, int(np.argmax(margins < margin)) if np.any(margins < margin) else len(margins))


def test_int8_greedy_equals_greedy_through_its_own_int8_forward(hf_llama):
    """Generation adds nothing to the int8 numerics: the cached, bucketed, compiled loop emits the
    same tokens as re-running the int8 model on the whole sequence. (int8 vs transformers' float
    model is not expected to agree token for token: activation quantization moves the logits.)"""
    _, _, path = hf_llama
    model, qparams = jint8.from_pretrained(path, dtype=jnp.float32, quantization=jint8.Int8Config(min_size=0))
    assert any(isinstance(leaf, jint8.Int8Weight)
               for leaf in jax.tree.leaves(qparams, is_leaf=lambda x: isinstance(x, jint8.Int8Weight)))
    result = generate(model, qparams, [PROMPTS[0]], config=GenerationConfig(max_new_tokens=12))
    assert result.sequences[0].tolist() == _naive_greedy(model, qparams, PROMPTS[0], 12)


def test_int8_greedy_agrees_with_float_greedy_where_the_float_margin_is_clear(hf_llama):
    """int8 tokens equal float32 tokens up to the first step where float32's top-2 logit margin is
    below 0.25: the int8 logit error of this model is about 0.07 at most (measured over its prompts),
    so a wider margin cannot flip the argmax, while a narrower one may, and greedy paths never
    re-join after they split."""
    _, _, path = hf_llama
    model, params = jint8.from_pretrained(path, dtype=jnp.float32)
    _, qparams = jint8.from_pretrained(path, dtype=jnp.float32, quantization=jint8.Int8Config(min_size=0))
    config = GenerationConfig(max_new_tokens=12)
    for prompt in PROMPTS:
        reference = generate(model, params, [prompt], config=config).sequences[0]
        quantized = generate(model, qparams, [prompt], config=config).sequences[0]
        clear = _clear_steps(model, params, reference, len(prompt))
        np.testing.assert_array_equal(quantized[len(prompt) : len(prompt) + clear],
                                      reference[len(prompt) : len(prompt) + clear])


# ----------------------------------------------------------------------------- greedy exactness


def test_greedy_equals_naive_recompute(tiny):
    model, params = tiny
    result = generate(model, params, [PROMPTS[0]], config=GenerationConfig(max_new_tokens=12))
    assert result.sequences[0].tolist() == _naive_greedy(model, params, PROMPTS[0], 12)
    assert result.sequences.shape == (1, len(PROMPTS[0]) + 12)
    assert result.decode_steps == 11 and result.tokens_per_step == 1.0


def test_batch_with_mixed_prompt_lengths_equals_each_prompt_alone(tiny):
    model, params = tiny
    config = GenerationConfig(max_new_tokens=12)
    ids, mask = _left_pad(PROMPTS, pad=7)
    batch = generate(model, params, ids, mask, config).sequences
    for row, prompt in enumerate(PROMPTS):
        alone = generate(model, params, [prompt], config=config).sequences[0]
        np.testing.assert_array_equal(batch[row, ids.shape[1] :], alone[len(prompt) :])


def test_eos_stops_a_sequence_and_pads_the_rest(tiny):
    model, params = tiny
    free = generate(model, params, [PROMPTS[1]], config=GenerationConfig(max_new_tokens=12)).sequences[0]
    eos = int(free[len(PROMPTS[1]) + 3])
    stop = list(free[len(PROMPTS[1]):]).index(eos)  # its first occurrence
    config = GenerationConfig(max_new_tokens=12, eos_token_id=(VOCAB - 1, eos), pad_token_id=VOCAB - 1)
    result = generate(model, params, [PROMPTS[1]], config=config)
    new = result.sequences[0, len(PROMPTS[1]) :]
    np.testing.assert_array_equal(new[: stop + 1], free[len(PROMPTS[1]) : len(PROMPTS[1]) + stop + 1])
    assert np.all(new[stop + 1 :] == VOCAB - 1)
    assert result.num_new_tokens.tolist() == [stop + 1]
    assert result.decode_steps == stop  # the loop exits once every sequence is done


def test_lengths_in_one_bucket_reuse_the_compiled_program(tiny):
    model, params = tiny
    config = GenerationConfig(max_new_tokens=5, prompt_length_bucket=16, new_tokens_bucket=16)
    generate(model, params, [[1, 2, 3]], config=config)
    before = compile_count()
    for prompt, max_new in (([4, 5, 6, 7, 8], 9), (list(range(1, 17)), 16), ([9], 1)):
        generate(model, params, [prompt], config=dataclasses.replace(config, max_new_tokens=max_new, seed=3))
    assert compile_count() == before
    generate(model, params, [list(range(1, 18))], config=config)  # 17 tokens: the next prompt bucket
    assert compile_count() == before + 1
    generate(model, params, [[1, 2]], config=dataclasses.replace(config, max_new_tokens=17))
    assert compile_count() == before + 2


class _LlamaKeepingLastLogits(LlamaForCausalLM):
    """A model that takes transformers' logits_to_keep; generate asks it for the prefill's last."""

    def __call__(self, input_ids, positions=None, cache=None, cache_index=None, kv_mask=None, logits_to_keep=0):
        logits, cache = super().__call__(input_ids, positions, cache, cache_index, kv_mask)
        if input_ids.shape[1] > 1:  # the prefill (T = 1 is the decode step)
            assert logits_to_keep == 1
        return (logits[:, -logits_to_keep:] if logits_to_keep else logits), cache


def test_prefill_asks_a_model_that_can_for_the_last_logits_only(tiny):
    model, params = tiny
    config = GenerationConfig(max_new_tokens=6)
    expected = generate(model, params, [PROMPTS[1]], config=config).sequences
    keeping = _LlamaKeepingLastLogits(model.config)
    np.testing.assert_array_equal(generate(keeping, params, [PROMPTS[1]], config=config).sequences, expected)


# ----------------------------------------------------------------------------- speculative decoding


@pytest.mark.parametrize("batch", [1, 3])
def test_speculative_greedy_equals_plain_greedy(tiny, draft, batch):
    model, params = tiny
    assistant, assistant_params = draft
    ids, mask = _left_pad(PROMPTS[:batch], pad=7)
    config = GenerationConfig(max_new_tokens=12, num_assistant_tokens=3)
    plain = generate(model, params, ids, mask, config)
    fast = generate(model, params, ids, mask, config, assistant_model=assistant, assistant_params=assistant_params)
    np.testing.assert_array_equal(fast.sequences, plain.sequences)
    assert 0 <= fast.accepted_tokens_per_step <= 3


def test_speculative_with_itself_accepts_every_draft(tiny):
    model, params = tiny
    config = GenerationConfig(max_new_tokens=13, num_assistant_tokens=3)
    plain = generate(model, params, [PROMPTS[0]], config=config)
    fast = generate(model, params, [PROMPTS[0]], config=config, assistant_model=model, assistant_params=params)
    np.testing.assert_array_equal(fast.sequences, plain.sequences)
    assert fast.accepted_tokens_per_step == 3.0 and fast.decode_steps == 3  # 1 + 3 * (3 + 1) = 13


@pytest.mark.parametrize("prompts", [[REPEATING], [REPEATING, PROMPTS[2]]])
def test_prompt_lookup_greedy_equals_plain_greedy(tiny, prompts):
    model, params = tiny
    ids, mask = _left_pad(prompts, pad=7)
    plain = generate(model, params, ids, mask, GenerationConfig(max_new_tokens=12))
    lookup = generate(model, params, ids, mask, GenerationConfig(max_new_tokens=12, prompt_lookup_num_tokens=4))
    np.testing.assert_array_equal(lookup.sequences, plain.sequences)
    assert lookup.decode_steps <= plain.decode_steps
    assert lookup.tokens_per_step == pytest.approx(1 + lookup.accepted_tokens_per_step, abs=1 / lookup.decode_steps)


def _transformers_prompt_lookup(sequence, num_tokens, max_ngram):
    """transformers' PromptLookupCandidateGenerator.get_candidates, in plain Python."""
    for n in range(min(max_ngram, len(sequence) - 1), 0, -1):
        pattern = sequence[-n:]
        for start in range(len(sequence) - n + 1):
            if sequence[start : start + n] == pattern and start + n < len(sequence):
                return sequence[start + n : min(start + n + num_tokens, len(sequence))]
    return []


@pytest.mark.parametrize("seed", range(4))
def test_lookup_drafts_match_transformers_candidates(seed):
    rng = np.random.default_rng(seed)
    batch, width, end = 6, 40, 30
    tokens = rng.integers(0, 4, size=(batch, width)).astype(np.int32)  # 4 symbols: many n-gram matches
    valid = np.zeros((batch, width), bool)
    starts = rng.integers(0, end - 1, size=batch)
    for row, start in enumerate(starts):
        valid[row, start:end] = True
    drafts, count = _lookup_drafts(jnp.asarray(tokens), jnp.asarray(valid), end, 3, 2)
    for row, start in enumerate(starts):
        expected = _transformers_prompt_lookup(tokens[row, start:end].tolist(), 3, 2)
        assert int(count[row]) == len(expected)
        assert np.asarray(drafts[row, : len(expected)]).tolist() == expected


# ----------------------------------------------------------------------------- sampling


def test_sampling_is_reproducible_with_a_seed(tiny):
    model, params = tiny
    config = GenerationConfig(max_new_tokens=12, do_sample=True, temperature=1.5, top_p=0.95, seed=7)
    first = generate(model, params, [PROMPTS[0], PROMPTS[0]], config=config).sequences
    again = generate(model, params, [PROMPTS[0], PROMPTS[0]], config=config).sequences
    other = generate(model, params, [PROMPTS[0], PROMPTS[0]], config=dataclasses.replace(config, seed=8)).sequences
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, other)
    assert not np.array_equal(first[0], first[1])  # rows draw different samples


def test_sampling_with_top_k_1_is_greedy(tiny):
    model, params = tiny
    greedy = generate(model, params, [PROMPTS[2]], config=GenerationConfig(max_new_tokens=12)).sequences
    sampled = generate(model, params, [PROMPTS[2]],
                       config=GenerationConfig(max_new_tokens=12, do_sample=True, top_k=1, temperature=3.0))
    np.testing.assert_array_equal(sampled.sequences, greedy)


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 0, 1.0), (0.7, 5, 1.0), (1.3, 0, 0.8), (0.9, 10, 0.6)])
def test_filter_logits_matches_transformers_warpers(temperature, top_k, top_p):
    torch = require_module("torch")
    lp = require_module("transformers.generation.logits_process")
    logits = np.random.default_rng(0).normal(size=(4, 50)).astype(np.float32) * 3
    warpers = [lp.TemperatureLogitsWarper(temperature)]
    if top_k:
        warpers.append(lp.TopKLogitsWarper(top_k))
    if top_p < 1:
        warpers.append(lp.TopPLogitsWarper(top_p))
    expected = torch.tensor(logits)
    for warper in warpers:
        expected = warper(None, expected)
    sampling = SamplingParams(jnp.float32(temperature), jnp.int32(top_k), jnp.float32(top_p))
    got = np.asarray(filter_logits(jnp.asarray(logits), sampling))
    np.testing.assert_array_equal(np.isinf(got), np.isinf(expected.numpy()))
    np.testing.assert_allclose(got[~np.isinf(got)], expected.numpy()[~np.isinf(got)], rtol=1e-6)


def test_rejection_sampling_keeps_the_target_distribution():
    """Draft from q, verify against p (K = 1): the first emitted token is distributed as p."""
    p_logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]] * 2))  # [K+1, V]
    q_logits = jnp.log(jnp.array([[0.1, 0.2, 0.3, 0.4]]))  # [K, V]
    plan = _Plan(new_tokens_capacity=1, draft_length=1, drafter="assistant", ngram_size=0, do_sample=True,
                 streaming=False, stream_interval=1)
    sampling = SamplingParams(jnp.float32(1.0), jnp.int32(0), jnp.float32(1.0))
    controls = type("Controls", (), {"sampling": sampling})

    @jax.vmap
    def first_token(key):
        draft_key, verify_key = jax.random.split(key)
        drafted = jax.random.categorical(draft_key, q_logits)[None].astype(jnp.int32)  # [1, K]
        emitted, _ = _verify(p_logits[None], drafted, jnp.ones((1,), jnp.int32), q_logits[None], verify_key,
                             controls, plan)
        return emitted[0, 0]

    n = 40_000
    tokens = np.asarray(first_token(jax.random.split(jax.random.key(0), n)))
    frequencies = np.bincount(tokens, minlength=4) / n
    # 5 standard errors of a frequency estimate: sqrt(0.25 / n) = 0.0025
    np.testing.assert_allclose(frequencies, [0.5, 0.3, 0.15, 0.05], atol=5 * 0.0025)


def test_speculative_sampling_is_reproducible_and_in_vocab(tiny, draft):
    model, params = tiny
    assistant, assistant_params = draft
    config = GenerationConfig(max_new_tokens=12, do_sample=True, top_k=20, seed=1, num_assistant_tokens=3)
    run = functools.partial(generate, model, params, [PROMPTS[0]], config=config, assistant_model=assistant,
                            assistant_params=assistant_params)
    first, again = run().sequences, run().sequences
    np.testing.assert_array_equal(first, again)
    assert first.shape == (1, len(PROMPTS[0]) + 12) and np.all((first >= 0) & (first < VOCAB))


# ----------------------------------------------------------------------------- streaming


def test_stream_delivers_the_new_tokens_in_order(tiny):
    model, params = tiny
    chunks = []
    config = GenerationConfig(max_new_tokens=12, stream_interval=4)
    ids, mask = _left_pad(PROMPTS[:2])
    result = generate(model, params, ids, mask, config, stream=chunks.append)
    assert len(chunks) >= 3 and all(chunk.shape[0] == 2 for chunk in chunks)
    np.testing.assert_array_equal(np.concatenate(chunks, axis=1), result.sequences[:, ids.shape[1] :])


# ----------------------------------------------------------------------------- bad input


def test_config_validation_names_the_field():
    with pytest.raises(InvalidConfigError, match="max_new_tokens"):
        GenerationConfig(max_new_tokens=0)
    for top_p in (0.0, 1.5, -0.1):
        with pytest.raises(InvalidConfigError, match="top_p"):
            GenerationConfig(top_p=top_p)
    with pytest.raises(InvalidConfigError, match="temperature"):
        GenerationConfig(temperature=-1.0)
    with pytest.raises(InvalidConfigError, match="top_k"):
        GenerationConfig(top_k=-1)
    with pytest.raises(InvalidConfigError, match="eos_token_id"):
        GenerationConfig(eos_token_id=-3)
    assert GenerationConfig(eos_token_id=[2, 3]).eos_token_id == (2, 3)
    assert GenerationConfig(eos_token_id=5).resolved_pad_token_id == 5


def test_bad_prompts_raise_clear_errors(tiny, draft):
    model, params = tiny
    with pytest.raises(EmptyPromptError):
        generate(model, params, np.zeros((1, 0), np.int32))
    with pytest.raises(EmptyPromptError, match="rows \\[1\\]"):
        generate(model, params, [[1, 2], [3, 4]], [[1, 1], [0, 0]])
    with pytest.raises(PromptPaddingError, match="left padding"):
        generate(model, params, [[1, 2, 3]], [[1, 1, 0]])
    with pytest.raises(ContextLengthError, match="max_position_embeddings=256"):
        generate(model, params, [list(range(1, 90)) * 3])
    with pytest.raises(ContextLengthError, match="max_new_tokens"):
        generate(model, params, [list(range(1, 90)) * 2], config=GenerationConfig(max_new_tokens=100))
    with pytest.raises(EmptyPromptError, match="vocab_size"):
        generate(model, params, [[1, VOCAB]])
    other_vocab, other_params = _random_model(2, num_layers=1, vocab=VOCAB + 1)
    with pytest.raises(AssistantMismatchError, match="vocab_size"):
        generate(model, params, [[1, 2]], assistant_model=other_vocab, assistant_params=other_params)
    with pytest.raises(InvalidConfigError, match="not both"):
        generate(model, params, [[1, 2]], config=GenerationConfig(prompt_lookup_num_tokens=2),
                 assistant_model=draft[0], assistant_params=draft[1])


# ----------------------------------------------------------------------------- on a mesh

_SHARDED_SCRIPT = """
import os, sys, tempfile
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
import jax, jax.numpy as jnp, torch, transformers
import jint8
torch.manual_seed(0)
config = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256, initializer_range=0.1,
    tie_word_embeddings=False)
path = tempfile.mkdtemp()
transformers.LlamaForCausalLM(config).save_pretrained(path)
model, params = jint8.from_pretrained(path, dtype=jnp.float32, progress=False)
_, sharded = jint8.from_pretrained(path, dtype=jnp.float32, mesh=jint8.make_mesh(data=1, model=4), progress=False)
assert len(jax.tree.leaves(sharded)[3].sharding.device_set) == 4
config = jint8.GenerationConfig(max_new_tokens=10)
single = jint8.generate(model, params, [[5, 6, 7, 8], [9, 10, 11, 12]], config=config).sequences
spread = jint8.generate(model, sharded, [[5, 6, 7, 8], [9, 10, 11, 12]], config=config).sequences
assert (single == spread).all(), (single, spread)
print("OK")
"""


def test_generate_with_tensor_parallel_params_equals_one_device():
    import subprocess
    import sys

    require_module("torch")
    env = {**__import__("os").environ, "JAX_PLATFORMS": "cpu"}
    done = subprocess.run([sys.executable, "-c", _SHARDED_SCRIPT], capture_output=True, text=True, env=env,
                          timeout=300)
    assert done.returncode == 0 and done.stdout.strip().endswith("OK"), done.stderr[-3000:]


def test_clear_compiled_programs_resets_the_counter(tiny):
    clear_compiled_programs()
    assert compile_count() == 0  # last: it drops the programs the other tests share

"""The continuous-batching engine on a tiny float32 Llama: greedy output equal to jint8.generate's
alone and beside others (chunked prefill and prompts of different lengths prefilled together in
one call included), a bounded set of compiled shapes, seeded sampling independent of
batch-mates, blocks freed, cancellation, a full queue, shutdown."""

import re
import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tiny_serving import tiny_model

import jint8
from jint8.errors import EngineStoppedError, InvalidConfigError, InvalidRequestError, QueueFullError
from jint8.serve import Engine, EngineConfig, SamplingOptions

VOCAB = 97
# prompts shorter than, equal to and longer than the 16-token chunk (the longest takes 3 chunks)
PROMPTS = [[5, 9, 13], list(range(1, 17)), [(7 * i) % VOCAB for i in range(40)], [3, 14, 15, 92, 65, 35]]
# a prefill call holds up to 64 tokens (rows x chunk): up to four prompts' chunks in one call
CONFIG = EngineConfig(max_batch=4, block_size=8, prefill_chunk=16, prefill_tokens_per_step=64, batch_buckets=(2, 4),
                      chunk_buckets=(8, 16))
SHAPES = {(2, 1), (4, 1), (1, 8), (1, 16), (2, 8), (2, 16), (4, 8), (4, 16)}
SAMPLER_ROWS = {1, 2, 4}  # the row counts of SHAPES


@pytest.fixture(scope="module")
def tiny():
    return tiny_model(VOCAB)


def _prefill_calls(engine) -> tuple[float, float]:
    """(prefill calls, sequences in them) so far."""
    value = engine.metrics.registry.get_sample_value
    return value("jint8_prefill_sequences_per_call_count"), value("jint8_prefill_sequences_per_call_sum")


def _run_queued_before_start(engine, prompts, options) -> list[list[int]]:
    """Submit every prompt, then start the engine: its first iteration sees them all waiting."""
    outputs = [[] for _ in prompts]
    done = threading.Semaphore(0)

    def sink_for(i):
        def sink(tokens, reason):
            outputs[i].extend(tokens)
            if reason is not None:
                done.release()
        return sink

    for i, prompt in enumerate(prompts):
        engine.submit(prompt, options, sink_for(i))
    engine.start()
    assert all(done.acquire(timeout=120) for _ in prompts)
    return outputs


@pytest.fixture(scope="module")
def started(tiny):
    """The module's engine, started with PROMPTS queued: (engine, their tokens, prefill calls)."""
    engine = Engine(*tiny, CONFIG)
    try:
        outputs = _run_queued_before_start(engine, PROMPTS, SamplingOptions(max_tokens=12))
        yield engine, outputs, _prefill_calls(engine)
    finally:
        engine.shutdown(cancel=True, timeout=10)


@pytest.fixture(scope="module")
def engine(started):
    return started[0]


def _reference(tiny, prompt, max_new):
    model, params = tiny
    config = jint8.GenerationConfig(max_new_tokens=max_new, prompt_length_bucket=64, new_tokens_bucket=32)
    return [int(t) for t in jint8.generate(model, params, [prompt], config=config).sequences[0][len(prompt):]]


@pytest.fixture(scope="module")
def expected(tiny):
    return [_reference(tiny, p, 12) for p in PROMPTS]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_prompts_of_different_lengths_prefilled_in_one_call_equal_generate_and_running_alone(started, expected,
                                                                                             dtype):
    """All four prompts queued before the engine starts share its first prefill call, [4, 16]
    (3, 16, 16 of 40 and 6 tokens, left-padded); the 40-token one finishes in two more calls.
    Their greedy tokens equal jint8.generate's and (float32) the same engine's with each prompt
    alone: batch independence and the compiled shapes do not depend on the dtype, so the
    bfloat16 case holds the shared prefill call to generate's bfloat16 tokens only."""
    engine, outputs, calls = started
    options = SamplingOptions(max_tokens=12)
    if dtype == "bfloat16":
        tiny = tiny_model(VOCAB, jnp.bfloat16)
        expected = [_reference(tiny, p, 12) for p in PROMPTS]
        engine = Engine(*tiny, CONFIG)
        try:
            outputs = _run_queued_before_start(engine, PROMPTS, options)
            calls = _prefill_calls(engine)
        finally:
            engine.shutdown(cancel=True, timeout=10)
    else:
        alone = [engine.generate([p], options, timeout=60)[0] for p in PROMPTS]
        assert set(engine.step_shapes) == SHAPES
        assert alone == expected
    assert calls == (3, 6)
    assert outputs == expected


def test_greedy_equals_generate_alone_and_in_a_batch_without_recompiling(tiny, engine, expected):
    options = SamplingOptions(max_tokens=12)
    engine.warmup()
    compiled = engine.compile_count
    assert set(engine.compiled_shapes) == SHAPES and set(engine.compiled_sampler_rows) == SAMPLER_ROWS
    assert compiled == len(SHAPES) + len(SAMPLER_ROWS)
    together = engine.generate(PROMPTS, options, timeout=120)
    assert together == expected
    compiled = engine.compile_count
    # churn: more requests than slots, joining while others run; every shape has been seen
    alone = [engine.generate([p], options, timeout=60)[0] for p in PROMPTS]
    churn = engine.generate(PROMPTS * 3, SamplingOptions(max_tokens=7), timeout=120)
    assert alone == expected
    assert churn == [e[:7] for e in expected] * 3
    assert engine.compile_count == compiled
    assert engine.load == dict(waiting=0, running=0, blocks_used=0, free_blocks=engine.allocator.usable_blocks)


def test_the_step_has_no_conditional_and_greedy_calls_skip_the_sampler(tiny):
    """XLA's GPU conditional reads its predicate on the host (a device sync inside the call), so
    the step must not hold one: sampling is a program of its own, dispatched only for calls with
    a sampled row."""
    engine = Engine(*tiny, CONFIG)
    arguments = engine._step_arguments(np.zeros((2, 1), np.int32), np.full((2, 1), -1, np.int32),
                                       np.zeros((2, engine.allocator.max_blocks_per_sequence), np.int32), [])
    program = engine._step.lower(*arguments).as_text()
    assert "stablehlo.case" not in program and "stablehlo.if" not in program
    engine.start()
    try:
        engine.generate(PROMPTS[:2], SamplingOptions(max_tokens=3), timeout=60)
        assert engine.compiled_sampler_rows == []
        engine.generate(PROMPTS[:2], SamplingOptions(max_tokens=3, temperature=0.5, seed=3), timeout=60)
        assert set(engine.compiled_sampler_rows) == {2}  # the prefill call's 2 rows and the decode batch of 2
    finally:
        engine.shutdown(cancel=True, timeout=10)


def test_a_bf16_step_on_the_cpu_writes_only_the_new_slots_of_the_pools_in_place():
    """XLA's CPU backend has no bf16 scatter and upcasts it: a whole pool converted to float32 and
    back around every layer's write, every step. The engine keeps 16-bit pools as their bits, so
    no array the pools' size but of another type appears in the compiled step, and the donated
    pools are updated in place."""
    engine = Engine(*tiny_model(VOCAB, jnp.bfloat16), CONFIG)
    assert engine.k_pool.dtype == jnp.uint16 and engine.cache_dtype == jnp.bfloat16
    arguments = engine._step_arguments(np.zeros((2, 1), np.int32), np.full((2, 1), -1, np.int32),
                                       np.zeros((2, engine.allocator.max_blocks_per_sequence), np.int32), [])
    program = engine._step.lower(*arguments).compile().as_text()
    pool_shape = "[" + ",".join(map(str, engine.k_pool.shape)) + "]"
    pool_sized = set(re.findall(r"\b(\w+)" + re.escape(pool_shape), program))
    assert pool_sized == {"u16"}, f"pool-sized arrays of types {sorted(pool_sized)} in the step"
    params = len(jax.tree.leaves(engine.params))
    aliases = re.search(r"input_output_alias=\{(.*?)\}, entry_computation_layout", program).group(1)
    # outputs 2 and 3 (the pools) are parameters `params` and `params` + 1 (the donated pools)
    assert f"{{2}}: ({params}, {{}}" in aliases and f"{{3}}: ({params + 1}, {{}}" in aliases


def test_seeded_sampling_does_not_depend_on_batch_mates(engine):
    options = SamplingOptions(max_tokens=10, temperature=1.0, top_k=20, top_p=0.9, seed=1234)
    alone = engine.generate([PROMPTS[0]], options, timeout=60)[0]
    beside = engine.generate([PROMPTS[0], PROMPTS[1], PROMPTS[3]], options, timeout=60)
    assert beside[0] == alone
    other_seed = engine.generate([PROMPTS[0]], SamplingOptions(max_tokens=10, temperature=1.0, seed=99), timeout=60)
    assert other_seed[0] != alone and all(0 <= t < VOCAB for t in alone)


def test_a_long_prompt_is_prefilled_in_chunks_between_decode_steps_of_running_streams(engine):
    """A 40-token prompt takes three 16-token chunks; a stream already running gets a token after
    each, so it keeps flowing while the new request prefills."""
    events, lock = [], threading.Lock()
    a_started, done = threading.Event(), threading.Semaphore(0)

    def sink_for(name):
        def sink(tokens, reason):
            with lock:
                events.extend([name] * len(tokens))
            a_started.set()
            if reason is not None:
                done.release()
        return sink

    engine.submit(PROMPTS[0], SamplingOptions(max_tokens=30), sink_for("a"))
    assert a_started.wait(60)
    with lock:
        mark = len(events)
    engine.submit(PROMPTS[2], SamplingOptions(max_tokens=4), sink_for("b"))
    assert done.acquire(timeout=60) and done.acquire(timeout=60)
    after = events[mark:]
    assert after.index("b") >= 2, after  # a's tokens between b's prefill chunks
    assert events.count("a") == 30 and events.count("b") == 4


def test_eos_and_stop_token_ids_end_a_request(tiny, engine):
    expected = _reference(tiny, PROMPTS[3], 12)
    stop_at = expected[4]
    out = engine.generate([PROMPTS[3]], SamplingOptions(max_tokens=12, stop_token_ids=(stop_at,)), timeout=60)[0]
    assert out == expected[: expected.index(stop_at) + 1]
    # beside a stream that runs on: the steps dispatched past the stop token deliver nothing
    both = engine.generate([PROMPTS[3], PROMPTS[1]], SamplingOptions(max_tokens=12, stop_token_ids=(stop_at,)),
                           timeout=60)
    other = _reference(tiny, PROMPTS[1], 12)
    assert both == [out, other[: other.index(stop_at) + 1] if stop_at in other else other]
    # a request whose one token comes from its prefill call never decodes
    assert engine.generate([PROMPTS[0], PROMPTS[3]], SamplingOptions(max_tokens=1), timeout=60) == [
        [_reference(tiny, PROMPTS[0], 1)[0]], [expected[0]]]
    assert engine.load["blocks_used"] == 0


def test_cancel_frees_the_slot_and_its_blocks(engine):
    events, first = [], threading.Event()
    finished = threading.Event()

    def sink(tokens, reason):
        events.append((tokens, reason))
        first.set()
        if reason is not None:
            finished.set()

    request = engine.submit(PROMPTS[2], SamplingOptions(max_tokens=80), sink)
    assert first.wait(60)
    engine.cancel(request)
    assert finished.wait(60)
    assert events[-1] == ([], "abort") and len(events) < 80
    assert engine.load["blocks_used"] == 0 and engine.load["running"] == 0


def test_bad_requests_and_a_full_queue_are_refused_with_the_field_named(tiny):
    engine = Engine(*tiny, EngineConfig(max_batch=2, max_queue=2, max_context=64, batch_buckets=(2,),
                                        prefill_chunk=16, chunk_buckets=(16,)))  # not started: nothing runs
    sink = lambda tokens, reason: None  # noqa: E731
    with pytest.raises(InvalidRequestError, match="maximum context length is 64") as error:
        engine.submit(list(range(60)), SamplingOptions(max_tokens=8), sink)
    assert error.value.param == "prompt"
    with pytest.raises(InvalidRequestError, match="outside") as error:
        engine.submit([VOCAB], SamplingOptions(), sink)
    for field, value in (("max_tokens", 0), ("temperature", -1.0), ("top_p", 0.0), ("top_k", -2), ("seed", -1)):
        with pytest.raises(InvalidRequestError, match=field) as error:
            SamplingOptions(**{field: value})
        assert error.value.param == field
    engine.submit([1, 2], SamplingOptions(), sink)
    engine.submit([1, 2], SamplingOptions(), sink)
    with pytest.raises(QueueFullError, match="max_queue=2"):
        engine.submit([1, 2], SamplingOptions(), sink)
    engine.shutdown(cancel=True)
    with pytest.raises(EngineStoppedError):
        engine.submit([1, 2], SamplingOptions(), sink)
    with pytest.raises(InvalidConfigError, match="batch_buckets"):
        EngineConfig(max_batch=4, batch_buckets=(1, 2))
    with pytest.raises(InvalidConfigError, match="prefill_batch=8 must be <= max_batch=4"):
        EngineConfig(max_batch=4, prefill_batch=8)


def test_shutdown_finishes_requests_in_flight(tiny, engine):
    results = []
    done = threading.Event()

    def sink(tokens, reason):
        results.extend(tokens)
        if reason is not None:
            results.append(reason)
            done.set()

    engine.submit(PROMPTS[1], SamplingOptions(max_tokens=9), sink)
    engine.shutdown(timeout=60)  # not cancel: the request runs to its end
    assert done.is_set() and results[-1] == "length" and len(results) == 10
    np.testing.assert_array_equal(results[:-1], _reference(tiny, PROMPTS[1], 9))


def test_cli_serve_refuses_bad_options_before_loading(tmp_path, capsys):
    from jint8 import cli

    assert cli.main(["serve", "--model", str(tmp_path / "missing.gguf")]) == 2
    assert "missing.gguf: no such file" in capsys.readouterr().err
    (tmp_path / "model.gguf").write_bytes(b"")
    assert cli.main(["serve", "--model", str(tmp_path / "model.gguf"), "--max-batch", "0"]) == 2
    assert "EngineConfig.max_batch=0 must be >= 1" in capsys.readouterr().err


def test_int8_without_outlier_columns_does_not_depend_on_batch_mates(tiny):
    """The README's rule, the side that holds exactly: without the outlier decomposition
    (threshold 0) LLM.int8's scales are per row, so an int8 request's greedy output is the same
    alone and beside others (with outliers the columns are a union over the batch's rows)."""
    model, params = tiny
    config = EngineConfig(max_batch=4, batch_buckets=(4,), prefill_chunk=16, chunk_buckets=(16,))
    engine = Engine(model, jint8.quantize_params(params, jint8.Int8Config(threshold=0.0)), config).start()
    options = SamplingOptions(max_tokens=8)
    try:
        together = engine.generate(PROMPTS, options, timeout=120)
        assert together == [engine.generate([p], options, timeout=60)[0] for p in PROMPTS]
    finally:
        engine.shutdown(cancel=True)

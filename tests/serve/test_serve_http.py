"""`jint8 serve`'s HTTP side through the real openai client, against a server on 127.0.0.1 (an
ephemeral port) over a tiny float32 Llama and a byte-level tokenizer: every answer is held to
jint8.generate's greedy tokens for the same prompt ids."""

import concurrent.futures
import threading
import time

import httpx
import openai
import pytest
from tiny_serving import byte_tokenizer, tiny_model

import jint8
from jint8.serve import EngineConfig, SamplingOptions
from jint8.serve.runner import ServerThread, build_app

MAX_QUEUE = 20  # above the 16 concurrent clients below, so only the full-queue test fills it
TEXTS = ["hello there", "the quick brown fox", "a", "jumps over the lazy dog", "serving!", "0123456789",
         "paged attention", "continuous batching of requests"]


@pytest.fixture(scope="module")
def tokenizer():
    return byte_tokenizer()


@pytest.fixture(scope="module")
def tiny(tokenizer):
    return tiny_model(len(tokenizer))


@pytest.fixture(scope="module")
def server(tiny, tokenizer):
    config = EngineConfig(max_batch=16, batch_buckets=(16,), prefill_chunk=32, chunk_buckets=(32,), max_queue=MAX_QUEUE)
    engine, app = build_app(*tiny, tokenizer, model_name="tiny", engine_config=config)
    server = ServerThread(engine, app).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def reference(tiny, tokenizer):
    """Greedy text (and token count, finish reason) of jint8.generate for prompt ids."""
    model, params = tiny

    def greedy(ids, max_tokens):
        config = jint8.GenerationConfig(max_new_tokens=max_tokens, eos_token_id=tokenizer.eos_token_id,
                                        prompt_length_bucket=64, new_tokens_bucket=64)
        result = jint8.generate(model, params, [ids], config=config)
        count = int(result.num_new_tokens[0])
        tokens = [int(t) for t in result.sequences[0][len(ids):len(ids) + count]]
        reason = "stop" if tokens[-1] == tokenizer.eos_token_id else "length"
        return tokenizer.decode(tokens, skip_special_tokens=True), count, reason

    return greedy


def _chat_ids(tokenizer, text):
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                           tokenize=False)
    return tokenizer(prompt, add_special_tokens=False)["input_ids"]


def _streamed(stream):
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    return chunks, text


def test_models_chat_and_completions_streamed_and_not_equal_greedy_generate(server, client, tokenizer, reference):
    assert [m.id for m in client.models.list().data] == ["tiny"]
    assert httpx.get(f"{server.url}/health").json() == {"status": "ok"}
    messages = [{"role": "user", "content": TEXTS[1]}]
    text, count, reason = reference(_chat_ids(tokenizer, TEXTS[1]), 20)
    chat = client.chat.completions.create(model="tiny", messages=messages, max_tokens=20, temperature=0)
    assert chat.object == "chat.completion" and chat.choices[0].message.role == "assistant"
    assert (chat.choices[0].message.content, chat.choices[0].finish_reason) == (text, reason)
    assert (chat.usage.prompt_tokens, chat.usage.completion_tokens) == (len(_chat_ids(tokenizer, TEXTS[1])), count)
    chunks, streamed = _streamed(client.chat.completions.create(
        model="tiny", messages=messages, max_tokens=20, temperature=0, stream=True,
        stream_options={"include_usage": True}))
    assert streamed == text and chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-2].choices[0].finish_reason == reason and chunks[-1].usage.completion_tokens == count
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)

    ids = tokenizer(TEXTS[0])["input_ids"]
    text, count, reason = reference(ids, 12)
    completion = client.completions.create(model="tiny", prompt=TEXTS[0], max_tokens=12, temperature=0)
    assert (completion.choices[0].text, completion.usage.completion_tokens) == (text, count)
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model="tiny", prompt=TEXTS[0], max_tokens=12, temperature=0, stream=True))
    assert streamed == text
    by_ids = client.completions.create(model="tiny", prompt=ids, max_tokens=12, temperature=0, echo=False)
    assert by_ids.choices[0].text == text


def test_stop_strings_and_seeds(client, tokenizer, reference):
    text, _, _ = reference(tokenizer(TEXTS[3])["input_ids"], 30)
    start = next(i for i in range(2, len(text) - 2) if "\ufffd" not in text[i:i + 2])
    stop = text[start:start + 2]
    expected = text[: text.find(stop)]
    for stream in (False, True):
        out = client.completions.create(model="tiny", prompt=TEXTS[3], max_tokens=30, temperature=0, stop=[stop],
                                        stream=stream)
        if stream:
            chunks = list(out)
            got, reason = "".join(c.choices[0].text for c in chunks), chunks[-1].choices[0].finish_reason
        else:
            got, reason = out.choices[0].text, out.choices[0].finish_reason
        assert (got, reason) == (expected, "stop")
    sampled = [client.completions.create(model="tiny", prompt=TEXTS[2], max_tokens=10, temperature=1.0, top_p=0.9,
                                         seed=seed, extra_body={"top_k": 40}).choices[0].text for seed in (7, 7, 8)]
    assert sampled[0] == sampled[1] != sampled[2]


def test_concurrent_clients_get_complete_and_correct_answers_within_a_time_limit(server, client, tokenizer,
                                                                                 reference):
    """16 clients x 3 requests each, mixed lengths, chat and completions, streamed and not."""
    jobs = [(c, r) for c in range(16) for r in range(3)]
    expected = {}
    for c, r in jobs:
        text, max_tokens = TEXTS[(c + r) % len(TEXTS)], 4 + (5 * c + r) % 24
        ids = _chat_ids(tokenizer, text) if r == 1 else tokenizer(text)["input_ids"]
        expected[c, r] = reference(ids, max_tokens)[0], text, max_tokens

    def run(job):
        want, text, max_tokens = expected[job]
        stream = job[0] % 2 == 0
        if job[1] == 1:
            out = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": text}],
                                                 max_tokens=max_tokens, temperature=0, stream=stream)
            return _streamed(out)[1] if stream else out.choices[0].message.content
        out = client.completions.create(model="tiny", prompt=text, max_tokens=max_tokens, temperature=0, stream=stream)
        return "".join(c.choices[0].text for c in out) if stream else out.choices[0].text

    start = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        results = dict(zip(jobs, pool.map(run, jobs)))
    assert time.monotonic() - start < 120
    assert all(results[job] == expected[job][0] for job in jobs)
    load = server.engine.load
    assert load["running"] == load["blocks_used"] == load["waiting"] == 0


def test_bad_fields_and_overlong_prompts_get_400_naming_the_field(client):
    messages = [{"role": "user", "content": "hi"}]
    cases = [
        (dict(temperature=3.0), "temperature"), (dict(top_p=0.0), "top_p"), (dict(n=2), "n"),
        (dict(max_tokens=0), "max_tokens"), (dict(model="gpt-4"), "model"), (dict(seed=-1), "seed"),
        (dict(extra_body={"top_k": -1}), "top_k"), (dict(max_tokens=10_000), "messages"),
        (dict(messages=[]), "messages"), (dict(messages=[{"role": "wizard", "content": "x"}]), "messages.0.role"),
    ]
    for overrides, param in cases:
        request = {"model": "tiny", "messages": messages, "max_tokens": 4, **overrides}
        with pytest.raises(openai.BadRequestError) as error:
            client.chat.completions.create(**request)
        body = error.value.body
        assert error.value.status_code == 400 and body["param"] == param, (overrides, body)
        assert body["type"] == "invalid_request_error" and body["message"]
    with pytest.raises(openai.BadRequestError, match="maximum context length is 128") as error:
        client.completions.create(model="tiny", prompt="x" * 200, max_tokens=4)
    assert error.value.body["param"] == "prompt"


def _blocked_engine(engine):
    """Stall the engine thread inside a request's sink until the returned event is set."""
    release, stalled = threading.Event(), threading.Event()

    def sink(tokens, reason):
        stalled.set()
        release.wait(60)

    engine.submit([1, 2, 3], SamplingOptions(max_tokens=1), sink)
    assert stalled.wait(60)
    return release


def _wait_idle(engine, timeout=60):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if engine.load["running"] == engine.load["blocks_used"] == engine.load["waiting"] == 0:
            return True
        time.sleep(0.05)
    return False


def _aborted(server):
    metrics = httpx.get(f"{server.url}/metrics").text
    line = next((ln for ln in metrics.splitlines() if ln.startswith('jint8_requests_total{finish_reason="abort"}')),
                "x 0")
    return float(line.split()[-1])


def test_a_full_queue_gets_429_and_the_queued_requests_still_complete(server, client, tokenizer, reference):
    release = _blocked_engine(server.engine)
    jobs = [TEXTS[i % len(TEXTS)] for i in range(MAX_QUEUE)]
    with concurrent.futures.ThreadPoolExecutor(MAX_QUEUE) as pool:
        futures = [pool.submit(client.completions.create, model="tiny", prompt=t, max_tokens=6, temperature=0)
                   for t in jobs]
        deadline = time.monotonic() + 60
        while server.engine.load["waiting"] < MAX_QUEUE and time.monotonic() < deadline:
            time.sleep(0.02)
        with pytest.raises(openai.RateLimitError) as error:
            client.completions.create(model="tiny", prompt="one too many", max_tokens=6)
        assert error.value.status_code == 429 and "max_queue=20" in error.value.body["message"]
        release.set()
        texts = [f.result().choices[0].text for f in futures]
    assert texts == [reference(tokenizer(t)["input_ids"], 6)[0] for t in jobs]
    assert "jint8_requests_rejected_total 1.0" in httpx.get(f"{server.url}/metrics").text


def test_a_client_that_disconnects_frees_its_slot_and_blocks(server, client):
    """The engine is held still while each client goes away, so neither request can finish first."""
    before = _aborted(server)
    stream = client.completions.create(model="tiny", prompt=TEXTS[4], max_tokens=100, temperature=0, stream=True)
    next(iter(stream))
    release = _blocked_engine(server.engine)
    stream.close()
    time.sleep(0.5)
    release.set()
    assert _wait_idle(server.engine)
    # a non-streamed request whose client times out while it waits in the queue
    release = _blocked_engine(server.engine)
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{server.url}/v1/completions", json={"prompt": TEXTS[5], "max_tokens": 100, "temperature": 0},
                   timeout=0.5)
    time.sleep(0.5)  # the server notices the closed connection while the request is still queued
    release.set()
    assert _wait_idle(server.engine)
    assert _aborted(server) == before + 2
    metrics = httpx.get(f"{server.url}/metrics").text
    for name in ("jint8_queue_depth", "jint8_batch_occupancy", "jint8_time_to_first_token_seconds_count",
                 "jint8_inter_token_latency_seconds_count", "jint8_generation_tokens_total",
                 "jint8_prompt_tokens_total"):
        assert name in metrics


def test_graceful_shutdown_finishes_the_stream_in_flight(server, client, tokenizer, reference):
    """Last in this file: it stops the module's server. The engine is held still while shutdown
    begins, so the stream is surely in flight: new connections are refused, the stream ends whole."""
    stream = client.completions.create(model="tiny", prompt=TEXTS[6], max_tokens=40, temperature=0, stream=True)
    chunks = iter(stream)
    first = next(chunks)
    release = _blocked_engine(server.engine)
    stopper = threading.Thread(target=server.stop)
    stopper.start()
    time.sleep(0.5)
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{server.url}/health", timeout=5)
    release.set()
    rest = list(chunks)
    stopper.join(60)
    text = first.choices[0].text + "".join(c.choices[0].text for c in rest)
    assert text == reference(tokenizer(TEXTS[6])["input_ids"], 40)[0]
    assert rest[-1].choices[0].finish_reason in ("length", "stop")
    assert not stopper.is_alive() and not server.engine.is_running

"""`jint8 serve` over the real SmolLM2-135M-Instruct GGUF (its tokenizer and chat template), asked
through the openai client. float32 without quantization keeps the CPU compile short; the int8
path is the same engine and is covered on the tiny models."""

import jax.numpy as jnp
import openai
import pytest
from reference import require_module

import jint8
from jint8.serve import EngineConfig
from jint8.serve.runner import ServerThread, build_app


@pytest.fixture(scope="module")
def smollm2_server():
    require_module("torch")  # transformers' GGUF tokenizer reader imports it
    from jint8.assets import smollm2_gguf_path
    from jint8.loading import load_tokenizer

    path = smollm2_gguf_path()
    model, params = jint8.from_pretrained(path, dtype=jnp.float32)
    config = EngineConfig(max_batch=2, batch_buckets=(2,), prefill_chunk=64, chunk_buckets=(64,), max_context=256)
    engine, app = build_app(model, jint8.fuse_projections(params), load_tokenizer(path), model_name="smollm2",
                            engine_config=config)
    with ServerThread(engine, app) as server:
        yield server.url


def test_smollm2_answers_through_the_openai_client(smollm2_server):
    client = openai.OpenAI(base_url=f"{smollm2_server}/v1", api_key="unused", max_retries=0, timeout=300)
    assert [m.id for m in client.models.list().data] == ["smollm2"]
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    chunks = list(client.chat.completions.create(model="smollm2", messages=messages, max_tokens=8, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert "Paris" in text, text
    usage = chunks[-1].usage
    assert usage.prompt_tokens > 10 and 0 < usage.completion_tokens <= 8

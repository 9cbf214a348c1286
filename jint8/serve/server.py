"""The OpenAI-compatible HTTP server: a FastAPI app over one Engine.

The engine's step runs on its own thread; this side is asynchronous: each request submits token
ids and awaits an asyncio queue the engine thread fills (call_soon_threadsafe). Streams are
server-sent events in OpenAI's chunk format ending with `data: [DONE]`. A client that goes away
(a closed stream, or a dropped connection while waiting for a whole completion) cancels its
request, which frees its batch slot and cache blocks at the engine's next step.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from typing import AsyncIterator, Optional

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST

from jint8.errors import EngineStoppedError, InvalidRequestError, QueueFullError
from jint8.serve.config import SamplingOptions
from jint8.serve.engine import Engine
from jint8.serve.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    error_body,
    validation_param,
)
from jint8.serve.text import TextAssembler

# a non-stream request checks this often whether its client is still connected
_DISCONNECT_POLL_S = 0.2


class _Aborted(Exception):
    """The engine ended the request without a result (shutdown, a failed step)."""


class _Generation:
    """One request's tokens, carried from the engine thread to the event loop."""

    def __init__(self, engine: Engine, tokenizer, prompt_ids: list, options: SamplingOptions, stop: list):
        self._loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue = asyncio.Queue()
        self._engine = engine
        self.prompt_tokens = len(prompt_ids)
        self.text = TextAssembler(tokenizer, stop)
        self.finish_reason: Optional[str] = None
        self.id = engine.submit(prompt_ids, options, self._sink)

    def _sink(self, tokens, finish_reason) -> None:  # on the engine thread
        self._loop.call_soon_threadsafe(self._queue.put_nowait, (tokens, finish_reason))

    async def pieces(self) -> AsyncIterator[str]:
        """Text as it becomes final; sets finish_reason (stop strings end the request early)."""
        while self.finish_reason is None:
            tokens, reason = await self._queue.get()
            piece = self.text.add(tokens)
            if self.text.stopped:
                self.finish_reason = "stop"
                self._engine.cancel(self.id, "stop")
            elif reason == "abort":
                raise _Aborted("the request was cancelled by the server (shutting down)")
            elif reason is not None:
                self.finish_reason = reason
                piece += self.text.finish()
            if piece:
                yield piece

    def cancel(self) -> None:
        if self.finish_reason is None:
            self._engine.cancel(self.id)

    def usage(self) -> dict:
        completion = self.text.num_tokens
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": completion,
                "total_tokens": self.prompt_tokens + completion}


def create_app(engine: Engine, tokenizer, model_name: str, *, queue_full_status: int = 429,
               default_max_tokens: int = 16, shutdown_timeout: float = 30.0) -> FastAPI:
    """The FastAPI app serving `engine` (started and stopped with the app's lifespan).

    queue_full_status: 429 (OpenAI's rate-limit answer, clients retry) or 503 for a full queue.
    default_max_tokens: /v1/completions' max_tokens when a request names none (OpenAI's 16);
    chat completions default to the rest of the context."""
    if queue_full_status not in (429, 503):
        raise ValueError(f"queue_full_status={queue_full_status} must be 429 or 503")
    created = int(time.time())

    @contextlib.asynccontextmanager
    async def lifespan(app):
        engine.start()
        yield
        # uvicorn has let in-flight responses finish (or cancelled them) before this runs
        await asyncio.to_thread(engine.shutdown, cancel=True, timeout=shutdown_timeout)

    app = FastAPI(title="jint8", lifespan=lifespan)

    @app.exception_handler(RequestValidationError)
    async def _invalid_body(request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {"loc": ("body",), "msg": "invalid body"}
        param = validation_param(tuple(first.get("loc", ())))
        return JSONResponse(error_body(f"{param}: {first.get('msg')}", param=param), status_code=400)

    @app.exception_handler(InvalidRequestError)
    async def _invalid_request(request, exc: InvalidRequestError):
        return JSONResponse(error_body(str(exc), param=exc.param), status_code=400)

    @app.exception_handler(QueueFullError)
    async def _queue_full(request, exc: QueueFullError):
        return JSONResponse(error_body(f"the server is busy: {exc}", "rate_limit_exceeded",
                                       code="rate_limit_exceeded"), status_code=queue_full_status)

    @app.exception_handler(EngineStoppedError)
    async def _stopped(request, exc: EngineStoppedError):
        return JSONResponse(error_body(str(exc), "server_error"), status_code=503)

    @app.get("/health")
    async def health():
        alive = engine.is_running
        return JSONResponse({"status": "ok" if alive else "stopped"}, status_code=200 if alive else 503)

    @app.get("/metrics")
    async def metrics():
        return Response(engine.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models():
        return {"object": "list",
                "data": [{"id": model_name, "object": "model", "created": created, "owned_by": "jint8"}]}

    def check_model(name: Optional[str]) -> None:
        if name is not None and name != model_name:
            raise InvalidRequestError(f"model={name!r} is not served here (serving {model_name!r})", "model")

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        check_model(body.model)
        prompt_ids = _chat_prompt_ids(tokenizer, body)
        options = body.sampling(max(1, engine.max_request_tokens - len(prompt_ids)))
        engine.check_prompt(prompt_ids, options, "messages")
        generation = _Generation(engine, tokenizer, prompt_ids, options, body.stop_strings())
        return await _respond(generation, body, request, "chat.completion", model_name)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        check_model(body.model)
        prompt_ids = _completion_prompt_ids(tokenizer, body.prompt)
        options = body.sampling(default_max_tokens)
        engine.check_prompt(prompt_ids, options, "prompt")
        generation = _Generation(engine, tokenizer, prompt_ids, options, body.stop_strings())
        prefix = body.prompt if body.echo and isinstance(body.prompt, str) else ""
        return await _respond(generation, body, request, "text_completion", model_name, prefix)

    return app


def _chat_prompt_ids(tokenizer, body: ChatCompletionRequest) -> list:
    if not getattr(tokenizer, "chat_template", None):
        raise InvalidRequestError("this model's tokenizer has no chat template; use /v1/completions",
                                  "messages")
    messages = [{"role": m.role, "content": m.text()} for m in body.messages]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _completion_prompt_ids(tokenizer, prompt) -> list:
    if isinstance(prompt, list) and all(isinstance(p, int) for p in prompt) and prompt:
        return list(prompt)
    if isinstance(prompt, list):
        if len(prompt) != 1:
            raise InvalidRequestError(f"prompt is a list of {len(prompt)} strings: only one prompt per "
                                      "request is supported", "prompt")
        prompt = prompt[0]
    return list(tokenizer(prompt)["input_ids"])


def _choice(kind: str, text: str, finish_reason, *, delta: bool, first: bool = False) -> dict:
    if kind == "chat.completion":
        if delta:
            message = {"role": "assistant", "content": text} if first else {"content": text}
            return {"index": 0, "delta": message, "finish_reason": finish_reason, "logprobs": None}
        return {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish_reason,
                "logprobs": None}
    return {"index": 0, "text": text, "finish_reason": finish_reason, "logprobs": None}


async def _respond(generation: _Generation, body, request: Request, kind: str, model_name: str, prefix: str = ""):
    head = {"id": f"{'chatcmpl' if kind == 'chat.completion' else 'cmpl'}-{uuid.uuid4().hex}",
            "created": int(time.time()), "model": model_name}
    if body.stream:
        return StreamingResponse(_stream(generation, body, head, kind, prefix), media_type="text/event-stream")
    collect = asyncio.ensure_future(_collect(generation))
    try:
        while not collect.done():
            await asyncio.wait({collect}, timeout=_DISCONNECT_POLL_S)
            if not collect.done() and await request.is_disconnected():
                generation.cancel()
                collect.cancel()
                return Response(status_code=499)  # nobody reads it; the slot is freed
        text = prefix + collect.result()
    except _Aborted as e:
        return JSONResponse(error_body(str(e), "server_error"), status_code=503)
    finally:
        collect.cancel()
    return {**head, "object": kind, "choices": [_choice(kind, text, generation.finish_reason, delta=False)],
            "usage": generation.usage()}


async def _collect(generation: _Generation) -> str:
    return "".join([piece async for piece in generation.pieces()])


def _sse(payload: dict) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


async def _stream(generation: _Generation, body, head: dict, kind: str, prefix: str) -> AsyncIterator[str]:
    chunk = {**head, "object": "chat.completion.chunk" if kind == "chat.completion" else "text_completion"}
    usage_field = {"usage": None} if body.include_usage else {}
    try:
        first = True
        if kind == "chat.completion" or prefix:  # the role (chat) or the echoed prompt comes first
            yield _sse({**chunk, "choices": [_choice(kind, prefix, None, delta=True, first=True)], **usage_field})
            first = False
        async for piece in generation.pieces():
            yield _sse({**chunk, "choices": [_choice(kind, piece, None, delta=True, first=first)], **usage_field})
            first = False
        final = _choice(kind, "", generation.finish_reason, delta=True, first=first)
        if kind == "chat.completion":
            final["delta"] = {}
        yield _sse({**chunk, "choices": [final], **usage_field})
        if body.include_usage:
            yield _sse({**chunk, "choices": [], "usage": generation.usage()})
    except _Aborted as e:
        yield _sse(error_body(str(e), "server_error"))
    finally:
        generation.cancel()  # a client that went away lands here too (the generator is closed)
    yield "data: [DONE]\n\n"

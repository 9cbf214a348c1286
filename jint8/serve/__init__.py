"""Serving: a continuous-batching engine over a paged KV cache and an OpenAI-compatible HTTP server.

engine.py runs the scheduler and the compiled step on one thread; paged_cache.py keeps the block
tables; server.py is the FastAPI app, runner.py runs it (`serve`, `ServerThread`; `jint8 serve`).
The HTTP side needs the `serve` extra (fastapi, uvicorn) and loads on first use; the engine needs
only jint8.
"""

from jint8.serve.config import EngineConfig, SamplingOptions
from jint8.serve.engine import Engine
from jint8.serve.paged_cache import BlockAllocator

_HTTP_NAMES = {"serve": "runner", "ServerThread": "runner", "build_app": "runner", "create_app": "server"}


def __getattr__(name):
    if name in _HTTP_NAMES:
        import importlib

        return getattr(importlib.import_module(f"jint8.serve.{_HTTP_NAMES[name]}"), name)
    raise AttributeError(f"module 'jint8.serve' has no attribute {name!r}")


__all__ = ["BlockAllocator", "Engine", "EngineConfig", "SamplingOptions", "ServerThread", "build_app", "create_app",
           "serve"]

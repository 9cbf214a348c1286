"""Serving: a continuous-batching engine over a paged KV cache and an OpenAI-compatible HTTP server.

engine.py runs the scheduler and the compiled step on one thread; paged_cache.py keeps the block
tables; server.py is the FastAPI app (`jint8 serve`). The HTTP side needs the `serve` extra
(fastapi, uvicorn); the engine needs only jint8.
"""

from jint8.serve.engine import Engine, EngineConfig, SamplingOptions
from jint8.serve.paged_cache import BlockAllocator

__all__ = ["BlockAllocator", "Engine", "EngineConfig", "SamplingOptions"]

"""Running the app: `serve` blocks (the CLI), `ServerThread` serves in the background (notebooks, tests)."""

from __future__ import annotations

import threading
import time
from typing import Optional

import uvicorn

from jint8.serve.engine import Engine, EngineConfig
from jint8.serve.server import create_app


def _config(app, host: str, port: int, graceful_timeout: float) -> uvicorn.Config:
    # timeout_graceful_shutdown: on SIGINT/SIGTERM uvicorn stops accepting, lets open responses
    # run this long, then cancels them (which cancels their requests in the engine).
    return uvicorn.Config(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=graceful_timeout,
                          lifespan="on")


def build_app(model, params, tokenizer, *, model_name: str, engine_config: EngineConfig = EngineConfig(),
              queue_full_status: int = 429, warmup: bool = False):
    """(Engine, FastAPI app) for a model and its tokenizer; the engine stops with the app."""
    eos = () if tokenizer.eos_token_id is None else (int(tokenizer.eos_token_id),)
    engine = Engine(model, params, engine_config, eos_token_ids=eos)
    if warmup:
        engine.warmup()
    return engine, create_app(engine, tokenizer, model_name, queue_full_status=queue_full_status)


def serve(model, params, tokenizer, *, model_name: str = "jint8", host: str = "127.0.0.1", port: int = 8000,
          engine_config: EngineConfig = EngineConfig(), queue_full_status: int = 429, warmup: bool = True,
          graceful_timeout: float = 30.0) -> None:
    """Serve the OpenAI API until SIGINT/SIGTERM, then finish (or, past graceful_timeout, cancel)
    the requests in flight."""
    _, app = build_app(model, params, tokenizer, model_name=model_name, engine_config=engine_config,
                       queue_full_status=queue_full_status, warmup=warmup)
    uvicorn.Server(_config(app, host, port, graceful_timeout)).run()


class ServerThread:
    """The server on a background thread: `with ServerThread(engine, app) as server: server.url`.
    Port 0 takes a free ephemeral port."""

    def __init__(self, engine: Engine, app, host: str = "127.0.0.1", port: int = 0, graceful_timeout: float = 10.0):
        self.engine = engine
        self._server = uvicorn.Server(_config(app, host, port, graceful_timeout))
        self._server.install_signal_handlers = lambda: None  # signals belong to the main thread
        self._thread: Optional[threading.Thread] = None
        self._url = ""

    @property
    def url(self) -> str:
        """http://host:port, the port the server bound (known once started)."""
        return self._url

    def start(self, timeout: float = 60.0) -> "ServerThread":
        self._thread = threading.Thread(target=self._server.run, name="jint8-http", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the jint8 server did not start")
            time.sleep(0.01)
        host, port = self._server.servers[0].sockets[0].getsockname()[:2]
        self._url = f"http://{host}:{port}"
        return self

    def stop(self, timeout: float = 30.0) -> None:
        """Graceful shutdown: no new connections, open responses finish, then the engine stops."""
        self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout)

    def __enter__(self) -> "ServerThread":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

"""The HTTP side of `densa serve`: a FastAPI app speaking the OpenAI API in front of the batching engine.

Routes: POST /v1/completions and /v1/chat/completions (both with `stream: true` as server-sent events;
densa/serve/handlers.py), GET /v1/models, GET /health, GET /metrics (Prometheus text), and vLLM's POST /tokenize,
POST /detokenize and GET /tokenizer_info, through which lm-eval's `local-completions` model tokenizes with the
server's own tokenizer. With `chat_only` the legacy completions and the tokenizer routes are refused, as a hosted
chat model's API does. Every error is OpenAI's body with a 4xx (or, for a bug, 500) status.

`Guard` reads every request body before the app sees it, so a body over `max_request_bytes` is answered 413
without being held in memory (a declared Content-Length over the limit: before a byte is read).
"""

from __future__ import annotations

import secrets
from collections.abc import Callable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI
from fastapi import Request as HTTPRequest
from fastapi.responses import JSONResponse, PlainTextResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from densa.model.model import DensaModel
from densa.serve.engine import Engine
from densa.serve.handlers import OpenAIHandlers, ServeConfig, TextCodec
from densa.serve.metrics import ServerMetrics
from densa.serve.protocol import APIError

__all__ = ["ServeConfig", "build_app"]

ROUTES = ("/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/metrics", "/tokenize",
          "/detokenize", "/tokenizer_info")


def error_response(exc: APIError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status)


class Guard:
    """ASGI middleware: the bearer-key check, the request-size limit and per-route request counting. A pure ASGI
    layer (not Starlette's BaseHTTPMiddleware), so streaming responses and client disconnects pass through
    untouched."""

    def __init__(self, app: Any, api_key: str | None, metrics: ServerMetrics, max_request_bytes: int) -> None:
        self.app, self.metrics, self.limit = app, metrics, max_request_bytes
        self.expected = f"Bearer {api_key}".encode() if api_key else None

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        route = scope["path"] if scope["path"] in ROUTES else "other"  # bounded label values
        headers = dict(scope["headers"])
        if self.expected is not None and scope["path"] != "/health":
            if not secrets.compare_digest(headers.get(b"authorization", b""), self.expected):  # constant time
                self.metrics.count_request(route, 401)
                error = APIError(401, "missing or wrong API key: send 'Authorization: Bearer KEY'",
                                 "authentication_error", code="invalid_api_key")
                return await error_response(error)(scope, receive, send)
        try:
            body = await self.read_body(headers.get(b"content-length"), receive)
        except APIError as exc:  # 413; the server discards the rest of the body, so the client reads the answer
            self.metrics.count_request(route, exc.status)
            return await error_response(exc)(scope, receive, send)
        if body is None:  # the client left while sending
            return self.metrics.count_request(route, 499)
        replayed = False

        async def replay() -> dict:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # then: the disconnect, when it comes

        status = 500

        async def send_status(message: dict) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, replay, send_status)
        finally:
            self.metrics.count_request(route, status)

    async def read_body(self, declared: bytes | None, receive: Callable) -> bytes | None:
        """The whole body, or APIError 413 as soon as it is known to exceed the limit; None if the client left."""
        def too_large(size: str) -> APIError:
            return APIError(413, f"the request body ({size}) is larger than this server's limit of {self.limit} "
                            "bytes (densa serve --max-request-bytes)", code="request_too_large")

        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            raise too_large(f"{int(declared)} bytes")
        body = bytearray()
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            body += message.get("body", b"")
            if len(body) > self.limit:
                raise too_large(f"{len(body)} bytes read so far")
            if not message.get("more_body", False):
                return bytes(body)


def build_app(model: DensaModel, tokenizer: Any, cfg: ServeConfig, engine_thread: bool = True) -> FastAPI:
    """The server for one model. With `engine_thread` the engine starts in its own thread with the app's lifespan;
    without it the caller runs `app.state.engine.run()` on the thread that loaded the model (`densa serve` does:
    see `Engine.run`). Either way the lifespan's end stops the engine."""
    vocab = model.config.vocab_size
    if len(tokenizer) > vocab:  # its ids past the vocabulary would be index errors inside the model
        raise ValueError(f"the tokenizer has {len(tokenizer)} entries but the model's vocabulary has {vocab}: serve "
                         "the model with the tokenizer it was trained with")
    if cfg.max_request_bytes < 1:
        raise ValueError(f"max_request_bytes must be >= 1, got {cfg.max_request_bytes}")
    metrics = ServerMetrics()
    engine = Engine(model, metrics, max_batch=cfg.max_batch, max_queue=cfg.max_queue, usd_per_hour=cfg.usd_per_hour,
                    compile=cfg.compile)
    codec = TextCodec(tokenizer)
    handlers = OpenAIHandlers(engine, codec, cfg, vocab)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if engine_thread:
            engine.start()
        yield
        engine.stop()
        handlers.close()

    app = FastAPI(title="densa serve", lifespan=lifespan)
    app.state.engine, app.state.metrics, app.state.config = engine, metrics, cfg
    app.add_api_route("/v1/completions", handlers.completions, methods=["POST"])
    app.add_api_route("/v1/chat/completions", handlers.chat, methods=["POST"])

    @app.exception_handler(APIError)
    async def _api_error(request: HTTPRequest, exc: APIError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: HTTPRequest, exc: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return error_response(APIError(exc.status_code, str(exc.detail), kind))

    @app.exception_handler(Exception)
    async def _internal(request: HTTPRequest, exc: Exception) -> JSONResponse:
        return error_response(APIError(500, f"internal error: {type(exc).__name__}: {exc}", "server_error"))

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "model": cfg.model_name, "active": engine.active, "queue_depth": engine.queue_depth}

    @app.get("/metrics")
    async def prometheus() -> PlainTextResponse:
        return PlainTextResponse(metrics.render(engine.queue_depth, engine.active, cfg.max_batch),
                                 media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [{"id": cfg.model_name, "object": "model", "created": 0,
                                            "owned_by": "densa", "max_model_len": cfg.context}]}

    if not cfg.chat_only:  # a hosted chat API has no tokenizer routes: the chat-only server is its stand-in
        @app.get("/tokenizer_info")
        async def tokenizer_info() -> dict:
            tok = codec.tok
            return {"eos_token": tok.eos_token, "bos_token": tok.bos_token, "pad_token": tok.pad_token,
                    "chat_template": getattr(tok, "chat_template", None), "model_max_length": cfg.context}

        @app.post("/tokenize")
        async def tokenize(request: HTTPRequest) -> JSONResponse:
            return await handlers.offload(handlers.tokenize, await request.body())

        @app.post("/detokenize")
        async def detokenize(request: HTTPRequest) -> JSONResponse:
            return await handlers.offload(handlers.detokenize, await request.body())

    app.add_middleware(Guard, api_key=cfg.api_key, metrics=metrics, max_request_bytes=cfg.max_request_bytes)
    return app

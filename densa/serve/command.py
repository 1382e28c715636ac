"""`densa serve MODEL`: serve any model the resolver accepts over the OpenAI API (docs/serving.md).

Binds 127.0.0.1 unless told otherwise: exposing a model to a network is a decision the user makes with --host,
ideally together with --api-key.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import threading
import time
from pathlib import Path

import uvicorn
from fastapi import FastAPI

from densa.cost import HARDWARE_USD_PER_HOUR, usd_per_hour
from densa.serve.handlers import DEFAULT_MAX_REQUEST_BYTES


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", metavar="MODEL", help="a densa checkpoint or export dir, an HF Llama dir, a .gguf "
                        "file or the alias smollm2-135m")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind; 0.0.0.0 exposes the server to the "
                        "network")
    parser.add_argument("--port", type=int, default=8000, help="TCP port; 0 picks a free one (printed at start)")
    parser.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on every route but /health; "
                        "without it the DENSA_API_KEY environment variable is used, and without that no key")
    parser.add_argument("--served-model-name", help="the model id clients send; None = the MODEL argument's "
                        "last path component")
    parser.add_argument("--tokenizer", metavar="DIR", help="tokenizer directory; None = the model's own")
    parser.add_argument("--max-batch", type=int, default=8, help="requests decoded together in one forward")
    parser.add_argument("--max-queue", type=int, default=64, help="requests waiting for a batch slot before new "
                        "ones get 429")
    parser.add_argument("--timeout", type=float, default=300.0, help="per-request limit in seconds, queueing "
                        "included; past it the request ends with 408")
    parser.add_argument("--context", type=int, help="prompt + completion tokens per request; None = the "
                        "model's max_position_embeddings")
    parser.add_argument("--max-tokens-limit", type=int, default=4096, help="largest max_tokens a request may ask")
    parser.add_argument("--max-request-bytes", type=int, default=DEFAULT_MAX_REQUEST_BYTES,
                        help="largest request body in bytes; larger ones get 413 before they are read (default "
                        "1 MiB; lm-eval batches of token-id prompts need about 7 bytes per token)")
    parser.add_argument("--chat-only", action="store_true", help="serve /v1/chat/completions only: "
                        "/v1/completions answers 404 as a hosted chat model does, and the tokenizer routes are off "
                        "(a stand-in for a hosted API in `densa eval`)")
    parser.add_argument("--hardware", default="cpu-2core", choices=list(HARDWARE_USD_PER_HOUR),
                        help="hardware whose list price meters each request's $ cost (densa/cost.py)")
    parser.add_argument("--usd-per-hour", type=float, help="hardware price per hour; overrides --hardware")
    parser.add_argument("--compile", choices=["auto", "on", "off"], default="auto",
                        help="torch.compile the decode step (densa/model/compile.py): auto = on a GPU only; on = "
                        "also on CPU (a compile of tens of seconds to minutes first; pays on long runs)")
    parser.add_argument("--threads", type=int, help="torch CPU threads; None = torch's choice")
    parser.add_argument("--log-level", default="warning", choices=["debug", "info", "warning", "error"],
                        help="uvicorn log level (info logs every request)")


def main(args: argparse.Namespace) -> None:
    import torch

    from densa.data.tokenizer import load_tokenizer
    from densa.resolve import resolve
    from densa.serve.app import ServeConfig, build_app

    if args.threads:
        torch.set_num_threads(args.threads)
    for flag in ("max_batch", "max_queue", "max_tokens_limit", "max_request_bytes"):
        if getattr(args, flag) < 1:
            raise ValueError(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    if args.timeout <= 0:
        raise ValueError(f"--timeout must be > 0, got {args.timeout}")
    if not 0 <= args.port <= 65535:  # socket.bind would raise OverflowError, a traceback rather than a message
        raise ValueError(f"--port must be in 0..65535, got {args.port}")
    if args.context is not None and args.context < 2:
        raise ValueError(f"--context must be >= 2 (a prompt token and a completion token), got {args.context}")
    resolved = resolve(args.model)
    tokenizer = load_tokenizer(args.tokenizer) if args.tokenizer else resolved.tokenizer
    if tokenizer is None:
        raise ValueError(f"{args.model} ships no tokenizer; pass --tokenizer DIR")
    context = args.context or resolved.model.config.max_position_embeddings
    api_key = args.api_key or os.environ.get("DENSA_API_KEY") or None  # not a flag default: --help would print it
    cfg = ServeConfig(model_name=args.served_model_name or Path(args.model.rstrip("/")).name, api_key=api_key,
                      max_batch=args.max_batch, max_queue=args.max_queue, timeout_s=args.timeout,
                      max_tokens_limit=args.max_tokens_limit, context=context,
                      usd_per_hour=usd_per_hour(args.hardware, args.usd_per_hour), hardware=args.hardware,
                      max_request_bytes=args.max_request_bytes, chat_only=args.chat_only, compile=args.compile)
    app = build_app(resolved.model, tokenizer, cfg, engine_thread=False)
    sock = bind(args.host, args.port)
    host, port = sock.getsockname()[:2]
    key = ", API key required" if cfg.api_key else ""
    chat = ", chat only" if cfg.chat_only else ""
    print(f"densa serve: {cfg.model_name!r} on http://{host}:{port}/v1 (batch {cfg.max_batch}, queue "
          f"{cfg.max_queue}, context {cfg.context}, ${cfg.usd_per_hour}/h{key}{chat})", flush=True)
    run_on_main_thread(app, uvicorn.Server(uvicorn.Config(app, log_level=args.log_level)), sock)


def run_on_main_thread(app: FastAPI, server: uvicorn.Server, sock: socket.socket) -> None:
    """Serve HTTP from a thread and run the engine here, on the thread that loaded the model: a second thread
    running torch's parallel kernels would make libgomp stop spin-waiting for the whole process (`Engine.run`).
    Ctrl-C or SIGTERM shuts down as uvicorn does on its own: stop accepting, finish the requests in flight (the
    engine keeps decoding them), then stop; a second signal stops at once."""
    engine = app.state.engine

    def serve_http() -> None:
        try:
            server.run(sockets=[sock])
        finally:  # whatever ended the server (a signal, a startup failure) ends the engine loop too
            engine.stop()

    def on_signal(signum: int, frame: object) -> None:
        if server.should_exit:
            server.force_exit = True
            engine.stop()
        server.should_exit = True

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    http = threading.Thread(target=serve_http, name="densa-http", daemon=True)
    http.start()
    try:
        engine.run()
    finally:
        server.should_exit = True
        http.join(timeout=15)
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def bind(host: str, port: int) -> socket.socket:
    """A listening socket (port 0: a free port), bound before uvicorn starts so the real port is known."""
    try:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        return socket.create_server((host, port), family=family, backlog=2048)
    except OSError as exc:
        raise OSError(f"cannot listen on {host}:{port}: {exc.strerror}") from None


class BackgroundServer:
    """Run an app on 127.0.0.1 in a thread (tests, benchmarks): `with BackgroundServer(app) as url: ...`."""

    def __init__(self, app: FastAPI, host: str = "127.0.0.1", port: int = 0) -> None:
        self.sock = bind(host, port)
        self.url = "http://{}:{}".format(*self.sock.getsockname()[:2])
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="error"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self) -> str:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the server did not start")
            time.sleep(0.01)
        return self.url

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=15)
        self.sock.close()

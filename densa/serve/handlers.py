"""The OpenAI routes' logic: body → engine requests → JSON response or server-sent events.

Everything that grows with the request runs in a small thread pool, never on the event loop: JSON parsing,
tokenization (a prompt of 1 MB is seconds of tokenizer work) and the detokenization of token-id prompts. The loop
only submits to the engine and relays its events, so /health and running streams keep answering while a large
prompt is tokenized. Each thread (the pool's, the engine's, the loop's) tokenizes with its own copy of the
tokenizer (`TextCodec`), so nobody waits for a lock another thread holds for seconds.

Each prompt becomes one engine `Request`; the engine's events cross from its thread into the event loop through
`loop.call_soon_threadsafe` (`_Pending`). When a client goes away (a streaming response is cancelled, or the
polled `is_disconnected()` of a non-streaming one turns true) its requests are cancelled, and the engine frees
their batch slots before its next step.
"""

from __future__ import annotations

import asyncio
import copy
import json
import math
import threading
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

from fastapi import Request as HTTPRequest
from fastapi.responses import JSONResponse, Response, StreamingResponse

from densa.serve.engine import Engine, Event, QueueFull, Request, SamplingParams, TokenLogprob
from densa.serve.protocol import (
    APIError,
    ChatRequest,
    CompletionRequest,
    DetokenizeRequest,
    TokenizeRequest,
    chat_logprobs,
    completion_logprobs,
    envelope,
    merge_usage,
    parse_body,
    sse,
)

OPENAI_DEFAULT_MAX_TOKENS = 16  # /v1/completions without max_tokens
DEFAULT_MAX_REQUEST_BYTES = 1 << 20  # 1 MiB: thousands of context windows of text; raise it with --max-request-bytes
PREP_THREADS = 4  # requests parsed and tokenized at once, off the event loop
CHAT_ONLY_MESSAGE = ("This is a chat model and not supported in the v1/completions endpoint. Did you mean to use "
                     "v1/chat/completions?")  # OpenAI's own words for a chat model on the legacy route
T = TypeVar("T")


@dataclass
class ServeConfig:
    model_name: str  # the id clients put in `model`
    api_key: str | None = None  # when set, every route but /health needs `Authorization: Bearer KEY`
    max_batch: int = 8  # rows decoded together
    max_queue: int = 64  # requests waiting for a row; one more is answered 429
    timeout_s: float = 300.0  # per request, queueing included; past it: 408
    max_tokens_limit: int = 4096  # largest max_tokens accepted
    default_max_tokens: int = 256  # chat requests that set no limit (capped by the context)
    context: int = 2048  # prompt + completion tokens per request
    usd_per_hour: float = 0.10
    hardware: str = "cpu-2core"
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES  # larger bodies get 413 before they are read
    chat_only: bool = False  # refuse /v1/completions and the tokenizer routes, as hosted chat APIs do
    compile: str = "auto"  # the decode-step switch (densa/model/compile.py): auto, on or off


def cost_headers(usage: dict) -> dict[str, str]:
    """What a request cost, as response headers (for clients that drop unknown `usage` fields)."""
    x = usage["x_densa"]
    return {"x-densa-cost-usd": repr(float(x["usd"])), "x-densa-flops": repr(float(x["flops"]))}


def max_token_bytes(tokenizer: Any) -> int | None:
    """The most bytes of text one token can stand for, when that is knowable: a byte-level BPE (one character of its
    token strings per byte) that keeps every byte of the input (no normalizer, pre-tokenizers that only split, no
    added token that swallows the spaces beside it). Then a text of n bytes is at least n / this many tokens, and a
    prompt far past the context is refused without tokenizing it. None for any other tokenizer."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    spec = json.loads(backend.to_str())
    pre = spec.get("pre_tokenizer") or {}
    parts = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    kinds = [p.get("type") for p in parts]
    added = spec.get("added_tokens") or []
    if (spec.get("normalizer") is not None or spec["model"].get("type") != "BPE" or "ByteLevel" not in kinds
            or not set(kinds) <= {"ByteLevel", "Digits", "Split"} or any(p.get("behavior") == "Removed" for p in parts)
            or any(t.get("lstrip") or t.get("rstrip") for t in added)):
        return None
    return max([*map(len, spec["model"]["vocab"]), *(len(t["content"].encode()) for t in added)])


class TextCodec:
    """The tokenizer, one copy per thread. A Hugging Face fast tokenizer must not be entered from two threads at once
    ("Already borrowed"), and one copy behind a lock would make the engine thread, which decodes at every step, wait
    while a worker encodes a long prompt. Copies are made on a thread's first use (milliseconds); `tok`, the
    original, is only read (special tokens, chat template) and copied."""

    def __init__(self, tokenizer: Any) -> None:
        self.tok, self._local, self._copying, self._pieces = tokenizer, threading.local(), threading.Lock(), {}
        ids = [tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|im_end|>")]
        self.chat_stops = {i for i in ids if isinstance(i, int) and i != tokenizer.unk_token_id}
        self.eos = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
        self.max_token_bytes = max_token_bytes(tokenizer)

    def _own(self) -> Any:
        tok = getattr(self._local, "tok", None)
        if tok is None:
            with self._copying:  # copying reads the original: one copy at a time
                tok = self._local.tok = copy.deepcopy(self.tok)
        return tok

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(self._own()(text, add_special_tokens=add_special_tokens)["input_ids"])

    def fewest_tokens(self, text: str) -> int:
        """A lower bound on the tokens of `text`, without tokenizing it (0 when the tokenizer allows none)."""
        return math.ceil(len(text.encode("utf-8")) / self.max_token_bytes) if self.max_token_bytes else 0

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self._own().decode(ids, skip_special_tokens=skip_special_tokens)

    def token_text(self, token_id: int) -> str:
        """One token as text, special tokens included (what logprobs report)."""
        if token_id not in self._pieces:
            self._pieces[token_id] = self.decode([token_id], skip_special_tokens=False)
        return self._pieces[token_id]

    def chat_prompt(self, messages: list[dict[str, str]], check: Callable[[int], None] = lambda n: None) -> list[int]:
        """The messages through the chat template, tokenized; `check(lower bound of the tokens)` runs first."""
        if not getattr(self.tok, "chat_template", None):
            raise APIError(400, "this model's tokenizer has no chat template; use /v1/completions", param="messages")
        from jinja2 import TemplateError

        try:
            text = self._own().apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except (TemplateError, ValueError, TypeError, KeyError) as exc:  # e.g. "roles must alternate": a 400
            raise APIError(400, f"the model's chat template rejected the messages: {exc}", param="messages") from None
        check(self.fewest_tokens(text))
        return self.encode(text, add_special_tokens=False)


class _Pending:
    """The event-loop end of one engine request."""

    def __init__(self) -> None:
        self.loop, self.queue = asyncio.get_running_loop(), asyncio.Queue()

    def emit(self, event: Event) -> None:  # called from the engine thread
        self.loop.call_soon_threadsafe(self.queue.put_nowait, event)

    async def events(self) -> AsyncIterator[Event]:
        while True:
            event = await self.queue.get()
            yield event
            if event.kind != "delta":
                return


Job = tuple[Request, _Pending]


@dataclass
class _Result:
    text: str
    logprobs: list[TokenLogprob]
    finish_reason: str
    usage: dict


@dataclass
class _Completion:
    """A /v1/completions body, checked and tokenized (in a worker thread)."""

    body: CompletionRequest
    prompts: list[list[int]]
    echoes: list[str]  # the prompts' texts when `echo`, else ""
    max_tokens: int


@dataclass
class _Chat:
    body: ChatRequest
    prompt: list[int]
    max_tokens: int


class OpenAIHandlers:
    """/v1/completions and /v1/chat/completions for one model and engine."""

    def __init__(self, engine: Engine, codec: TextCodec, cfg: ServeConfig, vocab_size: int) -> None:
        self.engine, self.codec, self.cfg, self.vocab = engine, codec, cfg, vocab_size
        self.pool = ThreadPoolExecutor(PREP_THREADS, thread_name_prefix="densa-prepare")

    async def offload(self, fn: Callable[..., T], *args: Any) -> T:
        """Run `fn(*args)` in the preparation pool: whatever grows with the request stays off the event loop."""
        return await asyncio.get_running_loop().run_in_executor(self.pool, fn, *args)

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)

    # ---- checks ----
    def check_model(self, name: str) -> None:
        if name != self.cfg.model_name:
            raise APIError(404, f"model {name!r} is not served here; this server serves {self.cfg.model_name!r}",
                           param="model", code="model_not_found")

    def check_ids(self, ids: list[int], param: str) -> None:
        bad = [i for i in ids if not 0 <= i < self.vocab]
        if bad:
            raise APIError(400, f"token id {bad[0]} is outside the vocabulary [0, {self.vocab})", param=param)

    def check_max_tokens(self, max_tokens: int) -> None:
        if max_tokens > self.cfg.max_tokens_limit:
            raise APIError(400, f"max_tokens={max_tokens} is above this server's limit of {self.cfg.max_tokens_limit}",
                           param="max_tokens", code="invalid_value")

    def check_context(self, n_prompt: int, max_tokens: int, param: str, at_least: bool = False) -> None:
        """Prompt + completion within the context; `at_least`: `n_prompt` is a lower bound, not yet a count."""
        if n_prompt + max_tokens > self.cfg.context:
            what = f"{'at least ' if at_least else ''}{n_prompt} prompt tokens{' (by its length)' if at_least else ''}"
            raise APIError(400, f"{what} + max_tokens={max_tokens} exceed the context of {self.cfg.context} tokens",
                           param=param, code="context_length_exceeded")

    def check_budget(self, n_prompt: int, max_tokens: int, param: str) -> None:
        if n_prompt == 0:
            raise APIError(400, "the prompt is empty", param=param)
        self.check_max_tokens(max_tokens)
        self.check_context(n_prompt, max_tokens, param)

    def completion_prompts(self, prompt: Any, echo: bool, max_tokens: int) -> tuple[list[list[int]], list[str]]:
        """The `prompt` field in any of its four forms → token lists, and their texts when `echo` (else ""). A text
        that cannot fit the context with `max_tokens` is refused before it is tokenized."""
        if isinstance(prompt, str):
            prompt = [prompt]
        if not prompt:
            raise APIError(400, "the prompt list is empty", param="prompt")
        if isinstance(prompt[0], int):
            prompt = [prompt]
        if isinstance(prompt[0], str):
            for text in prompt:
                self.check_context(self.codec.fewest_tokens(text), max_tokens, "prompt", at_least=True)
            return [self.codec.encode(p) for p in prompt], list(prompt) if echo else [""] * len(prompt)
        for ids in prompt:
            self.check_ids(ids, "prompt")
        return [list(ids) for ids in prompt], [self.codec.decode(ids) if echo else "" for ids in prompt]

    # ---- request preparation (worker threads) ----
    def prepare_completion(self, raw: bytes) -> _Completion:
        body: CompletionRequest = parse_body(raw, CompletionRequest)
        if self.cfg.chat_only:  # after parsing: a malformed body is still a 400, as on OpenAI
            raise APIError(404, f"{CHAT_ONLY_MESSAGE} (model {self.cfg.model_name!r} is served with --chat-only)",
                           param="model")
        self.check_model(body.model)
        max_tokens = OPENAI_DEFAULT_MAX_TOKENS if body.max_tokens is None else body.max_tokens
        self.check_max_tokens(max_tokens)
        prompts, echoes = self.completion_prompts(body.prompt, body.echo, max_tokens)
        if body.stream and len(prompts) > 1:
            raise APIError(400, "streaming supports one prompt per request", param="prompt")
        for p in prompts:
            self.check_budget(len(p), max_tokens, "prompt")
        return _Completion(body, prompts, echoes, max_tokens)

    def prepare_chat(self, raw: bytes) -> _Chat:
        body: ChatRequest = parse_body(raw, ChatRequest)
        self.check_model(body.model)
        cfg = self.cfg
        limit = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        if limit is not None:
            self.check_max_tokens(limit)
        prompt = self.codec.chat_prompt([{"role": m.role, "content": m.text()} for m in body.messages],
                                        lambda fewest: self.check_context(fewest, 1 if limit is None else limit,
                                                                          "messages", at_least=True))
        max_tokens = limit if limit is not None else max(1, min(cfg.default_max_tokens, cfg.context - len(prompt)))
        self.check_budget(len(prompt), max_tokens, "messages")
        return _Chat(body, prompt, max_tokens)

    # ---- engine plumbing ----
    def submit(self, prompts: list[list[int]], params: list[SamplingParams]) -> list[Job]:
        """Queue one request per prompt, all or none (a full queue is a 429)."""
        jobs = []
        for prompt, sp in zip(prompts, params, strict=True):
            pending = _Pending()
            jobs.append((Request(prompt, sp, pending.emit, self.cfg.timeout_s, self.codec.decode), pending))
        try:
            for r, _ in jobs:
                self.engine.submit(r)
        except QueueFull as exc:
            for r, _ in jobs:
                r.cancel()
            raise APIError(429, str(exc), "rate_limit_error", code="queue_full") from None
        return jobs

    @staticmethod
    async def _result(pending: _Pending) -> _Result:
        text, logprobs = [], []
        async for ev in pending.events():
            if ev.kind == "error":
                raise APIError(ev.status, ev.message, "timeout" if ev.status == 408 else "server_error")
            text.append(ev.text)
            logprobs.extend(ev.logprobs)
            if ev.kind == "done":
                return _Result("".join(text), logprobs, ev.finish_reason, ev.usage)
        raise RuntimeError("the engine's event stream ended without a result")

    async def collect(self, request: HTTPRequest, jobs: list[Job]) -> list[_Result] | None:
        """Wait for every job; None, with every job cancelled, if the client disconnects first."""
        async def disconnected() -> None:
            while not await request.is_disconnected():
                await asyncio.sleep(0.2)

        results = [asyncio.ensure_future(self._result(p)) for _, p in jobs]
        work = asyncio.ensure_future(asyncio.gather(*results))
        watch = asyncio.ensure_future(disconnected())
        try:
            await asyncio.wait([work, watch], return_when=asyncio.FIRST_COMPLETED)
        finally:
            watch.cancel()
            for r, _ in jobs:
                r.cancel()  # no-op for finished requests; frees the slots of the rest
            # when one prompt failed, the other prompts' waits would pend forever (the engine says nothing more
            # to a cancelled request): a leaked task per failed multi-prompt request
            for task in results:
                task.cancel()
        if not work.done():
            work.cancel()
            return None
        return work.result()

    @staticmethod
    async def stream(job: Job, first: list[dict], chunk: Callable[[Event], dict], include_usage: bool
                     ) -> AsyncIterator[str]:
        """Server-sent events: `first` chunks, one chunk per engine event, then [DONE]. With `include_usage` every
        chunk has `"usage": null` and a last chunk with empty `choices` carries the usage, as OpenAI does; without
        it the chunk with the `finish_reason` carries the usage (densa's extension: curl users and
        `densa bench serve` read it there), so a client never sees the usage twice."""
        req, pending = job
        try:
            for c in first:
                yield sse({**c, "usage": None} if include_usage else c)
            async for ev in pending.events():
                if ev.kind == "error":
                    yield sse(APIError(ev.status, ev.message, "timeout" if ev.status == 408 else "server_error"
                                       ).body())
                    break
                data = chunk(ev)
                if include_usage or ev.usage:
                    data["usage"] = None if include_usage else ev.usage
                yield sse(data)
                if ev.kind == "done" and include_usage:
                    yield sse({**data, "choices": [], "usage": ev.usage})
            yield sse("[DONE]")
        finally:
            req.cancel()  # the client went away (or we are done): free the slot

    # ---- routes ----
    async def completions(self, request: HTTPRequest) -> Response:
        plan = await self.offload(self.prepare_completion, await request.body())
        body, prompts, echoes = plan.body, plan.prompts, plan.echoes
        stops = set() if body.ignore_eos else self.codec.eos
        echo_logprobs = body.echo and body.logprobs is not None
        params = [SamplingParams(plan.max_tokens, body.temperature, body.top_p, body.top_k, body.stop_list(), stops,
                                 body.logprobs, echo_logprobs, body.seed) for _ in prompts]
        jobs = self.submit(prompts, params)
        head = envelope("cmpl-" + jobs[0][0].id, "text_completion", self.cfg.model_name)

        def logprobs(entries: list[TokenLogprob], start: int = 0) -> dict | None:
            return None if body.logprobs is None else completion_logprobs(entries, self.codec.token_text, start)

        if body.stream:
            offset = [0]  # text_offset of the next token: advanced by token texts, as the non-streaming answer is
            # (advancing by the streamed text would be wrong after an echoed prompt, whose text goes in the first
            # chunk but whose tokens come in the next, and where text is held back for a stop string)

            def chunk(ev: Event) -> dict:
                lp = logprobs(ev.logprobs, offset[0])
                if lp is not None:
                    offset[0] += sum(len(piece) for piece in lp["tokens"])
                choice = {"index": 0, "text": ev.text, "logprobs": lp, "finish_reason": ev.finish_reason}
                return {**head, "choices": [choice]}

            first = [{**head, "choices": [{"index": 0, "text": echoes[0], "logprobs": None,
                                           "finish_reason": None}]}] if echoes[0] else []
            include = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(self.stream(jobs[0], first, chunk, include), media_type="text/event-stream")

        results = await self.collect(request, jobs)
        if results is None:
            return Response(status_code=499)  # the client is gone; nobody reads this
        choices = [{"index": i, "text": echoes[i] + res.text, "logprobs": logprobs(res.logprobs),
                    "finish_reason": res.finish_reason} for i, res in enumerate(results)]
        usage = merge_usage([r.usage for r in results])
        return JSONResponse({**head, "choices": choices, "usage": usage}, headers=cost_headers(usage))

    async def chat(self, request: HTTPRequest) -> Response:
        plan = await self.offload(self.prepare_chat, await request.body())
        body = plan.body
        params = SamplingParams(plan.max_tokens, body.temperature, body.top_p, body.top_k, body.stop_list(),
                                self.codec.chat_stops, (body.top_logprobs or 0) if body.logprobs else None, False,
                                body.seed)
        jobs = self.submit([plan.prompt], [params])
        head = envelope("chatcmpl-" + jobs[0][0].id, "chat.completion", self.cfg.model_name)

        def logprobs(entries: list[TokenLogprob]) -> dict | None:
            return chat_logprobs(entries, self.codec.token_text) if body.logprobs else None

        if body.stream:
            head["object"] = "chat.completion.chunk"

            def chunk(ev: Event) -> dict:
                delta = {"content": ev.text} if ev.text or ev.kind == "delta" else {}
                return {**head, "choices": [{"index": 0, "delta": delta, "logprobs": logprobs(ev.logprobs),
                                             "finish_reason": ev.finish_reason}]}

            first = [{**head, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                           "logprobs": None, "finish_reason": None}]}]
            include = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(self.stream(jobs[0], first, chunk, include), media_type="text/event-stream")

        results = await self.collect(request, jobs)
        if results is None:
            return Response(status_code=499)
        res = results[0]
        choice = {"index": 0, "message": {"role": "assistant", "content": res.text},
                  "logprobs": logprobs(res.logprobs), "finish_reason": res.finish_reason}
        return JSONResponse({**head, "choices": [choice], "usage": res.usage}, headers=cost_headers(res.usage))

    # ---- vLLM's tokenizer routes (lm-eval's remote tokenizer) ----
    def tokenize(self, raw: bytes) -> JSONResponse:
        """POST /tokenize, rendered in the worker thread too: a large prompt's id list is large JSON."""
        body = parse_body(raw, TokenizeRequest)
        tokens = self.codec.encode(body.prompt, add_special_tokens=body.add_special_tokens)
        return JSONResponse({"tokens": tokens, "count": len(tokens), "max_model_len": self.cfg.context})

    def detokenize(self, raw: bytes) -> JSONResponse:
        body = parse_body(raw, DetokenizeRequest)
        self.check_ids(body.tokens, "tokens")
        return JSONResponse({"prompt": self.codec.decode(body.tokens, skip_special_tokens=False)})

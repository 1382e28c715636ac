"""The OpenAI routes' logic: body → engine requests → JSON response or server-sent events.

Each prompt becomes one engine `Request`; the engine's events cross from its thread into the event loop through
`loop.call_soon_threadsafe` (`_Pending`). When a client goes away (a streaming response is cancelled, or the
polled `is_disconnected()` of a non-streaming one turns true) its requests are cancelled, and the engine frees
their batch slots before its next step.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from fastapi import Request as HTTPRequest
from fastapi.responses import JSONResponse, Response, StreamingResponse

from densa.serve.engine import Engine, Event, QueueFull, Request, SamplingParams, TokenLogprob
from densa.serve.protocol import (
    APIError,
    ChatRequest,
    CompletionRequest,
    chat_logprobs,
    completion_logprobs,
    envelope,
    merge_usage,
    parse_body,
    sse,
)

OPENAI_DEFAULT_MAX_TOKENS = 16  # /v1/completions without max_tokens


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


class TextCodec:
    """The tokenizer behind one lock: the engine thread decodes while the event loop encodes, and a Hugging Face
    fast tokenizer must not be entered from two threads at once ("Already borrowed")."""

    def __init__(self, tokenizer: Any) -> None:
        self.tok, self.lock, self._pieces = tokenizer, threading.Lock(), {}
        ids = [tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|im_end|>")]
        self.chat_stops = {i for i in ids if isinstance(i, int) and i != tokenizer.unk_token_id}
        self.eos = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        with self.lock:
            return list(self.tok(text, add_special_tokens=add_special_tokens)["input_ids"])

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        with self.lock:
            return self.tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def token_text(self, token_id: int) -> str:
        """One token as text, special tokens included (what logprobs report)."""
        if token_id not in self._pieces:
            self._pieces[token_id] = self.decode([token_id], skip_special_tokens=False)
        return self._pieces[token_id]

    def chat_prompt(self, messages: list[dict[str, str]]) -> list[int]:
        if not getattr(self.tok, "chat_template", None):
            raise APIError(400, "this model's tokenizer has no chat template; use /v1/completions", param="messages")
        from jinja2 import TemplateError

        with self.lock:
            try:
                text = self.tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            except (TemplateError, ValueError, TypeError, KeyError) as exc:  # e.g. "roles must alternate": a 400
                raise APIError(400, f"the model's chat template rejected the messages: {exc}",
                               param="messages") from None
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


class OpenAIHandlers:
    """/v1/completions and /v1/chat/completions for one model and engine."""

    def __init__(self, engine: Engine, codec: TextCodec, cfg: ServeConfig, vocab_size: int) -> None:
        self.engine, self.codec, self.cfg, self.vocab = engine, codec, cfg, vocab_size

    # ---- checks ----
    def check_model(self, name: str) -> None:
        if name != self.cfg.model_name:
            raise APIError(404, f"model {name!r} is not served here; this server serves {self.cfg.model_name!r}",
                           param="model", code="model_not_found")

    def check_ids(self, ids: list[int], param: str) -> None:
        bad = [i for i in ids if not 0 <= i < self.vocab]
        if bad:
            raise APIError(400, f"token id {bad[0]} is outside the vocabulary [0, {self.vocab})", param=param)

    def check_budget(self, n_prompt: int, max_tokens: int, param: str) -> None:
        cfg = self.cfg
        if n_prompt == 0:
            raise APIError(400, "the prompt is empty", param=param)
        if max_tokens > cfg.max_tokens_limit:
            raise APIError(400, f"max_tokens={max_tokens} is above this server's limit of {cfg.max_tokens_limit}",
                           param="max_tokens", code="invalid_value")
        if n_prompt + max_tokens > cfg.context:
            raise APIError(400, f"{n_prompt} prompt tokens + max_tokens={max_tokens} exceed the context of "
                           f"{cfg.context} tokens", param=param, code="context_length_exceeded")

    def completion_prompts(self, prompt: Any) -> tuple[list[list[int]], list[str]]:
        """The `prompt` field in any of its four forms → token lists and their texts (for `echo`)."""
        if isinstance(prompt, str):
            return [self.codec.encode(prompt)], [prompt]
        if not prompt:
            raise APIError(400, "the prompt list is empty", param="prompt")
        if isinstance(prompt[0], int):
            prompt = [prompt]
        if isinstance(prompt[0], str):
            return [self.codec.encode(p) for p in prompt], list(prompt)
        for ids in prompt:
            self.check_ids(ids, "prompt")
        return [list(ids) for ids in prompt], [self.codec.decode(ids) for ids in prompt]

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
        """Server-sent events: `first` chunks, one chunk per engine event, the usage chunk if asked, [DONE]."""
        req, pending = job
        try:
            for c in first:
                yield sse(c)
            async for ev in pending.events():
                if ev.kind == "error":
                    yield sse(APIError(ev.status, ev.message, "timeout" if ev.status == 408 else "server_error"
                                       ).body())
                    break
                yield sse({**chunk(ev), **({"usage": ev.usage} if ev.usage else {})})
                if ev.kind == "done" and include_usage:
                    yield sse({**chunk(ev), "choices": [], "usage": ev.usage})
            yield sse("[DONE]")
        finally:
            req.cancel()  # the client went away (or we are done): free the slot

    # ---- routes ----
    async def completions(self, request: HTTPRequest) -> Response:
        body: CompletionRequest = parse_body(await request.body(), CompletionRequest)
        self.check_model(body.model)
        prompts, texts = self.completion_prompts(body.prompt)
        if body.stream and len(prompts) > 1:
            raise APIError(400, "streaming supports one prompt per request", param="prompt")
        max_tokens = OPENAI_DEFAULT_MAX_TOKENS if body.max_tokens is None else body.max_tokens
        for p in prompts:
            self.check_budget(len(p), max_tokens, "prompt")
        stops = set() if body.ignore_eos else self.codec.eos
        echo_logprobs = body.echo and body.logprobs is not None
        params = [SamplingParams(max_tokens, body.temperature, body.top_p, body.top_k, body.stop_list(), stops,
                                 body.logprobs, echo_logprobs, body.seed) for _ in prompts]
        jobs = self.submit(prompts, params)
        head = envelope("cmpl-" + jobs[0][0].id, "text_completion", self.cfg.model_name)
        echoes = texts if body.echo else [""] * len(prompts)

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
        return JSONResponse({**head, "choices": choices, "usage": merge_usage([r.usage for r in results])})

    async def chat(self, request: HTTPRequest) -> Response:
        body: ChatRequest = parse_body(await request.body(), ChatRequest)
        self.check_model(body.model)
        cfg = self.cfg
        prompt = self.codec.chat_prompt([{"role": m.role, "content": m.text()} for m in body.messages])
        limit = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        max_tokens = limit if limit is not None else max(1, min(cfg.default_max_tokens, cfg.context - len(prompt)))
        self.check_budget(len(prompt), max_tokens, "messages")
        top = (body.top_logprobs or 0) if body.logprobs else None
        params = SamplingParams(max_tokens, body.temperature, body.top_p, body.top_k, body.stop_list(),
                                self.codec.chat_stops, top, False, body.seed)
        jobs = self.submit([prompt], [params])
        head = envelope("chatcmpl-" + jobs[0][0].id, "chat.completion", cfg.model_name)

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
        return JSONResponse({**head, "choices": [choice], "usage": res.usage})

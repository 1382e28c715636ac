"""The OpenAI wire format: validated request bodies, error bodies and response objects.

Requests are validated by pydantic in strict mode (a string where a number belongs is an error, not coerced), and
every failure becomes OpenAI's error body `{"error": {"message", "type", "param", "code"}}` with a 4xx status.
Unknown fields are ignored, as vLLM does, so clients that send extra options (lm-eval sends `seed`) still work;
options that would change the output but are not implemented (penalties, n > 1, best_of) are rejected rather than
silently ignored.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from densa.serve.engine import TokenLogprob


class APIError(Exception):
    """An error answered with OpenAI's error body."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class StrictModel(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


class StreamOptions(StrictModel):
    include_usage: bool = False


class _Sampling(StrictModel):
    model: str
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int | None = Field(None, ge=1)  # not OpenAI's, but vLLM's and common
    n: int = Field(1, ge=1, le=1)  # one choice per prompt
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=-(2**63), lt=2**64)  # what torch.Generator.manual_seed accepts
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    user: str | None = None

    @field_validator("presence_penalty", "frequency_penalty")
    @classmethod
    def _no_penalty(cls, value: float) -> float:
        if value != 0:
            raise ValueError("penalties are not supported; send 0 or omit the field")
        return value

    @field_validator("stop")
    @classmethod
    def _stops(cls, value: str | list[str] | None) -> str | list[str] | None:
        stops = [value] if isinstance(value, str) else value or []
        if len(stops) > 4 or any(not s for s in stops):
            raise ValueError("at most 4 non-empty stop strings")
        return value

    def stop_list(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])


class CompletionRequest(_Sampling):
    """POST /v1/completions (the legacy API, which lm-eval's `local-completions` uses for log-likelihoods)."""

    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(16, ge=0)
    logprobs: int | None = Field(None, ge=0, le=20)
    echo: bool = False
    ignore_eos: bool = False  # vLLM's extension: generate exactly max_tokens (benchmarks)
    best_of: int | None = Field(None, ge=1, le=1)
    suffix: None = None


class ContentPart(StrictModel):
    type: Literal["text"]
    text: str


class ChatMessage(StrictModel):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class ChatRequest(_Sampling):
    """POST /v1/chat/completions."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=0)
    max_completion_tokens: int | None = Field(None, ge=0)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)


class TokenizeRequest(StrictModel):
    """POST /tokenize (vLLM's, used by lm-eval's remote tokenizer)."""

    prompt: str
    add_special_tokens: bool = True


class DetokenizeRequest(StrictModel):
    tokens: list[int]


_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89abcdefABCDEF]")  # \ud800-\udfff: half of a UTF-16 pair


def _lone_surrogate(value: Any, where: str) -> str | None:
    """The path of the first string holding a lone UTF-16 surrogate (JSON's "\\ud800" decodes to one, which is
    no Unicode character: no UTF-8 encoding, no tokenization), or None."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return where
    elif isinstance(value, dict):
        return next((p for k, v in value.items() if (p := _lone_surrogate(v, f"{where}.{k}" if where else k))), None)
    elif isinstance(value, list):
        return next((p for i, v in enumerate(value) if (p := _lone_surrogate(v, f"{where}.{i}"))), None)
    return None


def parse_body(raw: bytes, model: type[StrictModel]) -> Any:
    """Decode and validate a JSON body; any problem is a 400 naming the offending field."""
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise APIError(400, f"the request body is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise APIError(400, "the request body must be a JSON object")
    maybe = b"\x00" in raw[:4] or _SURROGATE_ESCAPE.search(raw)  # UTF-16/32 JSON, or an escape: scan the strings
    if maybe and (where := _lone_surrogate(data, "")):
        raise APIError(400, f"{where}: a lone UTF-16 surrogate escape (\\ud800-\\udfff without its pair) is not "
                       "text", param=where.split(".")[0], code="invalid_value")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]  # loc: the field, then (for unions and lists) the member that failed
        param = str(first["loc"][0]) if first["loc"] else None
        where = ".".join(str(p) for p in first["loc"]) or "body"
        raise APIError(400, f"{where}: {first['msg']}", param=param, code="invalid_value") from None


# ---- responses ----
def completion_logprobs(entries: list[TokenLogprob], token_text: Callable[[int], str], text_start: int = 0
                        ) -> dict[str, Any]:
    """The legacy completions `logprobs` object: tokens, token_logprobs, top_logprobs, text_offset."""
    tokens, offsets, offset = [], [], text_start
    for e in entries:
        piece = token_text(e.token_id)
        tokens.append(piece)
        offsets.append(offset)
        offset += len(piece)
    return {"tokens": tokens, "token_logprobs": [e.logprob for e in entries],
            "top_logprobs": [({token_text(i): lp for i, lp in e.top} if e.logprob is not None else None)
                             for e in entries],
            "text_offset": offsets}


def chat_logprobs(entries: list[TokenLogprob], token_text: Callable[[int], str]) -> dict[str, Any]:
    """The chat `logprobs` object: per token its text, logprob, UTF-8 bytes and top alternatives."""
    def item(token_id: int, logprob: float) -> dict[str, Any]:
        piece = token_text(token_id)
        return {"token": piece, "logprob": logprob, "bytes": list(piece.encode("utf-8"))}

    return {"content": [{**item(e.token_id, e.logprob), "top_logprobs": [item(i, lp) for i, lp in e.top]}
                        for e in entries]}


def envelope(request_id: str, obj: str, model: str) -> dict[str, Any]:
    return {"id": request_id, "object": obj, "created": int(time.time()), "model": model}


def merge_usage(usages: list[dict]) -> dict:
    """One `usage` for a request with several prompts: tokens, FLOPs, compute and $ add up; latency and queueing are
    the slowest prompt's, time to first token the fastest's; per-token means are weighted by tokens processed."""
    if len(usages) == 1:
        return usages[0]
    xs = [u["x_densa"] for u in usages]

    def weighted(key: str) -> float | None:
        pairs = [(x[key], x["tokens_processed"]) for x in xs if x[key] is not None]
        weight = sum(w for _, w in pairs)
        return sum(v * w for v, w in pairs) / weight if weight else None

    ttfts = [x["ttft_s"] for x in xs if x["ttft_s"] is not None]
    merged = {key: sum(x[key] for x in xs) for key in ("flops", "tokens_processed", "compute_s", "usd")}
    merged.update(flops_per_token=merged["flops"] / max(merged["tokens_processed"], 1),
                  latency_s=max(x["latency_s"] for x in xs),
                  ttft_s=min(ttfts) if ttfts else None, queue_s=max((x["queue_s"] or 0.0) for x in xs),
                  usd_per_hour=xs[0]["usd_per_hour"], mean_batch_size=weighted("mean_batch_size"),
                  experts_per_token=weighted("experts_per_token"))
    total = {key: sum(u[key] for u in usages) for key in ("prompt_tokens", "completion_tokens", "total_tokens")}
    return {**total, "x_densa": merged}


def sse(data: dict[str, Any] | str) -> str:
    """One server-sent event."""
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n"

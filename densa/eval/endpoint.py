"""The HTTP side of an endpoint model (`openai:` and `openai-chat:`): the API key, retries, one-line errors, and what
each request cost.

lm-eval's `local-completions` and `local-chat-completions` build the requests and parse the answers; the two classes
here change only how a request is sent (`model_call`) and keep, per generation, the endpoint's own account of it:

- The key is read from the environment variable `api_key_env` (`--api-key-env`, default `OPENAI_API_KEY`) and sent as
  `Authorization: Bearer KEY`; it is never passed on a command line, written to results, logged or printed.
- 429 and 5xx answers, refused connections and timeouts are retried with exponential backoff (`Retry-After` honoured,
  capped); when the tries run out the run stops with one line and `--resume` continues it later.
- 401/403 (key missing or refused), 404 (no such route or model) and a body that is not the JSON an OpenAI endpoint
  returns stop the run with one line (`EndpointError`): nothing is scored from them. Other 4xx answers (a prompt too
  long, say) fail only their item.
- Each generation is sent alone, and its `usage` (prompt, completion and reasoning tokens), `finish_reason` and wall
  time are kept under its prompt (`Metered.usage`) for the runner's per-item lines.
"""

from __future__ import annotations

import copy
import json
import os
import re
import time
from typing import Any

from lm_eval.models.openai_completions import LocalChatCompletion, LocalCompletionsAPI

RETRIES = 4  # tries after the first, for 429 / 5xx / connection errors
RETRY_BASE_S = 1.0  # backoff: base · 2^k seconds (0-based try k), or the server's Retry-After, at most RETRY_MAX_S
RETRY_MAX_S = 30.0
TIMEOUT_S = 300.0  # per request


class EndpointError(RuntimeError):
    """A problem with the endpoint itself: the run stops here, with this one line, and nothing is scored from the
    failed request. `kind`: "unreachable", "auth" (401/403), "not-found" (404), "malformed" (not the JSON an OpenAI
    endpoint returns) or "overloaded" (429/5xx after every retry)."""

    def __init__(self, message: str, kind: str) -> None:
        super().__init__(message)
        self.kind = kind


def api_key(env: str) -> str | None:
    return os.environ.get(env) or None


def headers(key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"} if key else {}


def request(method: str, url: str, key: str | None, key_env: str, payload: dict[str, Any] | None = None,
            timeout: float = TIMEOUT_S, retries: int | None = None) -> tuple[dict[str, Any], float]:
    """One JSON request with the retry policy above: (the decoded body, seconds of the successful try)."""
    import requests

    retries = RETRIES if retries is None else retries
    kind = "overloaded"
    for attempt in range(retries + 1):
        start = time.perf_counter()
        try:
            response = requests.request(method, url, json=payload, headers=headers(key), timeout=timeout)
        except requests.RequestException as exc:
            problem, wait = f"cannot reach the endpoint {url}: {_reason(exc)}", _backoff(attempt, None)
            kind = "unreachable"
        else:
            wall = time.perf_counter() - start
            status = response.status_code
            if status < 400:
                return _json_body(response, url), wall
            message = _error_message(response)
            if status in (401, 403):
                hint = (f"the key in ${key_env} was refused" if key else
                        f"it needs an API key: set ${key_env} (or name another variable with --api-key-env)")
                raise EndpointError(f"{url} answered {status}: {hint} ({message})", "auth")
            if status == 404:
                raise EndpointError(f"{url} answered 404: {message}", "not-found")
            if status != 429 and status < 500:
                raise RuntimeError(f"{url} answered {status}: {message}")  # this request only
            problem, kind = f"{url} answered {status}: {message}", "overloaded"
            wait = _backoff(attempt, response.headers.get("Retry-After"))
        if attempt == retries:
            break
        time.sleep(wait)
    tries = f" (after {retries + 1} tries; rerun with --resume to continue)" if retries else ""
    raise EndpointError(problem + tries, kind)


def _reason(exc: Exception) -> str:
    found = re.search(r"\[Errno -?\d+\] [^'\")]+", str(exc))  # "[Errno 111] Connection refused"
    return found.group(0) if found else type(exc).__name__


def _backoff(attempt: int, retry_after: str | None) -> float:
    try:
        return min(float(retry_after), RETRY_MAX_S) if retry_after is not None else _exp(attempt)
    except ValueError:  # an HTTP date: use our own schedule
        return _exp(attempt)


def _exp(attempt: int) -> float:
    return min(RETRY_BASE_S * 2 ** attempt, RETRY_MAX_S)


def _json_body(response: Any, url: str) -> dict[str, Any]:
    try:
        body = response.json()
    except ValueError:
        raise EndpointError(f"{url} returned malformed JSON (HTTP {response.status_code}): "
                            f"{response.text[:80]!r}", "malformed") from None
    if not isinstance(body, dict):
        raise EndpointError(f"{url} returned JSON that is not an object: {response.text[:80]!r}", "malformed")
    return body


def _error_message(response: Any) -> str:
    try:
        error = response.json().get("error")
        message = error.get("message") if isinstance(error, dict) else error
    except (ValueError, AttributeError):
        message = None
    return " ".join(str(message or response.text or response.reason or "no detail").split())[:200]


def check_choices(body: dict[str, Any], url: str, chat: bool, generate: bool) -> None:
    """The fields lm-eval reads must be there: a malformed answer is an error, never an empty generation."""
    choices = body.get("choices")
    field = "message" if chat else ("text" if generate else "logprobs")
    if not isinstance(choices, list) or not choices or not all(isinstance(c, dict) and field in c for c in choices):
        raise EndpointError(f"{url} returned a malformed answer: no choices[].{field} in "
                            f"{json.dumps(body)[:120]}", "malformed")
    if chat and not all(isinstance(c["message"], dict) and "content" in c["message"] for c in choices):
        raise EndpointError(f"{url} returned a malformed answer: no choices[].message.content", "malformed")


class Metered:
    """Mixin for lm-eval's API models: keyed, retried, checked requests, and per-generation usage."""

    key_env: str
    chat: bool

    def setup_metering(self, key_env: str) -> None:
        self.key_env, self.usage, self._last = key_env, {}, None

    @property
    def api_key(self) -> str:
        return api_key(self.key_env) or ""

    @property
    def header(self) -> dict[str, str]:
        return headers(api_key(self.key_env))

    def model_call(self, messages: Any, *, generate: bool = True, gen_kwargs: dict | None = None,
                   **kwargs: Any) -> dict[str, Any]:
        payload = self._create_payload(self.create_message(messages), generate=generate,
                                       gen_kwargs=copy.deepcopy(gen_kwargs), seed=self._seed, eos=self.eos_string,
                                       **kwargs)
        body, wall = request("POST", self.base_url, api_key(self.key_env), self.key_env, payload, self.timeout)
        check_choices(body, self.base_url, self.chat, generate)
        if generate:
            self._last = {"usage": body.get("usage"), "finish_reason": body["choices"][0].get("finish_reason"),
                          "wall_s": wall}
        return body

    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        """One request at a time, so each generation's usage is known; the text is cut at every stop sequence of
        the task (a chat endpoint is sent only the first 4, OpenAI's limit), as lm-eval cuts it in process."""
        out = []
        for req in requests:
            self._last = None
            [text] = super().generate_until([req], disable_tqdm=True)
            until = req.args[1].get("until") or []
            for stop in [until] if isinstance(until, str) else until:
                text = text.split(stop)[0] if stop else text
            out.append(text)
            self.usage[prompt_text(req.args[0])] = self._last
        return out


def prompt_text(context: Any) -> str:
    """lm-eval's prompt as a string: chat prompts travel as `JsonChatStr` (the messages as JSON), a 1-tuple once
    lm-eval has logged the sample."""
    if isinstance(context, tuple) and len(context) == 1 and isinstance(context[0], str):
        return context[0]
    return context


class MeteredCompletions(Metered, LocalCompletionsAPI):
    chat = False


class MeteredChat(Metered, LocalChatCompletion):
    chat = True


def usage_fields(entry: dict[str, Any] | None) -> dict[str, Any]:
    """An item's token counts as the endpoint billed them (None where it reports none)."""
    usage = (entry or {}).get("usage") or {}
    details = usage.get("completion_tokens_details") or {}
    return {"prompt_tokens": usage.get("prompt_tokens"), "output_tokens": usage.get("completion_tokens"),
            "reasoning_tokens": details.get("reasoning_tokens") if isinstance(details, dict) else None,
            "finish_reason": (entry or {}).get("finish_reason"), "wall_s": (entry or {}).get("wall_s")}


def probe(model: Any, batch_size: int, prompt_tokens: int | None = None, new_tokens: int | None = None,
          repeats: int = 2) -> dict[str, Any]:
    """densa.eval.measure's latency probe (`probe_endpoint`, same rounds and summary) through the endpoint, keyed, on
    the route the model is scored on: streaming /v1/completions (with `ignore_eos`), or /v1/chat/completions for a
    chat endpoint (the probe text as the user message; a chat reply may end before `new_tokens`)."""
    from concurrent.futures import ThreadPoolExecutor

    from openai import OpenAI, OpenAIError

    from densa.eval import measure
    from densa.eval.tasks.local_data import wikitext2

    prompt_tokens = prompt_tokens or measure.PROMPT_TOKENS
    new_tokens = new_tokens or measure.NEW_TOKENS
    client = OpenAI(base_url=model.base_url, api_key=api_key(model.key_env) or "none", max_retries=2)
    if model.tokenizer is not None and not model.chat:
        prompts: list[Any] = measure.probe_prompts(model.tokenizer, repeats, prompt_tokens)
    else:
        prompts = [page[: 4 * prompt_tokens] for page in wikitext2()["test"]["page"][:repeats]]

    def stream(prompt: Any) -> Any:
        if model.chat:
            return client.chat.completions.create(model=model.served_name, max_tokens=new_tokens, temperature=0,
                                                  messages=[{"role": "user", "content": prompt}], stream=True)
        return client.completions.create(model=model.served_name, prompt=prompt, max_tokens=new_tokens,
                                         temperature=0, stream=True, extra_body={"ignore_eos": True})

    def one(prompt: Any) -> tuple[float, list[float]]:
        start, stamps = time.perf_counter(), []
        try:
            for chunk in stream(prompt):
                choice = chunk.choices[0] if chunk.choices else None
                text = (choice.delta.content if model.chat else choice.text) if choice is not None else None
                if text:
                    stamps.append(time.perf_counter())
        except OpenAIError as exc:  # a one-line error, not the client's traceback
            raise EndpointError(f"{model.name}: the endpoint failed the latency probe: "
                                f"{' '.join(str(exc).split())[:200]}", "probe") from None
        if not stamps:
            raise EndpointError(f"{model.name}: the endpoint streamed no tokens in the latency probe", "malformed")
        return stamps[0] - start, [b - a for a, b in zip(stamps, stamps[1:], strict=False)]

    one(prompts[0])  # warm-up
    rounds = []  # measure's layout: TTFT s and step s at batch 1, then at batch b
    for _ in range(max(getattr(measure, "PROBE_ROUNDS", 1), 1)):
        single = [one(p) for p in prompts]
        with ThreadPoolExecutor(batch_size) as pool:
            batch = list(pool.map(one, [prompts[i % len(prompts)] for i in range(batch_size)]))
        rounds.append(([s[0] for s in single], [x for s in single for x in s[1]], [b[0] for b in batch],
                       [x for b in batch for x in b[1]]))
    summary = measure._summary(rounds, batch_size, prompt_tokens, new_tokens)
    summary["machine"] = None  # the serving machine is not this one: its load is not measured here
    return summary

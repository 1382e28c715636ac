"""The continuous-batching engine behind `densa serve`: one scheduler thread owns the model and one batched cache.

Loop (one iteration between two decode steps):
1. admit: take waiting requests into free batch slots (up to `max_batch` rows), drop those cancelled or past their
   deadline, prefill the admitted prompts together (left-padded, one forward, last-position logits unless a
   request asked for prompt logprobs), sample each one's first token and
   join their rows to the running cache (densa/serve/batching.py);
2. decode: one `decode_step` of every running row's last token, (B, 1) → logits (B, V) — static cache buffers, no
   host sync, compiled under the switch of densa/model/compile.py (`compile=`); sample per row with the row's own
   settings (greedy rows share one argmax);
3. retire: rows that hit a stop token, a stop string, `max_tokens`, their deadline or a client disconnect leave the
   cache at once, so their slot is free for the next admit.
Requests talk to the HTTP side only through `emit(Event)` (thread-safe, supplied by the caller) and the `cancel()`
flag, so the engine can be driven without HTTP (tests, the benchmark's reference runs).

Metering: every forward's wall time is split between the rows it served (prefill: by prompt tokens; decode:
evenly), so `compute_s` is the request's share of the busy hardware and `usd = $/hour × compute_s / 3600`.
FLOPs come from the measurement core (densa/measure.py) over the tokens the request put through the model, with each
layer's MoE FFN costed at the experts its tokens actually used (`ModelOutput.ffn_experts`).
"""

from __future__ import annotations

import threading
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from densa.cost import request_usd
from densa.generation import sample_next
from densa.measure import experts_per_row, forward_flops_per_token
from densa.model.cache import ModelCache
from densa.model.compile import inference_steps
from densa.model.fastlinear import pack_linears
from densa.model.model import DensaModel
from densa.serve.batching import concat_caches, drop_rows, pad_prompts
from densa.serve.metrics import ServerMetrics

GREEDY_BELOW = 1e-5  # temperatures below this decode greedily (as vLLM does): logits / 1e-40 overflow


class QueueFull(RuntimeError):
    """The waiting queue is at `max_queue`; the HTTP layer answers 429."""


@dataclass
class SamplingParams:
    max_tokens: int
    temperature: float = 1.0
    top_p: float | None = None
    top_k: int | None = None
    stop: list[str] = field(default_factory=list)  # stop strings (not included in the text)
    stop_token_ids: set[int] = field(default_factory=set)  # e.g. EOS, <|im_end|> (not included in the text)
    logprobs: int | None = None  # top-N alternatives per generated token; None = no logprobs
    echo_logprobs: bool = False  # also the logprobs of the prompt tokens (legacy completions `echo`)
    seed: int | None = None


@dataclass
class TokenLogprob:
    token_id: int
    logprob: float | None  # None for the first prompt token (nothing predicts it)
    top: list[tuple[int, float]]  # the N most likely tokens at this position, best first


@dataclass
class Event:
    """What the engine tells a request: text so far ("delta"), the end ("done"), or a failure ("error")."""

    kind: str
    text: str = ""
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None
    usage: dict | None = None
    status: int = 200
    message: str = ""


class Request:
    """One prompt to complete. Created by the HTTP layer; after `Engine.submit`, only the engine mutates it."""

    def __init__(self, prompt_ids: list[int], params: SamplingParams, emit: Callable[[Event], None],
                 timeout_s: float, decode: Callable[[list[int]], str]) -> None:
        self.id = uuid.uuid4().hex[:24]
        self.prompt_ids, self.params, self.emit, self.decode = prompt_ids, params, emit, decode
        self.arrival = time.perf_counter()
        self.deadline = self.arrival + timeout_s
        self.cancelled = threading.Event()
        self.finished = False
        self.generated: list[int] = []  # sampled tokens, stop token excluded
        self.completion_tokens = 0  # sampled tokens, stop token included (it cost a step)
        self.last_token = -1
        self.sent_chars = 0
        self.first_token_at: float | None = None
        self.admitted_at: float | None = None
        self.compute_s = 0.0
        self.batch_sizes = 0  # Σ batch size over this row's decode steps (for the mean)
        self.decode_steps = 0
        self.experts_L: list[float] | None = None  # per layer, Σ FFN experts over this request's tokens (MoE only)
        self.generator = torch.Generator().manual_seed(params.seed) if params.seed is not None else None

    def cancel(self) -> None:
        """Called from the HTTP side when the client goes away: the slot is freed before the next step."""
        self.cancelled.set()


class Engine:
    """The scheduler thread. `submit()` is the only call the HTTP side needs."""

    def __init__(self, model: DensaModel, metrics: ServerMetrics, *, max_batch: int = 8, max_queue: int = 64,
                 usd_per_hour: float = 0.10, compile: str = "auto") -> None:
        if max_batch < 1 or max_queue < 1:
            raise ValueError(f"max_batch={max_batch} and max_queue={max_queue} must be >= 1")
        self.model, self.metrics = model.eval(), metrics
        self.steps = inference_steps(self.model, compile)  # the compile switch (densa/model/compile.py)
        dtype = next(self.model.parameters()).dtype
        if not self.steps.compiled and dtype in (torch.float32, torch.bfloat16):
            # eager on CPU: linears on oneDNN-packed weights of the model's own dtype (a no-op off CPU); served
            # weights never change, so the packed snapshot stays valid (densa/model/fastlinear.py)
            pack_linears(self.model, dtype)
        self.max_batch, self.max_queue, self.usd_per_hour = max_batch, max_queue, usd_per_hour
        self.waiting: deque[Request] = deque()
        self.rows: list[Request] = []  # row i of self.cache
        self.cache: ModelCache | None = None
        self.admitting: list[Request] = []  # taken from the queue, not yet rows (an error must reach them too)
        self.cond = threading.Condition()
        self.running = self.stop_requested = False
        self.thread: threading.Thread | None = None

    # ---- the HTTP side ----
    def submit(self, request: Request) -> None:
        with self.cond:
            if len(self.waiting) >= self.max_queue:
                raise QueueFull(f"the server queue is full ({self.max_queue} waiting requests); retry later")
            self.waiting.append(request)
            self.cond.notify()

    @property
    def queue_depth(self) -> int:
        return len(self.waiting)

    @property
    def active(self) -> int:
        return len(self.rows)

    def start(self) -> None:
        """Run the scheduler in a new thread (tests, embedding). `densa serve` calls `run()` on its main thread
        instead: see `run`."""
        self.running = True
        self.thread = threading.Thread(target=self._loop, name="densa-engine", daemon=True)
        self.thread.start()

    def run(self) -> None:
        """Run the scheduler in the calling thread until `stop()`. Torch's CPU kernels use OpenMP (libgomp), and a
        process in which two OS threads have run parallel kernels keeps a team per thread; once libgomp manages more
        threads than there are CPUs it stops spin-waiting, so every parallel kernel pays a sleep and a wake-up (a
        65k-element multiply: 5 µs on the model-loading thread, 52–68 µs on a second thread). `densa serve` loads
        the model on its main thread, so the model must run there too; HTTP is served from another thread, which
        runs no parallel kernels."""
        with self.cond:
            if self.stop_requested:  # stopped before it ran (e.g. the HTTP server failed to start)
                return
            self.running = True
        self._loop()

    def stop(self) -> None:
        with self.cond:
            self.running, self.stop_requested = False, True
            self.cond.notify()
        if self.thread is not None and self.thread is not threading.current_thread():
            self.thread.join(timeout=10)

    # ---- the scheduler thread ----
    def _loop(self) -> None:
        with torch.inference_mode():
            while True:
                with self.cond:
                    while self.running and not self.waiting and not self.rows:
                        self.cond.wait()
                    if not self.running:
                        break
                try:
                    self._admit()
                    self._retire()
                    if self.rows:
                        self._decode_step()
                        self._retire()
                except Exception as exc:  # a bug must not kill the server: fail the affected requests, go on
                    self._fail_all(exc)

    def _take_waiting(self) -> list[Request]:
        now = time.perf_counter()
        admitted: list[Request] = []
        with self.cond:
            while self.waiting and len(self.rows) + len(admitted) < self.max_batch:
                r = self.waiting.popleft()
                if r.cancelled.is_set():
                    continue
                if now > r.deadline:
                    self._timeout(r)
                    continue
                admitted.append(r)
        return admitted

    def _admit(self) -> None:
        new = self.admitting = self._take_waiting()
        if not new:
            return
        start = time.perf_counter()
        ids, mask = pad_prompts([r.prompt_ids for r in new])
        cache = self.model.new_cache()
        echo = any(r.params.echo_logprobs for r in new)
        out = self.steps.prefill(ids, cache, mask, logits_to_keep=0 if echo else 1)  # prompt logits only for echo
        logits_BTV = out.logits
        self._count_experts(new, out.ffn_experts, mask)
        elapsed = time.perf_counter() - start
        total = sum(len(r.prompt_ids) for r in new)
        for r in new:
            r.admitted_at, r.compute_s = start, r.compute_s + elapsed * len(r.prompt_ids) / total
        keep = []
        for i, r in enumerate(new):
            if r.params.echo_logprobs:
                row_logits = logits_BTV[i, ids.shape[1] - len(r.prompt_ids):]  # this row's real positions
                r.emit(Event("delta", logprobs=self._prompt_logprobs(r, row_logits)))
            if r.params.max_tokens == 0:
                self._finish(r, "length")
                continue
            self._accept_or_fail(r, logits_BTV[i, -1])
            if not r.finished:
                keep.append(i)
        if not keep:
            self.admitting = []
            return
        if len(keep) < len(new):
            drop_rows(cache, keep)
        self.cache = cache if self.cache is None else concat_caches(self.cache, cache)
        self.rows.extend(new[i] for i in keep)
        self.admitting = []

    def _decode_step(self) -> None:
        start = time.perf_counter()
        tokens = torch.tensor([[r.last_token] for r in self.rows], dtype=torch.long)  # (B, 1)
        logits_BV, ffn_experts_LB = self.steps.decode(tokens, self.cache)
        self._count_experts(self.rows, None if ffn_experts_LB is None else ffn_experts_LB[..., None], None)
        share = (time.perf_counter() - start) / len(self.rows)
        greedy = logits_BV.argmax(-1).tolist()
        for i, r in enumerate(self.rows):
            r.compute_s += share
            r.batch_sizes += len(self.rows)
            r.decode_steps += 1
            self._accept_or_fail(r, logits_BV[i], greedy[i])

    def _retire(self) -> None:
        """Drop rows that finished, timed out or lost their client; their slots free up for the next admit.
        Waiting requests that timed out or lost their client leave the queue too."""
        now = time.perf_counter()
        with self.cond:
            if any(r.cancelled.is_set() or now > r.deadline for r in self.waiting):
                for r in self.waiting:
                    if not r.cancelled.is_set() and now > r.deadline:
                        self._timeout(r)
                self.waiting = deque(r for r in self.waiting if not r.finished and not r.cancelled.is_set())
        keep = []
        for i, r in enumerate(self.rows):
            if not r.finished and not r.cancelled.is_set() and now > r.deadline:
                self._timeout(r)
            if not r.finished and not r.cancelled.is_set():
                keep.append(i)
        if len(keep) == len(self.rows):
            return
        self.rows = [self.rows[i] for i in keep]
        if not self.rows:
            self.cache = None
        else:
            drop_rows(self.cache, keep)

    # ---- per-request bookkeeping ----
    def _accept_or_fail(self, r: Request, logits_V: Tensor, greedy: int | None = None) -> None:
        """`_accept`, but a failure that belongs to one request (its sampling, its text) ends that request with a
        500 and leaves the other rows of the batch running."""
        try:
            self._accept(r, logits_V, greedy)
        except Exception as exc:  # noqa: BLE001 - reported to the request's client
            r.finished = True
            r.emit(Event("error", status=500, message=f"internal error: {type(exc).__name__}: {exc}"))

    def _accept(self, r: Request, logits_V: Tensor, greedy: int | None = None) -> None:
        """Sample the next token of `r` from its logits, then stream text and decide whether it is finished."""
        p = r.params
        if p.temperature < GREEDY_BELOW:
            token = greedy if greedy is not None else int(logits_V.argmax())
        else:
            token = int(sample_next(logits_V[None], p.temperature, p.top_k, p.top_p, r.generator)[0])
        if r.first_token_at is None:
            r.first_token_at = time.perf_counter()
        r.completion_tokens += 1
        r.last_token = token
        logprobs = [self._logprob(logits_V, token, p.logprobs)] if p.logprobs is not None else []
        if token in p.stop_token_ids:
            if logprobs:
                r.emit(Event("delta", logprobs=logprobs))
            self._finish(r, "stop")
            return
        r.generated.append(token)
        text = r.decode(r.generated)
        stop_at = self._stop_string(text, r)
        if stop_at is not None:
            self._send(r, text[:stop_at], logprobs, final=True)
            self._finish(r, "stop")
        elif len(r.generated) >= p.max_tokens:
            self._send(r, text, logprobs, final=True)
            self._finish(r, "length")
        else:
            self._send(r, text, logprobs, final=False)

    @staticmethod
    def _stop_string(text: str, r: Request) -> int | None:
        hits = [i for s in r.params.stop if (i := text.find(s, max(0, r.sent_chars - len(s)))) >= 0]
        return min(hits) if hits else None

    @staticmethod
    def _send(r: Request, text: str, logprobs: list[TokenLogprob], final: bool) -> None:
        """Emit the new text, holding back what could still become a stop string or is a partial UTF-8 char."""
        end = len(text)
        if not final:
            end = len(text.rstrip("\ufffd"))  # an incomplete UTF-8 character decodes to U+FFFD until completed
            hold = max((len(s) - 1 for s in r.params.stop), default=0)
            end = max(r.sent_chars, end - hold)
        delta = text[r.sent_chars : end]
        r.sent_chars = max(r.sent_chars, end)
        if delta or logprobs:
            r.emit(Event("delta", text=delta, logprobs=logprobs))

    @staticmethod
    def _logprob(logits_V: Tensor, token: int, top_n: int) -> TokenLogprob:
        logp_V = torch.log_softmax(logits_V.float(), -1)
        top = logp_V.topk(top_n) if top_n > 0 else None
        pairs = list(zip(top.indices.tolist(), top.values.tolist(), strict=True)) if top is not None else []
        return TokenLogprob(token, float(logp_V[token]), pairs)

    def _prompt_logprobs(self, r: Request, logits_TV: Tensor) -> list[TokenLogprob]:
        """Logprob of each prompt token given the ones before it (the first has none), with its top-N."""
        n = r.params.logprobs or 0
        logp_TV = torch.log_softmax(logits_TV[:-1].float(), -1)  # position t predicts prompt token t + 1
        ids = torch.tensor(r.prompt_ids[1:], dtype=torch.long)
        chosen = logp_TV.gather(1, ids[:, None])[:, 0].tolist()
        top_v, top_i = logp_TV.topk(n, dim=-1) if n > 0 else (None, None)
        out = [TokenLogprob(r.prompt_ids[0], None, [])]
        for t, lp in enumerate(chosen):
            top = list(zip(top_i[t].tolist(), top_v[t].tolist(), strict=True)) if n > 0 else []
            out.append(TokenLogprob(r.prompt_ids[t + 1], lp, top))
        return out

    def _count_experts(self, rows: list[Request], ffn_experts_LBT: Tensor | None, mask_BT: Tensor | None) -> None:
        """Add each row's FFN experts (from the forward's output) to its request and to the server metrics."""
        if ffn_experts_LBT is None:
            return
        per_row = experts_per_row(ffn_experts_LBT, mask_BT).tolist()  # (B, layers)
        for r, used_L in zip(rows, per_row, strict=True):
            r.experts_L = used_L if r.experts_L is None else [a + b for a, b in zip(r.experts_L, used_L, strict=True)]
        tokens = int(mask_BT.sum()) if mask_BT is not None else ffn_experts_LBT.shape[1] * ffn_experts_LBT.shape[2]
        for layer, total in enumerate(map(sum, zip(*per_row, strict=True))):
            self.metrics.record_experts(layer, total, tokens)

    def _finish(self, r: Request, reason: str) -> None:
        r.finished = True
        usage = self.usage(r)
        x = usage["x_densa"]
        self.metrics.record_finished(usage["prompt_tokens"], usage["completion_tokens"], x["latency_s"],
                                     x["ttft_s"], x["flops"], x["usd"])
        r.emit(Event("done", finish_reason=reason, usage=usage))

    def _timeout(self, r: Request) -> None:
        r.finished = True
        r.emit(Event("error", status=408, message="the request exceeded the server's per-request timeout"))

    def _fail_all(self, exc: Exception) -> None:
        for r in {id(r): r for r in self.rows + self.admitting if not r.finished}.values():
            r.emit(Event("error", status=500, message=f"internal error: {type(exc).__name__}: {exc}"))
        self.rows, self.admitting, self.cache = [], [], None

    def usage(self, r: Request) -> dict:
        """The OpenAI `usage` object plus densa's metering (`x_densa`)."""
        now = time.perf_counter()
        cfg = self.model.config
        processed = len(r.prompt_ids) + max(r.completion_tokens - 1, 0)  # the last sampled token is never fed
        context = len(r.prompt_ids) + r.completion_tokens
        experts_L = [u / processed for u in r.experts_L] if r.experts_L and processed else None
        flops = forward_flops_per_token(cfg, max(context, 1), experts_L) * processed
        experts_per_token = sum(experts_L) / len(experts_L) if experts_L else None
        return {
            "prompt_tokens": len(r.prompt_ids),
            "completion_tokens": r.completion_tokens,
            "total_tokens": len(r.prompt_ids) + r.completion_tokens,
            "x_densa": {
                "flops": flops,
                "tokens_processed": processed,
                "flops_per_token": flops / max(processed, 1),
                "latency_s": now - r.arrival,
                "ttft_s": None if r.first_token_at is None else r.first_token_at - r.arrival,
                "queue_s": None if r.admitted_at is None else r.admitted_at - r.arrival,
                "compute_s": r.compute_s,
                "usd": request_usd(r.compute_s, self.usd_per_hour),
                "usd_per_hour": self.usd_per_hour,
                "mean_batch_size": r.batch_sizes / r.decode_steps if r.decode_steps else 1.0,
                "experts_per_token": experts_per_token,
            },
        }

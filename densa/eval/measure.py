"""What a model's tokens cost in time, money and (for dynamic MoE models) FLOPs actually spent.

Latency is measured in a controlled probe rather than read off lm-eval's batched scoring: the same held-out
WikiText-2 text for every model, cut to `prompt_tokens` tokens of the model's own tokenizer, greedy decoding of
`new_tokens` tokens with stop tokens ignored. At batch 1 and at the run's batch size it records the time to first token
(the prefill forward plus the first pick) and the wall time of every later decoding step (ms per output token). From
these: prefill and decode throughput, and $ per 1M input / output tokens at the run's batch size (densa/cost.py).
The probe runs `PROBE_ROUNDS` times; medians pool the rounds, and each round's own prices give the spread (min, max)
the report prints beside the price. In process, a reference matmul timed before and after the rounds, other
processes' CPU use and the rounds' spread flag a busy machine (densa.eval.machine_load), whose tokens would otherwise
look dearer with no warning; the fastest reference matmul is the measured peak behind the idealised cost.

In process the probe runs `timed_greedy`, a plain cached greedy loop that `tests/test_eval.py` checks against
`densa.generation.generate`. An endpoint is probed through the OpenAI client with streaming (the first streamed
chunk marks the first token).

A dynamic MoE spends a data-dependent number of experts per token. `moe_spent_flops_per_token` runs the task's own
scored sequences at batch 1 (no padding to route) and replaces the analytic FFN term (the budget target) with the
experts the router actually chose, per layer.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch

from densa import cost
from densa.eval import machine_load
from densa.eval.models import EvalModel
from densa.eval.runner import encode_text

PROMPT_TOKENS = 128
NEW_TOKENS = 16
PROBE_ROUNDS = 3


def percentiles(values: Sequence[float]) -> dict[str, float | None]:
    """Median and 90th percentile (nearest-rank on sorted values; None when empty)."""
    if not values:
        return {"median": None, "p90": None}
    ordered = sorted(values)
    rank = -(-9 * len(ordered) // 10)  # nearest rank: ceil(0.9 n), 1-based (exact integer arithmetic)
    return {"median": statistics.median(ordered), "p90": ordered[rank - 1]}


@torch.no_grad()
def timed_greedy(model: Any, prompts: torch.Tensor, new_tokens: int) -> tuple[torch.Tensor, float, list[float]]:
    """Greedy decoding of `prompts` (B, P) with densa's cache: (generated (B, n), ttft_s, per-step seconds)."""
    cache = model.new_cache()
    start = time.perf_counter()
    token = model(prompts, cache=cache).logits[:, -1].argmax(-1)
    ttft = time.perf_counter() - start
    out, steps = [token], []
    for _ in range(new_tokens - 1):
        t0 = time.perf_counter()
        token = model(token[:, None], cache=cache).logits[:, -1].argmax(-1)
        steps.append(time.perf_counter() - t0)
        out.append(token)
    return torch.stack(out, dim=1), ttft, steps


def probe_prompts(tokenizer: Any, n: int, prompt_tokens: int) -> list[list[int]]:
    """`n` prompts of exactly `prompt_tokens` tokens from the starts of WikiText-2 test articles."""
    from densa.eval.tasks.local_data import wikitext2

    prompts = []
    for page in wikitext2()["test"]["page"]:
        ids = encode_text(tokenizer, page)
        if len(ids) >= prompt_tokens:
            prompts.append(ids[:prompt_tokens])
        if len(prompts) == n:
            return prompts
    raise RuntimeError("not enough WikiText-2 text for the latency probe")


def probe_local(model: EvalModel, batch_size: int, prompt_tokens: int = PROMPT_TOKENS,
                new_tokens: int = NEW_TOKENS, repeats: int = 2, rounds: int = PROBE_ROUNDS) -> dict[str, Any]:
    """TTFT and ms/token at batch 1 (`repeats` prompts) and at `batch_size` (one batch), `rounds` times, in process,
    with the machine-load check around them."""
    prompt_tokens = min(prompt_tokens, model.model.config.max_position_embeddings - new_tokens)
    prompts = probe_prompts(model.tokenizer, max(repeats, 1), prompt_tokens)
    net = model.model
    weight = next(net.parameters())
    before = machine_load.reference_gflops(weight.device, weight.dtype)
    others = machine_load.OtherLoad().start()
    timed_greedy(net, torch.tensor(prompts[:1]), 2)  # warm-up: first-call allocations are not the model's cost
    batch = torch.tensor([prompts[i % len(prompts)] for i in range(batch_size)])
    results = []
    for _ in range(max(rounds, 1)):
        single = [timed_greedy(net, torch.tensor([p]), new_tokens) for p in prompts]
        _, ttft_b, steps_b = timed_greedy(net, batch, new_tokens)
        results.append(([s[1] for s in single], [x for s in single for x in s[2]], [ttft_b], steps_b))
    other_cores = others.stop()
    after = machine_load.reference_gflops(weight.device, weight.dtype)
    summary = _summary(results, batch_size, prompt_tokens, new_tokens)
    summary["machine"] = machine_load.verdict(before, after, other_cores,
                                              [r["ms_per_token_batch_1"] for r in summary["rounds"]])
    return summary


def probe_endpoint(model: EvalModel, batch_size: int, prompt_tokens: int = PROMPT_TOKENS,
                   new_tokens: int = NEW_TOKENS, repeats: int = 2, rounds: int = PROBE_ROUNDS) -> dict[str, Any]:
    """The same probe through the endpoint's streaming /v1/completions (concurrent requests for the batch), `rounds`
    times."""
    import os

    from openai import OpenAI, OpenAIError

    client = OpenAI(base_url=model.base_url, api_key=os.environ.get("OPENAI_API_KEY") or "none", max_retries=0)
    if model.tokenizer is not None:
        prompts: list[Any] = probe_prompts(model.tokenizer, repeats, prompt_tokens)
    else:
        from densa.eval.tasks.local_data import wikitext2

        prompts = [page[: 4 * prompt_tokens] for page in wikitext2()["test"]["page"][:repeats]]

    def one(prompt: Any) -> tuple[float, list[float]]:
        start = time.perf_counter()
        stamps = []
        try:
            stream = client.completions.create(model=model.served_name, prompt=prompt, max_tokens=new_tokens,
                                               temperature=0, stream=True, extra_body={"ignore_eos": True})
            for chunk in stream:
                if chunk.choices and chunk.choices[0].text:
                    stamps.append(time.perf_counter())
        except OpenAIError as exc:  # a one-line error, not the client's traceback
            raise RuntimeError(f"{model.name}: the endpoint failed the latency probe: {exc}") from None
        if not stamps:
            raise RuntimeError(f"{model.name}: the endpoint streamed no tokens")
        return stamps[0] - start, [b - a for a, b in zip(stamps, stamps[1:], strict=False)]

    one(prompts[0])  # warm-up
    results = []
    for _ in range(max(rounds, 1)):
        single = [one(p) for p in prompts]
        with ThreadPoolExecutor(batch_size) as pool:
            batch = list(pool.map(one, [prompts[i % len(prompts)] for i in range(batch_size)]))
        results.append(([s[0] for s in single], [x for s in single for x in s[1]], [b[0] for b in batch],
                         [x for b in batch for x in b[1]]))
    summary = _summary(results, batch_size, prompt_tokens, new_tokens)
    summary["machine"] = None  # the serving machine is not this one: its load is not measured here
    return summary


Round = tuple[list[float], list[float], list[float], list[float]]  # TTFT s and step s at batch 1, then at batch b


def _summary(rounds: list[Round], batch_size: int, prompt_tokens: int, new_tokens: int) -> dict[str, Any]:
    """Medians and p90s over all rounds pooled, and each round's own throughput (for the prices' spread)."""
    ttft_1, steps_1, ttft_b, steps_b = ([x for r in rounds for x in r[i]] for i in range(4))
    summary = _figures(ttft_1, steps_1, ttft_b, steps_b, batch_size, prompt_tokens)
    per_round = []
    for r in rounds:
        f = _figures(*r, batch_size, prompt_tokens)
        per_round.append({"ms_per_token_batch_1": f["ms_per_token"]["batch_1"]["median"],
                          **{k: f["throughput_tokens_per_s"][k] for k in (f"prefill_batch_{batch_size}",
                                                                            f"decode_batch_{batch_size}")}})
    return {"prompt_tokens": prompt_tokens, "new_tokens": new_tokens, "batch_size": batch_size, **summary,
            "rounds": per_round}


def _figures(ttft_1: list[float], steps_1: list[float], ttft_b: list[float], steps_b: list[float], batch_size: int,
             prompt_tokens: int) -> dict[str, Any]:
    ms = [1000 * x for x in steps_1]
    ms_b = [1000 * x for x in steps_b]
    ttft_ms_b = percentiles([1000 * x for x in ttft_b])
    decode_tps_1 = 1000 / percentiles(ms)["median"] if ms else None
    decode_tps_b = batch_size * 1000 / percentiles(ms_b)["median"] if ms_b else None
    return {
        "ttft_ms": {"batch_1": percentiles([1000 * x for x in ttft_1]), f"batch_{batch_size}": ttft_ms_b},
        "ms_per_token": {"batch_1": percentiles(ms), f"batch_{batch_size}": percentiles(ms_b)},
        "throughput_tokens_per_s": {
            "prefill_batch_1": prompt_tokens / statistics.median(ttft_1),
            f"prefill_batch_{batch_size}": batch_size * prompt_tokens / statistics.median(ttft_b),
            "decode_batch_1": decode_tps_1,
            f"decode_batch_{batch_size}": decode_tps_b,
        },
    }


def prices(latency: dict[str, Any], usd_per_hour: float) -> dict[str, Any]:
    """$ per 1M input tokens (prefill throughput) and output tokens (decode throughput) at the run's batch size,
    and the 3:1 blend; `range` holds each figure's (min, max) over the probe's rounds, `machine` the machine-load
    check (densa.eval.machine_load) and `usd_per_hour` the price they were computed at."""
    b = latency["batch_size"]

    def priced(tps: dict[str, Any]) -> dict[str, float]:
        usd_in = cost.usd_per_1m_tokens(tps[f"prefill_batch_{b}"], usd_per_hour)
        usd_out = cost.usd_per_1m_tokens(tps[f"decode_batch_{b}"] or 0.0, usd_per_hour)
        return {"input": usd_in, "output": usd_out, "blended": cost.blended_usd_per_1m(usd_in, usd_out)}

    out: dict[str, Any] = priced(latency["throughput_tokens_per_s"])
    per_round = [priced(r) for r in latency.get("rounds") or []]
    out["range"] = {k: [min(p[k] for p in per_round), max(p[k] for p in per_round)] for k in out} if per_round \
        else None
    return out | {"rounds": len(per_round), "usd_per_hour": usd_per_hour, "machine": latency.get("machine")}


@torch.no_grad()
def moe_spent_flops_per_token(model: EvalModel, texts: list[str], max_tokens: int | None = None) -> float | None:
    """Forward FLOPs per token with the FFN experts the router actually used on `texts` (batch 1, each cut to the
    model's context), through the measurement core (densa/measure.py). None for models without a MoE FFN."""
    from densa.measure import ExpertMeter, forward_flops_per_token

    net, cfg = model.model, model.model.config
    if cfg.ffn == "swiglu" or not texts:
        return None
    limit = max_tokens or cfg.max_position_embeddings
    n_tokens, flops = 0, 0.0
    for text in texts:
        ids = encode_text(model.tokenizer, text)[-limit:]
        if not ids:
            continue
        meter = ExpertMeter()
        meter.add(net(torch.tensor([ids])).ffn_experts)
        flops += forward_flops_per_token(cfg, len(ids), meter.per_layer()) * len(ids)
        n_tokens += len(ids)
    return flops / n_tokens if n_tokens else None

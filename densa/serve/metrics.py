"""Server metrics in the Prometheus text exposition format (version 0.0.4), for GET /metrics.

Written out by hand rather than through `prometheus_client`: the server needs four kinds of series (counters,
gauges, histograms, labelled sums) and the format is a few lines of text, so one small class avoids a dependency.
Thread-safe: the scheduler thread and the HTTP event loop both record.
"""

from __future__ import annotations

import bisect
import threading
from collections import defaultdict

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


def _labels(labels: dict[str, str]) -> str:
    if not labels:
        return ""
    return "{" + ",".join(f'{k}="{v}"' for k, v in sorted(labels.items())) + "}"


class Histogram:
    """Cumulative-bucket histogram: `_bucket{le=...}`, `_sum`, `_count`."""

    def __init__(self, buckets: tuple[float, ...] = LATENCY_BUCKETS) -> None:
        self.buckets = buckets
        self.counts = [0] * (len(buckets) + 1)  # the last slot is +Inf
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.sum += value

    def lines(self, name: str) -> list[str]:
        out, running = [], 0
        for le, count in zip([*map(str, self.buckets), "+Inf"], self.counts, strict=True):
            running += count
            out.append(f'{name}_bucket{{le="{le}"}} {running}')
        return out + [f"{name}_sum {self.sum}", f"{name}_count {running}"]


class ServerMetrics:
    """Everything /metrics reports. `queue_depth` and `active` are read live from the engine."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.requests: dict[tuple[str, int], int] = defaultdict(int)  # (endpoint, HTTP status) -> count
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.flops = 0.0
        self.usd = 0.0
        self.latency = Histogram()
        self.ttft = Histogram()
        self.ms_per_token = Histogram((1, 2.5, 5, 10, 25, 50, 100, 250, 500, 1000))
        self.ffn_experts_sum: dict[int, float] = defaultdict(float)  # MoE layer -> Σ FFN experts over tokens
        self.ffn_experts_tokens: dict[int, int] = defaultdict(int)

    def count_request(self, endpoint: str, status: int) -> None:
        with self.lock:
            self.requests[(endpoint, status)] += 1

    def record_finished(self, prompt_tokens: int, completion_tokens: int, latency_s: float, ttft_s: float | None,
                        flops: float, usd: float) -> None:
        with self.lock:
            self.prompt_tokens += prompt_tokens
            self.completion_tokens += completion_tokens
            self.flops += flops
            self.usd += usd
            self.latency.observe(latency_s)
            if ttft_s is not None:
                self.ttft.observe(ttft_s)
                if completion_tokens > 1:
                    self.ms_per_token.observe(1000 * (latency_s - ttft_s) / (completion_tokens - 1))

    def record_experts(self, layer: int, experts_sum: float, tokens: int) -> None:
        with self.lock:
            self.ffn_experts_sum[layer] += experts_sum
            self.ffn_experts_tokens[layer] += tokens

    def render(self, queue_depth: int, active: int, max_batch: int) -> str:
        """The /metrics page."""
        p = "densa"
        with self.lock:
            lines = [f"# HELP {p}_requests_total HTTP requests by endpoint and status code.",
                     f"# TYPE {p}_requests_total counter"]
            lines += [f"{p}_requests_total{_labels({'endpoint': e, 'status': str(s)})} {n}"
                      for (e, s), n in sorted(self.requests.items())]
            for name, value, help_text in (
                    ("prompt_tokens_total", self.prompt_tokens, "Prompt tokens of finished requests."),
                    ("completion_tokens_total", self.completion_tokens, "Generated tokens of finished requests."),
                    ("flops_total", self.flops, "Forward FLOPs spent on finished requests."),
                    ("cost_usd_total", self.usd, "Metered hardware cost of finished requests, USD.")):
                lines += [f"# HELP {p}_{name} {help_text}", f"# TYPE {p}_{name} counter", f"{p}_{name} {value}"]
            for name, hist, help_text in (
                    ("request_latency_seconds", self.latency, "Arrival to last token."),
                    ("time_to_first_token_seconds", self.ttft, "Arrival to first generated token."),
                    ("ms_per_output_token", self.ms_per_token, "Decode time per token after the first.")):
                lines += [f"# HELP {p}_{name} {help_text}", f"# TYPE {p}_{name} histogram", *hist.lines(f"{p}_{name}")]
            for name, value, help_text in (("queue_depth", queue_depth, "Requests waiting for a batch slot."),
                                           ("active_requests", active, "Requests being decoded."),
                                           ("max_batch", max_batch, "Batch slots.")):
                lines += [f"# HELP {p}_{name} {help_text}", f"# TYPE {p}_{name} gauge", f"{p}_{name} {value}"]
            if self.ffn_experts_tokens:
                name = f"{p}_ffn_experts_per_token"
                lines += [f"# HELP {name} FFN experts a token used in each MoE layer (densa dynamic MoE).",
                          f"# TYPE {name} summary"]
                for layer in sorted(self.ffn_experts_tokens):
                    lines += [f'{name}_sum{{layer="{layer}"}} {self.ffn_experts_sum[layer]}',
                              f'{name}_count{{layer="{layer}"}} {self.ffn_experts_tokens[layer]}']
        return "\n".join(lines) + "\n"

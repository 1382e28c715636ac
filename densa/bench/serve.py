"""`densa bench serve`: a live `densa serve` under 1, 4 and 8 concurrent streaming clients.

Choices (docs/serving.md and docs/benchmarks.md give the figures):
- Models, one server after the other: densa = `from_preset("cpu-small-moe")` (Mega mixer + dynamic MoE, 16.8M
  parameters, 6.3M active) and `dense` = its dense twin of the same active parameters (densa/bench/decode.py
  `dense_twin`), both with *untrained* weights, which is fine for speed (every decode step runs the same operations
  whatever the weights; the MoE's routing is its untrained router's), plus a byte-level BPE tokenizer trained on the
  embedded tiny-shakespeare. Each is written to a temporary directory and served by a `densa serve` subprocess, so
  the clients (threads of this process) do not share the server's interpreter lock.
- Load: each client sends streaming /v1/completions requests back to back, `max_tokens` fixed, `ignore_eos` so every
  request generates exactly that many tokens, greedy, and `logprobs: 0` so the server sends one event per token
  (untrained models emit partial UTF-8 characters, whose text the server holds back; the per-token logprobs event
  makes the client-side clock tick once per token). Prompts are different lines of tiny-shakespeare.
- Figures per concurrency c: `tok_s_c{c}` = generated tokens of the phase ÷ its wall time (first request sent to
  last response finished); `ttft_ms_p50/p90_c{c}` = request sent to first token event; `ms_per_token_p50/p90_c{c}`
  = (last token event − first) ÷ (tokens − 1) per request; `usd_per_1m_tokens_c{c}` = the server's metered $ of the
  phase (x_densa.usd) per million generated tokens. `batching_speedup` = tok_s_c8 ÷ tok_s_c1 (goal >= 3).
  Unprefixed keys are densa's; `dense_` keys the twin's; `densa_vs_dense_tok_s_c{c}` = densa ÷ dense tokens/s
  (goal at 8 clients: >= 1).
"""

from __future__ import annotations

import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import requests
import torch

from densa.bench.decode import dense_twin
from densa.checkpoint import save_checkpoint
from densa.config import ModelConfig, from_preset
from densa.data.corpora import corpus_texts
from densa.data.tokenizer import train_tokenizer
from densa.model.model import DensaModel

CONCURRENCY = (1, 4, 8)


def _percentile(values: list[float], q: float) -> float:
    return float(statistics.quantiles(values, n=100, method="inclusive")[round(q) - 1]) if len(values) > 1 else \
        float(values[0])


def _write_model(root: Path, name: str, cfg: ModelConfig) -> Path:
    torch.manual_seed(0)
    model = DensaModel(cfg)
    save_checkpoint(model, root / name)
    text = next(corpus_texts("tinyshakespeare"))[:300_000]
    train_tokenizer([text], vocab_size=model.config.vocab_size).save_pretrained(str(root / name))
    return root / name


def _start_server(model_dir: Path, threads: int) -> tuple[subprocess.Popen, str]:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    cmd = [sys.executable, "-m", "densa", "serve", str(model_dir), "--port", "0", "--max-batch", "8",
           "--threads", str(threads)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    line = proc.stdout.readline()
    match = re.search(r"http://[\d.]+:\d+", line)
    if not match:
        proc.kill()
        raise RuntimeError(f"densa serve did not start: {line}{proc.stdout.read()[-2000:]}")
    url = match.group(0)
    # keep reading the server's output: an undrained pipe fills up (64 KiB) and blocks the server mid-benchmark
    threading.Thread(target=proc.stdout.read, name="densa-serve-output", daemon=True).start()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if requests.get(url + "/health", timeout=1).ok:
                return proc, url
        except requests.ConnectionError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError("densa serve did not answer /health within 60 s")


def _stream_one(session: requests.Session, url: str, model: str, prompt: str, max_tokens: int) -> dict:
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "ignore_eos": True, "logprobs": 0}
    sent = time.perf_counter()
    stamps, usage = [], None
    with session.post(url + "/v1/completions", json=body, stream=True, timeout=300) as resp:
        resp.raise_for_status()
        for line in resp.iter_lines():
            if not line.startswith(b"data: ") or line == b"data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise RuntimeError(chunk["error"]["message"])
            for choice in chunk["choices"]:
                stamps.extend([time.perf_counter()] * len((choice.get("logprobs") or {}).get("tokens") or []))
            usage = chunk.get("usage") or usage
    return {"sent": sent, "stamps": stamps, "usage": usage}


def _phase(url: str, model: str, prompts: list[str], clients: int, requests_per_client: int, max_tokens: int) -> dict:
    """`clients` threads each sending `requests_per_client` streaming requests back to back; the phase's figures."""
    results: list[dict] = []
    lock = threading.Lock()
    errors: list[BaseException] = []

    def client(k: int) -> None:
        with requests.Session() as session:
            for j in range(requests_per_client):
                try:
                    prompt = prompts[(k * requests_per_client + j) % len(prompts)]
                    r = _stream_one(session, url, model, prompt, max_tokens)
                except Exception as exc:  # reported after the phase
                    errors.append(exc)
                    return
                with lock:
                    results.append(r)

    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    if errors:
        raise RuntimeError(f"{len(errors)} client request(s) failed, first: {errors[0]}")
    if any(len(r["stamps"]) < 2 for r in results):  # ms/token needs two token events per request
        raise RuntimeError(f"a request streamed fewer than 2 token events (max_tokens={max_tokens})")
    tokens = sum(len(r["stamps"]) for r in results)
    ttft = [1000 * (r["stamps"][0] - r["sent"]) for r in results]
    per_token = [1000 * (r["stamps"][-1] - r["stamps"][0]) / (len(r["stamps"]) - 1) for r in results]
    usd = sum(r["usage"]["x_densa"]["usd"] for r in results)
    return {"tok_s": tokens / wall, "ttft_ms_p50": _percentile(ttft, 50), "ttft_ms_p90": _percentile(ttft, 90),
            "ms_per_token_p50": _percentile(per_token, 50), "ms_per_token_p90": _percentile(per_token, 90),
            "usd_per_1m_tokens": usd / tokens * 1e6, "requests": len(results), "tokens": tokens,
            "mean_batch_size": statistics.fmean(r["usage"]["x_densa"]["mean_batch_size"] for r in results)}


def run(quick: bool) -> dict:
    max_tokens = 32 if quick else 64
    per_client = {1: 4, 4: 2, 8: 2} if quick else {1: 8, 4: 4, 8: 3}
    threads = int(os.environ.get("OMP_NUM_THREADS", "2"))
    lines = [ln for ln in next(corpus_texts("tinyshakespeare")).splitlines() if len(ln) > 30]
    prompts = [" ".join(lines[i : i + 2]) for i in range(0, 200, 2)]  # about 20-30 tokens each
    densa_cfg = from_preset("cpu-small-moe")
    out: dict = {"model": "cpu-small-moe (untrained)", "dense_model": "its dense twin (untrained)",
                 "dense_intermediate_size": dense_twin(densa_cfg).intermediate_size, "threads": threads,
                 "max_tokens": max_tokens}
    for prefix, name, cfg in (("", "densa", densa_cfg), ("dense_", "dense", dense_twin(densa_cfg))):
        with tempfile.TemporaryDirectory() as tmp:
            proc, url = _start_server(_write_model(Path(tmp), name, cfg), threads)
            try:
                _phase(url, name, prompts, 2, 1, 8)  # warm-up: first forwards, allocator, connection setup
                for c in CONCURRENCY:
                    for key, value in _phase(url, name, prompts, c, per_client[c], max_tokens).items():
                        out[f"{prefix}{key}_c{c}"] = round(value, 9 if key.startswith("usd") else 2)
            finally:
                proc.terminate()
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:  # never leave a server behind
                    proc.kill()
                    proc.wait()
        out[f"{prefix}batching_speedup"] = round(out[f"{prefix}tok_s_c8"] / out[f"{prefix}tok_s_c1"], 2)
    for c in CONCURRENCY:
        out[f"densa_vs_dense_tok_s_c{c}"] = round(out[f"tok_s_c{c}"] / out[f"dense_tok_s_c{c}"], 3)
    return out

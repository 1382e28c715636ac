"""`densa quickstart`: the main job on embedded defaults.

Today it builds the cpu-small densa model and its dense baseline, runs a forward pass of each on a
`--context`-token sequence, checks that cached decoding reproduces the full forward, and prints parameter counts,
analytic FLOPs per token and measured forward time side by side. Training, sampling and evaluation join as the
trainer and evaluation land (see the issues list in the README).
"""

from __future__ import annotations

import argparse
import time

import torch

from densa.config import PRESETS, from_preset
from densa.counting import count_parameters, flops_per_token
from densa.model.model import DensaModel


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", default="cpu-small", choices=list(PRESETS), help="model size")
    parser.add_argument("--context", type=int, default=1024, help="tokens in the forward pass")
    parser.add_argument("--seed", type=int, default=0, help="seed for weights and input")


def _measure(mixer: str, args: argparse.Namespace) -> dict[str, float]:
    torch.manual_seed(args.seed)
    cfg = from_preset(args.preset, mixer=mixer)
    model = DensaModel(cfg).eval()
    ids = torch.randint(0, cfg.vocab_size, (1, args.context))
    with torch.no_grad():
        model(ids[:, :16])  # warm-up
        start = time.perf_counter()
        full = model(ids, labels=ids)
        ms = (time.perf_counter() - start) * 1e3
        cache = model.new_cache()
        model(ids[:, :-1], cache=cache)
        last = model(ids[:, -1:], cache=cache).logits[:, -1]
    counts, flops = count_parameters(model), flops_per_token(cfg, args.context)
    return {"total": counts.total, "active": counts.active, "embedding": counts.embedding,
            "gflops": flops.total / 1e9, "forward_ms": ms, "loss": full.loss.item(),
            "cache_err": (last - full.logits[:, -1]).abs().max().item(), "cache_kb": cache.nbytes() / 1024}


def main(args: argparse.Namespace) -> None:
    if args.context < 2:
        raise ValueError(f"--context={args.context}: must be >= 2")
    print(f"densa quickstart: preset {args.preset}, untrained weights, one sequence of {args.context} tokens\n")
    rows = {"densa (mega)": _measure("mega", args), "dense baseline": _measure("attention", args)}
    header = (f"{'model':<16}{'params':>12}{'active':>12}{'embed':>11}{'GFLOP/token':>13}{'fwd ms':>9}"
              f"{'loss':>8}{'cache KB':>10}{'cache err':>11}")
    print(header)
    for name, r in rows.items():
        print(f"{name:<16}{r['total']:>12,}{r['active']:>12,}{r['embedding']:>11,}{r['gflops']:>13.4f}"
              f"{r['forward_ms']:>9.1f}{r['loss']:>8.3f}{r['cache_kb']:>10.0f}{r['cache_err']:>11.1e}")
    vocab = from_preset(args.preset).vocab_size
    print(f"\nloss at initialisation should be near ln(vocab) = {torch.log(torch.tensor(float(vocab))):.3f}; "
          "cache err is |cached − full| on the last logits.")

"""Measure the Megalodon refinements of the Mega mixer, one at a time and together, to choose the defaults.

Trains small byte-level models (vocab 256) on tiny-shakespeare (first 90% train, last 10% validation) with the
same data order, optimiser and step count, and reports validation bits per byte and training tokens/s.
Usage: python scripts/mixer_options.py [--steps 300] [--seeds 2] [--json docs/results/mixer-options.json]
Results and the decision they led to: docs/mixer-options.md.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

from densa.config import from_preset
from densa.model.model import DensaModel

TEXT = Path(__file__).parents[1] / "data/corpora/tinyshakespeare/input.txt"
BASE = dict(hidden_size=128, num_hidden_layers=4, intermediate_size=352, num_attention_heads=2,
            num_key_value_heads=2, shared_qk_dim=64, value_dim=256, ema_dim=8, attn_chunk_size=64,
            ema_chunk_size=64, max_position_embeddings=256, complex_ema=False, timestep_norm=False,
            normalized_attention=False, two_hop_residual=False)
VARIANTS = {
    "mega (no refinements)": {},
    "+ complex_ema": {"complex_ema": True},
    "+ timestep_norm": {"timestep_norm": True},
    "+ normalized_attention": {"normalized_attention": True},
    "+ two_hop_residual": {"two_hop_residual": True},
    "all four (Megalodon)": {"complex_ema": True, "timestep_norm": True, "normalized_attention": True,
                             "two_hop_residual": True},
    "dense baseline (reference)": {"mixer": "attention"},
}


def batches(data: torch.Tensor, batch: int, length: int, generator: torch.Generator):
    while True:
        starts = torch.randint(0, len(data) - length - 1, (batch,), generator=generator)
        yield torch.stack([data[s : s + length + 1] for s in starts.tolist()])


def train_one(overrides: dict, seed: int, steps: int, train: torch.Tensor, val: torch.Tensor) -> dict:
    torch.manual_seed(seed)
    cfg = from_preset("tiny", **{**BASE, **overrides})
    model = DensaModel(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, betas=(0.9, 0.95), weight_decay=0.1)
    warmup = max(1, steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1, (s + 1) / warmup) * 0.5 * (
        1 + math.cos(math.pi * min(1.0, s / steps))))
    data = batches(train, 16, 256, torch.Generator().manual_seed(seed))
    start, losses = time.perf_counter(), []
    for _ in range(steps):
        ids = next(data)
        loss = model(ids, labels=ids).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
    seconds = time.perf_counter() - start
    model.eval()
    val_batches = batches(val, 16, 256, torch.Generator().manual_seed(1234))
    with torch.no_grad():
        val_loss = sum(model(ids, labels=ids).loss.item() for ids, _ in zip(val_batches, range(8), strict=False)) / 8
    return {"val_bpb": val_loss / math.log(2), "final_train_loss": sum(losses[-20:]) / 20,
            "tokens_per_s": steps * 16 * 256 / seconds, "nan": any(not math.isfinite(x) for x in losses)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--json", default="docs/results/mixer-options.json")
    args = parser.parse_args()
    data = torch.frombuffer(bytearray(TEXT.read_bytes()), dtype=torch.uint8).long()
    split = int(0.9 * len(data))
    results = {}
    for name, overrides in VARIANTS.items():
        runs = []
        for seed in range(args.seeds):
            runs.append(train_one(overrides, seed, args.steps, data[:split], data[split:]))
            print(f"{name:<28} seed {seed}: val {runs[-1]['val_bpb']:.4f} bpb, {runs[-1]['tokens_per_s']:.0f} tok/s",
                  flush=True)
        results[name] = {"overrides": overrides, "runs": runs,
                         "val_bpb_mean": sum(r["val_bpb"] for r in runs) / len(runs),
                         "tokens_per_s_mean": sum(r["tokens_per_s"] for r in runs) / len(runs)}
    out = {"steps": args.steps, "seeds": args.seeds, "batch": 16, "context": 256, "base_config": BASE,
           "variants": results}
    Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()

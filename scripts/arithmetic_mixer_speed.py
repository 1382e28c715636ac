"""Sampling and training speed of the token-value study's small model with Mega against attention (docs/alignment.md,
"Model choice"): the recipe's shapes (hidden 128, 3 layers, SwiGLU 352, vocab 512), untrained weights.

    OMP_NUM_THREADS=1 python scripts/arithmetic_mixer_speed.py [--json FILE]

Sampling: one GRPO step's worth, 64 prompts of 40 tokens, 96 new tokens at temperature 1 through `generate()` (the
cached decode path the study uses). Training: forward + backward on 32 sequences of 160 tokens (an SFT batch). Each
is repeated, alternating the two models, and the fastest repeat is kept; the ratio is Mega's time over attention's.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from densa.config import from_preset
from densa.model.model import DensaModel

SHAPES = dict(hidden_size=128, num_hidden_layers=3, intermediate_size=352, num_attention_heads=4,
              num_key_value_heads=4, max_position_embeddings=256, vocab_size=512)
MEGA = dict(mixer="mega", value_dim=128, ema_dim=8, attn_chunk_size=256, ema_chunk_size=256)  # recipes/sft-arithmetic


def fastest(fn, models: dict[str, DensaModel], reps: int) -> dict[str, float]:
    """The fastest of `reps` runs of fn(model) per model, the models taking turns."""
    times: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(reps):
        for name, model in models.items():
            start = time.perf_counter()
            fn(model)
            times[name].append(time.perf_counter() - start)
    return {name: min(t) for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=4)
    parser.add_argument("--json", default=None, help="write the figures here")
    args = parser.parse_args()
    torch.manual_seed(0)
    models = {"attention": DensaModel(from_preset("tiny", **SHAPES, mixer="attention")),
              "mega": DensaModel(from_preset("tiny", **SHAPES, **MEGA))}
    prompts = torch.randint(0, 512, (64, 40))  # (B, T)
    batch = torch.randint(0, 512, (32, 160))  # (B, T)

    def sample(model: DensaModel) -> None:
        with torch.no_grad():
            model.eval().generate(prompts, max_new_tokens=96, temperature=1.0)

    def train_step(model: DensaModel) -> None:
        model.train()(batch, labels=batch).loss.backward()

    out = {"threads": torch.get_num_threads()}
    for name, fn in (("sample_s", sample), ("train_step_s", train_step)):
        seconds = fastest(fn, models, args.reps)
        out.update({f"{k}_{name}": round(v, 4) for k, v in seconds.items()})
        out[f"mega_vs_attention_{name.removesuffix('_s')}"] = round(seconds["mega"] / seconds["attention"], 3)
    print(json.dumps(out, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            f.write(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()

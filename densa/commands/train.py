"""`densa train`: train a model from a recipe's `model:` and `train:` sections (docs/training.md). The same command
runs under `torchrun --nproc-per-node N -m densa.cli train ...` (DDP or FSDP2, `train.distributed`)."""

from __future__ import annotations

import argparse
import os

from densa.train import distributed
from densa.train.config import load_recipe
from densa.train.loop import train


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, metavar="RECIPE", help="recipe YAML with model: and train:")
    parser.add_argument("--out", required=True, metavar="DIR", help="run folder: metrics.jsonl and checkpoints/")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="overrides",
                        help="override a field: model.hidden_size=128, train.lr=1e-3 (repeatable)")
    parser.add_argument("--resume", action="store_true", help="continue from DIR/checkpoints/latest")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.epilog = ("several processes: torchrun --nproc-per-node N -m densa.cli train ... (train.distributed: auto, "
                     "ddp or fsdp2; train.batch_size is the global batch); docs/training.md, 'Distributed'")


def main(args: argparse.Namespace) -> None:
    model_cfg, train_cfg = load_recipe(args.config, args.overrides)
    try:
        result = train(model_cfg, train_cfg, args.out, resume=args.resume, progress=not args.no_progress)
    finally:
        distributed.shutdown()  # under torchrun (docs/training.md, Distributed)
    if os.environ.get("RANK", "0") != "0":
        return  # rank 0 reports for all
    val = f", validation {result.val_loss:.4f} nats/token = {result.val_bpb:.4f} bits/byte" if result.val_loss else ""
    print(f"trained to step {result.step} at {result.tokens_per_s:,.0f} tokens/s (MFU {result.mfu:.1%}){val}; "
          f"{result.skipped_steps} skipped steps; checkpoint {result.checkpoint}")

"""`densa init`: write an untrained checkpoint (config.json + model.safetensors)."""

from __future__ import annotations

import argparse

import torch

from densa.checkpoint import save_checkpoint
from densa.config import PRESETS, load_config
from densa.counting import count_parameters
from densa.model.model import DensaModel


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", default=None, help=f"model preset: {', '.join(PRESETS)} (default: the "
                        "recipe's preset, else cpu-small)")
    parser.add_argument("--config", metavar="RECIPE.yaml", help="recipe whose `model:` section overrides the preset")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override one config field, e.g. --set attn_chunk_size=128 (repeatable)")
    parser.add_argument("--out", required=True, metavar="DIR", help="checkpoint directory to write")
    parser.add_argument("--seed", type=int, default=0, help="seed for the weight initialisation")
    parser.add_argument("--force", action="store_true", help="replace a checkpoint already in DIR")


def main(args: argparse.Namespace) -> None:
    config = load_config(args.preset, args.config, args.overrides)
    torch.manual_seed(args.seed)
    model = DensaModel(config)
    out = save_checkpoint(model, args.out, overwrite=args.force)
    counts = count_parameters(model)
    print(f"wrote {out}: {config.mixer} model, {counts.total:,} parameters ({counts.active:,} active)")

"""`densa init`: write an untrained checkpoint (config.json + model.safetensors), with `--tokenizer` its tokenizer.

A checkpoint without a tokenizer works for densa's own tools but not for `pipeline("text-generation")`,
`densa serve` or `densa export` users, so init warns when none is given.
"""

from __future__ import annotations

import argparse
import sys

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
    parser.add_argument("--tokenizer", metavar="DIR", help="tokenizer folder (`densa tokenizer train`, or any "
                        "Hugging Face model folder) to save with the checkpoint; it must fit the vocabulary")
    parser.add_argument("--force", action="store_true", help="replace a checkpoint already in DIR")


def main(args: argparse.Namespace) -> None:
    config = load_config(args.preset, args.config, args.overrides)
    tokenizer = None
    if args.tokenizer:
        from densa.data.tokenizer import load_tokenizer

        tokenizer = load_tokenizer(args.tokenizer)
        if len(tokenizer) > config.vocab_size:
            raise ValueError(f"--tokenizer {args.tokenizer}: {len(tokenizer):,} entries do not fit the model's "
                             f"vocabulary of {config.vocab_size:,}; pass --set vocab_size={len(tokenizer)}")
    torch.manual_seed(args.seed)
    model = DensaModel(config)
    out = save_checkpoint(model, args.out, overwrite=args.force)
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out))
    counts = count_parameters(model)
    with_tok = f", tokenizer from {args.tokenizer}" if tokenizer is not None else ""
    print(f"wrote {out}: {config.mixer} model, {counts.total:,} parameters ({counts.active:,} active){with_tok}")
    if tokenizer is None:
        print(f"densa init: warning: {out} has no tokenizer, which pipeline(\"text-generation\"), `densa serve` and "
              "its exports need; pass --tokenizer DIR to save one with it", file=sys.stderr)

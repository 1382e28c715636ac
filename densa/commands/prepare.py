"""`densa prepare`: tokenize a corpus into memory-mapped shards with a train/validation split and a manifest."""

from __future__ import annotations

import argparse
import time

from densa.data.corpora import EMBEDDED
from densa.data.prepare import prepare
from densa.data.reference import score_reference


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--corpus", required=True, metavar="C",
                        help=f"an embedded corpus ({', '.join(EMBEDDED)}) or a .txt/.jsonl/.gz file or directory")
    parser.add_argument("--tokenizer", required=True, metavar="DIR", help="tokenizer folder (densa tokenizer train)")
    parser.add_argument("--out", required=True, metavar="DIR", help="folder for the shards and manifest.json")
    parser.add_argument("--valid-fraction", type=float, default=0.05, metavar="F",
                        help="share held out for validation when the corpus has no held-out files of its own")
    parser.add_argument("--max-docs", type=int, default=None, metavar="K", help="use at most K documents per split")
    parser.add_argument("--shard-tokens", type=int, default=1 << 26, metavar="N", help="tokens per shard file")
    parser.add_argument("--reference", metavar="MODEL", default=None,
                        help="also score every training token with this reference model (any MODEL with the same "
                             "tokenizer) into train-*.refloss.bin, for train.token_selection=rho1 and "
                             "train.curriculum=value (docs/high-value-tokens.md)")
    parser.add_argument("--reference-context", type=int, default=256, metavar="T",
                        help="tokens of context the reference model sees (windows of T+1 tokens)")
    parser.add_argument("--reference-batch", type=int, default=16, metavar="B", help="windows per reference forward")


def main(args: argparse.Namespace) -> None:
    start = time.perf_counter()
    manifest = prepare(args.corpus, args.tokenizer, args.out, args.valid_fraction, args.max_docs, args.shard_tokens)
    for name, split in manifest["splits"].items():
        print(f"{name:<6} {split['documents']:>7,} documents {split['tokens']:>12,} tokens {split['bytes']:>13,} "
              f"bytes in {len(split['files'])} file(s)")
    print(f"split: {manifest['split_rule']}")
    if args.reference:
        manifest = score_reference(args.out, args.reference, args.reference_context, args.reference_batch)
        ref = manifest["reference"]
        print(f"reference {ref['model']}: mean loss {ref['mean_loss']:.4f} nats/token over {ref['scored_tokens']:,} "
              f"tokens, {ref['scoring_flops']:.3g} FLOPs")
    print(f"wrote {args.out}/manifest.json in {time.perf_counter() - start:.1f}s")

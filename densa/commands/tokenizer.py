"""`densa tokenizer train`: train a byte-level BPE tokenizer and check it on every embedded corpus."""

from __future__ import annotations

import argparse
import itertools
import json
import time
from pathlib import Path

from densa.data.corpora import EMBEDDED, corpus_texts
from densa.data.tokenizer import check_round_trip, train_tokenizer


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("action", choices=["train"], help="what to do (train a new tokenizer)")
    parser.add_argument("--corpus", action="append", required=True, metavar="C",
                        help=f"training text: an embedded corpus ({', '.join(EMBEDDED)}) or a .txt/.jsonl/.gz "
                        "file or directory; repeatable")
    parser.add_argument("--vocab-size", type=int, required=True, metavar="N", help="entries, special tokens included")
    parser.add_argument("--out", required=True, metavar="DIR", help="directory for tokenizer.json and its config")
    parser.add_argument("--max-docs", type=int, default=None, metavar="K",
                        help="train on at most K documents per corpus (default: all)")
    parser.add_argument("--no-check", action="store_true",
                        help="skip the round-trip check on the embedded corpora (it reads all of them)")


def main(args: argparse.Namespace) -> None:
    start = time.perf_counter()
    texts = itertools.chain.from_iterable(itertools.islice(corpus_texts(c), args.max_docs) for c in args.corpus)
    tokenizer = train_tokenizer(texts, args.vocab_size)
    out = Path(args.out)
    tokenizer.save_pretrained(str(out))
    print(f"trained a {len(tokenizer):,}-entry byte-level BPE on {', '.join(args.corpus)} in "
          f"{time.perf_counter() - start:.1f}s -> {out}")
    stats = {"vocab_size": len(tokenizer), "corpora": args.corpus, "checks": {}}
    checks = [] if args.no_check else [(c, s) for c in EMBEDDED for s in ("train", "valid")
                                       if s == "train" or EMBEDDED[c][2] is not None]
    checks += [(c, "train") for c in args.corpus if c not in EMBEDDED]
    for corpus, split in checks:
        rt = check_round_trip(tokenizer, corpus_texts(corpus, split))
        name = f"{corpus}:{split}"
        stats["checks"][name] = {"documents": rt.documents, "bytes": rt.bytes, "tokens": rt.tokens,
                                                 "bytes_per_token": rt.bytes_per_token, "mismatches": rt.mismatches}
        verdict = "exact" if rt.mismatches == 0 else f"{rt.mismatches} documents differ"
        print(f"  {name:<22} {rt.bytes / 1e6:8.2f} MB  {rt.bytes_per_token:5.2f} bytes/token  "
              f"round trip {verdict}", flush=True)
    (out / "tokenizer_stats.json").write_text(json.dumps(stats, indent=2) + "\n")
    bad = [k for k, v in stats["checks"].items() if v["mismatches"]]
    if bad:
        raise RuntimeError(f"encode -> decode is not exact on {', '.join(bad)}")

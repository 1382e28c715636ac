"""`densa moefy MODEL --experts E [--budget F] --out DIR`: a dense Llama-architecture model → a densa dynamic-MoE
checkpoint (docs/moefy.md). The output is an ordinary densa checkpoint with the source's tokenizer: `densa eval`,
`densa serve`, `densa inspect-routing` and `densa export` take it like any other."""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import torch

from densa.checkpoint import is_checkpoint, save_checkpoint
from densa.moefy.calibrate import calibration_windows, corpus_text, encode
from densa.moefy.convert import MoefyConfig, check_source, convert, with_budget
from densa.moefy.tune import TuneConfig, prepare_data, tune
from densa.resolve import resolve


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", metavar="MODEL", nargs="?", default="smollm2-135m",
                        help="dense Llama-architecture model: HF dir, .gguf, densa dense-baseline checkpoint, or "
                             "smollm2-135m")
    parser.add_argument("--experts", type=int, required=True, metavar="E",
                        help="experts per FFN; must divide the FFN intermediate size (each expert holds I/E neurons)")
    parser.add_argument("--budget", type=float, default=0.5, metavar="F",
                        help="mean share of FFN FLOPs a token spends, in (0, 1]; 1 keeps every expert (exact)")
    parser.add_argument("--split", choices=["cluster", "random"], default="cluster",
                        help="cluster: group co-activated neurons (MoEfication); random: balanced random ablation")
    parser.add_argument("--calib-corpus", default="gutenberg", metavar="C",
                        help="corpus for calibration and tuning (embedded name or path)")
    parser.add_argument("--calib-tokens", type=int, default=8192, metavar="N", help="calibration tokens")
    parser.add_argument("--calib-seq-len", type=int, default=512, metavar="L", help="calibration window length")
    parser.add_argument("--router-steps", type=int, default=150, metavar="N",
                        help="Adam steps of each layer's router fit on the calibration activations")
    parser.add_argument("--tune-steps", type=int, default=0, metavar="N",
                        help="brief tuning with densa's trainer at the budget (0 = fitted router only)")
    parser.add_argument("--tune", choices=["router", "all"], default="router",
                        help="what tuning trains: the routers (budget controller holds the target) or all weights")
    parser.add_argument("--tune-lr", type=float, default=0.0, metavar="LR",
                        help="tuning peak learning rate (0 = 1e-3 router, 3e-5 all)")
    parser.add_argument("--tune-batch", type=int, default=4, metavar="B", help="tuning sequences per step")
    parser.add_argument("--tune-context", type=int, default=256, metavar="T", help="tuning tokens per sequence")
    parser.add_argument("--seed", type=int, default=0, help="seed of the split, router fit and tuning")
    parser.add_argument("--out", required=True, metavar="DIR", help="output checkpoint folder")
    parser.add_argument("--force", action="store_true", help="replace a checkpoint already in DIR")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


@torch.no_grad()
def exactness(dense, conversion, tokenizer, corpus: str, seq_len: int) -> float:
    """Max |logit difference| between the source and the conversion with every expert active, on one held-out
    window (the corpus' held-out split when it has one)."""
    try:
        text = corpus_text(corpus, "valid", 8 * seq_len)
    except ValueError:
        text = corpus_text(corpus, "train", 8 * seq_len)
    ids = torch.tensor(encode(tokenizer, text)[:seq_len])[None]
    full = with_budget(conversion, 1.0)
    return float((full(ids).logits - dense(ids).logits).abs().max())


def main(args: argparse.Namespace) -> None:
    out = Path(args.out)
    for flag, value, least in (("--calib-tokens", args.calib_tokens, 1), ("--calib-seq-len", args.calib_seq_len, 1),
                               ("--router-steps", args.router_steps, 0), ("--tune-steps", args.tune_steps, 0)):
        if value < least:  # before loading the model: a bad number fails at once, naming the flag
            raise ValueError(f"{flag} {value}: must be >= {least}")
    if is_checkpoint(out) and not args.force:
        raise FileExistsError(f"--out {out} already holds a checkpoint (pass --force to replace it)")
    cfg = MoefyConfig(experts=args.experts, budget=args.budget, split=args.split, router_steps=args.router_steps,
                      seed=args.seed)
    tune_cfg = TuneConfig(steps=args.tune_steps, mode=args.tune, lr=args.tune_lr, batch_size=args.tune_batch,
                          context=args.tune_context, corpus=args.calib_corpus,
                          seed=args.seed) if args.tune_steps else None
    source = resolve(args.model)
    check_source(source.model.config, args.experts)
    progress = not args.no_progress
    windows = calibration_windows(source.tokenizer, args.calib_corpus, args.calib_tokens, args.calib_seq_len)
    conversion = convert(source.model, windows, cfg, progress=progress)
    report = {"source": args.model, "budget": args.budget, **conversion.report,
              "max_abs_logit_diff_all_experts": exactness(source.model, conversion, source.tokenizer,
                                                          args.calib_corpus, args.calib_seq_len)}
    if tune_cfg is not None:
        work = out / "tune"
        data = prepare_data(source.tokenizer, tune_cfg.corpus, tune_cfg.max_docs, work)
        report.update(tune(conversion.model, data, work / "run", tune_cfg, progress=progress))
        shutil.rmtree(data)
        shutil.rmtree(work / "tokenizer")
    save_checkpoint(conversion.model, out, overwrite=args.force)
    if source.tokenizer is not None:
        source.tokenizer.save_pretrained(str(out))
    (out / "moefy.json").write_text(json.dumps(report, indent=2) + "\n")
    layers = report["layers"]
    recall = sum(r["router_recall"] for r in layers) / len(layers)
    chance = sum(r["random_router_recall"] for r in layers) / len(layers)
    print(f"converted {args.model} to {out}: {len(layers)} FFNs x {cfg.experts} experts of "
          f"{report['expert_width']} neurons ({cfg.split} split), budget {cfg.budget:g} "
          f"({cfg.budget * cfg.experts:g} experts per token); router top-{layers[0]['label_k']} recall "
          f"{recall:.3f} (random {chance:.3f}); all experts active: max |logit diff| "
          f"{report['max_abs_logit_diff_all_experts']:.2e}")

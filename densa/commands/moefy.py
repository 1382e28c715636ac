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
from densa.moefy.distill import DistillConfig, distill
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
    parser.add_argument("--shared", type=float, default=0.0, metavar="S",
                        help="share of the FFN's neurons made always-on shared experts, chosen by activation rate "
                             "(CMoE; rounded to whole experts; the budget counts them); 0 = none")
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
    parser.add_argument("--distill-steps", type=int, default=0, metavar="N",
                        help="distil the conversion against the original's next-token distribution (KL) for N steps "
                             "on the corpus' training text after the calibration windows (0 = none)")
    parser.add_argument("--distill", choices=["moe", "all", "lora"], default="moe",
                        help="what distillation trains: routers + experts, every weight, or routers + low-rank "
                             "adapters (merged into the weights at the end)")
    parser.add_argument("--distill-lr", type=float, default=0.0, metavar="LR",
                        help="distillation peak learning rate (0 = 1e-4 moe, 5e-5 all, 1e-3 lora)")
    parser.add_argument("--distill-batch", type=int, default=4, metavar="B", help="distillation sequences per step")
    parser.add_argument("--distill-context", type=int, default=256, metavar="T",
                        help="distillation tokens per sequence")
    parser.add_argument("--lora-rank", type=int, default=8, metavar="R", help="adapter rank of --distill lora")
    parser.add_argument("--on-policy", type=float, default=0.0, metavar="P",
                        help="share of distillation steps on the student's own samples scored by the original")
    parser.add_argument("--distill-kl", choices=["forward", "reverse"], default="forward",
                        help="KL(original || student) or KL(student || original)")
    parser.add_argument("--resume", action="store_true",
                        help="continue an interrupted distillation in DIR (the conversion is redone, deterministic, "
                             "then the saved student and optimizer replace it)")
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
                               ("--router-steps", args.router_steps, 0), ("--tune-steps", args.tune_steps, 0),
                               ("--distill-steps", args.distill_steps, 0)):
        if value < least:  # before loading the model: a bad number fails at once, naming the flag
            raise ValueError(f"{flag} {value}: must be >= {least}")
    if is_checkpoint(out) and not args.force:
        raise FileExistsError(f"--out {out} already holds a checkpoint (pass --force to replace it)")
    cfg = MoefyConfig(experts=args.experts, budget=args.budget, split=args.split, shared=args.shared,
                      router_steps=args.router_steps, seed=args.seed)
    distill_cfg = DistillConfig(steps=args.distill_steps, mode=args.distill, lr=args.distill_lr,
                                batch_size=args.distill_batch, context=args.distill_context,
                                lora_rank=args.lora_rank, on_policy=args.on_policy, kl=args.distill_kl,
                                seed=args.seed) if args.distill_steps else None
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
    if distill_cfg is not None:
        tokens = distill_cfg.steps * distill_cfg.batch_size * distill_cfg.context
        text = calibration_windows(source.tokenizer, args.calib_corpus, tokens, distill_cfg.context,
                                   skip=int(windows.numel()))  # the training text after the calibration windows
        report.update(distill(conversion.model, source.model, text, out / "distill", distill_cfg,
                              resume=args.resume, progress=progress))
        for name in ("distill-state.pt", "distill-best.pt"):  # the result is the checkpoint below
            (out / "distill" / name).unlink(missing_ok=True)
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
          f"{report['max_abs_logit_diff_all_experts']:.2e}"
          + (f"; {cfg.shared_experts()} shared experts" if cfg.shared else "")
          + (f"; distilled {report['distill_steps']} steps ({report['distill_tokens']:,} tokens, {args.distill}) in "
             f"{report['distill_cpu_seconds']:.0f} CPU-s ({report['distill_wall_seconds']:.0f} s wall), KL "
             f"{report['distill_first_kl']:.4f} -> {report['distill_last_kl']:.4f}" if distill_cfg else ""))

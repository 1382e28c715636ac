"""`densa quickstart`: the main job on embedded defaults, end to end in a few minutes on a laptop CPU.

1. trains a byte-level BPE tokenizer on the embedded TinyStories sample;
2. prepares it into token shards with a held-out split (`densa prepare`);
3. trains the densa model (Mega mixer) and its dense Llama-style baseline of the same size with the same recipe
   (`densa train`, progress bar with tokens/s, loss, lr, ETA and MFU);
4. samples a continuation from each, and prints parameters, FLOPs/token, throughput, MFU and validation
   bits-per-byte side by side. Checkpoints stay under `--out` (load them with any MODEL argument).

`--quick` runs the same pipeline on the tiny preset in seconds (tests and smoke checks).
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import torch

from densa.checkpoint import load_model
from densa.config import PRESETS, from_preset
from densa.counting import count_parameters, flops_per_token
from densa.data.corpora import corpus_texts
from densa.data.prepare import prepare
from densa.data.tokenizer import load_tokenizer, train_tokenizer
from densa.train.config import TrainConfig
from densa.train.loop import train

MARKER = "quickstart.json"
CORPUS = "tinystories"
PROMPT = "Once upon a time"
# per preset: tokenizer/model vocabulary, batch, context, steps (cpu-small: 3-4 minutes per model on 2 cores)
PLANS = {
    "tiny": dict(vocab=512, batch_size=4, context=64, steps=30, eval_batches=2),
    "cpu-small": dict(vocab=8192, batch_size=8, context=256, steps=120, eval_batches=8),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", default="cpu-small", choices=list(PRESETS), help="model size")
    parser.add_argument("--quick", action="store_true", help="the tiny preset for a few steps (seconds)")
    parser.add_argument("--steps", type=int, default=None, help="training steps per model (default: per preset)")
    parser.add_argument("--out", default="runs/quickstart", metavar="DIR",
                        help="tokenizer, data and checkpoints (a previous quickstart there is replaced)")
    parser.add_argument("--context", type=int, default=None, help="training context (default: per preset)")
    parser.add_argument("--seed", type=int, default=0, help="seed for weights and data order")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def _fresh(out: Path) -> None:
    """Use `out`, replacing a previous quickstart's output but never anything else."""
    if out.exists() and any(out.iterdir()):
        if not (out / MARKER).is_file():
            raise FileExistsError(f"--out {out} exists and was not written by densa quickstart; choose another")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).write_text(json.dumps({"written_by": "densa quickstart"}) + "\n")


def main(args: argparse.Namespace) -> None:
    preset = "tiny" if args.quick else args.preset
    plan = PLANS.get(preset, dict(PLANS["cpu-small"], vocab=from_preset(preset).vocab_size))
    context = args.context or plan["context"]
    steps = args.steps or (10 if args.quick else plan["steps"])
    if steps < 1:
        raise ValueError(f"--steps={steps}: must be >= 1")
    if context < 2:
        raise ValueError(f"--context={context}: must be >= 2")
    out = Path(args.out)
    _fresh(out)
    start = time.perf_counter()
    vocab = plan["vocab"]
    print(f"densa quickstart: {preset} densa vs its dense baseline on the embedded {CORPUS} sample -> {out}")
    tokenizer = train_tokenizer(corpus_texts(CORPUS), vocab)
    tokenizer.save_pretrained(str(out / "tokenizer"))
    manifest = prepare(CORPUS, out / "tokenizer", out / "data")
    tr = manifest["splits"]["train"]
    print(f"tokenizer: {len(tokenizer):,} entries; data: {tr['tokens']:,} training tokens "
          f"({tr['bytes'] / tr['tokens']:.2f} bytes/token), {manifest['splits']['valid']['tokens']:,} held out "
          f"[{time.perf_counter() - start:.0f}s]")
    cfg = TrainConfig(data=str(out / "data"), batch_size=plan["batch_size"], context=context, steps=steps,
                      warmup_steps=max(1, steps // 10), lr=3e-3, log_interval=max(1, steps // 20),
                      eval_interval=steps, eval_batches=plan["eval_batches"], checkpoint_interval=steps,
                      keep_last=1, seed=args.seed)
    tok = load_tokenizer(out / "tokenizer")
    rows = {}
    for name, mixer in (("densa (mega)", "mega"), ("dense baseline", "attention")):
        model_cfg = from_preset(preset, mixer=mixer, vocab_size=vocab)
        print(f"\ntraining {name}: {steps} steps of {cfg.batch_size}x{cfg.context} tokens")
        torch.manual_seed(args.seed)
        result = train(model_cfg, cfg, out / mixer, progress=not args.no_progress)
        model = load_model(result.checkpoint).eval()
        prompt = torch.tensor([tok.encode(PROMPT)])
        sample = model.generate(prompt, max_new_tokens=40, temperature=0.8, top_k=40,
                                generator=torch.Generator().manual_seed(args.seed),
                                stop_tokens=[tok.eos_token_id])
        text = tok.decode(sample[0].tolist(), skip_special_tokens=True)
        counts = count_parameters(model)
        rows[name] = {"params": counts.total, "active": counts.active,
                      "gflops": flops_per_token(model_cfg, cfg.context).total / 1e9, "tok_s": result.tokens_per_s,
                      "mfu": result.mfu, "val_loss": result.val_loss, "bpb": result.val_bpb, "sample": text,
                      "checkpoint": str(result.checkpoint)}
    print(f"\n{'model':<16}{'params':>12}{'active':>12}{'GFLOP/token':>13}{'tokens/s':>10}{'MFU':>7}"
          f"{'val loss':>10}{'bits/byte':>11}")
    for name, r in rows.items():
        print(f"{name:<16}{r['params']:>12,}{r['active']:>12,}{r['gflops']:>13.4f}{r['tok_s']:>10,.0f}"
              f"{r['mfu']:>7.1%}{r['val_loss']:>10.3f}{r['bpb']:>11.3f}")
    for name, r in rows.items():
        print(f"\n{name} sample: {r['sample']!r}\n  checkpoint: {r['checkpoint']}")
    (out / "summary.json").write_text(json.dumps(rows, indent=2) + "\n")
    print(f"\ndone in {time.perf_counter() - start:.0f}s; bits/byte is held-out cross-entropy per UTF-8 byte "
          "(lower is better). Continue training with `densa train --config recipes/cpu-small-train.yaml`.")

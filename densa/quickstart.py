"""`densa quickstart`: the main job on embedded defaults, end to end: the iso-FLOP study in miniature.

1. trains a byte-level BPE tokenizer on the embedded TinyStories sample and prepares it into token shards with a
   held-out split (`densa tokenizer train`, `densa prepare`);
2. trains densa (Mega mixer + dynamic MoE) for `--steps` steps and its dense Llama-style baseline (same tokenizer,
   data, optimizer) for the same training FLOPs (densa.counting), with progress bars;
3. samples a continuation from each;
4. evaluates both, and smollm2-135m when installed, on the held-out text: bits per byte (comparable across
   tokenizers) and, when densa's eval API is available, a small fixed subset of the eval suite;
5. writes report.md and report.html (tables, the Intelligence Density comparison, a plot) and summary.json.

Checkpoints: `OUT/mega/checkpoints/latest` (densa) and `OUT/attention/checkpoints/latest` (dense baseline); `densa
eval` with no MODEL looks for them under runs/quickstart. `--quick` runs the same pipeline on the tiny preset in
seconds (tests, smoke checks) and skips smollm2 and the eval suite.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path
from typing import Any

import torch

from densa.checkpoint import load_model
from densa.config import PRESETS, ModelConfig, densa_recipe, from_preset
from densa.counting import count_parameters, flops_per_token
from densa.data.corpora import corpus_texts
from densa.data.prepare import prepare, split_documents
from densa.data.tokenizer import load_tokenizer, train_tokenizer
from densa.measure import heldout_bits_per_byte
from densa.model.model import DensaModel
from densa.report.quickstart import bits_saved_per_gflop, print_table, suite_table, write_report
from densa.study.iso_flop import equal_flop_steps
from densa.train.config import TrainConfig
from densa.train.loop import METRICS, train

MARKER = "quickstart.json"
CORPUS = "tinystories"
PROMPT = "Once upon a time"
# per preset: vocabulary, batch, context, densa's steps, validation batches, held-out bytes for bits/byte
PLANS = {
    "tiny": dict(vocab=512, batch_size=4, context=64, steps=30, eval_batches=2, heldout_bytes=8_000),
    "cpu-small": dict(vocab=8192, batch_size=8, context=256, steps=100, eval_batches=8, heldout_bytes=40_000),
}
# densa = the preset's size with densa's recipe (cpu-small -> exactly the cpu-small-moe preset); the dense baseline is
# the same size with full attention and a SwiGLU FFN
MODELS = {"densa": densa_recipe, "dense baseline": lambda size: dict(size, mixer="attention")}
EVAL_TASKS = ("arc_easy", "piqa")  # log-likelihood tasks with short items, where small models can leave chance


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", default="cpu-small", choices=list(PRESETS), help="model size")
    parser.add_argument("--quick", action="store_true",
                        help="the tiny preset for a few steps, no smollm2 or eval suite (seconds)")
    parser.add_argument("--steps", type=int, default=None,
                        help="densa's training steps (default: per preset); the dense baseline gets equal FLOPs")
    parser.add_argument("--out", default="runs/quickstart", metavar="DIR",
                        help="tokenizer, data, checkpoints and the report (a previous quickstart there is replaced)")
    parser.add_argument("--context", type=int, default=None, help="training context (default: per preset)")
    parser.add_argument("--seed", type=int, default=0, help="seed for weights and data order")
    parser.add_argument("--no-smollm2", action="store_true", help="do not evaluate smollm2-135m beside them")
    parser.add_argument("--eval-limit", type=int, default=20,
                        help="items per task of the eval-suite subset (when densa's eval API is available)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def _fresh(out: Path) -> None:
    """Use `out`, replacing a previous quickstart's output but never anything else."""
    if out.exists() and any(out.iterdir()):
        if not (out / MARKER).is_file():
            raise FileExistsError(f"--out {out} exists and was not written by densa quickstart; choose another")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).write_text(json.dumps({"written_by": "densa quickstart"}) + "\n")


class Clock:
    """Prints numbered stages with the elapsed time, so the whole run shows progress even between bars."""

    def __init__(self, stages: int) -> None:
        self.start, self.stages, self.done = time.perf_counter(), stages, 0

    def stage(self, text: str) -> None:
        self.done += 1
        print(f"\n[{self.done}/{self.stages} {self.elapsed():.0f}s] {text}", flush=True)

    def elapsed(self) -> float:
        return time.perf_counter() - self.start


def heldout_text(max_bytes: int) -> str:
    """The start of the held-out split `densa prepare` made (the last 5% of the TinyStories sample), cut at a
    line break at most `max_bytes` long."""
    _, valid, _ = split_documents(CORPUS, 0.05, None)
    text = "".join(valid)
    if len(text.encode("utf-8")) <= max_bytes:
        return text
    cut = text.encode("utf-8")[:max_bytes].decode("utf-8", errors="ignore")
    return cut[: cut.rfind("\n") + 1] or cut


def sample(model: DensaModel, tokenizer: Any, seed: int) -> str:
    prompt = torch.tensor([tokenizer.encode(PROMPT, add_special_tokens=False)])
    out = model.generate(prompt, max_new_tokens=40, temperature=0.8, top_k=40,
                         generator=torch.Generator().manual_seed(seed), stop_tokens=[tokenizer.eos_token_id])
    return tokenizer.decode(out[0].tolist(), skip_special_tokens=True)


def validation_curve(run_dir: Path, flops_per_step: float) -> list[tuple[float, float]]:
    """(training FLOPs, validation bits/byte) at each evaluation of a run."""
    records = [json.loads(line) for line in (run_dir / METRICS).read_text().splitlines() if line]
    return [(r["step"] * flops_per_step, r["val_bpb"]) for r in records if r.get("kind") == "eval"]


def main(args: argparse.Namespace) -> None:
    preset = "tiny" if args.quick else args.preset
    plan = PLANS.get(preset, dict(PLANS["cpu-small"], vocab=from_preset(preset).vocab_size))
    context = args.context or plan["context"]
    steps = args.steps or (10 if args.quick else plan["steps"])
    if steps < 1:
        raise ValueError(f"--steps={steps}: must be >= 1")
    if context < 2:
        raise ValueError(f"--context={context}: must be >= 2")
    if args.eval_limit < 1:
        raise ValueError(f"--eval-limit={args.eval_limit}: must be >= 1")
    with_smollm2 = not (args.quick or args.no_smollm2)
    progress = not args.no_progress
    out = Path(args.out)
    _fresh(out)
    clock = Clock(stages=6)
    print(f"densa quickstart: {preset} densa vs its dense baseline at equal training FLOPs on the embedded {CORPUS} "
          f"sample -> {out}")

    clock.stage("tokenizer and data")
    vocab = plan["vocab"]
    tokenizer = train_tokenizer(corpus_texts(CORPUS), vocab)
    tokenizer.save_pretrained(str(out / "tokenizer"))
    manifest = prepare(CORPUS, out / "tokenizer", out / "data")
    tr = manifest["splits"]["train"]
    print(f"tokenizer: {len(tokenizer):,} entries; data: {tr['tokens']:,} training tokens "
          f"({tr['bytes'] / tr['tokens']:.2f} bytes/token), {manifest['splits']['valid']['tokens']:,} held out")
    tok = load_tokenizer(out / "tokenizer")
    base = TrainConfig(data=str(out / "data"), batch_size=plan["batch_size"], context=context, steps=steps,
                       lr=3e-3, eval_batches=plan["eval_batches"], keep_last=1, seed=args.seed)
    tokens_per_step = base.batch_size * base.context
    configs = {name: ModelConfig(**dict(recipe(PRESETS[preset]), vocab_size=vocab)) for name, recipe in MODELS.items()}
    budget = flops_per_token(configs["densa"], context).training * tokens_per_step * steps

    rows: dict[str, dict[str, Any]] = {}
    for name in MODELS:
        cfg = configs[name]
        per_token = flops_per_token(cfg, context).training
        n = equal_flop_steps(budget, per_token, tokens_per_step)
        clock.stage(f"training {name}: {n} steps of {base.batch_size}x{context} tokens "
                    f"({budget:.3g} training FLOPs)")
        run_cfg = TrainConfig(**{**base.to_dict(), "steps": n, "warmup_steps": max(1, n // 10),
                                 "log_interval": max(1, n // 20), "eval_interval": max(1, n // 5),
                                 "checkpoint_interval": n})
        torch.manual_seed(args.seed)
        result = train(cfg, run_cfg, out / cfg.mixer, progress=progress)
        model = load_model(result.checkpoint).eval()
        counts = count_parameters(model)
        rows[name] = {"params": counts.total, "active": counts.active, "steps": n,
                      "training_flops": per_token * tokens_per_step * n, "tokens_per_s": result.tokens_per_s,
                      "mfu": result.mfu, "val_loss": result.val_loss, "val_bpb": result.val_bpb,
                      "sample": sample(model, tok, args.seed), "checkpoint": str(result.checkpoint),
                      "curve": validation_curve(out / cfg.mixer, per_token * tokens_per_step), "config": cfg,
                      "model": model, "tokenizer": tok, "context": context}

    clock.stage("held-out bits per byte" + (" (and smollm2-135m)" if with_smollm2 else ""))
    text = heldout_text(plan["heldout_bytes"])
    if with_smollm2:
        smol = _load_smollm2()
        if isinstance(smol, str):
            print(f"smollm2-135m skipped: {smol}")
        else:
            rows["smollm2-135m"] = smol
    for name, row in rows.items():
        ctx = min(row["context"], row["config"].max_position_embeddings)
        measured = heldout_bits_per_byte(row["model"], row["tokenizer"], text, ctx, progress=progress, desc=name)
        row.update(heldout_bpb=measured.bpb, bytes_per_token=measured.bytes / measured.tokens,
                   gflops_per_token=measured.flops_per_token / 1e9, ffn_experts=measured.ffn_experts)
        row["gflops_per_byte"] = row["gflops_per_token"] / row["bytes_per_token"]
        row["bits_saved_per_gflop"] = bits_saved_per_gflop(row).value  # densa.eval.density's definition
        print(f"{name}: {measured.bpb:.3f} bits/byte over {measured.bytes:,} held-out bytes")

    clock.stage("eval-suite subset")
    suite = None if args.quick else _eval_suite(rows, out, args.eval_limit, progress)

    clock.stage("report")
    print_table(rows)
    paths = write_report(rows, suite, out, preset=preset, corpus=CORPUS, text_bytes=len(text.encode("utf-8")),
                         wall_s=clock.elapsed())
    summary = {name: {k: v for k, v in row.items() if k not in ("model", "tokenizer", "config")}
               for name, row in rows.items()}
    (out / "summary.json").write_text(json.dumps({"models": summary, "eval_suite": suite,
                                                  "wall_s": round(clock.elapsed(), 1)}, indent=2) + "\n")
    for name, row in rows.items():
        if "sample" in row:
            print(f"\n{name} sample: {row['sample']!r}")
    print(f"\nreport: {paths[0]} and {paths[1]}; checkpoints under {out}/mega and {out}/attention")
    print(f"done in {clock.elapsed():.0f}s. bits/byte is held-out cross-entropy per UTF-8 byte (lower is better). "
          "Next: `densa eval`, and `densa study iso-flop` for the full comparison.")


def _load_smollm2() -> dict[str, Any] | str:
    """smollm2-135m as a report row, or why it is unavailable."""
    from densa.resolve import resolve

    try:
        resolved = resolve("smollm2-135m")
    except (OSError, ValueError, ImportError) as exc:
        return str(exc)
    model = resolved.model
    counts = count_parameters(model)
    return {"params": counts.total, "active": counts.active, "config": model.config, "model": model,
            "tokenizer": resolved.tokenizer, "context": 512, "note": "SmolLM2-135M-Instruct (Q4_1 GGUF), pretrained "
            "by Hugging Face on about 2T tokens; not trained here"}


def _eval_suite(rows: dict[str, dict[str, Any]], out: Path, limit: int, progress: bool) -> dict[str, Any] | None:
    """A small fixed subset of the eval suite (densa.eval.api.evaluate) for every model, as a report table; None
    when that API is missing. Scores whose 95% interval includes chance get no Intelligence Density."""
    try:
        from densa.eval.api import evaluate
    except ImportError:
        print("eval suite skipped: densa.eval.api is not available in this version")
        return None
    specs = {name: str(row["checkpoint"]) if "checkpoint" in row else "smollm2-135m" for name, row in rows.items()}
    records = evaluate(list(specs.values()), list(EVAL_TASKS), limit, out / "eval", progress=progress,
                       labels={spec: name for name, spec in specs.items()})
    return suite_table(records, {spec: name for name, spec in specs.items()}, limit)

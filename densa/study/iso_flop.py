"""`densa study iso-flop`: densa vs a dense transformer vs a top-k MoE (and ablations) at equal training FLOPs.

Every run shares the tokenizer (byte-level BPE trained on the training books), the data (Gutenberg training shards;
validation on the held-out books), the optimizer and schedule (the recipe's `train:` section) and a training-FLOP
budget: a variant's step count is `budget / (training FLOPs per token × tokens per step)` with densa.counting's
analytic FLOPs (a dynamic MoE costed at its budget target), so cheaper models take more steps. After training, a
dynamic MoE's FLOPs are recomputed from what its layers actually routed (the trainer's `routing/*flops_per_token`
log), and every curve's x-axis uses the FLOPs spent.

The six variants are the 2 × 3 grid {mega, attention} × {dynamic MoE, top-k MoE, dense SwiGLU}:
densa (mega + dynamic MoE), dense (Llama-style), topk_moe (attention + top-k MoE with densa's experts and K = densa's
target, so total parameters and average active FLOPs match), and three ablations, one factor each.

Headline: `flops_to_dense_loss_ratio` = training FLOPs densa needs to reach the dense baseline's final validation
loss ÷ the dense run's FLOPs (first crossing of densa's validation curve, linear interpolation between evaluations,
the cheapest of densa's runs of that seed; per seed, mean and t-interval over seeds). docs/iso-flop.md has the rest.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from tqdm import tqdm

from densa.checkpoint import load_model
from densa.config import ConfigError, ModelConfig, from_preset, read_recipe
from densa.counting import count_parameters, flops_per_token
from densa.data.corpora import corpus_texts
from densa.data.prepare import prepare
from densa.data.pretrain import TokenStream
from densa.data.tokenizer import load_tokenizer, train_tokenizer
from densa.measure import bits_per_byte, forward_flops_per_token, token_byte_lengths
from densa.model.model import DensaModel
from densa.study.iso_flop_analysis import plot, render_table, summarise
from densa.train import distributed
from densa.train.config import TrainConfig
from densa.train.loop import METRICS, train

RECIPES = Path(__file__).resolve().parents[2] / "recipes"


@dataclass(frozen=True)
class Variant:
    name: str
    mixer: str
    ffn: str
    role: str  # "main" (seeds), "ablation" (ablation_seeds) or "lever" (the inference-density study's extra arms)
    what: str
    # further ModelConfig fields, derived from the study's base config (a lever: layout, widths, budget)
    changes: Callable[[ModelConfig], dict[str, Any]] | None = None

    def describe(self) -> dict[str, str]:
        """The JSON-able part (the results files)."""
        return {"name": self.name, "mixer": self.mixer, "ffn": self.ffn, "role": self.role, "what": self.what}


# the inference-density levers (densa study inference-density, docs/inference-density.md): a cheaper mixer, a
# hybrid layout with a few full-attention layers, narrower Mega widths, fewer FFN experts per token
VARIANTS = {v.name: v for v in (
    Variant("densa", "mega", "moe", "main", "Mega mixer + dynamic MoE"),
    Variant("dense", "attention", "swiglu", "main", "Llama-style transformer, dense SwiGLU"),
    Variant("topk_moe", "attention", "topk_moe", "main", "transformer + top-k MoE (densa's experts, K = its target)"),
    Variant("mega_topk", "mega", "topk_moe", "ablation", "densa without dynamic routing (mega + top-k MoE)"),
    Variant("mega_dense", "mega", "swiglu", "ablation", "densa's mixer with a dense SwiGLU"),
    Variant("attention_moe", "attention", "moe", "ablation", "dense attention with densa's dynamic MoE"),
    Variant("delta_moe", "deltanet", "moe", "lever", "gated delta-rule mixer + dynamic MoE"),
    Variant("delta_hybrid_moe", "deltanet", "moe", "lever",
            "gated delta rule with every 3rd layer full attention + dynamic MoE", lambda b: {"attention_every": 3}),
    Variant("mega_hybrid_moe", "mega", "moe", "lever", "Mega with every 3rd layer full attention + dynamic MoE",
            lambda b: {"attention_every": 3}),
    Variant("mega_narrow_moe", "mega", "moe", "lever", "Mega at half value width and ema_dim 8 + dynamic MoE",
            lambda b: {"value_dim": b.value_dim // 2, "ema_dim": 8}),
    Variant("mega_moe_lean", "mega", "moe", "lever", "densa with 2 FFN experts per token (of 4 slots)",
            lambda b: {"target_active_experts": 2.0}),
    Variant("delta_moe_lean", "deltanet", "moe", "lever", "gated delta rule + 2 FFN experts per token",
            lambda b: {"target_active_experts": 2.0}),
)}
CLASSIC = [name for name, v in VARIANTS.items() if v.role != "lever"]  # the iso-FLOP study's own six


@dataclass(kw_only=True)
class StudyConfig:
    """The recipe's `study:` and `data:` sections."""

    budgets: list[float]  # training FLOPs per run, one scaling point each
    seeds: int = 3  # seeds of the main variants (densa, dense, topk_moe)
    ablation_seeds: int = 1
    ablation_budgets: str = "all"  # "all" or "largest": train the ablations at every budget or only the largest
    variants: list[str] = dataclasses.field(default_factory=lambda: list(CLASSIC))
    warmup_fraction: float = 0.05  # warm-up steps as a share of each run's steps
    evals_per_run: int = 8  # points on each validation curve
    eval_windows: int = 64  # final held-out evaluation: windows spread over all held-out books
    decode_tokens: int = 32  # measured ms/token: tokens decoded (cached, batch 1) after a 32-token prompt
    keep_checkpoints: bool = False
    eval_tasks: list[str] = dataclasses.field(default_factory=list)  # densa eval tasks, on seed 0 at the top budget
    eval_limit: int = 40  # items per eval task (a seeded subset, the same for every model)
    corpus: str = "gutenberg"
    max_docs: int = 8  # training books (the held-out books are the corpus' own)
    vocab_size: int = 2048

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):  # a `--set` of the wrong type: one line naming the field
            value = getattr(self, f.name)
            ok = {"int": isinstance(value, int) and not isinstance(value, bool),
                  "float": isinstance(value, int | float) and not isinstance(value, bool),
                  "str": isinstance(value, str), "bool": isinstance(value, bool),
                  "list[str]": isinstance(value, list)}.get(str(f.type), True)
            if not ok:
                raise ConfigError(f"study.{f.name}={value!r}: expected {f.type}")
        try:  # YAML reads 5.0e11 (no exponent sign) as a string
            budgets = [float(b) for b in self.budgets] if isinstance(self.budgets, list) else None
        except (TypeError, ValueError):
            budgets = None
        if budgets is None:
            raise ConfigError(f"study.budgets={self.budgets!r}: expected a list of FLOP counts, e.g. [5.0e11, 1.0e12]")
        if not self.budgets or any(float(b) <= 0 for b in self.budgets):
            raise ConfigError(f"study.budgets={self.budgets}: need one or more positive FLOP counts")
        self.budgets = sorted(float(b) for b in self.budgets)
        unknown = sorted(set(self.variants) - set(VARIANTS))
        if unknown or "dense" not in self.variants:
            raise ConfigError(f"study.variants={self.variants}: must include 'dense' and only name "
                              f"{', '.join(VARIANTS)}")
        for name in ("seeds", "ablation_seeds", "evals_per_run", "eval_windows", "decode_tokens", "max_docs",
                     "eval_limit"):
            if getattr(self, name) < 1:
                raise ConfigError(f"study.{name}={getattr(self, name)}: must be >= 1")
        if self.eval_tasks:  # fail now, not after an hour of training
            from densa.eval.benchmarks import parse_tasks

            self.eval_tasks = parse_tasks(self.eval_tasks)
        if self.ablation_budgets not in ("all", "largest"):
            raise ConfigError(f"study.ablation_budgets={self.ablation_budgets!r}: choose all or largest")
        if not 0 <= self.warmup_fraction < 1:
            raise ConfigError(f"study.warmup_fraction={self.warmup_fraction}: must be in [0, 1)")


# ------------------------------------------------------------------------------------------------- configuration

def load_study(recipe: Path, overrides: list[str], seeds: int | None
               ) -> tuple[StudyConfig, ModelConfig, dict[str, Any]]:
    """(study config, the shared base model config, the `train:` fields) from the recipe and `--set` overrides
    (`section.key=value`, value parsed as YAML; sections study, data, model, train)."""
    doc = read_recipe(recipe)
    extra = sorted(set(doc) - {"study", "data", "model", "train"})
    if extra:
        raise ConfigError(f"recipe {str(recipe)!r}: unknown section(s) {extra}; valid: study, data, model, train")
    sections = {k: dict(doc.get(k) or {}) for k in ("study", "data", "model", "train")}
    for pair in overrides:
        key, sep, raw = pair.partition("=")
        section, dot, name = key.strip().partition(".")
        if not sep or not dot or section not in sections:
            raise ConfigError(f"--set {pair!r}: expected SECTION.KEY=VALUE with SECTION one of study, data, model, "
                              "train")
        sections[section][name] = yaml.safe_load(raw)
    if seeds is not None:
        sections["study"]["seeds"] = seeds
    fields = {f.name for f in dataclasses.fields(StudyConfig)}
    study = {**sections["study"], **sections["data"]}
    unknown = sorted(set(study) - fields)
    if unknown:
        raise ConfigError(f"unknown study/data key(s) {unknown}; valid: {', '.join(sorted(fields))}")
    model = dict(sections["model"])
    preset = model.pop("preset", "tiny")
    for reserved in ("data", "steps", "seed"):
        if reserved in sections["train"]:
            raise ConfigError(f"train.{reserved} is set by the study; remove it from the recipe")
    TrainConfig(**sections["train"], data="-")  # validate the train fields now, not after the data is prepared
    study_cfg = StudyConfig(**study)
    base = from_preset(preset, **{**model, "vocab_size": study_cfg.vocab_size})  # the study's tokenizer
    return study_cfg, base, sections["train"]


def variant_config(base: ModelConfig, variant: Variant) -> ModelConfig:
    """The base with the variant's mixer and FFN. Every MoE keeps the base's expert width F; the top-k MoE routes
    K = densa's target experts, so it has densa's FFN experts (total parameters) and active FFN FLOPs."""
    changes: dict[str, Any] = {"mixer": variant.mixer, "ffn": variant.ffn}
    if variant.changes is not None:
        changes.update(variant.changes(base))
    if variant.ffn != "swiglu":
        changes["moe_intermediate_size"] = base.expert_intermediate_size
    if variant.ffn == "topk_moe":
        changes["num_experts_per_tok"] = max(1, round(base.target_active_experts))
    return base.replace(**changes)


def equal_flop_steps(budget: float, training_flops_per_token: float, tokens_per_step: int) -> int:
    """Optimizer steps whose training FLOPs come closest to `budget` (at least 1)."""
    return max(1, round(budget / (training_flops_per_token * tokens_per_step)))


# ------------------------------------------------------------------------------------------------- data

def prepare_data(study: StudyConfig, out: Path) -> Path:
    """Tokenizer + shards under out/data, once (reused when the manifest matches the recipe)."""
    data = out / "data"
    stamp = {"corpus": study.corpus, "max_docs": study.max_docs, "vocab_size": study.vocab_size}
    if (data / "study-data.json").is_file() and json.loads((data / "study-data.json").read_text()) == stamp:
        return data
    texts = list(corpus_texts(study.corpus, "train"))[: study.max_docs]
    tokenizer = train_tokenizer(texts, study.vocab_size)
    tokenizer.save_pretrained(str(out / "tokenizer"))
    prepare(study.corpus, out / "tokenizer", data, max_docs=study.max_docs)
    (data / "study-data.json").write_text(json.dumps(stamp) + "\n")
    return data


# ------------------------------------------------------------------------------------------------- one run

def spent_training_flops_per_token(cfg: ModelConfig, context: int, metrics: list[dict]) -> float:
    """Training FLOPs per token actually spent: 3 × the measurement core's forward FLOPs, with each MoE layer at the
    mean FFN experts it logged during training (`routing/layers.{i}.mean_ffn_experts`)."""
    logged = [r for r in metrics if r.get("kind") == "train" and "routing/layers.0.mean_ffn_experts" in r]
    if cfg.ffn == "swiglu" or not logged:
        return 3 * forward_flops_per_token(cfg, context)
    experts = [statistics.fmean(r[f"routing/layers.{i}.mean_ffn_experts"] for r in logged)
               for i in range(cfg.num_hidden_layers)]
    return 3 * forward_flops_per_token(cfg, context, experts)


def heldout_windows(data: Path, context: int, n: int) -> torch.Tensor:
    """`n` windows of context + 1 tokens at evenly spaced offsets across the whole validation split (every held-out
    book), (n, context + 1)."""
    stream = TokenStream(data, "valid")
    last = stream.tokens - (context + 1)
    starts = [round(i * last / max(1, n - 1)) for i in range(n)]
    return torch.stack([torch.from_numpy(stream.read(s, context + 1)) for s in starts])


@torch.inference_mode()
def decode_ms_per_token(model: DensaModel, prompt: torch.Tensor, new_tokens: int, repeats: int = 3) -> float:
    """Wall ms per generated token: cached greedy decoding at batch 1 after prefilling `prompt` (1, P); the median
    step of each repeat, then the fastest repeat (on a shared machine the slow repeats are other people's load)."""
    model.eval()
    sync = torch.cuda.synchronize if prompt.is_cuda else (lambda: None)
    medians = []
    for _ in range(repeats):
        cache, times = model.new_cache(), []
        next_id = model(prompt, cache=cache).logits[:, -1:].argmax(-1)
        for _ in range(new_tokens):
            sync()
            start = time.perf_counter()
            next_id = model(next_id, cache=cache).logits[:, -1:].argmax(-1)
            sync()
            times.append(time.perf_counter() - start)
        medians.append(statistics.median(times))
    return min(medians) * 1e3


def run_dir_of(out: Path, variant: Variant, budget_index: int, seed: int) -> Path:
    return out / "runs" / f"{variant.name}-b{budget_index}-s{seed}"


def run_one(variant: Variant, budget_index: int, budget: float, seed: int, base: ModelConfig,
            train_fields: dict[str, Any], study: StudyConfig, data: Path, out: Path, progress: bool,
            ctx: distributed.Dist) -> dict | None:
    """Train one (variant, budget, seed), evaluate it, and return its record (cached in result.json). Under torchrun
    every rank trains; rank 0 alone evaluates and writes, the others return None."""
    run_dir = run_dir_of(out, variant, budget_index, seed)
    if ctx.is_main:
        shutil.rmtree(run_dir, ignore_errors=True)  # an interrupted run starts over
    distributed.barrier(ctx)
    cfg = variant_config(base, variant)
    probe = TrainConfig(**train_fields, data=str(data))
    tokens_per_step = probe.batch_size * probe.context * probe.grad_accum
    steps = equal_flop_steps(budget, flops_per_token(cfg, probe.context).training, tokens_per_step)
    tcfg = dataclasses.replace(probe, steps=steps, seed=seed, warmup_steps=round(study.warmup_fraction * steps),
                               eval_interval=max(1, steps // study.evals_per_run), log_interval=max(1, steps // 50),
                               checkpoint_interval=steps, keep_last=1)
    start = time.perf_counter()
    result = train(cfg, tcfg, run_dir, progress=progress)
    train_s = time.perf_counter() - start
    if not ctx.is_main:
        return None
    metrics = [json.loads(line) for line in (run_dir / METRICS).read_text().splitlines() if line]
    per_token = spent_training_flops_per_token(cfg, tcfg.context, metrics)
    curve = [[r["step"] * tokens_per_step * per_token, r["val_loss"], r["val_bpb"]]
             for r in metrics if r.get("kind") == "eval"]
    model = load_model(result.checkpoint).to(ctx.device)
    windows = heldout_windows(data, tcfg.context, study.eval_windows).to(ctx.device)
    final = bits_per_byte(model, windows, token_byte_lengths(load_tokenizer(data / "tokenizer"), cfg.vocab_size))
    counts = count_parameters(model)
    record = {
        "variant": variant.name, "budget_index": budget_index, "budget": budget, "seed": seed, "steps": steps,
        "tokens": steps * tokens_per_step, "training_flops": steps * tokens_per_step * per_token,
        "training_flops_per_token": per_token, "analytic_training_flops_per_token":
            flops_per_token(cfg, tcfg.context).training,
        "inference_flops_per_token": final.flops_per_token,
        "params_total": counts.total, "params_active": counts.active,
        "val_loss": final.nats_per_token, "val_bpb": final.bpb, "ffn_experts": final.ffn_experts,
        "curve": curve, "train_s": train_s, "tokens_per_s": result.tokens_per_s,
        "ms_per_token": decode_ms_per_token(model, windows[:1, :32], study.decode_tokens),
    }
    if study.eval_tasks and seed == 0 and budget_index == len(study.budgets) - 1 and variant.role == "main":
        record["eval_suite"] = eval_suite(result.checkpoint, variant.name, study, run_dir / "eval", progress)
    if not study.keep_checkpoints:
        shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
    (run_dir / "result.json").write_text(json.dumps(record, indent=1) + "\n")
    return record


def eval_suite(checkpoint: Path, label: str, study: StudyConfig, out: Path, progress: bool) -> dict:
    """The eval-suite subset (densa.eval.api) on one checkpoint: per task the score, its 95% interval, chance, and
    whether the interval's lower end is above chance (only those scores say anything about the model)."""
    from densa.eval.api import evaluate

    records = evaluate([str(checkpoint)], study.eval_tasks, study.eval_limit, out, progress=progress,
                       labels={str(checkpoint): label})
    suite = {}
    for r in records:
        ci, chance = r.get("score_ci"), r.get("chance")
        above = None if r.get("at_chance") is None else not r["at_chance"]  # densa.eval.density's rule
        suite[r["task"]] = {"score": r["score"], "score_ci": ci, "chance": chance, "above_chance": above,
                            "n_items": r.get("n_items")}
    return suite


# ------------------------------------------------------------------------------------------------- entry point

def default_recipe(quick: bool) -> Path:
    return RECIPES / ("iso-flop-quick.yaml" if quick else "iso-flop-cpu.yaml")


def run(args: argparse.Namespace, out: Path) -> dict:
    """Prepare the data, train every (variant, budget, seed) at equal FLOPs, evaluate, plot and summarise."""
    recipe = Path(args.config) if args.config else default_recipe(args.quick)
    study, base, train_fields = load_study(recipe, list(getattr(args, "overrides", None) or []), args.seeds)
    progress = not getattr(args, "no_progress", False)
    ctx = distributed.setup(train_fields.get("distributed", "auto"))  # torchrun: every rank runs the same plan
    if ctx.is_main:
        print(f"iso-flop study: {recipe} -> {out}")
        prepare_data(study, out)
    distributed.barrier(ctx)
    data = out / "data"
    # seed-major order: an interrupted study holds whole seeds (every variant and budget), which a rerun with fewer
    # --seeds summarises without training anything
    plan = [(VARIANTS[name], b, budget, seed)
            for seed in range(max(study.seeds, study.ablation_seeds))
            for b, budget in enumerate(study.budgets)
            for name in study.variants
            if seed < (study.seeds if VARIANTS[name].role == "main" else study.ablation_seeds)
            and (VARIANTS[name].role == "main" or study.ablation_budgets == "all" or b == len(study.budgets) - 1)]
    # decided once, before anyone writes, so that every rank skips the same finished runs
    done = [(run_dir_of(out, v, b, s) / "result.json").is_file() for v, b, _, s in plan]
    distributed.barrier(ctx)
    records = []
    bar = tqdm(plan, disable=not (progress and ctx.is_main), unit="run", desc="iso-flop runs", position=0)
    for (variant, b, budget, seed), finished in zip(bar, done, strict=True):
        bar.set_postfix_str(f"{variant.name} budget {budget:.2g} seed {seed}")
        if finished:
            records.append(json.loads((run_dir_of(out, variant, b, seed) / "result.json").read_text()))
        else:
            records.append(run_one(variant, b, budget, seed, base, train_fields, study, data, out, progress, ctx))
    bar.close()
    if not ctx.is_main:  # wait for rank 0's summary and return the same figures
        distributed.barrier(ctx)
        return json.loads((out / "iso-flop-flat.json").read_text())
    flat, table = summarise(records, study)
    plots = plot(records, table, study, out)
    detail = {"recipe": str(recipe), "study": dataclasses.asdict(study), "base_model": base.to_dict(),
              "train": train_fields, "variants": {n: VARIANTS[n].describe() for n in study.variants},
              "table": table, "runs": records, "plots": [p.name for p in plots]}
    (out / "iso-flop-detail.json").write_text(json.dumps(detail, indent=1) + "\n")
    print(render_table(table, study))
    flat = {**flat, "runs": len(records), "plots": [str(p) for p in plots]}
    (out / "iso-flop-flat.json").write_text(json.dumps(flat, indent=1) + "\n")
    distributed.barrier(ctx)
    return flat

"""`densa study high-value-tokens`: uniform vs selective (Rho-1) vs value-curriculum training at equal total FLOPs.

Setup (docs/high-value-tokens.md has the reasoning and the measured figures):
- Text: the embedded TinyStories sample, cut into documents of `paragraphs_per_doc` paragraphs and shuffled with a
  fixed seed; 10% are held out for validation, 10% are the reference model's clean seed set, the rest is training
  text. Two training corpora share everything else: `noisy` (the training documents with densa/data/noise.py noise at
  `noise_rate`) and `clean` (the same documents as they are). Validation is the same clean held-out text for both.
- Tokenizer: byte-level BPE (`vocab_size`) trained on the clean seed + training documents.
- Reference model (Rho-1): a smaller densa model trained for `reference_steps` on the clean seed set only; it scores
  both corpora (densa/data/reference.py), which also gives every document its value.
- Arms, per corpus and seed: `uniform` (plain next-token loss), `selective` (train.token_selection=rho1 with
  `select_fraction`), `curriculum` (train.curriculum=value). Same model, optimiser and schedule shape (cosine to a
  moderate `min_lr_ratio`, which Luo et al. 2025, arXiv 2511.18903, recommend for ordered data;
  docs/high-value-tokens.md, 'Value curriculum').
- Equal total FLOPs: uniform trains `steps` steps, which sets the budget B = steps × tokens/step × training
  FLOPs/token. The other arms are charged the reference model's training plus scoring the whole training split once
  (what the trainer adds to its FLOP count, `reference_cost`) and get the steps that fit in what remains.

Headline, per corpus and method: `flops_to_baseline_ratio` = the total FLOPs at which the method's validation curve
first reaches the uniform run's final validation loss (same seed; linear interpolation between evaluations) ÷ B. It
is null for a seed whose curve never gets there within B, and the mean over seeds (with a t 95% interval) is reported
only when every seed got there; `_seeds_reached` says how many did. `val_loss_delta` (method − uniform final
validation loss at equal FLOPs) is always reported, with its t 95% interval.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import statistics
import tempfile
import typing
from dataclasses import dataclass
from pathlib import Path

import matplotlib
import numpy as np
import torch
from scipy import stats as scipy_stats
from tqdm import tqdm

from densa.checkpoint import load_model
from densa.config import ConfigError, _parse_value, from_preset
from densa.counting import count_parameters, flops_per_token
from densa.data.corpora import corpus_texts
from densa.data.noise import NoiseConfig, inject_noise_with_spans, noise_share
from densa.data.prepare import load_manifest, prepare_documents
from densa.data.pretrain import PretrainLoader
from densa.data.reference import reference_cost, score_reference
from densa.data.tokenizer import load_tokenizer, train_tokenizer
from densa.model.model import DensaModel
from densa.study.stats import first_crossing, mean_ci
from densa.train.config import TrainConfig
from densa.train.loop import METRICS, train
from densa.train.selection import select_tokens, token_losses
from densa.train.state import latest_checkpoint

CORPORA = ("noisy", "clean")
METHODS = ("uniform", "selective", "curriculum")


@dataclass(kw_only=True)
class StudySize:
    """Everything that sets the study's size; `--set FIELD=VALUE` overrides any field."""

    docs_fraction: float = 1.0  # share of the TinyStories documents used
    paragraphs_per_doc: int = 4
    vocab_size: int = 512
    hidden_size: int = 128  # the trained model: the `tiny` preset at this width
    reference_hidden_size: int = 64  # the reference model: `tiny` at this width
    steps: int = 360  # the uniform run's steps; sets the FLOP budget
    reference_steps: int = 100
    batch_size: int = 16
    context: int = 64
    lr: float = 3e-3
    min_lr_ratio: float = 0.3
    eval_points: int = 9  # validation runs along the uniform run (same step interval for every run)
    eval_batches: int = 8
    seeds: int = 3
    noise_rate: float = 0.3  # expected share of noise characters in the noisy corpus
    select_fraction: float = 0.6


FULL = StudySize()
QUICK = StudySize(docs_fraction=0.1, hidden_size=64, reference_hidden_size=32, steps=80, reference_steps=30,
                  batch_size=8, eval_points=5, eval_batches=4, seeds=2)


def size_from_args(args: argparse.Namespace) -> StudySize:
    if getattr(args, "config", None):
        raise ConfigError("high-value-tokens takes no --config; change its size with --set FIELD=VALUE "
                          f"(fields: {', '.join(f.name for f in dataclasses.fields(StudySize))})")
    size = QUICK if args.quick else FULL
    hints = typing.get_type_hints(StudySize)
    changes: dict[str, typing.Any] = {}
    for pair in getattr(args, "overrides", None) or []:
        key, sep, raw = pair.partition("=")
        if not sep or key.strip() not in hints:
            raise ConfigError(f"--set {pair!r}: expected FIELD=VALUE with FIELD one of {', '.join(hints)}")
        changes[key.strip()] = _parse_value(key.strip(), raw.strip(), hints[key.strip()])
    if args.seeds is not None:
        changes["seeds"] = args.seeds
    size = dataclasses.replace(size, **changes)
    if size.seeds < 1 or size.steps < 2 or size.reference_steps < 1:
        raise ConfigError(f"seeds={size.seeds}, steps={size.steps}, reference_steps={size.reference_steps}: "
                          "need seeds >= 1, steps >= 2, reference_steps >= 1")
    return size


# --------------------------------------------------------------------------- data


def story_documents(size: StudySize) -> tuple[list[str], list[str], list[str]]:
    """(validation, reference seed, training) documents of clean TinyStories text."""
    text = "".join(corpus_texts("tinystories"))
    paragraphs = [p.strip() for p in text.split("\n\n") if p.strip()]
    k = size.paragraphs_per_doc
    docs = ["\n\n".join(paragraphs[i:i + k]) + "\n" for i in range(0, len(paragraphs), k)]
    random.Random(0).shuffle(docs)
    docs = docs[:max(30, int(len(docs) * size.docs_fraction))]
    tenth = len(docs) // 10
    return docs[:tenth], docs[tenth:2 * tenth], docs[2 * tenth:]


def model_config(size: StudySize, hidden: int):
    """The `tiny` preset at width `hidden` (FFN, EMA-value and q/k widths scale with it)."""
    return from_preset("tiny", vocab_size=size.vocab_size, hidden_size=hidden, intermediate_size=hidden * 11 // 4,
                       value_dim=2 * hidden, shared_qk_dim=max(16, hidden // 2))


def train_config(size: StudySize, data: Path, steps: int, seed: int, **extra) -> TrainConfig:
    interval = max(1, size.steps // size.eval_points)
    return TrainConfig(data=str(data), batch_size=size.batch_size, context=size.context, steps=steps, lr=size.lr,
                       min_lr_ratio=size.min_lr_ratio, warmup_steps=max(1, steps // 10), log_interval=interval,
                       eval_interval=interval, eval_batches=size.eval_batches, checkpoint_interval=steps, keep_last=1,
                       seed=seed, **extra)


def curve(run: Path) -> list[tuple[float, float]]:
    """(total FLOPs, validation loss) of each evaluation of a run, in order."""
    records = [json.loads(line) for line in (run / METRICS).read_text().splitlines()]
    return [(r["flops"], r["val_loss"]) for r in records if r["kind"] == "eval"]


# --------------------------------------------------------------------------- analysis


def r6(x: float | None) -> float | None:
    return None if x is None else round(x, 6)


def summarise(curves: dict, budget: float, offsets: dict[str, float], seeds: int) -> dict:
    """Flat headline keys from `curves[corpus][method][seed]` (lists of (FLOPs, validation loss))."""
    out: dict[str, typing.Any] = {}
    for corpus in CORPORA:
        uniform_final = [curves[corpus]["uniform"][s][-1][1] for s in range(seeds)]
        out[f"{corpus}_uniform_final_val_loss"] = r6(statistics.fmean(uniform_final))
        for method in METHODS[1:]:
            key = f"{corpus}_{method}"
            finals = [curves[corpus][method][s][-1][1] for s in range(seeds)]
            ratios = [first_crossing(curves[corpus][method][s], uniform_final[s]) for s in range(seeds)]
            ratios = [None if r is None else r / budget for r in ratios]
            out[f"{key}_final_val_loss"] = r6(statistics.fmean(finals))
            reached = [r for r in ratios if r is not None]
            out[f"{key}_seeds_reached"] = len(reached)
            mean, low, high = mean_ci(reached) if len(reached) == seeds else (None, None, None)
            out[f"{key}_flops_to_baseline_ratio"] = r6(mean)
            out[f"{key}_flops_to_baseline_ratio_ci_low"] = r6(low)
            out[f"{key}_flops_to_baseline_ratio_ci_high"] = r6(high)
            # the same with the reference model free (its cost amortised over many runs, as in Rho-1): training
            # FLOPs only; the runs still had the fewer steps the charged budget left them
            training_only = [r - offsets[corpus] / budget for r in reached]
            mean, low, high = mean_ci(training_only) if len(reached) == seeds else (None, None, None)
            out[f"{key}_flops_to_baseline_ratio_training_only"] = r6(mean)
            out[f"{key}_flops_to_baseline_ratio_training_only_ci_low"] = r6(low)
            out[f"{key}_flops_to_baseline_ratio_training_only_ci_high"] = r6(high)
            mean, low, high = mean_ci([f - u for f, u in zip(finals, uniform_final, strict=True)])
            out[f"{key}_val_loss_delta"] = r6(mean)
            out[f"{key}_val_loss_delta_ci_low"] = r6(low)
            out[f"{key}_val_loss_delta_ci_high"] = r6(high)
        out[f"{corpus}_reference_flops_share"] = r6(offsets[corpus] / budget)
    return out


# --------------------------------------------------------------------------- the study


def run(args: argparse.Namespace, out: Path) -> dict:
    size = size_from_args(args)
    with tempfile.TemporaryDirectory(prefix="densa-hvt-") as work:
        return run_study(size, out, Path(work), progress=not getattr(args, "no_progress", False))


@dataclass
class StudyData:
    """The prepared folders and the text behind them."""

    folders: dict[str, Path]  # "noisy", "clean", "seed" -> prepared folder
    tokenizer: Path
    train_docs: list[str]  # clean training documents
    noisy: list[tuple[str, list[tuple[int, int]]]]  # the same with noise, and each one's noise spans


def build_data(size: StudySize, work: Path) -> StudyData:
    """Tokenizer and the three prepared folders (module docstring); validation is the clean held-out text."""
    valid, seed_docs, train_docs = story_documents(size)
    tok = work / "tokenizer"
    train_tokenizer(seed_docs + train_docs, size.vocab_size).save_pretrained(str(tok))
    noisy = inject_noise_with_spans(train_docs, NoiseConfig(rate=size.noise_rate, seed=0))
    rule = "clean held-out TinyStories documents (10%)"
    folders = {"noisy": work / "data-noisy", "clean": work / "data-clean", "seed": work / "data-seed"}
    prepare_documents([text for text, _ in noisy], valid, tok, folders["noisy"], "tinystories+noise", rule)
    prepare_documents(train_docs, valid, tok, folders["clean"], "tinystories", rule)
    prepare_documents(seed_docs, valid, tok, folders["seed"], "tinystories-seed", rule)
    return StudyData(folders, tok, train_docs, noisy)


def run_study(size: StudySize, out: Path, work: Path, progress: bool = True, peak: float | None = None) -> dict:
    """Run every arm under `work` (bulky; the caller deletes it) and write the plot, curves and table into `out`."""
    data = build_data(size, work)
    main_cfg, ref_cfg = model_config(size, size.hidden_size), model_config(size, size.reference_hidden_size)
    tokens_per_step = size.batch_size * size.context
    step_flops = flops_per_token(main_cfg, size.context).training * tokens_per_step
    budget = size.steps * step_flops
    reference_train = flops_per_token(ref_cfg, size.context).training * tokens_per_step * size.reference_steps

    bar = tqdm(total=1 + len(CORPORA) * len(METHODS) * size.seeds, disable=not progress, unit="run",
               desc="high-value-tokens", dynamic_ncols=True)
    bar.set_postfix_str("reference model")
    torch.manual_seed(0)
    reference = train(ref_cfg, train_config(size, data.folders["seed"], size.reference_steps, seed=0),
                      work / "reference", progress=False, peak=peak)
    bar.update(1)
    ref_model = load_model(reference.checkpoint)
    offsets, steps = {}, {}
    for corpus in CORPORA:  # score both corpora; the method arms get the steps the reference leaves in the budget
        manifest = score_reference(data.folders[corpus], ref_model, size.context, training_flops=reference_train,
                                   name="reference (tiny, trained on the clean seed set)", progress=False)
        offsets[corpus] = reference_cost(manifest)
        method_steps = int((budget - offsets[corpus]) // step_flops)
        if method_steps < 1:
            raise ValueError(f"the reference model's cost ({offsets[corpus]:.3g} FLOPs) leaves no steps in the "
                             f"budget ({budget:.3g}); raise --set steps or lower reference_steps")
        steps[corpus] = {"uniform": size.steps, "selective": method_steps, "curriculum": method_steps}

    arms = {"uniform": {}, "selective": {"token_selection": "rho1", "select_fraction": size.select_fraction},
            "curriculum": {"curriculum": "value"}}
    curves: dict[str, dict[str, list]] = {c: {m: [] for m in METHODS} for c in CORPORA}
    for corpus in CORPORA:
        for seed in range(size.seeds):
            for method in METHODS:
                bar.set_postfix_str(f"{corpus} {method} seed {seed}")
                run_dir = work / "runs" / f"{corpus}-{method}-{seed}"
                cfg = train_config(size, data.folders[corpus], steps[corpus][method], seed, **arms[method])
                train(main_cfg, cfg, run_dir, progress=False, peak=peak)
                curves[corpus][method].append(curve(run_dir))
                bar.update(1)
    bar.close()

    result = {
        "budget_flops": budget,
        "seeds": size.seeds,
        "model_params": count_parameters(DensaModel(main_cfg)).total,
        "reference_params": count_parameters(ref_model).total,
        "reference_training_flops": reference_train,
        "reference_val_loss": round(reference.val_loss, 6),
        "select_fraction": size.select_fraction,
        "noise_rate": size.noise_rate,
        **{f"{c}_train_tokens": load_manifest(data.folders[c])["splits"]["train"]["tokens"] for c in CORPORA},
        **{f"{c}_reference_mean_loss": round(load_manifest(data.folders[c])["reference"]["mean_loss"], 6)
           for c in CORPORA},
        **{f"{c}_{m}_steps": steps[c][m] for c in CORPORA for m in METHODS},
        **mechanism(data, size, work / "runs", steps["noisy"]["curriculum"]),
        **summarise(curves, budget, offsets, size.seeds),
    }
    (out / "curves.json").write_text(json.dumps({"size": dataclasses.asdict(size), "budget_flops": budget,
                                                 "curves": curves}, indent=1) + "\n")
    plot(curves, budget, out / "high-value-tokens.png")
    (out / "high-value-tokens.md").write_text(markdown(result))
    return result


def mechanism(data: StudyData, size: StudySize, runs: Path, curriculum_steps: int) -> dict:
    """Does the reference find the noise? Noise shares of the noisy corpus, the rank correlation of document value
    with each document's noise share, what Rho-1 selection keeps of noise vs clean tokens (each seed's final model),
    and the noise share of the first vs the second half of a value-curriculum run."""
    noisy_docs = [text for text, _ in data.noisy]
    manifests = {c: load_manifest(data.folders[c]) for c in CORPORA}
    doc_noise = [noise_share([c], [d]) for c, d in zip(data.train_docs, noisy_docs, strict=True)]
    spearman = scipy_stats.spearmanr(manifests["noisy"]["reference"]["document_values"], doc_noise).statistic
    labels = noise_token_labels(data.noisy, data.tokenizer)
    kept = [selection_by_class(runs / f"noisy-selective-{seed}", data.folders["noisy"], labels, size)
            for seed in range(size.seeds)]
    first, second = curriculum_noise_shares(data.folders["noisy"], labels, size, curriculum_steps)
    return {
        "noisy_noise_char_share": round(noise_share(data.train_docs, noisy_docs), 4),
        "noisy_noise_token_share": round(1 - manifests["clean"]["splits"]["train"]["tokens"]
                                         / manifests["noisy"]["splits"]["train"]["tokens"], 4),
        "noisy_document_value_vs_noise_spearman": round(float(spearman), 4),
        "noisy_noise_token_share_sampled": round(statistics.fmean(k[2] for k in kept), 4),
        "noisy_selective_kept_share_noise_tokens": round(statistics.fmean(k[0] for k in kept), 4),
        "noisy_selective_kept_share_clean_tokens": round(statistics.fmean(k[1] for k in kept), 4),
        "noisy_curriculum_noise_token_share_first_half": round(first, 4),
        "noisy_curriculum_noise_token_share_second_half": round(second, 4),
    }


def noise_token_labels(noisy: list[tuple[str, list[tuple[int, int]]]], tokenizer_dir: Path) -> np.ndarray:
    """For every token of the noisy train stream: does it start inside an injected noise segment? (EOS: no.)
    Tokenized exactly as `prepare_documents` does, and checked against the stream's length by the callers' use."""
    tokenizer = load_tokenizer(tokenizer_dir)
    encodings = tokenizer.backend_tokenizer.encode_batch([text for text, _ in noisy], add_special_tokens=False)
    labels = []
    for (_, spans), enc in zip(noisy, encodings, strict=True):
        starts = np.array([a for a, _ in enc.offsets], dtype=np.int64)
        is_noise = np.zeros(starts.size, dtype=bool)
        for a, b in spans:
            is_noise |= (starts >= a) & (starts < b)
        labels.append(np.append(is_noise, False))
    return np.concatenate(labels)


def window_labels(labels: np.ndarray, starts: list[int], context: int) -> np.ndarray:
    """Noise labels of the predicted tokens (start + 1 .. start + T) of each window: (B, T)."""
    return np.stack([labels[s + 1:s + 1 + context] for s in starts])


@torch.no_grad()
def selection_by_class(run: Path, data: Path, labels: np.ndarray, size: StudySize,
                       batches: int = 16) -> tuple[float, float, float]:
    """The mechanism check: with the run's final model, the share of noise tokens and of clean tokens that Rho-1
    selection keeps, on `batches` fixed random training batches; and the noise share of those tokens."""
    model = load_model(latest_checkpoint(run / "checkpoints")).eval()
    loader = PretrainLoader(data, "train", size.batch_size, size.context, seed=10_000, reference=True)
    if labels.size != loader.stream.tokens:
        raise RuntimeError(f"noise labels ({labels.size}) do not match the train stream ({loader.stream.tokens})")
    kept_noise = noise = kept_clean = clean = 0
    for i in range(batches):
        batch, ref = loader.batch(i), loader.reference_batch(i)[:, 1:]
        mask = select_tokens(token_losses(model(batch).logits, batch), ref, size.select_fraction).numpy()
        is_noise = window_labels(labels, loader.starts(i), size.context)
        kept_noise, noise = kept_noise + (mask & is_noise).sum(), noise + is_noise.sum()
        kept_clean, clean = kept_clean + (mask & ~is_noise).sum(), clean + (~is_noise).sum()
    return kept_noise / max(1, noise), kept_clean / max(1, clean), noise / (noise + clean)


def curriculum_noise_shares(data: Path, labels: np.ndarray, size: StudySize, steps: int) -> tuple[float, float]:
    """Share of noise tokens in the first and the second half of a value-curriculum run's windows (seed 0)."""
    loader = PretrainLoader(data, "train", size.batch_size, size.context, seed=0, curriculum="value",
                            total_batches=steps)
    shares = [window_labels(labels, loader.starts(i), size.context).mean() for i in range(steps)]
    half = steps // 2
    return float(np.mean(shares[:half])), float(np.mean(shares[half:]))


def plot(curves: dict, budget: float, path: Path) -> None:
    """Validation loss against total FLOPs (as a share of the budget), one panel per corpus; thin lines are seeds,
    thick lines their mean, the dashed line the uniform runs' mean final loss."""
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"uniform": "tab:gray", "selective": "tab:blue", "curriculum": "tab:orange"}
    fig, axes = plt.subplots(1, len(CORPORA), figsize=(11, 4.2), sharey=False)
    for ax, corpus in zip(axes, CORPORA, strict=True):
        for method in METHODS:
            runs = curves[corpus][method]
            for points in runs:
                ax.plot([f / budget for f, _ in points], [v for _, v in points], color=colors[method], alpha=0.25,
                        linewidth=0.8)
            mean = [statistics.fmean(p[i][1] for p in runs) for i in range(len(runs[0]))]
            ax.plot([f / budget for f, _ in runs[0]], mean, color=colors[method], linewidth=2, marker="o",
                    markersize=3, label=method)
        target = statistics.fmean(p[-1][1] for p in curves[corpus]["uniform"])
        ax.axhline(target, color="black", linestyle="--", linewidth=0.8, label="uniform final")
        ax.set_title(f"{corpus} training text (validation: clean held-out)")
        ax.set_xlabel("total FLOPs / uniform budget (reference model included)")
        ax.set_ylabel("validation loss (nats/token)")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def markdown(result: dict) -> str:
    """The headline table and the mechanism checks, for people (the JSON holds the same figures)."""
    def fmt(x):
        return "–" if x is None else f"{x:.3f}"

    lines = ["# high-value-tokens", "",
             f"Budget {result['budget_flops']:.3g} FLOPs per run, {result['seeds']} seeds; validation on clean "
             "held-out text. Ratio: null (–) when a seed never reached the uniform run's final loss within the "
             "budget; mean and t 95% interval only when every seed did. See docs/high-value-tokens.md.", "",
             "| corpus | method | steps | final val loss | Δ vs uniform [95% CI] | FLOPs-to-baseline ratio [95% CI] "
             "| seeds reached |", "|---|---|---|---|---|---|---|"]
    for c in CORPORA:
        lines.append(f"| {c} | uniform | {result[f'{c}_uniform_steps']} | "
                     f"{fmt(result[f'{c}_uniform_final_val_loss'])} | – | 1 | – |")
        for m in METHODS[1:]:
            k = f"{c}_{m}"
            lines.append(f"| {c} | {m} | {result[f'{k}_steps']} | {fmt(result[f'{k}_final_val_loss'])} | "
                         f"{fmt(result[f'{k}_val_loss_delta'])} [{fmt(result[f'{k}_val_loss_delta_ci_low'])}, "
                         f"{fmt(result[f'{k}_val_loss_delta_ci_high'])}] | "
                         f"{fmt(result[f'{k}_flops_to_baseline_ratio'])} "
                         f"[{fmt(result[f'{k}_flops_to_baseline_ratio_ci_low'])}, "
                         f"{fmt(result[f'{k}_flops_to_baseline_ratio_ci_high'])}] | "
                         f"{result[f'{k}_seeds_reached']}/{result['seeds']} |")
    lines += ["", "Mechanism (noisy corpus): noise is "
              f"{result['noisy_noise_token_share']:.1%} of training tokens; Spearman(document value, document "
              f"noise share) = {result['noisy_document_value_vs_noise_spearman']:.3f}; Rho-1 selection with the "
              f"final models keeps {result['noisy_selective_kept_share_noise_tokens']:.1%} of noise tokens and "
              f"{result['noisy_selective_kept_share_clean_tokens']:.1%} of clean ones; the value curriculum's first "
              f"half is {result['noisy_curriculum_noise_token_share_first_half']:.1%} noise, its second half "
              f"{result['noisy_curriculum_noise_token_share_second_half']:.1%}."]
    return "\n".join(lines) + "\n"

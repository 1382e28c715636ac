"""`densa study token-value`: does token-value RL keep accuracy with far fewer output tokens? (docs/alignment.md)

A protocol that cannot flatter, in two phases on the generated arithmetic word problems:

  tuning        one SFT model (seed `tuning_seed`) and, from it, one RL run per pre-registered candidate
                (`candidates`, tried in the order listed). Every one of them is scored on the *validation* split
                only; the test split is not touched. The selection rule, fixed before any run: among candidates
                with validation accuracy_delta ≥ −1 point and invented answers on unanswerable problems no more
                frequent than the SFT model's, the largest token reduction; if none qualifies, the highest
                accuracy_delta (then the largest reduction). A candidate that crashes is recorded as failed.
  confirmation  per seed s = 0..seeds−1 (none equal to tuning_seed): a *separate* SFT model (sft.seed = s), and
                from it RL-correct (the selected config with reward.length = none) and RL-TV (the selected config),
                grpo.seed = s. Each arm is scored exactly once on the test split (held-out, OOD and the unanswerable
                problems of both); `Scorer` refuses a second test scoring. Truncation (the SFT outputs capped at
                RL-TV's mean length) is a view of the SFT decoding, not a new one.

Every arm — tuning candidates with their validation figures, failed runs with their error — is in the JSON, and
`trials` lists what was run in the order it was run. Nothing is lost on a crash: a rerun with the same `--out`
reuses every finished run (its `model/` folder and its `ok` line in trials.jsonl), keeps every failed one failed (it
is not retried) and reads every scoring back from `scores/` instead of decoding again, so a resumed study scores each
arm on the test split once, like an uninterrupted one. `scores/` (with a copy of each tokenizer) and trials.jsonl are
all a rerun needs of a finished seed, so a study can move between machines without its model folders; a finished
tuning phase can be carried as a record of its validation figures (`study.tuning_record`, `read_tuning_record`).
Reported per arm: accuracy, output tokens (all; correct only), Token Value (correct answers per 1,000 output
tokens), accuracy against a token budget, OOD accuracy, the short-but-wrong rate (output no longer than the concise
reference solution, and wrong), and on unanswerable problems the invented-number rate (a numeric final answer where
the honest one is `#### unknown`).

Headline keys (suffixed with `key_suffix`, e.g. `_smollm2`): `token_reduction` = 1 − tokens(RL-TV)/tokens(SFT) and
`accuracy_delta` = accuracy(RL-TV) − accuracy(SFT) in points on the test split, pooled over seeds, with a 95%
Student-t interval over seeds (`..._ci95_seeds`, the goal's interval) and an item bootstrap (`..._ci95`). Goal:
token_reduction ≥ 0.5, the lower end of accuracy_delta's seed interval ≥ −1, OOD accuracy ≥ SFT's and the
invented-number rate ≤ SFT's (each also reported on its own).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from densa.align.config import load_recipe
from densa.align.evaluate import Output, audit_unanswerable, budget_curve, generate_greedy
from densa.align.grpo import run_grpo
from densa.align.logs import read_jsonl
from densa.align.policy import chat_tokenizer, load_policy
from densa.align.problems import heldout_and_ood, messages, unanswerable, validation_split
from densa.align.sft import run_sft
from densa.config import ConfigError, read_recipe
from densa.data.tokenizer import load_tokenizer
from densa.study.stats import mean_ci

ARMS = ("sft", "rl_correct", "rl_tv", "truncation")
LABELS = {"sft": "SFT", "rl_correct": "RL, correctness only", "rl_tv": "RL, token value", "truncation": "SFT truncated"}
ROUTED = ("sft.", "task.", "policy.", "grpo.", "reward.")

# Pre-registered token-value candidates, tried in this order on the validation split (docs/alignment.md, 'Evidence').
CANDIDATES: dict[str, list[str]] = {
    "gated": ["reward.length=gated", "reward.weight=0.5"],
    "shortest": ["reward.length=shortest", "reward.weight=0.5"],
    "dler": ["reward.length=truncation", "reward.truncate_at=40", "reward.overlong_cache=0", "grpo.loss_type=dapo",
             "grpo.scale_rewards=batch", "grpo.epsilon_high=0.28", "grpo.dynamic_sampling=true"],
    "gated-kl": ["reward.length=gated", "reward.weight=0.5", "grpo.beta=0.04"],
    "gated-lr2e-5": ["reward.length=gated", "reward.weight=0.5", "grpo.lr=2.0e-5"],
}


@dataclass(kw_only=True)
class StudyConfig:
    sft_recipe: str = "recipes/sft-arithmetic.yaml"
    align_recipe: str = "recipes/align-token-value-study.yaml"
    seeds: int = 3  # confirmation seeds 0..seeds-1: each its own SFT model and RL runs
    tuning_seed: int = 100  # SFT and RL seed of the tuning phase (never a confirmation seed)
    candidates: dict[str, list[str]] = field(default_factory=lambda: {k: list(v) for k, v in CANDIDATES.items()})
    validation: int = 200  # answerable validation problems (tuning only)
    heldout: int = 400  # answerable test problems (1–3 operations)
    ood: int = 200  # answerable OOD test problems (4 operations)
    unanswerable: int = 100  # unanswerable problems added to each of validation, held-out and OOD
    unanswerable_fraction: float = 0.05  # share of unanswerable problems among SFT and RL training problems
    budgets: list[int] = field(default_factory=lambda: [8, 12, 16, 24, 32, 48, 64, 96])
    bootstrap: int = 2000
    key_suffix: str = ""  # appended to every output key, e.g. "_smollm2"
    merge_into: str = ""  # also add the (suffixed) keys to this JSON file, e.g. docs/results/token-value.json
    tuning_record: str = ""  # JSON of an earlier tuning phase of this config: phase 1 is read from it, not re-run
    sft: list[str] = field(default_factory=list)  # extra `section.key=value` overrides of the SFT recipe
    align: list[str] = field(default_factory=list)  # ... and of the align recipe (every RL run)
    quick: list[str] = field(default_factory=lambda: [
        "sft.steps=60", "sft.batch_size=16", "task.train_size=2000", "grpo.steps=2", "grpo.prompts_per_step=4",
        "grpo.num_generations=4", "grpo.max_completion_length=64", "task.max_new_tokens=64"])
    quick_sizes: dict[str, int] = field(default_factory=lambda: {"validation": 32, "heldout": 32, "ood": 16,
                                                                 "unanswerable": 8})


def load_study(path: str | None, seeds: int | None, overrides: list[str] = ()) -> StudyConfig:
    """The `study:` section of the recipe at `path` (defaults without one), then `study.key=value` overrides (the
    value parsed as YAML)."""
    section = dict(read_recipe(path).get("study") or {}) if path else {}
    for pair in overrides:
        key, _, raw = pair.partition("=")
        section[key.strip().removeprefix("study.")] = yaml.safe_load(raw)
    unknown = sorted(set(section) - set(vars(StudyConfig())))
    if unknown:
        raise ConfigError(f"unknown study key(s) {unknown} (in {path or 'no recipe'} or --set study.*); valid: "
                          f"{', '.join(vars(StudyConfig()))}")
    cfg = StudyConfig(**section)
    if seeds is not None:
        cfg.seeds = seeds
    if cfg.seeds < 1:
        raise ValueError(f"--seeds {cfg.seeds}: must be >= 1")
    if cfg.tuning_seed < cfg.seeds:
        raise ValueError(f"study.tuning_seed={cfg.tuning_seed}: must not be a confirmation seed (0..{cfg.seeds - 1})")
    if not cfg.candidates:
        raise ValueError("study.candidates is empty: pre-register at least one token-value config")
    return cfg


@dataclass
class Splits:
    """Answerable and unanswerable problems of the validation, test (held-out) and OOD splits."""

    validation: list
    test: list
    ood: list
    validation_unanswerable: list
    test_unanswerable: list
    ood_unanswerable: list

    @classmethod
    def build(cls, validation: int, heldout: int, ood: int, unanswerable_n: int) -> Splits:
        test, ood_items = heldout_and_ood(heldout, ood)
        return cls(validation_split(validation, heldout), test, ood_items, unanswerable("validation", unanswerable_n),
                   unanswerable("heldout", unanswerable_n), unanswerable("ood", unanswerable_n))


class Scorer:
    """Greedy decoding of a model on a split, with the protocol's guard: each arm is scored on `test` once. Each
    scoring is written to `cache/` and read back by a resumed study instead of decoding again."""

    def __init__(self, splits: Splits, max_new: int, progress: bool, cache: Path | None = None) -> None:
        self.splits, self.max_new, self.progress, self.cache = splits, max_new, progress, cache
        self.scored: list[tuple[str, str]] = []

    def score(self, arm: str, path: Path, split: str) -> dict[str, Any]:
        if split not in ("validation", "test"):
            raise ValueError(f"split {split!r}: choose validation or test")
        if (arm, split) in self.scored and split == "test":
            raise RuntimeError(f"{arm}: already scored on the test split (the protocol allows one scoring per arm)")
        self.scored.append((arm, split))
        parts = ("validation", "validation_unanswerable") if split == "validation" else (
            "test", "test_unanswerable", "ood", "ood_unanswerable")
        saved = self._saved(arm, split)
        if saved is not None and saved.is_file():  # scored before a crash: read back, not decoded again
            stored = json.loads(saved.read_text())
            # the run's own tokenizer (save_policy wrote it beside the weights), else the copy kept with the scores
            if not path.is_dir() and "tokenizer" not in stored:
                raise FileNotFoundError(f"{saved}: its model folder {path} is gone and it keeps no tokenizer copy")
            tok = load_tokenizer(path if path.is_dir() else saved.parent / stored["tokenizer"])
            chat_tokenizer(tok)
            return {"tok": tok, **{k: [Output(**o) for o in v] if k in parts else v for k, v in stored.items()}}
        model, tok = load_policy(load_recipe(None, [f"policy.path={path}"]).policy)
        run: dict[str, Any] = {"tok": tok}
        for part in parts:
            problems = getattr(self.splits, part)
            run[part] = generate_greedy(model, tok, [messages(p.question, system=False) for p in problems],
                                        [p.answer for p in problems], max_new_tokens=self.max_new,
                                        progress=self.progress)
            run[f"{part}_reference"] = [len(tok(p.concise())["input_ids"]) + 1 for p in problems]
        if saved is not None:
            saved.parent.mkdir(parents=True, exist_ok=True)
            stored = {k: [asdict(o) for o in v] if k in parts else v for k, v in run.items() if k != "tok"}
            stored["tokenizer"] = _keep_tokenizer(tok, saved.parent)
            saved.write_text(json.dumps(stored) + "\n")
        return run

    def cached(self, arm: str, split: str) -> bool:
        """Whether `arm` was scored on `split` before (its scoring is in `cache/`)."""
        saved = self._saved(arm, split)
        return saved is not None and saved.is_file()

    def _saved(self, arm: str, split: str) -> Path | None:
        return self.cache / f"{arm.replace('/', '-')}-{split}.json" if self.cache else None


def _keep_tokenizer(tok: Any, folder: Path) -> str:
    """Keep a copy of `tok` beside the scores (one folder per distinct tokenizer), so that scores copied to another
    machine are read without the model folders; returns the folder's name."""
    text = tok.backend_tokenizer.to_str()
    name = f"tokenizer-{hashlib.sha256(text.encode()).hexdigest()[:12]}"
    if not (folder / name / "tokenizer.json").is_file():
        tok.save_pretrained(str(folder / name))
    return name


def read_tuning_record(cfg: StudyConfig) -> dict[str, Any]:
    """Validation figures of an earlier tuning phase of the same study (`study.tuning_record`), checked against the
    config: same tuning seed, same candidates with the same overrides. The selection rule is then applied to them
    as it would be to a fresh tuning phase."""
    path = Path(cfg.tuning_record)
    if not path.is_file():
        raise ConfigError(f"study.tuning_record={cfg.tuning_record}: no such file")
    record = json.loads(path.read_text())
    if record.get("tuning_seed") != cfg.tuning_seed or record.get("candidates") != cfg.candidates:
        raise ConfigError(f"{path}: records the tuning of another config (tuning_seed or candidates differ)")
    validation = dict(record["validation"])
    missing = [n for n in ("sft", *cfg.candidates) if n not in validation and n not in record.get("failed", [])]
    if missing:
        raise ConfigError(f"{path}: no validation figures for {missing}")
    if record.get("sft_forced_concise"):
        validation["sft_forced_concise"] = record["sft_forced_concise"]
    return validation


def run(args: argparse.Namespace, out: Path) -> dict[str, Any]:
    cfg = load_study(args.config, args.seeds, [o for o in args.overrides if o.startswith("study.")])
    progress = not args.no_progress
    recipe_over = [o for o in args.overrides if not o.startswith("study.")]
    extra = (cfg.quick if args.quick else []) + recipe_over
    ignored = [pair for pair in recipe_over if not pair.startswith(ROUTED)]
    if ignored:  # an override no arm reads would be silently dropped
        raise ConfigError(f"--set {ignored[0]!r}: token-value passes only sft.*, task.*, policy.* (SFT) and "
                          "grpo.*, reward.*, task.* (every RL run) to the recipes, and study.* to the study")
    sizes = {"validation": cfg.validation, "heldout": cfg.heldout, "ood": cfg.ood, "unanswerable": cfg.unanswerable}
    if args.quick:
        sizes = {k: min(v, cfg.quick_sizes.get(k, v)) for k, v in sizes.items()}
    task = [f"task.heldout_size={max(sizes['heldout'], sizes['unanswerable'])}",
            f"task.validation_size={sizes['validation']}", f"task.unanswerable_fraction={cfg.unanswerable_fraction}"]
    sft_over = cfg.sft + _only(extra, ("sft.", "task.", "policy.")) + task
    rl_over = cfg.align + _only(extra, ("grpo.", "reward.", "task.")) + task
    # validate every recipe with every override now, not after the SFT stage has trained for minutes
    load_recipe(cfg.sft_recipe, sft_over, method="sft")
    base = load_recipe(cfg.align_recipe, rl_over, method="grpo")
    for overrides in cfg.candidates.values():
        load_recipe(cfg.align_recipe, rl_over + overrides, method="grpo")
    splits = Splits.build(sizes["validation"], sizes["heldout"], sizes["ood"], sizes["unanswerable"])
    scorer = Scorer(splits, base.task.max_new_tokens, progress, out / "scores")
    trials = Trials(out / "trials.jsonl")

    # phase 1: tuning, scored on validation only (or read from the record of an earlier tuning phase)
    if cfg.tuning_record:
        validation = read_tuning_record(cfg)
    else:
        tuning_dir = out / "tuning"
        sft_path = trials.sft(cfg.sft_recipe, sft_over, cfg.tuning_seed, tuning_dir / "sft", progress)
        validation = {"sft": _arm_metrics([scorer.score("tuning/sft", sft_path, "validation")], "validation", [])}
        validation["sft_forced_concise"] = _forced_concise(sft_path, splits.validation, base.task.max_new_tokens)
        for name, overrides in cfg.candidates.items():
            path = trials.rl(f"tuning/{name}", cfg.align_recipe, rl_over + overrides, sft_path, cfg.tuning_seed,
                             tuning_dir / name, progress)
            if path is not None:
                validation[name] = _arm_metrics([scorer.score(f"tuning/{name}", path, "validation")], "validation",
                                                [])
                trials.scored(f"tuning/{name}", "validation")
    selected, reason = select(validation, list(cfg.candidates))

    # phase 2: confirmation, each arm scored once on test
    runs: dict[str, list[dict[str, Any]]] = {arm: [] for arm in ARMS}
    for seed in range(cfg.seeds if selected else 0):
        # a seed whose three scorings are all in scores/ (copied from another machine, say) needs no model folder
        rl_arms = [f"seed{seed}/{arm}" for arm in ("rl_correct", "rl_tv")]
        scored_before = scorer.cached(f"seed{seed}/sft", "test") and all(
            scorer.cached(a, "test") or trials.failed(a) for a in rl_arms)
        sft_path = trials.sft(cfg.sft_recipe, sft_over, seed, out / f"seed{seed}" / "sft", progress,
                              scored=scored_before)
        scored = {"sft": scorer.score(f"seed{seed}/sft", sft_path, "test")}
        for arm, length in (("rl_correct", ["reward.length=none"]), ("rl_tv", [])):
            path = trials.rl(f"seed{seed}/{arm}", cfg.align_recipe, rl_over + cfg.candidates[selected] + length,
                             sft_path, seed, out / f"seed{seed}" / arm, progress,
                             scored=scorer.cached(f"seed{seed}/{arm}", "test"))
            if path is not None:
                scored[arm] = scorer.score(f"seed{seed}/{arm}", path, "test")
                trials.scored(f"seed{seed}/{arm}", "test")
        if len(scored) == 3:  # a seed enters the headline only with all three arms (a failed one is in `trials`)
            for arm in ("sft", "rl_correct", "rl_tv"):
                runs[arm].append(scored[arm])
            tv_mean = np.mean([len(o.tokens) for o in scored["rl_tv"]["test"]])
            runs["truncation"].append({**scored["sft"], "budget": max(1, round(float(tv_mean)))})
    trials.write()
    return _report(cfg, runs, out, validation, selected, reason, trials.records, args.quick)


class Trials:
    """The ordered log of every SFT and RL run (phase, arm, seed, overrides, status, error, seconds), kept in
    trials.jsonl. A rerun with the same log reuses what it records: a finished run whose model folder is there, and a
    failed run (not retried)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.records: list[dict[str, Any]] = read_jsonl(path) if path.is_file() else []

    def _finished(self, arm: str, model: Path, scored: bool = False) -> dict[str, Any] | None:
        """The logged run of `arm`, if it failed, or if it finished and its model folder is there or no longer
        needed (`scored`: every scoring that needs the model is kept)."""
        done = [r for r in self.records if r["arm"] == arm and (r["status"] == "failed" or model.is_dir() or scored)]
        return done[-1] if done else None

    def failed(self, arm: str) -> bool:
        return any(r["arm"] == arm and r["status"] == "failed" for r in self.records)

    def sft(self, recipe: str, overrides: list[str], seed: int, out: Path, progress: bool,
            scored: bool = False) -> Path:
        arm = str(out.relative_to(out.parents[1]))
        if self._finished(arm, out / "model", scored) is None:
            start = time.perf_counter()
            run_sft(load_recipe(recipe, overrides + [f"sft.seed={seed}"], method="sft"), out, progress=progress,
                    evaluate=False)  # an SFT failure ends the study: every arm depends on it
            self._add(arm, "sft", seed, None, overrides, "ok", "", start)
        return out / "model"

    def rl(self, arm: str, recipe: str, overrides: list[str], sft: Path, seed: int, out: Path,
           progress: bool, scored: bool = False) -> Path | None:
        """Run one GRPO arm; a failure is recorded (with its error) and returns None instead of stopping the study."""
        done = self._finished(arm, out / "model", scored)
        if done is not None:
            return out / "model" if done["status"] == "ok" else None
        start = time.perf_counter()
        full = overrides + [f"policy.path={sft}", f"grpo.seed={seed}"]
        try:
            run_grpo(load_recipe(recipe, full, method="grpo"), out, progress=progress, evaluate=False)
        except Exception as exc:  # noqa: BLE001 - a failed arm is a result: it goes in the JSON
            self._add(arm, "rl", seed, str(sft), overrides, "failed", f"{type(exc).__name__}: {exc}", start)
            (out / "error.txt").parent.mkdir(parents=True, exist_ok=True)
            (out / "error.txt").write_text(traceback.format_exc())
            return None
        self._add(arm, "rl", seed, str(sft), overrides, "ok", "", start)
        return out / "model"

    def scored(self, arm: str, split: str) -> None:
        """Note which split scored `arm`'s run."""
        [r for r in self.records if r["arm"] == arm][-1]["scored_on"] = split
        self.write()

    def _add(self, arm: str, kind: str, seed: int, sft: str | None, overrides: list[str], status: str, error: str,
             start: float) -> None:
        self.records.append({"order": len(self.records) + 1, "arm": arm, "kind": kind, "seed": seed, "from_sft": sft,
                             "overrides": list(overrides), "status": status, "error": error,
                             "wall_s": round(time.perf_counter() - start, 1), "scored_on": None})
        self.write()

    def write(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text("".join(json.dumps(r) + "\n" for r in self.records))


def select(validation: dict[str, dict[str, Any]], order: list[str]) -> tuple[str | None, str]:
    """The pre-registered selection rule (module docstring) on validation metrics; (None, why) when every candidate
    failed."""
    sft = validation["sft"]
    ok = [name for name in order if name in validation]
    if not ok:
        return None, "every candidate failed; nothing to confirm"

    def delta(name: str) -> float:
        return 100 * (validation[name]["accuracy"] - sft["accuracy"])

    def reduction(name: str) -> float:
        return 1 - validation[name]["mean_tokens"] / sft["mean_tokens"]

    eligible = [n for n in ok if delta(n) >= -1 and validation[n]["invented_rate"] <= sft["invented_rate"]]
    if eligible:
        best = max(eligible, key=reduction)  # max keeps the first listed on ties
        return best, f"largest validation token reduction ({reduction(best):.3f}) among {eligible}"
    best = max(ok, key=lambda n: (delta(n), reduction(n)))
    inventing = [n for n in ok if delta(n) >= -1]  # kept accuracy, but invented more numbers than SFT
    why = (f"{inventing} kept validation accuracy within 1 point but invented numbers more often than SFT"
           if inventing else "no candidate kept validation accuracy within 1 point")
    return best, f"{why}; highest accuracy_delta ({delta(best):+.1f})"


def _forced_concise(path: Path, problems: list, max_new: int) -> dict[str, float]:
    """Diagnostic: the SFT model made to start its answer the concise way (the first digit of the start number)."""
    model, tok = load_policy(load_recipe(None, [f"policy.path={path}"]).policy)
    outs = generate_greedy(model, tok, [messages(p.question, system=False) for p in problems],
                           [p.answer for p in problems], max_new_tokens=max_new,
                           forced=[str(p.steps[0][0])[0] for p in problems])
    return {"accuracy": sum(o.correct(tok) for o in outs) / len(outs),
            "mean_tokens": float(np.mean([len(o.tokens) for o in outs]))}


def _only(overrides: list[str], prefixes: tuple[str, ...]) -> list[str]:
    return [o for o in overrides if o.startswith(prefixes)]


def _item_arrays(run: dict[str, Any], split: str = "test") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per item: correct (0/1), output tokens and the short-but-wrong flag; truncation runs apply their budget."""
    tok, budget = run["tok"], run.get("budget")
    outputs: list[Output] = run[split]
    correct = np.array([o.correct(tok, budget) for o in outputs], dtype=float)
    tokens = np.array([min(len(o.tokens), budget) if budget else len(o.tokens) for o in outputs], dtype=float)
    ref = np.array(run[f"{split}_reference"], dtype=float)
    return correct, tokens, (tokens <= ref) & (correct == 0)


def _arm_metrics(runs: list[dict[str, Any]], split: str, budgets: list[int]) -> dict[str, Any]:
    """One arm over its seeds on `split` (validation or test; test also reports OOD)."""
    c, n, sw = (np.concatenate(x) for x in zip(*(_item_arrays(r, split) for r in runs), strict=True))
    budget = runs[0].get("budget")
    audit = [audit_unanswerable(r[f"{split}_unanswerable"], r["tok"], r.get("budget")) for r in runs]
    m: dict[str, Any] = {
        "accuracy": float(c.mean()), "accuracy_per_seed": [float(_item_arrays(r, split)[0].mean()) for r in runs],
        "mean_tokens": float(n.mean()), "mean_tokens_correct": float(n[c == 1].mean()) if c.any() else math.nan,
        "token_value_per_1k": float(1000 * c.sum() / n.sum()), "short_wrong_rate": float(sw.mean()),
        "invented_rate": float(np.mean([a["invented_rate"] for a in audit])),
        "honest_rate": float(np.mean([a["honest_rate"] for a in audit])),
        "abstain_on_answerable_rate": float(np.mean([o.abstained(r["tok"], budget) for r in runs for o in r[split]])),
    }
    if split == "test":
        oc, on, osw = (np.concatenate(x) for x in zip(*(_item_arrays(r, "ood") for r in runs), strict=True))
        m |= {"ood_accuracy": float(oc.mean()), "ood_mean_tokens": float(on.mean()),
              "ood_short_wrong_rate": float(osw.mean()),
              "ood_invented_rate": float(np.mean([audit_unanswerable(r["ood_unanswerable"], r["tok"],
                                                                     r.get("budget"))["invented_rate"]
                                                  for r in runs]))}
    if budgets and not budget:
        per = [budget_curve(r[split], r["tok"], budgets) for r in runs]
        m["budget_curve"] = {str(k): float(np.mean([p[k] for p in per])) for k in budgets}
    if budget:
        m["budget"] = [r["budget"] for r in runs]
    return m


def _bootstrap(rl: list[dict[str, Any]], sft: list[dict[str, Any]], draws: int) -> dict[str, list[float]]:
    """95% intervals of token_reduction and accuracy_delta: items resampled within each seed (paired across arms)."""
    rng = np.random.default_rng(0)
    pairs = [(_item_arrays(a), _item_arrays(b)) for a, b in zip(rl, sft, strict=True)]
    red, delta = [], []
    for _ in range(draws):
        tok_rl = tok_sft = acc_rl = acc_sft = 0.0
        items = 0
        for (c1, n1, _), (c0, n0, _) in pairs:
            idx = rng.integers(0, len(c1), len(c1))
            tok_rl, tok_sft = tok_rl + n1[idx].sum(), tok_sft + n0[idx].sum()
            acc_rl, acc_sft, items = acc_rl + c1[idx].sum(), acc_sft + c0[idx].sum(), items + len(idx)
        red.append(1 - tok_rl / tok_sft)
        delta.append(100 * (acc_rl - acc_sft) / items)
    return {"token_reduction": [float(np.percentile(red, 2.5)), float(np.percentile(red, 97.5))],
            "accuracy_delta": [float(np.percentile(delta, 2.5)), float(np.percentile(delta, 97.5))]}


def _seed_intervals(rl: list[dict[str, Any]], sft: list[dict[str, Any]]) -> dict[str, list[float | None]]:
    """Student-t 95% intervals of token_reduction and accuracy_delta over seeds (one paired value per seed: each
    seed has its own SFT model and its own RL runs, so this covers both). None with a single seed."""
    pairs = [(_item_arrays(a), _item_arrays(b)) for a, b in zip(rl, sft, strict=True)]
    red = [1 - n1.mean() / n0.mean() for (_, n1, _), (_, n0, _) in pairs]
    delta = [100 * (c1.mean() - c0.mean()) for (c1, _, _), (c0, _, _) in pairs]
    out: dict[str, list[float | None]] = {}
    for key, values in (("token_reduction", red), ("accuracy_delta", delta)):
        _, low, high = mean_ci([float(v) for v in values])
        out[key] = [low, high]
    return out


def _report(cfg: StudyConfig, runs: dict[str, list[dict[str, Any]]], out: Path, validation: dict[str, Any],
            selected: str | None, reason: str, trials: list[dict[str, Any]], quick: bool) -> dict[str, Any]:
    complete = bool(runs["sft"])
    arms = {arm: _arm_metrics(runs[arm], "test", cfg.budgets) for arm in ARMS} if complete else {}
    result: dict[str, Any] = {"token_reduction": None, "accuracy_delta": None, "goal_met": False}
    if complete:
        sft, tv, rc = arms["sft"], arms["rl_tv"], arms["rl_correct"]
        ci, ci_correct = _bootstrap(runs["rl_tv"], runs["sft"], cfg.bootstrap), _bootstrap(runs["rl_correct"],
                                                                                          runs["sft"], cfg.bootstrap)
        seed_ci = _seed_intervals(runs["rl_tv"], runs["sft"])
        reduction, delta = 1 - tv["mean_tokens"] / sft["mean_tokens"], 100 * (tv["accuracy"] - sft["accuracy"])
        low = seed_ci["accuracy_delta"][0]
        goals = {"goal_tokens_met": bool(reduction >= 0.5),
                 "goal_accuracy_met": bool((low if low is not None else delta) >= -1),
                 "goal_ood_met": bool(tv["ood_accuracy"] >= sft["ood_accuracy"]),
                 "goal_invented_met": bool(tv["invented_rate"] <= sft["invented_rate"]
                                           and tv["ood_invented_rate"] <= sft["ood_invented_rate"])}
        result = {
            "token_reduction": reduction, "token_reduction_ci95": ci["token_reduction"],
            "token_reduction_ci95_seeds": seed_ci["token_reduction"],
            "accuracy_delta": delta, "accuracy_delta_ci95": ci["accuracy_delta"],
            "accuracy_delta_ci95_seeds": seed_ci["accuracy_delta"],
            "goal_met": all(goals.values()), **goals,
            "ood_accuracy_delta": 100 * (tv["ood_accuracy"] - sft["ood_accuracy"]),
            "rl_correct_token_reduction": 1 - rc["mean_tokens"] / sft["mean_tokens"],
            "rl_correct_token_reduction_ci95": ci_correct["token_reduction"],
            "rl_correct_accuracy_delta": 100 * (rc["accuracy"] - sft["accuracy"]),
            "rl_correct_accuracy_delta_ci95": ci_correct["accuracy_delta"],
        }
        for arm, m in arms.items():
            for key in ("accuracy", "mean_tokens", "mean_tokens_correct", "token_value_per_1k", "short_wrong_rate",
                        "ood_accuracy", "ood_short_wrong_rate", "invented_rate", "ood_invented_rate", "honest_rate"):
                result[f"{arm}_{key}"] = m[key]
    forced = validation.get("sft_forced_concise") or {}  # not in a tuning record whose run did not keep it
    result |= {
        "selected": selected, "selection_reason": reason, "seeds": len(runs["sft"]), "seeds_planned": cfg.seeds,
        "tuning_seed": cfg.tuning_seed, "separate_sft_per_seed": True,
        "tuning_record": cfg.tuning_record or None,
        "sft_forced_concise_accuracy_validation": forced.get("accuracy"),
        "sft_forced_concise_mean_tokens_validation": forced.get("mean_tokens"),
        "validation": {k: _headline(v) for k, v in validation.items() if k != "sft_forced_concise"},
        "candidates": {name: {"overrides": o, "status": "ok" if name in validation else "failed"}
                       for name, o in cfg.candidates.items()},
        "trials": trials, "test_items": len(runs["sft"][0]["test"]) if complete else 0,
        "ood_items": len(runs["sft"][0]["ood"]) if complete else 0,
        "unanswerable_items": len(runs["sft"][0]["test_unanswerable"]) if complete else 0,
    }
    result = _finite({f"{k}{cfg.key_suffix}": v for k, v in result.items()})  # NaN → null: strict JSON
    (out / "detail.json").write_text(json.dumps(_finite({"config": asdict(cfg), "arms": arms, **result}), indent=2)
                                     + "\n")
    if complete:
        _plot_budget(arms, out / "token-value-budget.png")
        _plot_training(out, cfg.seeds, out / "token-value-training.png")
    (out / "token-value.md").write_text(_markdown(arms, validation, result, cfg.key_suffix))
    if cfg.merge_into and not quick:
        path = Path(cfg.merge_into)
        merged = json.loads(path.read_text()) if path.is_file() else {}
        path.write_text(json.dumps({**merged, **result}, indent=2) + "\n")
    return result


def _headline(m: dict[str, Any]) -> dict[str, Any]:
    return {k: m.get(k) for k in ("accuracy", "mean_tokens", "short_wrong_rate", "invented_rate", "honest_rate")}


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


def _interval(ci: list[float | None], spec: str) -> str:
    return "– (one seed)" if ci[0] is None else f"[{ci[0]:{spec}}, {ci[1]:{spec}}]"


def _markdown(arms: dict[str, Any], validation: dict[str, Any], r: dict[str, Any], sfx: str) -> str:
    def g(key: str) -> Any:
        return r[f"{key}{sfx}"]

    tuning = "\n".join(f"| {name} | {100 * m['accuracy']:.1f} | {m['mean_tokens']:.1f} | "
                       f"{100 * m['invented_rate']:.1f} |" for name, m in validation.items()
                       if name != "sft_forced_concise")
    failed = [t for t in g("trials") if t["status"] == "failed"]
    text = ("# token-value study\n\n## Tuning (validation split only)\n\n"
            "| candidate | accuracy % | tokens | invented % (unanswerable) |\n|---|---|---|---|\n" + tuning +
            f"\n\nSelected: **{g('selected')}** — {g('selection_reason')}.\n")
    if g("tuning_record"):
        text += f"\nThe tuning figures are read from `{g('tuning_record')}` (an earlier run of this phase).\n"
    if failed:
        text += "\nFailed runs: " + "; ".join(f"{t['arm']} ({t['error']})" for t in failed) + "\n"
    if not arms:
        return text + "\nNo confirmation seed completed: no headline.\n"
    rows = [f"| {LABELS[arm]} | {100 * m['accuracy']:.1f} | {m['mean_tokens']:.1f} | {m['mean_tokens_correct']:.1f} | "
            f"{m['token_value_per_1k']:.1f} | {100 * m['ood_accuracy']:.1f} | {100 * m['short_wrong_rate']:.1f} | "
            f"{100 * m['invented_rate']:.1f} | {100 * m['ood_invented_rate']:.1f} |" for arm, m in arms.items()]
    return text + (
        f"\n## Test split (each arm scored once; {g('seeds')} seeds, a separate SFT model per seed)\n\n"
        f"{g('test_items')} held-out + {g('ood_items')} OOD items, {g('unanswerable_items')} unanswerable per "
        "split.\n\n"
        "| arm | accuracy % | tokens | tokens (correct) | Token Value /1k | OOD acc % | short-wrong % | "
        "invented % | OOD invented % |\n|---|---|---|---|---|---|---|---|---|\n" + "\n".join(rows) +
        f"\n\ntoken_reduction = {g('token_reduction'):.3f}, seeds "
        f"{_interval(g('token_reduction_ci95_seeds'), '.3f')}; accuracy_delta = {g('accuracy_delta'):+.2f} points, "
        f"seeds {_interval(g('accuracy_delta_ci95_seeds'), '+.2f')} (item bootstrap "
        f"{_interval(g('accuracy_delta_ci95'), '+.2f')}); OOD accuracy_delta {g('ood_accuracy_delta'):+.2f} points.\n\n"
        f"Goals: tokens {g('goal_tokens_met')}, accuracy {g('goal_accuracy_met')}, OOD {g('goal_ood_met')}, "
        f"invented answers {g('goal_invented_met')}; all: **{g('goal_met')}**.\n")


def _plot_budget(arms: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for arm in ("sft", "rl_correct", "rl_tv"):
        curve = arms[arm]["budget_curve"]
        ax.plot([int(k) for k in curve], [100 * v for v in curve.values()], marker="o", label=LABELS[arm])
        ax.scatter([arms[arm]["mean_tokens"]], [100 * arms[arm]["accuracy"]], marker="x", s=60, color="k")
    t = arms["truncation"]
    ax.scatter([t["mean_tokens"]], [100 * t["accuracy"]], marker="s", s=50, color="red",
               label="SFT truncated at RL-TV's mean length", zorder=5)
    ax.set_xlabel("token budget (max_new_tokens); x = mean tokens used")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("accuracy vs output-token budget (greedy, mean of seeds)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _plot_training(out: Path, seeds: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for arm, color in (("rl_correct", "tab:orange"), ("rl_tv", "tab:green")):
        for seed in range(seeds):
            log = out / f"seed{seed}" / arm / "metrics.jsonl"
            recs = [r for r in read_jsonl(log) if "reward" in r] if log.is_file() else []
            steps = [r["step"] for r in recs]
            label = LABELS[arm] if seed == 0 else None
            axes[0].plot(steps, [r.get("accuracy", math.nan) for r in recs], color=color, alpha=0.7, label=label)
            axes[1].plot(steps, [r["completions/mean_length"] for r in recs], color=color, alpha=0.7, label=label)
    axes[0].set_ylabel("accuracy of samples (T=1)")
    axes[1].set_ylabel("mean completion tokens (sampled)")
    for ax in axes:
        ax.set_xlabel("GRPO step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)

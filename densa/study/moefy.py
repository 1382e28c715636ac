"""`densa study moefy`: smollm2-135m converted to densa's dynamic MoE at several FFN budgets (docs/moefy.md).

Arms, each at every budget of `budgets` (share of the FFN's FLOPs):
- `cluster-bNN` / `random-bNN`: the conversion as before issue 19 (co-activation clusters or the random ablation,
  fitted router, zc_bias set per budget on the calibration tokens), with brief router / all-weight tuning
  (`-tuned`, `-tuned-all`) on the variants named in `tuned` / `tuned_all`;
- `shared-bNN`: + always-on shared experts (densa/moefy/shared.py); the shared share is chosen among `shared` on
  the validation text at 50% budget (or the budget nearest it);
- `shared-bNN-distilled`: + distillation against the original (densa/moefy/distill.py); what trains and the
  learning rate are chosen among `distill_grid` by short pilot runs at 50% scored on the validation text, and the
  number of steps by validating every `distill_eval_every` steps of the full run (the best step is kept);
- `teal-bNN`: the neuron-level baseline (densa/moefy/teal.py), TEAL magnitude thresholds at sparsity 1 − budget.
Validation text: the last book of Gutenberg's training split (never in the calibration or distillation text, which
are the first books). Every choice is made on it; the held-out texts (Gutenberg's held-out books, WikiText-2) and
the benchmarks are scored once per kept variant. Every figure is keyed `<variant>_<measure>`; the rows with the
validation figures of every candidate are in rows.json.
Resumable: rerunning the same command with the same `--out` continues a stopped run. Every scored row, conversion
report and validation choice goes to `OUT/state.json` as it is made; a resumed run takes those as they are (nothing
is scored twice, so the held-out texts are still scored once per variant), redoes a conversion only where a row still
needs it, continues a distillation from its last checkpoint and the benchmarks from their last item. A different
configuration in the same `--out` is refused.

Headline keys (docs/moefy.md): `bpb_increase_at_half_ffn` = held-out bpb / original's − 1 of the MoE variant at 50%
with the best *validation* bpb (goal <= 0.10; `_variant` names it), `benchmark_drop_at_half_ffn_points` = the
largest accuracy drop of that variant over the benchmarks, in points (goal <= 2), `prefill_speedup_at_half_ffn` and
`decode_speedup_at_half_ffn` = the original's ms/token over that variant's (goals >= 1.5 and >= 1.2), measured
through the fast path (oneDNN-packed linears, densa/model/fastlinear.py); `teal_*` the same for the baseline.
Settings: `--set key=value` for any `StudyConfig` field (JSON values), e.g. `--set distill_steps=0`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from densa.checkpoint import save_checkpoint
from densa.data.corpora import corpus_texts
from densa.measure import bits_per_byte, forward_flops_per_token, text_windows, token_byte_lengths
from densa.model.model import DensaModel
from densa.moefy import teal
from densa.moefy.calibrate import calibration_windows, corpus_text, encode, ffn_inputs
from densa.moefy.convert import Conversion, MoefyConfig, convert, with_budget
from densa.moefy.distill import DistillConfig, distill
from densa.moefy.measure import ms_per_token
from densa.moefy.tune import TuneConfig, prepare_data, tune
from densa.resolve import resolve

HELD_OUT = {"gutenberg": ("gutenberg", "valid"), "wikitext2": ("wikitext2", "train")}  # wiki.test.raw
GOALS = {"bpb_increase_at_half_ffn": 0.10, "benchmark_drop_at_half_ffn_points": 2.0,
         "prefill_speedup_at_half_ffn": 1.5, "decode_speedup_at_half_ffn": 1.2}


@dataclass(kw_only=True)
class StudyConfig:
    model: str = "smollm2-135m"
    experts: int = 16
    budgets: list[float] = field(default_factory=lambda: [1.0, 0.75, 0.5, 0.35])
    splits: list[str] = field(default_factory=lambda: ["cluster", "random"])
    calib_tokens: int = 4096
    window: int = 512  # calibration and evaluation window
    eval_tokens: int = 2048  # held-out tokens per text
    val_tokens: int = 2048  # validation tokens (the last Gutenberg training book)
    router_steps: int = 60
    tune_steps: int = 10
    tune_mode: str = "router"
    tune_lr: float = 0.0
    tune_batch: int = 2
    tune_context: int = 256
    tuned: list[str] = field(default_factory=lambda: ["cluster-b50", "cluster-b35", "random-b50"])
    tuned_all: list[str] = field(default_factory=lambda: ["cluster-b50"])  # also tuned with every weight trainable
    tune_all_lr: float = 1e-4
    shared: list[float] = field(default_factory=lambda: [0.125, 0.25])  # candidate shared shares ([] = no arm)
    distill_steps: int = 400  # full distillation run per budget (0 = no distilled arm)
    distill_pilot_steps: int = 40  # per grid entry, at 50%, to choose mode and learning rate
    distill_grid: list[dict] = field(default_factory=lambda: [{"mode": "moe", "lr": 1e-4},
                                                              {"mode": "all", "lr": 5e-5},
                                                              {"mode": "lora", "lr": 1e-3}])
    distill_batch: int = 4
    distill_context: int = 256
    distill_on_policy: float = 0.0
    distill_eval_every: int = 100
    teal: bool = True
    timed: list[str] = field(default_factory=lambda: ["cluster-b100", "cluster-b75", "cluster-b50", "cluster-b35"])
    benchmarks: dict[str, int] = field(default_factory=lambda: {"arc_easy": 200, "piqa": 200, "hellaswag": 200})
    benchmarked: list[str] = field(default_factory=list)  # besides the original and the chosen 50% variant
    seed: int = 0

    def __post_init__(self) -> None:
        """Fail on a bad `--set` now, with the field named, not after minutes of calibration."""
        for f in dataclasses.fields(self):
            value, kind = getattr(self, f.name), f.type if isinstance(f.type, str) else str(f.type)
            ok = {"str": isinstance(value, str),
                  "int": isinstance(value, int) and not isinstance(value, bool),
                  "bool": isinstance(value, bool),
                  "float": isinstance(value, int | float) and not isinstance(value, bool),
                  "list[float]": isinstance(value, list) and all(isinstance(v, int | float) for v in value),
                  "list[str]": isinstance(value, list) and all(isinstance(v, str) for v in value),
                  "list[dict]": isinstance(value, list) and all(isinstance(v, dict) for v in value),
                  "dict[str, int]": isinstance(value, dict) and all(isinstance(v, int) for v in value.values()),
                  }.get(kind, True)
            if not ok:
                raise ValueError(f"--set {f.name}={value!r}: expected {kind}")
        if not self.budgets or not all(0 < b <= 1 for b in self.budgets):
            raise ValueError(f"--set budgets={self.budgets}: each must be in (0, 1] (a share of the FFN FLOPs)")
        for name in ("experts", "calib_tokens", "window", "eval_tokens", "val_tokens", "tune_batch", "tune_context"):
            if getattr(self, name) < 1:
                raise ValueError(f"--set {name}={getattr(self, name)}: must be >= 1")
        unknown = sorted(set(self.splits) - {"cluster", "random"})
        if unknown:
            raise ValueError(f"--set splits={self.splits}: choose from cluster, random")
        if not all(0 < s < 1 for s in self.shared):
            raise ValueError(f"--set shared={self.shared}: each must be in (0, 1) (a share of the FFN's neurons)")
        if self.distill_steps and not self.distill_grid:
            raise ValueError("--set distill_grid=[]: give at least one {\"mode\": ..., \"lr\": ...} entry")
        for entry in self.distill_grid:  # DistillConfig names a bad mode or learning rate
            DistillConfig(steps=1, mode=entry.get("mode", "moe"), lr=float(entry.get("lr", 0.0)))


CHECKPOINT_EVERY = 25  # distillation steps between checkpoints (a few minutes of CPU at the default sizes)
QUICK = dict(calib_tokens=1024, eval_tokens=512, val_tokens=512, router_steps=30, budgets=[1.0, 0.5],
             splits=["cluster"], tune_steps=2, tuned=["cluster-b50"], tuned_all=[], shared=[0.25], distill_steps=4,
             distill_pilot_steps=2, distill_grid=[{"mode": "moe", "lr": 1e-4}, {"mode": "lora", "lr": 1e-3}],
             distill_batch=2, distill_context=128, distill_eval_every=2, timed=[],
             benchmarks={"arc_easy": 8, "piqa": 8, "hellaswag": 8})


def study_config(args: argparse.Namespace) -> StudyConfig:
    values: dict[str, Any] = dict(QUICK) if args.quick else {}
    names = {f.name for f in dataclasses.fields(StudyConfig)}
    for pair in args.overrides:
        key, sep, raw = pair.partition("=")
        if not sep or key not in names:
            raise ValueError(f"--set {pair!r}: expected KEY=VALUE with KEY one of {', '.join(sorted(names))}")
        try:
            values[key] = json.loads(raw)
        except json.JSONDecodeError:
            values[key] = raw
    return StudyConfig(**values)


def score(model: DensaModel, tokenizer, texts: dict[str, list[int]], window: int) -> dict[str, Any]:
    """Held-out bits per byte on each text and both together, the FFN share used and FLOPs per token, all from the
    measurement core (densa/measure.py). A TEAL model's FFN share is its measured share of weights read."""
    row: dict[str, Any] = {}
    token_bytes = token_byte_lengths(tokenizer, model.config.vocab_size)
    nats = n_bytes = tokens = 0.0
    weighted: list[float] | None = None  # Σ over texts of tokens × per-layer experts
    is_teal = isinstance(model.layers[0].mlp, teal.TealFFN)
    if is_teal:
        teal.reset_counts(model)
    for name, ids in texts.items():
        s = bits_per_byte(model, text_windows(ids, window), token_bytes, batch=4)
        row[f"bpb_{name}"] = s.bpb
        nats, n_bytes, tokens = nats + s.nats, n_bytes + s.bytes, tokens + s.tokens
        if s.ffn_experts is not None:
            part = [e * s.tokens for e in s.ffn_experts]
            weighted = part if weighted is None else [a + b for a, b in zip(weighted, part, strict=True)]
    row["bpb"] = nats / math.log(2) / n_bytes
    cfg = model.config
    if is_teal:
        shares = teal.ffn_shares(model)
        row["ffn_fraction"] = sum(shares) / len(shares)
        row["flops_per_token"] = teal.teal_flops_per_token(model, window, shares)
        return row
    per_layer = [w / tokens for w in weighted] if weighted is not None else None
    row["ffn_fraction"] = sum(per_layer) / len(per_layer) / cfg.num_experts if per_layer else 1.0
    row["flops_per_token"] = forward_flops_per_token(cfg, window, per_layer)
    return row


@torch.no_grad()
def exactness(dense: DensaModel, full: DensaModel, texts: dict[str, list[int]], window: int) -> dict[str, Any]:
    """With every expert active: the largest |logit difference| from the original over one window of each held-out
    text, and whether 32 greedily generated tokens after each text's first 32 are identical."""
    diff, same = 0.0, True
    for ids in texts.values():
        x = torch.tensor(ids[:window])[None]
        diff = max(diff, float((full(x).logits - dense(x).logits).abs().max()))
        prompt = x[:, :32]
        same &= torch.equal(full.generate(prompt, max_new_tokens=32), dense.generate(prompt, max_new_tokens=32))
    return {"all_experts_max_abs_logit_diff": diff, "all_experts_greedy_identical": same}


def validation_ids(tok, tokens: int) -> list[int]:
    """The first `tokens` + 1 tokens of the last book of Gutenberg's training split (the validation text)."""
    *_, last = corpus_texts("gutenberg", "train")
    return encode(tok, last[: 8 * tokens])[: tokens + 1]


@dataclass
class Study:
    """What every arm needs: the settings, the original, the texts, and where the rows go."""

    cfg: StudyConfig
    out: Path
    dense: DensaModel
    tok: Any
    texts: dict[str, list[int]]  # held-out texts
    val: dict[str, list[int]]  # {"validation": ids}
    windows: torch.Tensor  # calibration windows
    progress: bool
    rows: dict[str, dict[str, Any]] = field(default_factory=dict)
    conversions: dict[str, dict[str, Any]] = field(default_factory=dict)
    memo: dict[str, Any] = field(default_factory=dict)  # validation figures behind each choice (shares, pilots)
    done: dict[str, dict[str, Any]] = field(default_factory=dict)  # rows an earlier run of this study scored
    best_half: str | None = None  # the MoE variant at 50% with the best validation bpb so far (saved for benchmarks)
    saved: dict[str, str] = field(default_factory=dict)

    def val_bpb(self, model: DensaModel) -> float:
        return score(model, self.tok, self.val, self.cfg.window)["bpb"]

    def add(self, name: str, model: DensaModel, moe: bool = True, **info: Any) -> None:
        """Score `model` on validation and held-out text once, time it if asked, save it if benchmarked; a MoE
        variant at the 50% budget that validates best so far becomes the headline candidate."""
        row = {**info, "val_bpb": self.val_bpb(model), **score(model, self.tok, self.texts, self.cfg.window)}
        if name in self.cfg.timed or (info.get("budget") == 0.5 and (not moe or self._beats_best(row))):
            row |= ms_per_token(model, self.texts["gutenberg"])
        self.rows[name] = row
        if name in self.cfg.benchmarked:
            self._save(model, name)
        superseded = None
        if moe and info.get("budget") == 0.5 and self._beats_best(row):
            superseded = self._new_best(name)
            self._save(model, name)
        self.save_state()
        if superseded:  # only once the new headline's model and row are safe on disk
            shutil.rmtree(superseded, ignore_errors=True)

    def reuse(self, name: str) -> bool:
        """Take the row `name` as an earlier run of this study scored it, if there is one (resume)."""
        if name not in self.done:
            return False
        row = self.rows[name] = self.done[name]
        path = self.out / "models" / name
        if name in self.cfg.benchmarked and path.is_dir():
            self.saved[name] = str(path)
        superseded = None
        if row.get("budget") == 0.5 and row.get("split") not in (None, "teal") and self._beats_best(row):
            superseded = self._new_best(name)
            if path.is_dir():
                self.saved[name] = str(path)
        self.save_state()
        if superseded:
            shutil.rmtree(superseded, ignore_errors=True)
        return True

    def save_state(self) -> None:
        """Everything scored and chosen so far, written as it happens: a stopped run resumes from it."""
        state = {"config": dataclasses.asdict(self.cfg), "rows": self.rows, "conversions": self.conversions,
                 "memo": self.memo}
        tmp = self.out / "state.json.tmp"
        tmp.write_text(json.dumps(state, indent=2) + "\n")
        tmp.replace(self.out / "state.json")

    def _new_best(self, name: str) -> str | None:
        """Make `name` the headline candidate; returns the saved model folder it supersedes (to delete), if any."""
        old, self.best_half = self.best_half, name
        if old is not None and old not in self.cfg.benchmarked and old in self.saved:
            return self.saved.pop(old)
        return None

    def _beats_best(self, row: dict[str, Any]) -> bool:
        return self.best_half is None or row["val_bpb"] < self.rows[self.best_half]["val_bpb"]

    def _save(self, model: DensaModel, name: str) -> None:
        if not self.cfg.benchmarks:
            return
        path = self.out / "models" / name
        save_checkpoint(model, path, overwrite=True)
        self.tok.save_pretrained(str(path))
        self.saved[name] = str(path)


def earlier_run(cfg: StudyConfig, out: Path) -> dict[str, Any] | None:
    """The state of an earlier run of this study in `out` (None if there is none); a different configuration there
    is an error, not something to mix with."""
    path = out / "state.json"
    if not path.is_file():
        return None
    state = json.loads(path.read_text())
    now = json.loads(json.dumps(dataclasses.asdict(cfg)))  # as it would read back from state.json
    if state["config"] != now:
        changed = sorted(k for k in set(now) | set(state["config"]) if state["config"].get(k) != now.get(k))
        raise ValueError(f"{out} holds a moefy study run with other settings ({', '.join(changed)}); use another "
                         "--out, or the same settings to resume it")
    return state


def run(args: argparse.Namespace, out: Path) -> dict:
    cfg = study_config(args)
    out.mkdir(parents=True, exist_ok=True)
    before = earlier_run(cfg, out)
    source = resolve(cfg.model)
    tok = source.tokenizer
    texts = {name: encode(tok, corpus_text(corpus, split, 8 * cfg.eval_tokens))[: cfg.eval_tokens + 1]
             for name, (corpus, split) in HELD_OUT.items()}
    st = Study(cfg, out, source.model, tok, texts, {"validation": validation_ids(tok, cfg.val_tokens)},
               calibration_windows(tok, "gutenberg", cfg.calib_tokens, cfg.window), not args.no_progress)
    if before is not None:
        st.done, st.conversions, st.memo = before["rows"], before["conversions"], before["memo"]
        if st.progress:
            print(f"resuming the study in {out}: {len(st.done)} rows already scored")
    if not st.reuse("dense"):
        st.rows["dense"] = {"val_bpb": st.val_bpb(st.dense), **score(st.dense, tok, texts, cfg.window),
                            **ms_per_token(st.dense, texts["gutenberg"])}
        st.save_state()
    for split in cfg.splits:
        _split_arm(st, split)
    if cfg.shared:
        _shared_arms(st)
    if cfg.teal:
        _teal_arm(st)
    bench = (_benchmarks(cfg, st.saved, out, st.progress, resume=before is not None)
             if cfg.benchmarks and st.saved else {})
    result = _summary(cfg, st, bench)
    (out / "rows.json").write_text(json.dumps({"config": dataclasses.asdict(cfg), "rows": st.rows,
                                               "conversions": st.conversions, "benchmarks": bench}, indent=2) + "\n")
    _plots(st.rows, bench, out)
    (out / "moefy.md").write_text(_markdown(st.rows, bench, result))
    return result


def _conversion_info(conversion: Conversion, seconds: float) -> dict[str, Any]:
    layers = conversion.report["layers"]
    return {"seconds": seconds, "router_recall": _mean(layers, "router_recall"),
            "random_router_recall": _mean(layers, "random_router_recall"),
            "mass_in_top_half": _mean(layers, "mass_in_top_k"),
            "oracle_half_lost_output": _mean(layers, "oracle_top_k_lost_output"),
            "router_half_lost_output": _mean(layers, "router_top_k_lost_output"), "per_layer": layers}


def _convert(st: Study, split: str, shared: float = 0.0) -> tuple[Conversion, dict[str, Any]]:
    start = time.perf_counter()
    conversion = convert(st.dense, st.windows, MoefyConfig(experts=st.cfg.experts, budget=1.0, split=split,
                                                           shared=shared, router_steps=st.cfg.router_steps,
                                                           seed=st.cfg.seed), st.progress)
    return conversion, _conversion_info(conversion, time.perf_counter() - start)


def _arm_done(st: Study, arm: str, budgets: list[float], rows: list[str]) -> bool:
    """Whether a resumed run had finished this arm: its conversion report (with the exactness check when it has a
    100% budget) and every row, which are then reused in `rows`' order."""
    report = st.conversions.get(arm, {})
    complete = report and (1.0 not in budgets or "all_experts_greedy_identical" in report)
    return bool(complete) and all(st.reuse(name) for name in rows)


def _split_arm(st: Study, split: str) -> None:
    """The conversion as before issue 19, with the optional brief tuning (module docstring)."""
    cfg = st.cfg
    data = prepare_data(st.tok, "gutenberg", 2, st.out / "tune") if cfg.tune_steps and cfg.tuned else None
    names = [f"{split}-b{round(100 * b)}" for b in cfg.budgets]
    rows = [r for n in names for r in (n, *([f"{n}-tuned-all"] if n in cfg.tuned_all and data is not None else []),
                                       *([f"{n}-tuned"] if n in cfg.tuned and data is not None else []))]
    if _arm_done(st, split, cfg.budgets, rows):
        return
    conversion, info = _convert(st, split)
    st.conversions[split] = {**info, **st.conversions.get(split, {})}  # a resumed run keeps the first report
    for budget, name in zip(cfg.budgets, names, strict=True):
        model = with_budget(conversion, budget)
        if not st.reuse(name):
            st.add(name, model, split=split, budget=budget, tuned=False)
        if budget == 1.0 and "all_experts_greedy_identical" not in st.conversions[split]:
            st.conversions[split] |= exactness(st.dense, model, st.texts, cfg.window)
            st.save_state()
        if name in cfg.tuned_all and data is not None and not st.reuse(f"{name}-tuned-all"):
            tuned_all = with_budget(conversion, budget)
            tc = TuneConfig(steps=cfg.tune_steps, mode="all", lr=cfg.tune_all_lr, batch_size=cfg.tune_batch,
                            context=cfg.tune_context, seed=cfg.seed)
            report = tune(tuned_all, data, st.out / "tune" / f"{name}-all", tc, st.progress)
            st.add(f"{name}-tuned-all", tuned_all, split=split, budget=budget, tuned="all", **report)
            del tuned_all
        if name in cfg.tuned and data is not None and not st.reuse(f"{name}-tuned"):
            tc = TuneConfig(steps=cfg.tune_steps, mode=cfg.tune_mode, lr=cfg.tune_lr, batch_size=cfg.tune_batch,
                            context=cfg.tune_context, seed=cfg.seed)
            report = tune(model, data, st.out / "tune" / name, tc, st.progress)
            st.add(f"{name}-tuned", model, split=split, budget=budget, tuned=True, **report)
        del model


def _pick_budget(budgets: list[float]) -> float:
    """The budget choices are made at: 0.5, or the one nearest it."""
    return min((b for b in budgets if b < 1) or budgets, key=lambda b: abs(b - 0.5))


def _shared_arms(st: Study) -> None:
    """+ shared experts (share chosen on validation), then + distillation (settings chosen on validation)."""
    cfg = st.cfg
    at = _pick_budget(cfg.budgets)
    shares = [s for s in cfg.shared if s <= at]
    if not shares:
        return
    candidates = {float(k): v for k, v in st.memo.get("shared_validation_bpb", {}).items()}
    best: tuple[float, Conversion, dict[str, Any]] | None = None  # the best candidate converted in this process
    for share in (s for s in shares if s not in candidates):
        conversion, info = _convert(st, "cluster", share)
        candidates[share] = st.val_bpb(with_budget(conversion, at))
        st.memo["shared_validation_bpb"] = {str(k): v for k, v in candidates.items()}
        st.save_state()
        if best is None or candidates[share] < candidates[best[0]]:
            best = (share, conversion, info)
        del conversion
    share = min(shares, key=lambda s: candidates[s])
    budgets = [b for b in cfg.budgets if b >= share]
    distilled = [b for b in budgets if b < 1] if cfg.distill_steps else []
    names = [f"shared-b{round(100 * b)}" for b in budgets] + [f"shared-b{round(100 * b)}-distilled" for b in distilled]
    if _arm_done(st, "shared", budgets, names):
        return
    if best is not None and best[0] == share:
        _, conversion, info = best
    else:  # a resumed run: the chosen candidate again (conversion is deterministic)
        conversion, info = _convert(st, "cluster", share)
    del best
    st.conversions["shared"] = {**info, "share": share, "shared_experts": conversion.report["shared_experts"],
                                "validation_bpb_by_share": {str(k): candidates[k] for k in shares},
                                **st.conversions.get("shared", {})}
    for budget in budgets:
        model = with_budget(conversion, budget)
        name = f"shared-b{round(100 * budget)}"
        if not st.reuse(name):
            st.add(name, model, split="shared", budget=budget, tuned=False, shared=share)
        if budget == 1.0 and "all_experts_greedy_identical" not in st.conversions["shared"]:
            st.conversions["shared"] |= exactness(st.dense, model, st.texts, cfg.window)
            st.save_state()
    if not distilled:
        return
    steps = max(cfg.distill_steps, cfg.distill_pilot_steps)
    text = calibration_windows(st.tok, "gutenberg", steps * cfg.distill_batch * cfg.distill_context,
                               cfg.distill_context, skip=int(st.windows.numel()))
    pilots: list[dict[str, Any]] = st.memo.setdefault("distill_pilots", [])
    if len(cfg.distill_grid) > 1:
        for i, entry in enumerate(cfg.distill_grid[len(pilots):], start=len(pilots)):
            model = with_budget(conversion, at)
            report = distill(model, st.dense, text, st.out / "distill" / f"pilot-{i}",
                             _distill_config(cfg, entry, cfg.distill_pilot_steps, eval_every=0),
                             resume=True, progress=st.progress)
            pilots.append({**entry, "val_bpb": st.val_bpb(model), "cpu_seconds": report["distill_cpu_seconds"]})
            st.save_state()
            del model
        best = min(pilots, key=lambda p: p["val_bpb"])
        entry = {k: best[k] for k in cfg.distill_grid[0]}
    else:
        entry = cfg.distill_grid[0]
    st.conversions["distill"] = {"pilots": pilots, "chosen": entry}
    for budget in sorted(distilled, key=lambda b: abs(b - at)):  # the headline budget first
        name = f"shared-b{round(100 * budget)}-distilled"
        if st.reuse(name):
            continue
        model = with_budget(conversion, budget)
        dc = _distill_config(cfg, entry, cfg.distill_steps, eval_every=cfg.distill_eval_every)
        report = distill(model, st.dense, text, st.out / "distill" / f"b{round(100 * budget)}", dc,
                         validate=st.val_bpb, resume=True, progress=st.progress)
        st.add(name, model, split="shared", budget=budget, tuned="distilled", shared=share, **report)
        del model


def _distill_config(cfg: StudyConfig, entry: dict, steps: int, eval_every: int) -> DistillConfig:
    return DistillConfig(steps=steps, mode=entry.get("mode", "moe"), lr=float(entry.get("lr", 0.0)),
                         batch_size=cfg.distill_batch, context=cfg.distill_context, on_policy=cfg.distill_on_policy,
                         sample_tokens=min(64, cfg.distill_context // 2), eval_every=eval_every,
                         checkpoint_every=CHECKPOINT_EVERY, seed=cfg.seed)


def _teal_arm(st: Study) -> None:
    """The neuron-level baseline at sparsity 1 − budget, thresholds from the calibration windows."""
    budgets = [b for b in st.cfg.budgets if b < 1 and not st.reuse(f"teal-b{round(100 * b)}")]
    if not budgets:
        return
    inputs = ffn_inputs(st.dense, st.windows, progress=st.progress)
    for budget in budgets:
        thresholds = teal.calibrate(st.dense, st.windows, 1 - budget, inputs=inputs)
        model = teal.teal_model(st.dense, thresholds)
        st.add(f"teal-b{round(100 * budget)}", model, moe=False, split="teal", budget=budget, tuned=False,
               sparsity=thresholds.sparsity)
        del model


def _mean(layers: list[dict[str, Any]], key: str) -> float:
    return sum(r[key] for r in layers) / len(layers)


def _benchmarks(cfg: StudyConfig, saved: dict[str, str], out: Path, progress: bool,
                resume: bool = False) -> dict[str, dict[str, Any]]:
    """Accuracy, ms/token and Intelligence Density of the original and the saved variants (densa.eval.api)."""
    from densa.eval.api import evaluate

    labels = {cfg.model: "dense", **{path: name for name, path in saved.items()}}
    records = evaluate(list(labels), list(cfg.benchmarks), dict(cfg.benchmarks), out / "eval", seed=cfg.seed,
                       batch_size=4, progress=progress, labels=labels, resume=resume)
    bench: dict[str, dict[str, Any]] = {}
    for r in records:
        density = (r.get("intelligence_density") or {}).get("per_gflop")
        bench.setdefault(labels[r["model"]], {})[r["task"]] = {
            "accuracy": r["score"], "accuracy_ci": r["score_ci"], "n": r["n_items"], "chance": r["chance"],
            "quality": r.get("quality"),
            "id_per_gflop": density, "flops_per_token": r["flops_per_token_spent"] or r["flops_per_token"],
            "ms_per_token": r["ms_per_token"]}
    return bench


def _summary(cfg: StudyConfig, st: Study, bench: dict[str, dict[str, Any]]) -> dict[str, Any]:
    rows, base = st.rows, st.rows["dense"]
    flat: dict[str, Any] = {"model": cfg.model, "experts": cfg.experts, "tune_steps": cfg.tune_steps,
                            "tune_mode": cfg.tune_mode, "calib_tokens": cfg.calib_tokens,
                            "eval_tokens_per_text": cfg.eval_tokens, "val_tokens": cfg.val_tokens,
                            "distill_steps": cfg.distill_steps, "goals": GOALS}
    for name, row in rows.items():
        for key in ("bpb", "bpb_gutenberg", "bpb_wikitext2", "val_bpb", "ffn_fraction", "flops_per_token",
                    "prefill_ms_per_token", "decode_ms_per_token", "distill_mode", "distill_lr", "distill_best_step",
                    "distill_tokens", "distill_cpu_seconds", "distill_wall_seconds", "sparsity", "shared"):
            if key in row:
                flat[f"{name}_{key}"] = row[key]
        flat[f"{name}_bpb_increase"] = row["bpb"] / base["bpb"] - 1
        flat[f"{name}_flops_ratio"] = row["flops_per_token"] / base["flops_per_token"]
    for split, info in st.conversions.items():
        for key, value in info.items():
            if key != "per_layer":  # per-layer figures stay in rows.json
                flat[f"{split}_{key}"] = value
    dense_bench = bench.get("dense", {})
    for name, tasks in bench.items():
        for task, b in tasks.items():
            flat[f"{name}_{task}_accuracy"] = b["accuracy"]
            flat[f"{name}_{task}_n"] = b["n"]
            ref = dense_bench.get(task, {})
            if b["id_per_gflop"] and ref.get("id_per_gflop"):  # densa eval's accuracy per active GFLOP/token
                flat[f"{name}_{task}_id_ratio"] = b["id_per_gflop"] / ref["id_per_gflop"]
            if (ref.get("quality") or 0) > 0 and b.get("quality") is not None and b["flops_per_token"]:
                # the same with chance-corrected quality (densa.eval.density) even where an interval includes chance
                flat[f"{name}_{task}_id_above_chance_ratio"] = (b["quality"] / b["flops_per_token"]) / (
                    ref["quality"] / ref["flops_per_token"])
        probe = next(iter(tasks.values()))["ms_per_token"] or {}
        flat[f"{name}_eval_probe_ms_per_token_batch1"] = (probe.get("batch_1") or {}).get("median")
    for prefix, half in (("", st.best_half), ("teal_", "teal-b50" if "teal-b50" in rows else None)):
        if half is None:
            continue
        flat[f"{prefix}bpb_increase_at_half_ffn"] = rows[half]["bpb"] / base["bpb"] - 1
        flat[f"{prefix}bpb_increase_at_half_ffn_variant"] = half
        for what in ("prefill", "decode"):
            if f"{what}_ms_per_token" in rows[half]:
                flat[f"{prefix}{what}_speedup_at_half_ffn"] = (base[f"{what}_ms_per_token"]
                                                               / rows[half][f"{what}_ms_per_token"])
    if st.best_half is not None:
        flat["bpb_increase_at_half_ffn_goal"] = GOALS["bpb_increase_at_half_ffn"]
        flat["bpb_increase_at_half_ffn_selected_on"] = "validation bpb (the last Gutenberg training book)"
        drops = {task: 100 * (dense_bench[task]["accuracy"] - b["accuracy"])
                 for task, b in bench.get(st.best_half, {}).items() if task in dense_bench}
        if drops:
            flat["benchmark_drop_at_half_ffn_points"] = max(drops.values())
            flat |= {f"benchmark_drop_at_half_ffn_points_{task}": d for task, d in drops.items()}
    return flat


def _plots(rows: dict[str, dict[str, Any]], bench: dict[str, dict[str, Any]], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.axhline(rows["dense"]["bpb"], color="black", lw=1, ls=":", label="original (dense)")
    arms: dict[str, list[tuple[float, float]]] = {}
    for r in rows.values():
        if "split" in r:
            what = {False: "", True: ", router tuned", "all": ", all weights tuned", "distilled": ", distilled"}
            arms.setdefault(f"{r['split']}{what[r['tuned']]}", []).append((r["ffn_fraction"], r["bpb"]))
    for label, pts in arms.items():
        ax.plot(*zip(*sorted(pts), strict=True), "o-" if len(pts) > 1 else "^", label=label)
    ax.set_xlabel("FFN compute used (share of the dense FFN's FLOPs, measured)")
    ax.set_ylabel("held-out bits per byte (Gutenberg + WikiText-2)")
    ax.set_title("smollm2-135m converted by densa moefy")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "moefy-bpb-vs-budget.png", dpi=120)
    plt.close(fig)
    if not bench:
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    for task in sorted({t for tasks in bench.values() for t in tasks}):
        pts = [(b[task]["flops_per_token"] / 1e9, b[task]["accuracy"], name) for name, b in bench.items()
               if task in b and b[task]["accuracy"] is not None and b[task]["flops_per_token"]]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "o", label=task)
        for x, y, name in pts:
            ax.annotate(name.replace("cluster-", "").replace("-tuned", "t"), (x, y), fontsize=7)
        chance = next(b[task]["chance"] for b in bench.values() if task in b)
        ax.axhline(chance, lw=0.8, ls=":", color=ax.lines[-1].get_color())
    ax.set_xlabel("active GFLOPs per token (measured routing)")
    ax.set_ylabel("accuracy (dotted: chance)")
    ax.set_title("Intelligence Density: accuracy per FLOP")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "moefy-id.png", dpi=120)
    plt.close(fig)


def _markdown(rows: dict[str, dict[str, Any]], bench: dict[str, dict[str, Any]], result: dict[str, Any]) -> str:
    lines = ["# densa study moefy", "", "| variant | FFN share | GFLOPs/token | bpb validation | bpb Gutenberg | "
             "bpb WikiText-2 | bpb both | increase | prefill ms/tok | decode ms/tok |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in rows.items():
        def ms(key: str, r: dict[str, Any] = r) -> str:
            return f"{r[key]:.2f}" if key in r else ""
        lines.append(f"| {name} | {r['ffn_fraction']:.3f} | {r['flops_per_token'] / 1e9:.3f} | "
                     f"{r['val_bpb']:.4f} | {r['bpb_gutenberg']:.4f} | {r['bpb_wikitext2']:.4f} | {r['bpb']:.4f} | "
                     f"{result[f'{name}_bpb_increase']:+.1%} | {ms('prefill_ms_per_token')} | "
                     f"{ms('decode_ms_per_token')} |")
    if bench:
        lines += ["", "| variant | task | accuracy | n | ID ratio vs original | above-chance ID ratio |",
                  "|---|---|---|---|---|---|"]
        for name, tasks in bench.items():
            for task, b in tasks.items():
                ratios = [result.get(f"{name}_{task}_{key}") for key in ("id_ratio", "id_above_chance_ratio")]
                cells = " | ".join(f"{r:.2f}" if r is not None else "" for r in ratios)
                lines.append(f"| {name} | {task} | {b['accuracy']:.3f} | {b['n']} | {cells} |")
    lines.append("")
    for key, goal in GOALS.items():
        for prefix in ("", "teal_"):
            if prefix + key in result:
                variant = result.get(f"{prefix}bpb_increase_at_half_ffn_variant", "")
                lines.append(f"{prefix}{key} ({variant}): {result[prefix + key]:+.4f} (goal "
                             f"{'<=' if 'speedup' not in key else '>='} {goal:g})")
    return "\n".join(lines) + "\n"


"""Brief tuning of a converted model with densa's trainer (densa/train/loop.py), at its compute budget.

The calibration fit only teaches the router to imitate activation norms; tuning lets the language-modelling loss
speak. In training mode the budget controller moves each layer's zc_bias every step toward the bias at which the
batch used `target_active_experts` experts per token, so the budget holds while the weights move.
- mode "router": only the routers train (a few hundred thousand parameters). With unit gate weights the router's
  gradient is the straight-through one (densa/model/router.py): d loss / d score_e = (d loss / d weight_e) / score_e
  for the experts a token used.
- mode "all": every weight trains, so the experts also adapt to the experts their tokens no longer get.
The text is the corpus' training split, tokenized with the model's tokenizer by `densa prepare`'s code.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from densa.data.prepare import prepare
from densa.model.model import DensaModel
from densa.model.moe import MoE
from densa.train.config import TrainConfig
from densa.train.loop import train


@dataclass(kw_only=True)
class TuneConfig:
    steps: int = 50  # optimizer steps
    mode: Literal["router", "all"] = "router"
    lr: float = 0.0  # AdamW peak learning rate; 0 = 1e-3 for "router", 3e-5 for "all"
    batch_size: int = 4
    context: int = 256
    corpus: str = "gutenberg"
    max_docs: int = 2  # documents of the corpus tokenized for tuning (a Gutenberg document is a whole book)
    seed: int = 0

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ValueError(f"--tune-steps {self.steps}: must be >= 1")
        if self.mode not in ("router", "all"):
            raise ValueError(f"--tune {self.mode!r}: choose router or all")

    def peak_lr(self) -> float:
        return self.lr or (1e-3 if self.mode == "router" else 3e-5)


def prepare_data(tokenizer, corpus: str, max_docs: int, out: Path) -> Path:
    """Tokenize `max_docs` documents of `corpus` with the model's tokenizer (once per folder)."""
    if tokenizer is None:
        raise ValueError("tuning needs the model's tokenizer (the source model ships none)")
    data = out / "data"
    if not (data / "manifest.json").is_file():
        tokenizer.save_pretrained(str(out / "tokenizer"))
        prepare(corpus, out / "tokenizer", data, max_docs=max_docs)
    return data


def tune(model: DensaModel, data: Path, run_dir: str | Path, cfg: TuneConfig, progress: bool = True) -> dict:
    """Train `model` in place for `cfg.steps` steps on the prepared folder `data` (see `prepare_data`), writing the
    trainer's run files into `run_dir`; returns the losses."""
    routers = {id(m.gate.weight) for m in model.modules() if isinstance(m, MoE)}
    if not routers:
        raise ValueError("the model has no MoE layers to tune")
    trainable = [p.requires_grad for p in model.parameters()]
    if cfg.mode == "router":
        for p in model.parameters():
            p.requires_grad_(id(p) in routers)
    tc = TrainConfig(data=str(data), steps=cfg.steps, batch_size=cfg.batch_size, context=cfg.context,
                     lr=cfg.peak_lr(), warmup_steps=max(1, cfg.steps // 10), weight_decay=0.0, seed=cfg.seed,
                     log_interval=1, eval_interval=cfg.steps, eval_batches=2, checkpoint_interval=cfg.steps,
                     keep_last=1)
    try:
        result = train(model.config, tc, run_dir, model=model, progress=progress)
    finally:
        for p, flag in zip(model.parameters(), trainable, strict=True):
            p.requires_grad_(flag)
        model.eval()
    shutil.rmtree(Path(run_dir) / "checkpoints", ignore_errors=True)  # the tuned model is `model`; keep the metrics
    return {"tune_mode": cfg.mode, "tune_steps": cfg.steps, "tune_lr": cfg.peak_lr(),
            "tune_tokens": cfg.steps * cfg.batch_size * cfg.context, "tune_first_loss": result.losses[0],
            "tune_last_loss": result.losses[-1], "tune_val_bpb": result.val_bpb}

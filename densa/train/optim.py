"""Optimizers and the learning-rate schedule.

Weight decay goes on matrices only: linear weights, fused 3-D expert weights and the embedding. Norm weights,
biases, the Mega EMA parameters and attention scales/biases (all the rest) get none. With `optimizer: muon`,
`torch.optim.Muon` takes the 2-D linear weights inside the blocks (not the router, embedding or head; Muon accepts
2-D parameters only) and AdamW the rest.

The schedule is a pure function of the step (so resuming needs no scheduler state): linear warm-up, then cosine down
to `min_lr_ratio`, or WSD: stable at the peak, then linear decay over the last `decay_fraction` of the steps.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from densa.model.moe import MoE
from densa.train.config import TrainConfig


def muon_parameters(model: nn.Module) -> set[int]:
    """ids of the 2-D hidden linear weights that Muon may take (not the MoE router)."""
    routers = {id(m.gate.weight) for m in model.modules() if isinstance(m, MoE)}
    return {id(m.weight) for m in model.layers.modules() if isinstance(m, nn.Linear)} - routers


def decayed_parameters(model: nn.Module) -> set[int]:
    """ids of the parameters that get weight decay: matrices of linear, expert and embedding weights."""
    chosen = {id(m.weight) for m in model.modules() if isinstance(m, nn.Linear | nn.Embedding)}
    for m in model.modules():
        if isinstance(m, MoE):
            chosen |= {id(p) for p in m.experts.parameters() if p.dim() >= 2}
    return chosen


def build_optimizers(model: nn.Module, cfg: TrainConfig) -> list[torch.optim.Optimizer]:
    """AdamW (and Muon) over every trainable parameter; each group's `base_lr` is its peak learning rate."""
    params = [p for p in model.parameters() if p.requires_grad]  # a tied head appears once
    muon = muon_parameters(model) if cfg.optimizer == "muon" else set()
    decay = decayed_parameters(model)
    adam_decay = [p for p in params if id(p) in decay and id(p) not in muon]
    adam_plain = [p for p in params if id(p) not in decay and id(p) not in muon]
    groups = [{"params": adam_decay, "weight_decay": cfg.weight_decay, "base_lr": cfg.lr},
              {"params": adam_plain, "weight_decay": 0.0, "base_lr": cfg.lr}]
    optimizers: list[torch.optim.Optimizer] = [
        torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.lr, betas=(cfg.beta1, cfg.beta2))]
    if muon:
        muon_params = [p for p in params if id(p) in muon]
        optimizers.append(torch.optim.Muon([{"params": muon_params, "base_lr": cfg.muon_lr}], lr=cfg.muon_lr,
                                           weight_decay=cfg.weight_decay, adjust_lr_fn="match_rms_adamw"))
    return optimizers


def lr_multiplier(step: int, cfg: TrainConfig) -> float:
    """Learning rate of optimizer step `step` (0-based) relative to the peak."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    lo = cfg.min_lr_ratio
    if cfg.schedule == "cosine":
        span = max(1, cfg.steps - cfg.warmup_steps)
        progress = min(1.0, (step - cfg.warmup_steps) / span)
        return lo + (1 - lo) * 0.5 * (1 + math.cos(math.pi * progress))
    decay_steps = max(1, round(cfg.decay_fraction * cfg.steps))
    decay_start = cfg.steps - decay_steps
    if step < decay_start:
        return 1.0
    return 1 - (1 - lo) * min(1.0, (step - decay_start + 1) / decay_steps)


def set_lr(optimizers: list[torch.optim.Optimizer], multiplier: float) -> None:
    for opt in optimizers:
        for group in opt.param_groups:
            group["lr"] = group["base_lr"] * multiplier

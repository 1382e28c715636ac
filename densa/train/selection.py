"""Selective language modelling (Rho-1, Lin et al. 2024, arXiv 2404.07965; docs/high-value-tokens.md,
'Selective language modelling').

The loss is the mean cross-entropy over the tokens of the micro-batch with the highest *excess loss*

    L_Δ(x_i) = L_θ(x_i) − L_ref(x_i),        L_SLM = (1/k) Σ_{i ∈ top-k by L_Δ} L_θ(x_i),   k = round(fraction · N)

where L_θ is the current model's token loss, L_ref the reference model's (precomputed into the shards,
densa/data/reference.py) and N the number of predicted tokens. Tokens the reference also finds hard (noise) and
tokens the model already knows have low excess loss and get no gradient. Selection needs no extra forward pass: the
excess is computed from the same logits, detached. Under data parallelism each rank selects within its own rows.

`select_tokens` is the fast path (one `topk`); `select_tokens_reference` the plain loop it is tested against.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def token_losses(logits: Tensor, input_ids: Tensor) -> Tensor:
    """Per-token next-token cross-entropy: logits (B, T+1, V), input_ids (B, T+1) -> (B, T)."""
    B, T1, V = logits.shape
    loss = F.cross_entropy(logits[:, :-1].reshape(-1, V), input_ids[:, 1:].reshape(-1), reduction="none")
    return loss.view(B, T1 - 1)


def kept_count(n: int, fraction: float) -> int:
    """How many of `n` tokens the selection keeps (at least one)."""
    return max(1, min(n, round(fraction * n)))


def select_tokens(loss: Tensor, ref_loss: Tensor, fraction: float) -> Tensor:
    """Boolean mask (same shape as `loss`) of the top `fraction` of tokens by excess loss `loss − ref_loss`."""
    excess = (loss.detach() - ref_loss).flatten()
    mask = torch.zeros_like(excess, dtype=torch.bool)
    mask[excess.topk(kept_count(excess.numel(), fraction)).indices] = True
    return mask.view(loss.shape)


def select_tokens_reference(loss: Tensor, ref_loss: Tensor, fraction: float) -> Tensor:
    """The same mask by sorting a Python list of (excess, position) pairs: the definition, spelled out."""
    excess = [(float(a) - float(b), i) for i, (a, b) in enumerate(zip(loss.flatten(), ref_loss.flatten(),
                                                                      strict=True))]
    ranked = sorted(excess, key=lambda pair: -pair[0])
    keep = {i for _, i in ranked[:kept_count(len(excess), fraction)]}
    return torch.tensor([i in keep for i in range(len(excess))]).view(loss.shape)


def selective_loss(loss: Tensor, ref_loss: Tensor, fraction: float) -> tuple[Tensor, Tensor]:
    """(mean of `loss` over the selected tokens, the mask): L_SLM above. `loss` keeps its gradient."""
    mask = select_tokens(loss, ref_loss, fraction)
    return loss[mask].mean(), mask


def rho1_objective(output, input_ids: Tensor, ref_loss: Tensor, fraction: float) -> Tensor:
    """The trainer's objective with the all-token cross-entropy swapped for the selective one:
    `output.loss − CE_all + CE_selected`, so a MoE model's router aux losses (inside `output.loss`) stay.
    `output` is the model's ModelOutput for `input_ids` (B, T+1) with labels; `ref_loss` is (B, T)."""
    tok = token_losses(output.logits, input_ids)  # (B, T), with gradient
    selected, _ = selective_loss(tok, ref_loss, fraction)
    return output.loss - tok.mean() + selected

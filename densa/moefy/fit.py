"""Fit a converted layer's router from calibration activations, and set its compute budget.

Target. Skipping expert e for token t removes exactly down_e · a_e(x_t) from the layer's output, so the experts a
token needs are those with the largest output norm ‖down_e a_e(x_t)‖ (`group_norms`). MoEfication fits its router
to predict the experts with the largest activation sums; the output norm is that idea measured where the error
lands.

Router. densa's `BudgetRouter` scores experts with sigmoid(W x) (no bias). W is fitted as a per-expert binary
classifier "is e among this token's k heaviest experts" (BCE, k = the fitting budget × E): first the ridge
least-squares solution of the ±1 labels (one solve), then full-batch Adam steps on the BCE. A fifth of the
calibration tokens is held out to report top-k recall (the share of the true k heaviest experts the router's k
best scores find), against a random router's k/E.

Budget. The E null experts' router rows are zero (score sigmoid(0) = 1/2) and every FFN slot is open (K = E), so a
token uses expert e iff sigmoid(W_e x) + expert_bias_e > 1/2 + zc_bias: a per-token threshold, i.e. dynamic compute.
`budget_zc_bias` finds the zc_bias at which the calibration tokens use `target` experts on average with the very
functions the budget controller uses in training (densa/model/router.py), so inference and training agree.
Shape suffixes: T tokens, D hidden, I neurons, E experts, F neurons per expert.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from densa.model.router import budget_bias, zc_thresholds


@dataclass
class RouterFit:
    weight_ED: Tensor  # router rows for the E FFN experts
    recall: float  # held-out top-k recall of the fitted router
    recall_random: float  # the same for a random router (expected k / E)
    k: int  # experts per token the labels marked as needed


def group_norms(act_TI: Tensor, down_DI: Tensor, groups_EF: Tensor) -> Tensor:
    """(T, E) norm of each expert's contribution to the FFN output: ‖down[:, g_e] · a[:, g_e]‖."""
    return torch.stack([(act_TI[:, g] @ down_DI[:, g].T).norm(dim=-1) for g in groups_EF], dim=1)


def dropped_error(act_TI: Tensor, down_DI: Tensor, groups_EF: Tensor, keep_TK: Tensor) -> float:
    """Mean over tokens of ‖FFN output lost‖ / ‖FFN output‖ when token t runs only the experts keep_TK[t]: how much
    of the layer's output a routing throws away (with the oracle's choice, what the split alone allows)."""
    kept_TE = torch.zeros(act_TI.shape[0], len(groups_EF), dtype=act_TI.dtype).scatter_(1, keep_TK, 1.0)
    full_TD = torch.zeros(act_TI.shape[0], down_DI.shape[0], dtype=act_TI.dtype)
    lost_TD = torch.zeros_like(full_TD)
    for e, g in enumerate(groups_EF):
        part_TD = act_TI[:, g] @ down_DI[:, g].T
        full_TD += part_TD
        lost_TD += part_TD * (1 - kept_TE[:, e : e + 1])
    return float((lost_TD.norm(dim=-1) / full_TD.norm(dim=-1).clamp_min(1e-12)).mean())


def topk_recall(scores_TE: Tensor, norms_TE: Tensor, k: int) -> float:
    """Share of each token's k heaviest experts (by `norms_TE`) that the k highest `scores_TE` select."""
    hit_TE = torch.zeros_like(norms_TE, dtype=torch.bool).scatter_(1, norms_TE.topk(k, dim=-1).indices, True)
    return float(hit_TE.gather(1, scores_TE.topk(k, dim=-1).indices).float().mean())


def fit_router(x_TD: Tensor, norms_TE: Tensor, k: int, steps: int = 150, lr: float = 3e-3, ridge: float = 1e-2,
               seed: int = 0) -> RouterFit:
    """Fit router rows W (E, D) so that sigmoid(W x_t) marks the k heaviest experts of token t (module docstring)."""
    x_TD, norms_TE = x_TD.float(), norms_TE.float()
    T, D = x_TD.shape
    g = torch.Generator().manual_seed(seed)
    held = torch.randperm(T, generator=g)
    cut = T - max(1, T // 5)
    train, valid = held[:cut], held[cut:]
    labels_TE = torch.zeros_like(norms_TE).scatter_(1, norms_TE.topk(k, dim=-1).indices, 1.0)
    x, y = x_TD[train], labels_TE[train]
    gram_DD = x.T @ x / len(x)
    gram_DD.diagonal().add_(ridge * gram_DD.diagonal().mean())
    weight_ED = torch.linalg.solve(gram_DD, x.T @ (2 * y - 1) / len(x)).T.contiguous().requires_grad_(True)
    opt = torch.optim.Adam([weight_ED], lr=lr)
    with torch.enable_grad():
        for _ in range(steps):
            loss = F.binary_cross_entropy_with_logits(x @ weight_ED.T, y)
            opt.zero_grad()
            loss.backward()
            opt.step()
    weight_ED = weight_ED.detach()
    random_ED = torch.randn(weight_ED.shape, generator=g)
    return RouterFit(weight_ED, topk_recall(x_TD[valid] @ weight_ED.T, norms_TE[valid], k),
                     topk_recall(x_TD[valid] @ random_ED.T, norms_TE[valid], k), k)


def budget_zc_bias(logits_TX: Tensor, expert_bias_E: Tensor, target: float, max_all_null: float) -> float:
    """The ZC bias at which tokens with router logits `logits_TX` (E FFN columns, then the null experts') use
    `target` FFN experts on average, at most `max_all_null` of them none; K = E slots (module docstring)."""
    E = expert_bias_E.numel()
    scores_TX = logits_TX.float().sigmoid()
    sel_TX = torch.cat([scores_TX[:, :E] + expert_bias_E, scores_TX[:, E:]], dim=1)
    return budget_bias(zc_thresholds(sel_TX, E, E), target, E, max_all_null)

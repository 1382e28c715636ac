"""Always-on shared neurons (CMoE, Pei et al.): the FFN's high-activation-rate neurons become shared experts that
every token runs; the routed experts are co-activation clusters of the rest.

Why: a SwiGLU FFN such as SmolLM2's spreads its output over its neurons, and a few neurons carry a large share of
it on almost every token. Routed at expert granularity they are dropped on the tokens whose router skips their
group; kept always on, the routed experts only need to cover what varies from token to token.

Activation rate. Neuron i is *active* on token t when its contribution |a_ti|·‖down[:, i]‖ to the FFN output is
among the token's top `active_share` × I; its rate is the share of calibration tokens on which it is active. The
s·F neurons with the highest rates fill the first s experts (the shared ones); the remaining (E − s)·F neurons are
split into E − s experts by the same balanced co-activation k-means as without sharing (densa/moefy/split.py).

Shared experts in densa's MoE. They are ordinary experts 0..s−1 of the fused layout, pinned on by the selection
bias: `expert_bias` (a saved router buffer, used for selection only) is +PIN on them and −PIN·s/(E−s) on the
routed ones, so its mean is 0 (the balance update re-centres it to mean 0: a no-op) and a shared expert's selection
score (≥ PIN) beats every null expert's (1/2 + zc_bias) at any zc_bias the budget can ask for (module `fit`). So the
converted checkpoint needs no new model feature: `densa eval`, `serve` and `export` load it unchanged, the budget
counts shared and routed experts alike (`target_active_experts` = budget × E), and measured FLOPs count them too.
Shape suffixes: T tokens, I neurons, E experts, F neurons per expert, S shared neurons.
"""

from __future__ import annotations

import torch
from torch import Tensor

from densa.model.moe import MoE
from densa.moefy.split import cluster_split, random_split

PIN = 2.0  # selection bias of a shared expert; sigmoid scores lie in (0, 1), so 2 clears any routed score


def activation_rates(act_TI: Tensor, down_DI: Tensor, active_share: float = 0.1) -> Tensor:
    """(I,) share of tokens on which each neuron's output contribution is in the token's top `active_share`."""
    contrib_TI = act_TI.abs() * down_DI.norm(dim=0)
    k = max(1, round(active_share * act_TI.shape[1]))
    top_TK = contrib_TI.topk(k, dim=-1).indices
    return torch.zeros(act_TI.shape[1]).index_add_(0, top_TK.flatten(), torch.ones(top_TK.numel())) / len(act_TI)


def shared_split(act_TI: Tensor, down_DI: Tensor, num_experts: int, shared_experts: int, split: str = "cluster",
                 active_share: float = 0.1, seed: int = 0) -> Tensor:
    """groups_EF: rows 0..s−1 the highest-rate neurons (the shared experts), rows s.. the rest split by `split`."""
    E, s = num_experts, shared_experts
    F = act_TI.shape[1] // E
    order_I = activation_rates(act_TI, down_DI, active_share).argsort(descending=True, stable=True)
    shared_S, rest = order_I[: s * F], order_I[s * F :].sort().values
    if split == "cluster":
        local_RF = cluster_split(act_TI[:, rest], E - s, seed=seed)
    else:
        local_RF = random_split(len(rest), E - s, seed=seed)
    return torch.cat([shared_S.sort().values.view(s, F), rest[local_RF]])


@torch.no_grad()
def pin_shared(moe: MoE, shared_experts: int) -> None:
    """Pin experts 0..s−1 on (module docstring): zero router rows, +PIN selection bias; routed experts −PIN·s/(E−s)."""
    E, s = moe.num_experts, shared_experts
    moe.gate.weight[:s] = 0.0
    moe.gate.expert_bias[:s] = PIN
    moe.gate.expert_bias[s:E] = -PIN * s / (E - s)

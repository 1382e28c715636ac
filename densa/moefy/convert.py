"""Dense Llama-architecture model → densa dynamic-MoE model (the conversion behind `densa moefy`).

What changes and what does not:
- Embeddings, attention, norms and the head are copied bit for bit (densa's dense-baseline block, `mixer="attention"`).
- Each SwiGLU FFN (width I) becomes `ffn="moe"` with E experts of F = I / E neurons: expert e holds the rows
  groups[e] of gate_proj and up_proj and the same columns of down_proj, in the fused 3-D layout
  (gate_up_proj [E, 2F, D] with the gate rows first, down_proj [E, D, F]). Because SwiGLU acts per neuron,
  down(a) = Σ_e down_e(a_e): with `moe_gate_weights="unit"` and every expert selected the MoE *is* the FFN
  (up to the order of float additions).
- The routing pool adds E null experts (zero computation) and opens K = E slots, so a token may use anywhere from 0
  to E experts; the budget controller's `zc_bias` sets the mean (densa/moefy/fit.py). At `budget=1` it is set
  below every score, so every expert is always selected and the model reproduces the original.
- Router losses and the balance bias are switched off (their coefficients 0): converted experts are not meant to be
  equally loaded, and the router is fitted to the model's own activations instead.
Shape suffixes: N windows, L tokens each, T tokens, D hidden, I neurons, E experts, F = I / E, X = 2E routing pool.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor
from tqdm import tqdm

from densa.config import ModelConfig
from densa.model.layers import SwiGLU
from densa.model.model import DensaModel
from densa.model.moe import MoE
from densa.moefy.calibrate import ffn_inputs, neuron_activations
from densa.moefy.fit import budget_zc_bias, dropped_error, fit_router, group_norms
from densa.moefy.shared import pin_shared, shared_split
from densa.moefy.split import cluster_split, coactivation_score, random_split

Split = Literal["cluster", "random"]


@dataclass(kw_only=True)
class MoefyConfig:
    """How to convert. `budget` is the share of the FFN's FLOPs a token spends on average (1 = every expert)."""

    experts: int = 16  # E: experts per FFN, each of I / E neurons
    budget: float = 0.5  # mean share of experts (= of FFN FLOPs) a token uses, in (0, 1]
    split: Split = "cluster"  # "cluster": co-activation k-means (MoEfication); "random": balanced random ablation
    shared: float = 0.0  # share of the neurons made always-on shared experts (rounded to whole experts; CMoE)
    active_share: float = 0.1  # a neuron is "active" on a token when in its top share of contributions (shared.py)
    label_budget: float = 0.0  # share of experts marked "needed" when fitting the router; 0 = budget (0.5 at 1)
    router_steps: int = 150  # full-batch Adam steps of the router fit per layer
    budget_update_rate: float = 0.2  # α of the budget controller during tuning (densa/model/router.py)
    max_all_null_rate: float = 0.5  # cap on the share of tokens that skip the whole FFN
    seed: int = 0

    def __post_init__(self) -> None:
        if self.experts < 1:
            raise ValueError(f"--experts {self.experts}: must be >= 1")
        if not 0 < self.budget <= 1:
            raise ValueError(f"--budget {self.budget}: must be in (0, 1] (a share of the FFN FLOPs)")
        if not 0 <= self.label_budget <= 1:
            raise ValueError(f"label_budget={self.label_budget}: must be in [0, 1]")
        if self.split not in ("cluster", "random"):
            raise ValueError(f"--split {self.split!r}: choose cluster or random")
        if not 0 <= self.shared < 1 or (self.shared and self.shared_experts() == 0):
            raise ValueError(f"--shared {self.shared}: must be 0 or in [1/(2E), 1) so that it rounds to at least one "
                             f"of the {self.experts} experts")
        if self.shared_experts() >= self.experts or self.shared_experts() > self.budget * self.experts + 1e-9:
            raise ValueError(f"--shared {self.shared}: {self.shared_experts()} shared experts of {self.experts} "
                             f"exceed the budget {self.budget:g} (the budget counts shared and routed experts)")

    def shared_experts(self) -> int:
        """s: experts every token runs (the first s of the fused layout)."""
        return round(self.shared * self.experts)

    def label_k(self) -> int:
        """Experts per token marked "needed" when fitting the router, shared ones included."""
        s, routed = self.shared_experts(), self.experts - self.shared_experts()
        if self.label_budget:
            k = round(self.label_budget * self.experts) - s
        else:
            k = round(self.budget * self.experts) - s if self.budget < 1 else round(0.5 * routed)
        return s + min(routed, max(1, k))


@dataclass
class Conversion:
    model: DensaModel
    router_logits: list[Tensor]  # per layer, (T, X) router logits on the calibration tokens (re-budgeting)
    report: dict = field(default_factory=dict)


def check_source(cfg: ModelConfig, experts: int) -> None:
    """Refuse what cannot be converted, naming the input."""
    if cfg.mixer != "attention" or cfg.ffn != "swiglu":
        raise ValueError(f"densa moefy converts dense Llama-architecture models (mixer='attention', ffn='swiglu'); "
                         f"this model has mixer={cfg.mixer!r}, ffn={cfg.ffn!r}")
    if experts < 1 or cfg.intermediate_size % experts:
        raise ValueError(f"--experts {experts}: must divide the FFN intermediate size {cfg.intermediate_size}")


def moe_config(dense: ModelConfig, cfg: MoefyConfig) -> ModelConfig:
    """The converted model's config: the dense config with a unit-weighted dynamic MoE FFN (module docstring)."""
    E = cfg.experts
    return dense.replace(ffn="moe", num_experts=E, num_experts_per_tok=E,
                         moe_intermediate_size=dense.intermediate_size // E, num_null_experts=E,
                         num_identity_experts=0, target_active_experts=cfg.budget * E, moe_gate_weights="unit",
                         router_z_loss_coef=0.0, seq_balance_loss_coef=0.0, balance_update_rate=0.0,
                         budget_update_rate=cfg.budget_update_rate, max_all_null_rate=cfg.max_all_null_rate)


@torch.no_grad()
def load_experts(moe: MoE, mlp: SwiGLU, groups_EF: Tensor) -> None:
    """Copy the dense FFN's neurons into the fused experts: expert e = neurons groups_EF[e]."""
    gate_EFD, up_EFD = mlp.gate_proj.weight[groups_EF], mlp.up_proj.weight[groups_EF]
    moe.experts.gate_up_proj.copy_(torch.cat([gate_EFD, up_EFD], dim=1))  # [E, 2F, D], gate rows first
    moe.experts.down_proj.copy_(mlp.down_proj.weight[:, groups_EF].permute(1, 0, 2))  # [D, E, F] -> [E, D, F]


def keep(scores_TR: Tensor, shared: int, k: int) -> Tensor:
    """(T, k) experts a token runs: the `shared` pinned ones, then the k − shared best-scored routed ones."""
    shared_TS = torch.arange(shared).expand(len(scores_TR), shared)
    return torch.cat([shared_TS, shared + scores_TR.topk(k - shared, dim=-1).indices], dim=1)


@torch.no_grad()
def convert(dense: DensaModel, windows_NL: Tensor, cfg: MoefyConfig, progress: bool = True) -> Conversion:
    """Convert `dense` using the calibration windows; returns the model at `cfg.budget` and per-layer reports."""
    check_source(dense.config, cfg.experts)
    inputs = ffn_inputs(dense, windows_NL, progress=progress)
    model = DensaModel(moe_config(dense.config, cfg)).eval()
    state = model.state_dict()
    for name, tensor in dense.state_dict().items():
        if ".mlp." not in name:
            state[name].copy_(tensor)  # embeddings, attention, norms, head: exactly as they were
    E, k, s = cfg.experts, cfg.label_k(), cfg.shared_experts()
    logits, layers = [], []
    for i, (block, x_TD) in enumerate(tqdm(list(zip(dense.layers, inputs, strict=True)), desc="experts + router",
                                           disable=not progress, unit="layer")):
        mlp, moe = block.mlp, model.layers[i].mlp
        act_TI = neuron_activations(mlp, x_TD)
        if s:
            groups_EF = shared_split(act_TI, mlp.down_proj.weight, E, s, cfg.split, cfg.active_share, seed=cfg.seed + i)
        elif cfg.split == "cluster":
            groups_EF = cluster_split(act_TI, E, seed=cfg.seed + i)
        else:
            groups_EF = random_split(act_TI.shape[1], E, seed=cfg.seed + i)
        load_experts(moe, mlp, groups_EF)
        norms_TE = group_norms(act_TI, mlp.down_proj.weight, groups_EF)
        fit = fit_router(x_TD, norms_TE[:, s:], k - s, steps=cfg.router_steps, seed=cfg.seed + i)  # routed only
        moe.gate.weight.zero_()  # null experts: logit 0, score 1/2, the threshold every FFN expert must beat
        moe.gate.weight[s:E] = fit.weight_ED
        pin_shared(moe, s)
        logits.append(x_TD.float() @ moe.gate.weight.float().T)
        layers.append({"layer": i, "router_recall": fit.recall, "random_router_recall": fit.recall_random,
                       "label_k": k, "shared_experts": s, "mass_in_top_k": coactivation_score(act_TI, groups_EF, k),
                       "oracle_top_k_lost_output": dropped_error(act_TI, mlp.down_proj.weight, groups_EF,
                                                                 keep(norms_TE[:, s:], s, k)),
                       "router_top_k_lost_output": dropped_error(act_TI, mlp.down_proj.weight, groups_EF,
                                                                 keep(x_TD.float() @ fit.weight_ED.T, s, k))})
    conversion = Conversion(model, logits, {"experts": E, "expert_width": model.config.expert_intermediate_size,
                                            "split": cfg.split, "shared_experts": s,
                                            "calibration_tokens": int(windows_NL.numel()),
                                            "layers": layers})
    conversion.model = with_budget(conversion, cfg.budget)
    return conversion


@torch.no_grad()
def with_budget(conversion: Conversion, budget: float, model: DensaModel | None = None) -> DensaModel:
    """A copy of `model` (default: the conversion's) whose controller targets `budget` × E experts per token, with
    each layer's zc_bias set so that the calibration tokens meet it (the 'untuned' operating point)."""
    source = model if model is not None else conversion.model
    cfg = source.config
    if not 0 < budget <= 1:
        raise ValueError(f"budget {budget}: must be in (0, 1]")
    out = DensaModel(cfg.replace(target_active_experts=budget * cfg.num_experts)).eval()
    out.load_state_dict(source.state_dict())
    for layer, logits_TX in zip(out.layers, conversion.router_logits, strict=True):
        gate = layer.mlp.gate
        gate.zc_bias.fill_(budget_zc_bias(logits_TX, gate.expert_bias, gate.target, gate.max_all_null))
    return out

"""Routers of the mixture-of-experts FFN: who computes what, per token. Design notes: docs/moe.md.

- `BudgetRouter` (ffn="moe", the dynamic MoE; docs/moe.md, 'Design'): token-choice top-K over a pool of E FFN experts
  followed by Z zero-computation (ZC) experts, null ones first, then identity ones (LongCat / vLLM layout: ids >= E
  are ZC). Sigmoid scores (DeepSeek-V3). Two biases steer *selection only*; the gate weights come from the unbiased
  scores, normalised over the selected experts that compute (FFN and identity; a null slot weighs 0), or with
  `moe_gate_weights="unit"` exactly 1 each (a FFN split by `densa moefy` is the plain sum of its experts):
  * `zc_bias`, one scalar per layer on every ZC expert, is the compute-budget controller (LongCat-Flash, DTop-p):
    each step it moves a fraction α of the way to the bias at which the step's batch would have used exactly
    `target_active_experts` FFN experts per token, lowered where needed so that at most `max_all_null_rate` of the
    tokens skip every FFN expert (ReMoE#6: layers drifting to 100% skipped). That bias is a quantile of per-token
    thresholds (`zc_thresholds`), so the step is scale-free; a fixed-gain step μ·(mean − target)/K (tried first)
    missed ±5% by up to 31% in training, because its gain depends on how dense the router scores are near the
    threshold, which changes during training (docs/moe.md, 'Design').
  * `expert_bias` on the FFN experts is DeepSeek-V3's aux-loss-free balancing: b_e -= γ·sign(load_e − mean load),
    re-centred to zero mean (torchtitan) so that it never shifts the FFN/ZC split, which belongs to the controller.
- `SoftmaxTopKRouter` (ffn="topk_moe", the baseline): Mixtral/OLMoE softmax over E experts, top-K, renormalised;
  the Switch balance loss with HF Mixtral's normalisation (f_i sums to K, so coefficients match HF's, not megablocks').

Both compute in fp32 and decide per token from that token's hidden state alone, so routing is causal; the
sequence-wise balance loss looks at whole sequences but only as a training loss, never to select.

Shape suffixes: T tokens (batch × length, flattened), B sequences, L positions, D hidden, E FFN experts,
X = E + Z routing pool, K slots per token.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from densa.config import ModelConfig


@dataclass
class Routing:
    ids_TK: Tensor  # selected experts, int64; ids >= E are zero-computation experts
    weights_TK: Tensor  # fp32 gate weights; 0 on null slots
    logits_TX: Tensor  # fp32 router logits (z-loss, metrics)
    scores_TX: Tensor  # fp32 router scores: sigmoid ("moe") or softmax ("topk_moe") of the logits


def router_z_loss(logits_TX: Tensor) -> Tensor:
    """ST-MoE z-loss: mean over tokens of logsumexp(logits)^2; keeps router logits from drifting large."""
    return torch.logsumexp(logits_TX, dim=-1).square().mean()


def switch_balance_loss(probs_TE: Tensor, ids_TK: Tensor) -> Tensor:
    """Switch balance loss as HF Mixtral's `load_balancing_loss_func` for one layer: E·Σ_i f_i·P_i with
    f_i = (top-K assignments to i) / T (so Σ f_i = K; megablocks divides by K, allenai/OLMoE#45) and P_i the mean
    router probability."""
    T, E = probs_TE.shape
    f_E = torch.bincount(ids_TK.flatten(), minlength=E).to(probs_TE.dtype) / T
    return E * (f_E * probs_TE.mean(0)).sum()


def sequence_balance_loss(scores_BLE: Tensor, ids_BLK: Tensor) -> Tensor:
    """DeepSeek-V3's sequence-wise balance loss (arXiv 2412.19437 eq. 17-20) over the E FFN experts, averaged over
    sequences: Σ_i f_i·P_i with f_i = E·(slots of the sequence on FFN expert i) / (FFN slots of the sequence) and
    P_i the sequence's mean of the scores normalised over the FFN experts. 1 at a perfectly even load."""
    B, _, E = scores_BLE.shape
    ids_BS = ids_BLK.flatten(1).clamp_max(E)  # every ZC slot lands in column E, dropped below
    ones_BS = torch.ones_like(ids_BS, dtype=scores_BLE.dtype)
    counts_BE = scores_BLE.new_zeros(B, E + 1).scatter_add_(1, ids_BS, ones_BS)[:, :E]
    f_BE = E * counts_BE / counts_BE.sum(-1, keepdim=True).clamp_min(1)
    p_BE = (scores_BLE / scores_BLE.sum(-1, keepdim=True)).mean(1)
    return (f_BE * p_BE).sum(-1).mean()


def zc_thresholds(sel_TX: Tensor, num_experts: int, top_k: int) -> Tensor:
    """c_TM[t, m-1] = f_{K-m+1} - z_m: token t gives at least m of its K slots to ZC experts iff the ZC bias exceeds
    it, where f_1 >= f_2 >= ... are its FFN selection scores and z_1 >= z_2 >= ... its (unbiased) ZC scores: the
    m-th best ZC expert must beat the (K-m+1)-th best FFN expert. Non-decreasing in m; M = min(K, Z)."""
    E, K = num_experts, top_k
    M = min(K, sel_TX.shape[1] - E)
    ffn_TK = sel_TX[:, :E].topk(min(K, E), dim=-1).values
    ffn_TK = F.pad(ffn_TK, (0, K - ffn_TK.shape[1]), value=float("-inf"))  # K > E: some slots are always ZC
    return ffn_TK.flip(-1)[:, :M] - sel_TX[:, E:].topk(M, dim=-1).values


def budget_bias(c_TM: Tensor, target: float, top_k: int, max_all_null: float) -> float:
    """The ZC bias at which tokens with thresholds c_TM use `target` FFN experts each on average, lowered if needed
    so that at most a share `max_all_null` of them use none (possible only when M == K)."""
    T, M = c_TM.shape
    c_N = c_TM.flatten().sort().values
    n = min(max(round((top_k - target) * T), 0), c_N.numel())  # ZC slots wanted = thresholds the bias must exceed
    hi = float(c_N[n]) if n < c_N.numel() else float(c_N[-1]) + 1
    lo = float(c_N[n - 1]) if n > 0 else hi - 1
    bias = (max(lo, hi - 1) + hi) / 2
    if M == top_k and max_all_null < 1:  # token t is all-null iff the bias exceeds c_TM[t, K-1]
        all_null_T = c_TM[:, -1].sort().values
        bias = min(bias, float(all_null_T[int(max_all_null * T)]))
    return bias


class SoftmaxTopKRouter(nn.Module):
    """Mixtral / OLMoE top-K softmax routing; `weight` has transformers' MixtralTopKRouter name and layout."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.num_experts, self.top_k = cfg.num_experts, cfg.num_experts_per_tok
        self.z_loss_coef, self.aux_loss_coef = cfg.router_z_loss_coef, cfg.router_aux_loss_coef
        self.weight = nn.Parameter(torch.empty(cfg.num_experts, cfg.hidden_size))  # MoE.reset_parameters inits

    def forward(self, x_TD: Tensor) -> Routing:
        logits_TE = F.linear(x_TD.float(), self.weight.float())
        probs_TE = logits_TE.softmax(dim=-1)
        top_TK, ids_TK = probs_TE.topk(self.top_k, dim=-1)
        return Routing(ids_TK, top_TK / top_TK.sum(-1, keepdim=True), logits_TE, probs_TE)

    def losses(self, r: Routing, batch: int) -> dict[str, tuple[float, Tensor]]:
        """name -> (coefficient, unweighted loss) for one forward."""
        return {"z_loss": (self.z_loss_coef, router_z_loss(r.logits_TX)),
                "balance_loss": (self.aux_loss_coef, switch_balance_loss(r.scores_TX, r.ids_TK))}

    def update(self, counts_E: Tensor, mean_ffn: float, where: str) -> dict[str, float]:
        return {}  # plain top-K has no per-step state


class BudgetRouter(nn.Module):
    """densa's router: sigmoid top-K over FFN + zero-computation experts with the budget and balance biases."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.num_experts, self.top_k = cfg.num_experts, cfg.num_experts_per_tok
        self.num_null, self.num_identity = cfg.num_null_experts, cfg.num_identity_experts
        self.target = cfg.target_active_experts
        self.budget_rate, self.balance_rate = cfg.budget_update_rate, cfg.balance_update_rate
        self.max_all_null = cfg.max_all_null_rate
        self.z_loss_coef, self.seq_balance_coef = cfg.router_z_loss_coef, cfg.seq_balance_loss_coef
        self.unit_weights = cfg.moe_gate_weights == "unit"
        X = cfg.num_experts + self.num_null + self.num_identity
        self.weight = nn.Parameter(torch.empty(X, cfg.hidden_size))  # rows: FFN, null, identity experts
        # routing state, saved with the checkpoint (inference routes with it); identical on every rank
        self.register_buffer("expert_bias", torch.zeros(cfg.num_experts))  # HF DeepSeek-V3: e_score_correction_bias
        self.register_buffer("zc_bias", torch.zeros(()))
        self._alarmed = False
        # the step's budget proposals, Σ bias·tokens and Σ tokens over training-mode forwards; a plain attribute,
        # not a buffer, so that DDP's broadcast_buffers cannot overwrite a rank's own
        self._proposal: Tensor | None = None

    def forward(self, x_TD: Tensor) -> Routing:
        E, Z = self.num_experts, self.num_null + self.num_identity
        logits_TX = F.linear(x_TD.float(), self.weight.float())
        scores_TX = logits_TX.sigmoid()
        sel_TX = scores_TX + torch.cat([self.expert_bias, self.zc_bias.expand(Z)])
        ids_TK = sel_TX.topk(self.top_k, dim=-1).indices  # the biases steer selection only (DeepSeek-V3)
        if self.training and Z:
            self._propose_budget(torch.cat([sel_TX[:, :E], scores_TX[:, E:]], dim=-1))
        computes_TK = (ids_TK < E) | (ids_TK >= E + self.num_null)  # FFN or identity: not null
        top_TK = scores_TX.gather(-1, ids_TK) * computes_TK
        if self.unit_weights:  # exactly 1 (x / x) in the forward; the router still gets d loss / d score / score
            return Routing(ids_TK, top_TK / top_TK.detach().clamp_min(1e-12), logits_TX, scores_TX)
        weights_TK = top_TK / top_TK.sum(-1, keepdim=True).clamp_min(1e-12)  # an all-null token gets all zeros
        return Routing(ids_TK, weights_TK, logits_TX, scores_TX)

    @torch.no_grad()
    def _propose_budget(self, sel_TX: Tensor) -> None:
        """Add this forward's proposal for the ZC bias; `sel_TX` holds FFN selection scores and unbiased ZC scores."""
        c_TM = zc_thresholds(sel_TX, self.num_experts, self.top_k)
        bias = budget_bias(c_TM, self.target, self.top_k, self.max_all_null)
        proposal = torch.tensor([bias * len(c_TM), len(c_TM)], dtype=torch.float64, device=sel_TX.device)
        self._proposal = proposal if self._proposal is None else self._proposal + proposal

    def losses(self, r: Routing, batch: int) -> dict[str, tuple[float, Tensor]]:
        """name -> (coefficient, unweighted loss) for one forward of `batch` sequences."""
        E = self.num_experts
        scores_BLE = r.scores_TX[:, :E].reshape(batch, -1, E)
        return {"z_loss": (self.z_loss_coef, router_z_loss(r.logits_TX)),
                "balance_loss": (self.seq_balance_coef,
                                 sequence_balance_loss(scores_BLE, r.ids_TK.reshape(batch, -1, self.top_k)))}

    @torch.no_grad()
    def update(self, counts_E: Tensor, mean_ffn: float, where: str) -> dict[str, float]:
        """One training step's bias updates: the ZC bias toward the step's proposals (averaged over micro-batches
        and ranks), the balance bias from the global batch's FFN expert load `counts_E`. Returns the controller's
        metrics; `mean_ffn` is the step's mean FFN experts per token, `where` names the layer in warnings."""
        Z = self.num_null + self.num_identity
        if Z:  # budget controller: move toward the bias that met the target on this step's tokens
            proposal = self._proposal if self._proposal is not None else self.zc_bias.new_zeros(2, dtype=torch.float64)
            self._proposal = None
            if dist.is_available() and dist.is_initialized():
                dist.all_reduce(proposal)  # token-weighted mean over micro-batches and ranks
            if proposal[1] > 0:
                self.zc_bias += self.budget_rate * (float(proposal[0] / proposal[1]) - self.zc_bias)
        load_E = counts_E.to(self.expert_bias.dtype)  # aux-loss-free balance: overloaded experts lose bias
        self.expert_bias -= self.balance_rate * torch.sign(load_E - load_E.mean())
        self.expert_bias -= self.expert_bias.mean()
        zc_share = 1 - mean_ffn / self.top_k
        # alarm: a layer that routes (almost) everything to ZC experts, or nothing while the target wants some
        alarm = Z > 0 and (zc_share >= 0.95 or (zc_share <= 0 and self.target < self.top_k))
        if alarm and not self._alarmed:
            warnings.warn(f"{where}: {zc_share:.0%} of routing slots go to zero-computation experts (mean "
                          f"{mean_ffn:.2f} FFN experts per token, target {self.target:g}); the budget controller "
                          "is saturated", RuntimeWarning, stacklevel=2)
        self._alarmed = alarm
        return {"target_active_experts": self.target, "zc_bias": float(self.zc_bias), "zc_share": zc_share,
                "budget_error": (mean_ffn - self.target) / self.target, "alarm": float(alarm)}

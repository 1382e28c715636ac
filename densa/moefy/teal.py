"""The neuron-level baseline: TEAL-style magnitude sparsity of a dense SwiGLU FFN (Liu et al., arXiv 2408.14690).

TEAL zeroes the entries of a matrix's input whose magnitude is below a threshold calibrated for a target sparsity;
the matching weight columns are then never read, which is what makes batch-1 decoding faster. For a SwiGLU FFN:
- the FFN input x (D) before gate_proj and up_proj: entries with |x_d| <= τ_x are dropped;
- the intermediate a = silu(gate x) ⊙ (up x) (I) before down_proj: entries with |a_i| <= τ_a are dropped.
Per layer, τ_x is the `sparsity` quantile of |x| over the calibration tokens, and τ_a the same quantile of |a|
computed from the thresholded x (TEAL's uniform allocation: every layer and both inputs at one sparsity p). At
sparsity p the FFN reads (2·(1 − p_x) + (1 − p_a)) / 3 of its weights, so budget b ≈ sparsity 1 − b; the shares
actually kept on each text are measured (`TealFFN.kept`) and give the FLOPs the study reports.

`TealFFN` replaces a block's `mlp` (it plugs into the block like the SwiGLU it wraps; the model stays a DensaModel
in memory, with no routing record, so it is a study arm, not a checkpoint). Execution:
- one token (batch-1 decoding): the sparse path. The kept input entries select rows of the transposed weights,
  stored row-major once ([D, 2I] for gate/up, [I, D] for down), so the weights read are the kept rows only:
  `index_select` copies them and one vector-matrix product each does the rest. That is the speed on this CPU.
- more tokens (prefill, scoring): the masked dense path, the same maths with every weight read (TEAL's kernels
  target decoding; prefill gains nothing).
Shape suffixes: T tokens, D hidden, I neurons, K kept entries.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from densa.counting import ffn_flops_per_token, flops_per_token
from densa.model.layers import SwiGLU
from densa.model.model import DensaModel
from densa.moefy.calibrate import ffn_inputs

QUANTILE_SAMPLE = 1 << 22  # torch.quantile's input limit is 2^24 elements; thresholds come from a fixed sample


class TealFFN(nn.Module):
    """A dense SwiGLU with magnitude thresholds on its two matrix inputs (module docstring)."""

    def __init__(self, mlp: SwiGLU, x_threshold: float, a_threshold: float) -> None:
        super().__init__()
        self.mlp = mlp
        self.x_threshold, self.a_threshold = x_threshold, a_threshold
        self.kept = torch.zeros(3, dtype=torch.float64)  # Σ kept share of x, Σ kept share of a, tokens
        self._rows: tuple[Tensor, Tensor] | None = None  # (W_gate_up^T [D, 2I], W_down^T [I, D]), built once

    def forward(self, x_BTD: Tensor) -> Tensor:
        if x_BTD.shape[0] * x_BTD.shape[1] == 1 and not torch.is_grad_enabled():
            return self._sparse(x_BTD)
        keep_x = x_BTD.abs() > self.x_threshold
        xs = x_BTD * keep_x
        a = F.silu(self.mlp.gate_proj(xs)) * self.mlp.up_proj(xs)
        keep_a = a.abs() > self.a_threshold
        self._count(keep_x.flatten(0, 1), keep_a.flatten(0, 1))
        return self.mlp.down_proj(a * keep_a)

    def _sparse(self, x_11D: Tensor) -> Tensor:
        if self._rows is None:
            gate_up_D2I = torch.cat([self.mlp.gate_proj.weight, self.mlp.up_proj.weight]).T.contiguous()
            self._rows = (gate_up_D2I, self.mlp.down_proj.weight.T.contiguous())
        gate_up_D2I, down_ID = self._rows
        x_D = x_11D.reshape(-1)
        idx_K = (x_D.abs() > self.x_threshold).nonzero().squeeze(1)
        gate_I, up_I = (x_D.index_select(0, idx_K) @ gate_up_D2I.index_select(0, idx_K)).chunk(2)
        a_I = F.silu(gate_I) * up_I
        jdx_K = (a_I.abs() > self.a_threshold).nonzero().squeeze(1)
        out_D = a_I.index_select(0, jdx_K) @ down_ID.index_select(0, jdx_K)
        self.kept += torch.tensor([len(idx_K) / len(x_D), len(jdx_K) / len(a_I), 1.0], dtype=torch.float64)
        return out_D.view_as(x_11D)

    def _count(self, keep_TD: Tensor, keep_TI: Tensor) -> None:
        self.kept += torch.stack([keep_TD.double().mean(-1).sum(), keep_TI.double().mean(-1).sum(),
                                  torch.tensor(float(len(keep_TD)), dtype=torch.float64)])

    def ffn_share(self) -> float:
        """Share of the FFN's weights read per token so far: (2·kept_x + kept_a) / 3 (1 if nothing ran)."""
        sx, sa, n = self.kept.tolist()
        return (2 * sx + sa) / 3 / n if n else 1.0


@dataclass
class TealThresholds:
    sparsity: float
    x_thresholds: list[float]
    a_thresholds: list[float]


def _quantile(values: Tensor, q: float, seed: int) -> float:
    flat = values.detach().abs().flatten().float()
    if flat.numel() > QUANTILE_SAMPLE:
        g = torch.Generator().manual_seed(seed)
        flat = flat[torch.randint(flat.numel(), (QUANTILE_SAMPLE,), generator=g)]
    return float(torch.quantile(flat, q))


@torch.no_grad()
def calibrate(dense: DensaModel, windows_NL: Tensor, sparsity: float, progress: bool = False,
              inputs: list[Tensor] | None = None) -> TealThresholds:
    """Per-layer thresholds at which the calibration tokens drop `sparsity` of each FFN input (module docstring).
    `inputs` (per layer, the FFN inputs on those windows) may be passed to reuse one calibration pass."""
    if not 0 <= sparsity < 1:
        raise ValueError(f"sparsity {sparsity}: must be in [0, 1)")
    if dense.config.ffn != "swiglu":
        raise ValueError(f"TEAL thresholds a dense SwiGLU FFN; this model has ffn={dense.config.ffn!r}")
    inputs = inputs if inputs is not None else ffn_inputs(dense, windows_NL, progress=progress)
    xs, As = [], []
    for i, (block, x_TD) in enumerate(zip(dense.layers, inputs, strict=True)):
        mlp = block.mlp
        tx = _quantile(x_TD, sparsity, seed=i) if sparsity else -1.0
        kept_TD = x_TD * (x_TD.abs() > tx)
        a_TI = F.silu(mlp.gate_proj(kept_TD)) * mlp.up_proj(kept_TD)
        xs.append(tx)
        As.append(_quantile(a_TI, sparsity, seed=i) if sparsity else -1.0)
    return TealThresholds(sparsity, xs, As)


def teal_model(dense: DensaModel, thresholds: TealThresholds) -> DensaModel:
    """A copy of `dense` whose every FFN is a `TealFFN` with the calibrated thresholds."""
    model = copy.deepcopy(dense).eval()
    for block, tx, ta in zip(model.layers, thresholds.x_thresholds, thresholds.a_thresholds, strict=True):
        block.mlp = TealFFN(block.mlp, tx, ta)
    return model


def reset_counts(model: DensaModel) -> None:
    for block in model.layers:
        block.mlp.kept.zero_()


def ffn_shares(model: DensaModel) -> list[float]:
    """Per layer, the measured share of FFN weights read per token since the last `reset_counts`."""
    return [block.mlp.ffn_share() for block in model.layers]


def teal_flops_per_token(model: DensaModel, context: int, shares: list[float]) -> float:
    """Forward FLOPs per token with each FFN costed at its measured share (densa.counting's figure otherwise)."""
    cfg = model.config
    return flops_per_token(cfg, context).total - sum((1 - s) * ffn_flops_per_token(cfg) for s in shares)

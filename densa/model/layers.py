"""Small layers shared by every block: RMSNorm, TimestepNorm, SwiGLU and rotary embeddings.

Shape letters: B batch, T time, D hidden, G norm groups, H heads, d head width.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from densa.model.fastlinear import fused_outputs

if TYPE_CHECKING:
    from densa.model.cache import Positions


class RMSNorm(nn.Module):
    """Root-mean-square norm with a learned scale (Llama). Computed in fp32, cast back to the input dtype."""

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        """x · rsqrt(mean(x²) + eps) · weight in fp32: torch's one-call form, bitwise the same as the four ops it
        replaces on fp32 CPU tensors and about 5 µs less dispatch per call in a decoding step."""
        return F.rms_norm(x.float(), (x.shape[-1],), self.weight.float(), self.eps).to(x.dtype)

    def reference(self, x: Tensor) -> Tensor:
        """The same norm written out (what `forward` must equal)."""
        x32 = x.float()
        y = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (y * self.weight.float()).to(x.dtype)


TimestepNormState = tuple[Tensor, Tensor, Tensor]  # (count (B,), sum (B, G), sum of squares (B, G)), fp64


class TimestepNorm(nn.Module):
    """Causal cumulative group norm (Megalodon §3.2): position t is normalised with the mean and variance of its
    group over positions <= t, so nothing leaks from the future and the statistics carry across chunks and decode
    steps through `state`.

    Megalodon uses Welford + Kahan sums in fp32 in a CUDA kernel; here the running sums are kept in fp64, which is
    exact enough for any length we train on and needs no custom kernel. Scales use the "+1" reparameterisation
    (weight initialised to 0, so weight decay pulls the scale toward 1; MLD-P App. B.2).
    """

    def __init__(self, dim: int, groups: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.groups, self.eps = groups, eps
        self.weight = nn.Parameter(torch.zeros(dim))
        self.bias = nn.Parameter(torch.zeros(dim))

    def forward(self, x: Tensor, state: TimestepNormState | None = None,
                valid_BT: Tensor | None = None) -> tuple[Tensor, TimestepNormState]:
        """Normalise x (B, T, D); `valid_BT` False at left padding, which then counts in no statistic."""
        B, T, D = x.shape
        G = self.groups
        x_BTGd = x.double().view(B, T, G, D // G)
        if valid_BT is not None:
            x_BTGd = x_BTGd.masked_fill(~valid_BT[..., None, None], 0.0)
            count_BT = valid_BT.double().cumsum(1).clamp_min(1)  # a padding step before any token divides by 1
        else:
            count_BT = torch.arange(1, T + 1, device=x.device, dtype=torch.float64).expand(B, T)
        sums_BTG = x_BTGd.sum(-1).cumsum(1)  # (B, T, G) running sum of values in each group
        sqs_BTG = x_BTGd.pow(2).sum(-1).cumsum(1)
        if state is not None:
            count0, sum0, sq0 = state
            sums_BTG = sums_BTG + sum0[:, None]
            sqs_BTG = sqs_BTG + sq0[:, None]
            count_BT = count_BT + count0[:, None]
        n_BT1 = (count_BT * (D // G))[..., None]
        mean_BTG = sums_BTG / n_BT1
        var_BTG = (sqs_BTG / n_BT1 - mean_BTG.pow(2)).clamp_min(0)
        y_BTGd = (x_BTGd - mean_BTG[..., None]) * torch.rsqrt(var_BTG[..., None] + self.eps)
        y = y_BTGd.view(B, T, D).to(x.dtype) * (self.weight + 1) + self.bias
        return y, (count_BT[:, -1], sums_BTG[:, -1], sqs_BTG[:, -1])


class SwiGLU(nn.Module):
    """Gated FFN of Llama: down(silu(gate(x)) * up(x)). Names match HF Llama so weights map 1:1."""

    fusable = ("gate_proj", "up_proj")  # one packed matmul in inference (densa/model/fastlinear.py)

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        gate, up = fused_outputs(self, x)
        return self.down_proj(F.silu(gate) * up)


class Rotary(nn.Module):
    """Rotary position embedding, rotate-half convention (HF Llama), so imported Llama weights need no permute."""

    def __init__(self, head_dim: int, theta: float) -> None:
        super().__init__()
        self.head_dim, self.theta = head_dim, theta
        self.register_buffer("inv_freq", torch.empty(head_dim // 2), persistent=False)
        self.reset_buffers()

    @torch.no_grad()
    def reset_buffers(self) -> None:
        """(Re)compute the frequencies; loaders that build modules on the meta device must call it."""
        d = self.head_dim
        self.inv_freq.copy_(1.0 / self.theta ** (torch.arange(0, d, 2, dtype=torch.float32) / d))

    def forward(self, q_BHTd: Tensor, k_BHTd: Tensor, pos: Positions, modulus: int | None = None
                ) -> tuple[Tensor, Tensor]:
        """Rotate queries and keys by the positions of `pos` (taken mod `modulus`: Mega's chunk-local positions).
        The tables depend only on the positions, the head width and theta, so a forward makes them once for all its
        layers (`Positions.shared`)."""
        cos, sin = self.tables(pos, modulus)
        return self.rotate(q_BHTd, cos, sin), self.rotate(k_BHTd, cos, sin)

    def tables(self, pos: Positions, modulus: int | None = None) -> tuple[Tensor, Tensor]:
        """cos and sin for the positions of `pos` (mod `modulus`), made once per forward for all layers."""
        def make() -> tuple[Tensor, Tensor]:
            return self.cos_sin(pos.ids_BT if modulus is None else pos.ids_BT % modulus)

        return pos.shared(("rope", self.head_dim, self.theta, modulus), make)

    def cos_sin(self, positions: Tensor) -> tuple[Tensor, Tensor]:
        """The fp32 tables for `positions`: (T, d), or (B, 1, T, d) for per-row (B, T) positions."""
        freqs = positions.float()[..., None] * self.inv_freq  # (T, d/2) or (B, T, d/2)
        emb = torch.cat([freqs, freqs], dim=-1)
        if emb.dim() == 3:
            emb = emb[:, None]  # (B, 1, T, d): broadcast over heads
        return emb.cos(), emb.sin()

    @staticmethod
    def rotate(x_BHTd: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        cos, sin = cos.to(x_BHTd.dtype), sin.to(x_BHTd.dtype)
        x1, x2 = x_BHTd.chunk(2, dim=-1)
        return x_BHTd * cos + torch.cat([-x2, x1], dim=-1) * sin

"""The gated delta rule (Gated DeltaNet, Yang, Kautz & Hatamizadeh, arXiv 2412.06464): a linear-attention state
S (K×V per head) that decays and is corrected toward each new key/value pair,

    S_t = exp(g_t) · S_{t−1} + k_t δ_tᵀ,    δ_t = β_t · (v_t − (exp(g_t) · S_{t−1})ᵀ k_t),    o_t = S_tᵀ (scale · q_t)

with g_t ≤ 0 the log decay and β_t ∈ (0, 1) the write strength. Conventions (shapes, log-space g, state K×V,
scale = K^−½) follow the pure-PyTorch reference of the flash-linear-attention project,
`fla/ops/gated_delta_rule/naive.py::naive_recurrent_gated_delta_rule` (fla-core 0.6.0, MIT), which
tests/test_deltanet.py runs against these functions.

Three forms, one result:
- `delta_rule_loop`: the recurrence token by token — the plain reference.
- `delta_rule_chunked`: the training form. Inside a chunk of C tokens the δ's solve one unit lower-triangular system
  (the WY / UT form: (I + A) δ = β ⊙ (v − e^γ ⊙ K S₀), A_ij = β_i e^{γ_i−γ_j} k_iᵀk_j for j < i, γ the in-chunk
  cumulative log decay), outputs are a masked C×C product plus the carried state, and the state is carried from
  chunk to chunk. Cost O(T·C·(K+V) + T·K·V) and memory O(C²) per head instead of O(T²).
- `delta_rule_step`: one token with a carried state — decoding, constant memory.
Shape letters: B batch, H heads, T time, N chunks, C chunk length, K key width, V value width.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def delta_rule_loop(q: Tensor, k: Tensor, v: Tensor, beta: Tensor, g: Tensor, scale: float,
                    state: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Reference. q, k (B, H, T, K); v (B, H, T, V); beta, g (B, H, T); state (B, H, K, V) or None.
    Returns o (B, H, T, V) and the final state, fp32."""
    q, k, v, beta, g = (t.float() for t in (q, k, v, beta, g))
    B, H, T, K = k.shape
    S = q.new_zeros(B, H, K, v.shape[-1]) if state is None else state.float()
    outs = []
    for t in range(T):
        S = S * g[:, :, t].exp()[..., None, None]
        delta = beta[:, :, t, None] * (v[:, :, t] - torch.einsum("bhkv,bhk->bhv", S, k[:, :, t]))
        S = S + k[:, :, t, :, None] * delta[:, :, None, :]
        outs.append(torch.einsum("bhkv,bhk->bhv", S, q[:, :, t] * scale))
    return torch.stack(outs, 2), S


def delta_rule_step(q: Tensor, k: Tensor, v: Tensor, beta: Tensor, g: Tensor, scale: float,
                    state: Tensor) -> tuple[Tensor, Tensor]:
    """One token: q, k (B, H, K); v (B, H, V); beta, g (B, H); state (B, H, K, V) fp32. Returns o (B, H, V) and the
    new state."""
    S = state * g.float().exp()[..., None, None]
    delta = beta.float()[..., None] * (v.float() - torch.einsum("bhkv,bhk->bhv", S, k.float()))
    S = S + k.float()[..., :, None] * delta[..., None, :]
    return torch.einsum("bhkv,bhk->bhv", S, q.float() * scale), S


def delta_rule_chunked(q: Tensor, k: Tensor, v: Tensor, beta: Tensor, g: Tensor, scale: float, chunk: int,
                       state: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """The chunked parallel form of `delta_rule_loop` (same arguments, plus the chunk length C)."""
    q, k, v, beta, g = (t.float() for t in (q, k, v, beta, g))
    B, H, T, K = k.shape
    V = v.shape[-1]
    C = min(chunk, T)
    pad = -T % C
    if pad:  # padded steps write nothing (β = 0) and do not decay (g = 0): the state is unchanged by them
        q, k, v = (F.pad(t, (0, 0, 0, pad)) for t in (q, k, v))
        beta, g = F.pad(beta, (0, pad)), F.pad(g, (0, pad))
    N = (T + pad) // C
    # (B, H, T', X) -> (B, H, N, C, X)
    q, k, v = (t.view(B, H, N, C, -1) for t in (q, k, v))
    beta, g = beta.view(B, H, N, C), g.view(B, H, N, C)
    gamma = g.cumsum(-1)  # (B, H, N, C) in-chunk cumulative log decay, <= 0
    decay_CC = (gamma[..., :, None] - gamma[..., None, :]).tril().exp().tril()  # e^{γ_i − γ_j} for j <= i, else 0
    kk_CC = k @ k.transpose(-1, -2)  # (B, H, N, C, C)
    eye = torch.eye(C, device=k.device)
    A = (beta[..., :, None] * decay_CC * kk_CC).tril(-1)  # strictly lower
    # (I + A) [W | U] = [β e^γ K | β V]: δ = U − W S₀ for the chunk's incoming state S₀
    rhs = torch.cat([(beta * gamma.exp())[..., None] * k, beta[..., None] * v], -1)  # (B, H, N, C, K + V)
    WU = torch.linalg.solve_triangular(eye + A, rhs, upper=False, unitriangular=True)
    W, U = WU[..., :K], WU[..., K:]
    qk_CC = (q * scale) @ k.transpose(-1, -2) * decay_CC  # (B, H, N, C, C), causal incl. the diagonal
    q_decayed = q * scale * gamma.exp()[..., None]  # reads the incoming state
    k_to_end = k * (gamma[..., -1:] - gamma).exp()[..., None]  # each key's decay to the chunk end
    S = q.new_zeros(B, H, K, V) if state is None else state.float()
    outs = []
    for n in range(N):
        delta = U[:, :, n] - W[:, :, n] @ S  # (B, H, C, V)
        outs.append(q_decayed[:, :, n] @ S + qk_CC[:, :, n] @ delta)
        S = S * gamma[:, :, n, -1].exp()[..., None, None] + k_to_end[:, :, n].transpose(-1, -2) @ delta
    o = torch.stack(outs, 2).view(B, H, N * C, V)[:, :, :T]
    return o, S

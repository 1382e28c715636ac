"""Moving-average gated attention (Mega, arXiv:2209.10655 §3; Megalodon, arXiv:2404.08801 §3), chunked.

Design choices (see docs/architecture.md for the reasons and measurements):
- EMA: multi-dimensional damped EMA over the whole sequence (real, or Megalodon's complex CEMA by config);
  it is the only path by which information crosses attention chunks (densa/model/ema.py).
- Attention: softmax attention *inside* chunks of `attn_chunk_size` tokens only, so cost is O(T·c), linear in T.
  Any length works: the sequence is right-padded to a multiple of c and trimmed (the fairseq module crashes there,
  facebookresearch/mega#16). Causal within a chunk.
- Position: RoPE on q and k with chunk-local positions (Megalodon), not Mega's learned additive bias: an additive
  bias needs a float mask, which rules out the fused SDPA kernels, while RoPE keeps `is_causal=True` SDPA usable;
  it is relative, so every chunk sees the same geometry.
- Multi-head shared Q/K (Megalodon): Z = X'W_z split into heads; q, k = Z ⊙ (κ+1) + μ per head ("+1" scales).
  Default: Mega's silu(Z) with a 1/√d temperature; `normalized_attention` uses Megalodon's QK-norm instead
  (Z / ||Z|| per head, no temperature). Defaults measured in docs/mixer-options.md.
- Output: hx + o_proj(γ ⊙ O) with the reset gate γ = silu(X'W_r), and a plain pre-norm residual in the block:
  Megalodon dropped Mega's update gate φ and the SiLU on H because they did not help stability at scale (its §3.4).

Shape letters: B batch, T new tokens, S keys (cached + new), D hidden, Z shared q/k dim, V value dim, H heads,
C chunks, c chunk length, z / v per-head widths.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from densa.config import ModelConfig
from densa.model.cache import MegaLayerCache, Positions
from densa.model.ema import DampedEMA
from densa.model.ffn import apply_ffn, build_mlp
from densa.model.layers import RMSNorm, Rotary, TimestepNorm
from densa.model.moe import Routed


def chunked_attention(q_BHTz: Tensor, k_BHSz: Tensor, v_BHSv: Tensor, chunk: int, scale: float) -> Tensor:
    """Causal softmax attention restricted to chunks of `chunk` keys.

    k/v hold S >= T positions whose first position starts a chunk; the T queries are the last T of them (S > T when
    a decode cache holds the head of the current chunk). Returns (B, H, T, v).
    """
    B, H, S, _ = k_BHSz.shape
    T = q_BHTz.shape[2]
    if T == 1:  # one decoding step: the query sees every cached key of its own chunk, no mask needed
        start = (S - 1) // chunk * chunk
        return F.scaled_dot_product_attention(q_BHTz, k_BHSz[:, :, start:], v_BHSv[:, :, start:], scale=scale)
    c = min(chunk, S)
    pad = (-S) % c
    widen = _fused_width(q_BHTz, k_BHSz, v_BHSv)
    q = F.pad(q_BHTz, (0, widen, S - T, pad))  # dummy queries for cached positions, zero padding to a chunk multiple
    k, v = F.pad(k_BHSz, (0, widen, 0, pad)), F.pad(v_BHSv, (0, 0, 0, pad))
    C = (S + pad) // c
    # (B, H, C*c, ·) -> (B, H*C, c, ·): chunks become extra "heads" of one batched causal SDPA call
    o = F.scaled_dot_product_attention(q.reshape(B, H * C, c, -1), k.reshape(B, H * C, c, -1),
                                       v.reshape(B, H * C, c, -1), is_causal=True, scale=scale)
    return o.view(B, H, C * c, -1)[:, :, S - T : S]


def _fused_width(q_BHTz: Tensor, k_BHSz: Tensor, v_BHSv: Tensor) -> int:
    """How many zero columns to append to q and k so that SDPA can take its fused CPU kernel, which needs q/k and v
    of one head width (Mega's shared q/k heads are narrower than its value heads, which sends SDPA to its math
    path: scores, mask and softmax materialised). Zero columns add nothing to q·k and the scale is passed
    explicitly, so the output is the same. Inference on CPU only: cpu-small-moe's chunked attention at 512 tokens
    took 1.05 ms this way against 2.72 alone, 1.10 against 1.25 inside the layer (2 threads), while with backward
    the padding measured no faster (docs/benchmarks.md, "A leaner EMA" and "`densa bench attention`")."""
    grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q_BHTz, k_BHSz, v_BHSv))
    if grad or q_BHTz.device.type != "cpu" or torch.compiler.is_compiling():
        return 0
    return max(v_BHSv.shape[-1] - q_BHTz.shape[-1], 0)


def chunked_attention_reference(q_BHTz: Tensor, k_BHTz: Tensor, v_BHTv: Tensor, chunk: int, scale: float) -> Tensor:
    """The same attention as one masked (T, T) softmax: token i sees j iff j <= i and both lie in one chunk."""
    T = q_BHTz.shape[2]
    i = torch.arange(T, device=q_BHTz.device)
    allowed_TT = (i[None, :] <= i[:, None]) & (i[None, :] // chunk == i[:, None] // chunk)
    scores = (q_BHTz.float() @ k_BHTz.float().transpose(-1, -2)) * scale
    probs = scores.masked_fill(~allowed_TT, float("-inf")).softmax(-1)
    return (probs @ v_BHTv.float()).to(v_BHTv.dtype)


def rolled_chunked_attention(q_BHTz: Tensor, k_BHTz: Tensor, v_BHTv: Tensor, valid_BT: Tensor, chunk: int,
                             scale: float) -> Tensor:
    """`chunked_attention` for a left-padded batch: each row is rolled so its first real token sits at index 0 (its
    padding moves to the end, where causal attention never reads it), attended, and rolled back. Every row then has
    its own chunk boundaries, exactly as if it were alone."""
    B, H, T, _ = q_BHTz.shape
    shift_B = (~valid_BT).sum(1)
    t = torch.arange(T, device=q_BHTz.device)

    def take(x: Tensor, idx_BT: Tensor) -> Tensor:
        return x.gather(2, idx_BT[:, None, :, None].expand(B, x.shape[1], T, x.shape[-1]))

    roll_BT = (t[None, :] + shift_B[:, None]) % T  # rolled[t] = original[t + shift]
    o = chunked_attention(take(q_BHTz, roll_BT), take(k_BHTz, roll_BT), take(v_BHTv, roll_BT), chunk, scale)
    return take(o, (t[None, :] - shift_B[:, None]) % T)


def positional_attention(q_BHTz: Tensor, k_BHSz: Tensor, v_BHSv: Tensor, q_pos_BT: Tensor, k_pos_BS: Tensor,
                         chunk: int, scale: float) -> Tensor:
    """Chunk attention from explicit per-row positions (key position -1 = padding): query i sees key j iff the key
    is real, not later, and in the same chunk. For decoding steps and continuations of a cached sequence, where
    rows may sit at different positions; O(T·S), so long fresh sequences use `chunked_attention` instead."""
    q_pos, k_pos = q_pos_BT[:, :, None], k_pos_BS[:, None, :]
    mask_BTS = (k_pos >= 0) & (k_pos <= q_pos) & (k_pos // chunk == q_pos // chunk)
    mask_BTS = mask_BTS | ~mask_BTS.any(-1, keepdim=True)  # a padding query with nothing to see: any finite output
    return F.scaled_dot_product_attention(q_BHTz, k_BHSz, v_BHSv, attn_mask=mask_BTS[:, None], scale=scale)


def ring_attention(q_BH1z: Tensor, k_BHSz: Tensor, v_BHSv: Tensor, k_pos_BS: Tensor, chunk_start_B: Tensor,
                   scale: float) -> Tensor:
    """`positional_attention` for one decoding step over a Mega layer's ring, after this step's key was written:
    every key in a row's ring is at or before the row's position, and the row's own key is there, so the query
    sees exactly the slots whose key lies at or after its chunk's start (one comparison; empty slots hold -1)."""
    mask_BS = k_pos_BS >= chunk_start_B[:, None]
    return F.scaled_dot_product_attention(q_BH1z, k_BHSz, v_BHSv, attn_mask=mask_BS[:, None, None], scale=scale)


class MovingAverageGatedAttention(nn.Module):
    """The Mega sequence mixer: EMA → shared Z → chunked multi-head attention → reset gate → output projection."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        D, Z, V, H = cfg.hidden_size, cfg.shared_qk_dim, cfg.value_dim, cfg.num_attention_heads
        self.dims, self.heads, self.chunk = (D, Z, V), H, cfg.attn_chunk_size
        self.normalized = cfg.normalized_attention
        self.eps = cfg.rms_norm_eps
        self.ema = DampedEMA(D, cfg.ema_dim, cfg.ema_chunk_size, complex_ema=cfg.complex_ema)
        self.v_proj = nn.Linear(D, V)  # values come from X, not X' (Mega §3.2)
        self.mx_proj = nn.Linear(D, Z + V + D)  # X' → z (shared Q/K), r (reset gate), hx
        self.qk_scale = nn.Parameter(torch.zeros(2, H, 1, Z // H))  # κ_q, κ_k ("+1" parameterisation)
        self.qk_bias = nn.Parameter(torch.zeros(2, H, 1, Z // H))  # μ_q, μ_k
        self.o_proj = nn.Linear(V, D)
        self.rotary = Rotary(Z // H, cfg.rope_theta)

    def _queries_keys(self, z_BHTz: Tensor, pos: Positions) -> tuple[Tensor, Tensor, float]:
        """q and k from the shared Z, rotated by chunk-local RoPE positions; both are made as one stacked tensor
        (2, B, H, T, z), so the scale, bias and rotation are one op each rather than one per tensor."""
        if self.normalized:  # Megalodon: per-head RMS norm without affine, then /√z, so q·k is a cosine (times κ)
            z_BHTz = z_BHTz * torch.rsqrt(z_BHTz.pow(2).mean(-1, keepdim=True) + self.eps) / z_BHTz.shape[-1] ** 0.5
            scale = 1.0
        else:  # Mega: silu(Z) with the usual 1/√d temperature
            z_BHTz, scale = F.silu(z_BHTz), z_BHTz.shape[-1] ** -0.5
        # (2, H, 1, z)[:, None] against (1, B, H, T, z): q = z (κ_q + 1) + μ_q, k likewise
        qk = torch.addcmul(self.qk_bias[:, None], z_BHTz[None], self.qk_scale[:, None] + 1)
        qk = Rotary.rotate(qk, *self.rotary.tables(pos, self.chunk))  # chunk-local RoPE positions
        q, k = qk.unbind(0)
        return q, k, scale

    def forward(self, x_BTD: Tensor, pos: Positions, cache: MegaLayerCache | None = None) -> Tensor:
        B, T, _ = x_BTD.shape
        D, Z, V = self.dims
        H, c = self.heads, self.chunk
        valid = pos.valid_BT
        decoding = cache is not None and T == 1 and valid is None  # one token per row: fixed shapes, in place

        x_ema = x_BTD if valid is None else x_BTD.masked_fill(~valid[..., None], 0.0)  # padding never enters the EMA
        mx_BTD, ema_state = self.ema(x_ema, cache.ema_state if cache is not None else None)
        mx_BTD = F.silu(mx_BTD)  # X' (Mega: silu(EMA(x) + ω x))
        v = F.silu(self.v_proj(x_BTD)).view(B, T, H, V // H).transpose(1, 2)  # (B, H, T, v)
        z, r, hx = self.mx_proj(mx_BTD).split([Z, V, D], dim=-1)
        q, k, scale = self._queries_keys(z.view(B, T, H, Z // H).transpose(1, 2), pos)  # (B, H, T, z) each

        if decoding:  # write this step's key into its ring slot, then attend over the ring
            if cache.k is None:  # a one-token prompt: the ring starts empty
                cache.allocate(B, H, (Z // H, V // H), k, ema_state.detach())
            else:
                cache.ema_state.copy_(ema_state.detach())
            cache.step(k, v, pos)
            S = pos.ring_extent(c) or c  # eager: the ring slots this step can see; compiled: all, masked
            o = ring_attention(q, cache.k[:, :, :S], cache.v[:, :, :S], cache.k_pos[:, :S], pos.chunk_start(c), scale)
        else:
            k_pos = pos.ids_BT if valid is None else pos.ids_BT.masked_fill(~valid, -1)
            if pos.first_step == 0:  # fresh sequences (every row at position 0): the fast path
                if valid is None:
                    o = chunked_attention(q, k, v, c, scale)
                else:
                    o = rolled_chunked_attention(q, k, v, valid, c, scale)
            else:  # continuing cached rows: mask from per-row positions over the ring + the new keys
                o = positional_attention(q, torch.cat([cache.k, k], dim=2), torch.cat([cache.v, v], dim=2),
                                         pos.ids_BT, torch.cat([cache.k_pos, k_pos], dim=1), c, scale)
            if cache is not None:
                if cache.k is None:
                    cache.allocate(B, H, (Z // H, V // H), k, ema_state)
                cache.ema_state = ema_state.detach()
                cache.write(k, v, pos)
        o = o.transpose(1, 2).reshape(B, T, V)
        return hx + self.o_proj(o * F.silu(r))


class MegaBlock(nn.Module):
    """Pre-norm block: x + Mega(norm(x)), then + FFN(norm(·)); optionally Megalodon's two-hop residual, where the
    FFN's residual is the block input x rather than the mixer output."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        D = cfg.hidden_size
        if cfg.timestep_norm:
            self.mixer_norm: nn.Module = TimestepNorm(D, cfg.timestep_norm_groups, cfg.rms_norm_eps)
        else:
            self.mixer_norm = RMSNorm(D, cfg.rms_norm_eps)
        self.mixer = MovingAverageGatedAttention(cfg)
        self.mlp_norm = RMSNorm(D, cfg.rms_norm_eps)
        self.mlp = build_mlp(cfg)
        self.two_hop = cfg.two_hop_residual

    def _normed(self, x: Tensor, pos: Positions, cache: MegaLayerCache | None) -> Tensor:
        if not isinstance(self.mixer_norm, TimestepNorm):
            return self.mixer_norm(x)
        h, state = self.mixer_norm(x, cache.norm_state if cache is not None else None, pos.valid_BT)
        if cache is not None and cache.norm_state is not None and x.shape[1] == 1 and pos.valid_BT is None:
            for held, new in zip(cache.norm_state, state, strict=True):  # a decoding step: in place
                held.copy_(new)
        elif cache is not None:
            cache.norm_state = tuple(t.detach().contiguous() for t in state)  # (count may be an expanded view)
        return h

    def forward(self, x: Tensor, pos: Positions, cache: MegaLayerCache | None = None) -> tuple[Tensor, Routed | None]:
        """(B, T, D) -> (B, T, D), and what the FFN routed (None for a dense FFN)."""
        y = x + self.mixer(self._normed(x, pos, cache), pos, cache)
        h, routed = apply_ffn(self.mlp, self.mlp_norm(y))
        return (x if self.two_hop else y) + h, routed

    def new_cache(self) -> MegaLayerCache:
        return MegaLayerCache(slots=self.mixer.chunk)

    @staticmethod
    def mixer_flops_per_token(cfg: ModelConfig, context: int) -> dict[str, float]:
        """Forward FLOPs per token of the Mega mixer averaged over `context` tokens (densa/counting.py adds the FFN
        and the head). Projections; softmax attention inside chunks of c; the EMA as densa runs it: FFT
        convolution inside chunks (real FFT ≈ 2.5·n·log2 n) plus the chunked form's state einsums."""
        from densa.counting import fft_flops, mean_keys

        T, D = context, cfg.hidden_size
        Z, V, N = cfg.shared_qk_dim, cfg.value_dim, cfg.ema_dim
        linear = 2 * (D * V + D * (Z + V + D) + V * D)
        attention = 2 * (Z + V) * mean_keys(T, cfg.attn_chunk_size)
        c = min(cfg.ema_chunk_size, T)
        n = 1 << (2 * c - 1).bit_length()
        # CEMA: the state contractions run as real matmuls over (re, im) pairs (2x the real EMA's work, a real
        # input times a complex weight); the kernel einsum is complex x complex (4 real multiply-adds each)
        pairs, cplx = (2, 4) if cfg.complex_ema else (1, 1)
        # state-in and state-out einsums run over the sequence padded to whole chunks; per sequence, the kernel
        # einsum over (D, N, c) and, when the last chunk is partial, the final-state einsum over its r tokens
        padded, r = -(-T // c) * c, T % c
        ema_state = ((2 * 2 * D * N * padded + 2 * D * N * r) * pairs + 2 * D * N * c * cplx) / T
        # per chunk of c tokens and channel: rfft(x), pointwise product (n/2+1 complex), irfft; plus rfft(kernel)
        ema_fft = D * (2 * fft_flops(n) + 6 * (n // 2 + 1)) / c + D * fft_flops(n) / T
        return {"linear": linear, "attention": attention, "ema_state": ema_state, "ema_fft": ema_fft}

"""The dense baseline: a Llama-style block (RoPE, full causal SDPA attention with grouped-query heads, SwiGLU,
RMSNorm). Module and parameter names match transformers' LlamaDecoderLayer, so Llama checkpoints map 1:1.

Shape letters: B batch, T new tokens, S keys (cached + new), D hidden, H query heads, Hkv key/value heads, d head.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from densa.config import ModelConfig
from densa.model.cache import KVLayerCache, Positions
from densa.model.fastlinear import fused_outputs
from densa.model.ffn import apply_ffn, build_mlp
from densa.model.layers import RMSNorm, Rotary
from densa.model.moe import Routed


class CausalSelfAttention(nn.Module):
    fusable = ("q_proj", "k_proj", "v_proj")  # one packed matmul in inference (densa/model/fastlinear.py)

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        D, H, Hkv, d = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.heads, self.kv_heads, self.head_dim = H, Hkv, d
        self.q_proj = nn.Linear(D, H * d, bias=False)
        self.k_proj = nn.Linear(D, Hkv * d, bias=False)
        self.v_proj = nn.Linear(D, Hkv * d, bias=False)
        self.o_proj = nn.Linear(H * d, D, bias=False)
        self.rotary = Rotary(d, cfg.rope_theta)

    def forward(self, x_BTD: Tensor, pos: Positions, cache: KVLayerCache | None = None) -> Tensor:
        B, T, _ = x_BTD.shape
        H, Hkv, d = self.heads, self.kv_heads, self.head_dim
        q, k, v = fused_outputs(self, x_BTD)
        q = q.reshape(B, T, H, d).transpose(1, 2)  # (B, H, T, d)
        k = k.reshape(B, T, Hkv, d).transpose(1, 2)  # (B, Hkv, T, d)
        v = v.reshape(B, T, Hkv, d).transpose(1, 2)
        q, k = self.rotary(q, k, pos)  # per-row positions (left padding)
        valid = pos.valid_BT  # (B, T) False at padding, or None when there is none
        if cache is not None and T == 1 and valid is None and cache.k is not None:  # decoding: in place
            cache.step(k, v, pos)
        elif cache is not None:
            cache.write(k, v, pos)
        if cache is None or pos.first_step == 0:  # a fresh sequence: attend over the new keys only
            mask = None
            if valid is not None:  # query i sees real keys <= i
                mask = torch.ones(T, T, dtype=torch.bool, device=k.device).tril() & valid[:, None, :]
                mask = (mask | ~mask.any(-1, keepdim=True))[:, None]  # padding queries: any finite output
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None and T > 1,
                                               enable_gqa=Hkv != H)
        else:  # continuing: slot s holds position s, so a query at position p sees the slots <= p
            S = pos.extent or cache.k.shape[2]  # the slots in use, or (compiled, fixed shapes) the whole buffer
            keys, values = cache.k[:, :, :S], cache.v[:, :, :S]  # (B, Hkv, S, d)
            mask_BTS = torch.arange(S, device=k.device) <= pos.ids_BT[:, :, None]
            o = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask_BTS[:, None], enable_gqa=Hkv != H)
        return self.o_proj(o.transpose(1, 2).reshape(B, T, H * d))


class LlamaBlock(nn.Module):
    """x + attn(norm(x)), then + SwiGLU(norm(·))."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = CausalSelfAttention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = build_mlp(cfg)

    def forward(self, x: Tensor, pos: Positions, cache: KVLayerCache | None = None) -> tuple[Tensor, Routed | None]:
        """(B, T, D) -> (B, T, D), and what the FFN routed (None for a dense FFN)."""
        x = x + self.self_attn(self.input_layernorm(x), pos, cache)
        h, routed = apply_ffn(self.mlp, self.post_attention_layernorm(x))
        return x + h, routed

    def new_cache(self) -> KVLayerCache:
        return KVLayerCache()

    @staticmethod
    def mixer_flops_per_token(cfg: ModelConfig, context: int) -> dict[str, float]:
        """Forward FLOPs per token of causal self-attention averaged over `context` tokens: projections, and the
        useful q·k and probs·v work (a query at position t sees t + 1 keys)."""
        from densa.counting import mean_keys

        D, d, H, Hkv = cfg.hidden_size, cfg.head_dim, cfg.num_attention_heads, cfg.num_key_value_heads
        linear = 2 * (D * H * d * 2 + D * Hkv * d * 2)
        return {"linear": linear, "attention": 2 * 2 * H * d * mean_keys(context, context)}

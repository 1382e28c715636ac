"""Llama-architecture Hugging Face models → densa's dense baseline (`mixer="attention"`), weights copied exactly.

densa's `LlamaBlock` uses transformers' module names, so the name table is one rule: drop the `model.` prefix of
the decoder. The config table maps LlamaConfig fields onto ModelConfig and rejects what densa does not implement
(biases, rope scaling, a head_dim that is not hidden/heads) with a message naming the field.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from densa.config import ConfigError, ModelConfig
from densa.model.model import DensaModel

LLAMA_ARCHITECTURES = {"LlamaForCausalLM", "MistralForCausalLM"}  # same block without sliding window


def hf_to_native_name(name: str) -> str:
    """`model.layers.3.self_attn.q_proj.weight` → `layers.3.self_attn.q_proj.weight`; `lm_head.weight` unchanged."""
    return name.removeprefix("model.")


def llama_config_to_model_config(hf: Any) -> ModelConfig:
    """Map a transformers LlamaConfig (or its dict) onto a densa ModelConfig for the dense baseline."""
    get = hf.get if isinstance(hf, dict) else lambda k, d=None: getattr(hf, k, d)
    for flag in ("attention_bias", "mlp_bias"):
        if get(flag, False):
            raise ConfigError(f"{flag}=True is not supported by densa's Llama block")
    if get("hidden_act", "silu") != "silu":
        raise ConfigError(f"hidden_act={get('hidden_act')!r}: densa's Llama block uses silu (SwiGLU)")
    rope = get("rope_parameters") or get("rope_scaling") or {}  # v5 name, v4 name (a v4 null means plain RoPE)
    rope_type = rope.get("rope_type", rope.get("type", "default")) if isinstance(rope, dict) else "default"
    if rope_type != "default":
        raise ConfigError(f"rope_type={rope_type!r}: only plain RoPE (rope_type 'default') is supported")
    if get("sliding_window"):
        raise ConfigError(f"sliding_window={get('sliding_window')}: sliding-window attention is not supported")
    heads = get("num_attention_heads")
    head_dim = get("head_dim") or get("hidden_size") // heads
    if head_dim * heads != get("hidden_size"):
        raise ConfigError(f"head_dim={head_dim}: densa requires head_dim == hidden_size / num_attention_heads")
    theta = rope.get("rope_theta") if isinstance(rope, dict) and "rope_theta" in rope else get("rope_theta", 10000.0)
    return ModelConfig(
        mixer="attention", ffn="swiglu", vocab_size=get("vocab_size"), hidden_size=get("hidden_size"),
        num_hidden_layers=get("num_hidden_layers"), intermediate_size=get("intermediate_size"),
        num_attention_heads=heads, num_key_value_heads=get("num_key_value_heads") or heads,
        max_position_embeddings=get("max_position_embeddings", 2048), rope_theta=float(theta),
        rms_norm_eps=float(get("rms_norm_eps", 1e-6)), tie_word_embeddings=bool(get("tie_word_embeddings", False)),
    )


def load_llama_state_dict(model: DensaModel, hf_state: dict[str, Tensor], source: str) -> None:
    """Copy a Llama state dict into `model` (built from `llama_config_to_model_config`); names must match 1:1."""
    native = {hf_to_native_name(k): v for k, v in hf_state.items() if not k.endswith("rotary_emb.inv_freq")}
    if model.config.tie_word_embeddings:
        native.pop("lm_head.weight", None)
    expected = set(model.state_dict()) - ({"lm_head.weight"} if model.config.tie_word_embeddings else set())
    missing, unexpected = sorted(expected - set(native)), sorted(set(native) - expected)
    if missing or unexpected:
        raise ValueError(f"{source}: weights do not match a Llama model of its config "
                         f"(missing {missing[:5]}, unexpected {unexpected[:5]})")
    with torch.no_grad():
        for name, param in model.state_dict().items():
            if name in native:
                if native[name].shape != param.shape:
                    raise ValueError(f"{source}: {name} has shape {tuple(native[name].shape)}, "
                                     f"expected {tuple(param.shape)}")
                param.copy_(native[name].to(param.dtype))

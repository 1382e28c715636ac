"""`DensaForCausalLM`: a Hugging Face `PreTrainedModel` + `GenerationMixin` around `DensaModel`.

One source of truth: the wrapper holds a `DensaModel` under `self.model` and adds no maths of its own. The cache
handed to and returned by `forward` is densa's `ModelCache` (EMA state + open chunk K/V for Mega layers, a growing
K/V cache for dense ones), so `generate()` decodes with it; transformers' DynamicCache is not used.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from densa.hf.configuration_densa import DensaConfig
from densa.model.cache import ModelCache
from densa.model.ema import DampedEMA
from densa.model.layers import Rotary
from densa.model.model import DensaModel


class DensaPreTrainedModel(PreTrainedModel):
    config_class = DensaConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    _no_split_modules = ["MegaBlock", "LlamaBlock"]
    _is_stateful = True  # recurrent EMA state: no assisted decoding / cache cropping
    supports_gradient_checkpointing = False

    def _init_weights(self, module: torch.nn.Module) -> None:
        # densa's own initialisation (depth-scaled output projections, Mega's EMA init) instead of HF's generic one
        # (non-persistent buffers such as RoPE frequencies are not in checkpoints and must be recomputed)
        if isinstance(module, DensaModel):
            module.init_weights()
        elif isinstance(module, DampedEMA):
            module.reset_parameters()
        elif isinstance(module, Rotary):
            module.reset_buffers()

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # forward creates densa's ModelCache itself


class DensaForCausalLM(DensaPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"model.lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: DensaConfig) -> None:
        super().__init__(config)
        self.model = DensaModel(config.to_model_config())
        self.post_init()

    def get_input_embeddings(self) -> torch.nn.Embedding:
        return self.model.embed_tokens

    def set_input_embeddings(self, value: torch.nn.Embedding) -> None:
        self.model.embed_tokens = value

    def get_output_embeddings(self) -> torch.nn.Linear:
        return self.model.lm_head

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None, cache: ModelCache | None = None,
                labels: Tensor | None = None, use_cache: bool | None = None, logits_to_keep: int = 0,
                **kwargs: Any) -> CausalLMOutputWithPast:
        """HF-style forward. `attention_mask` (B, seen + T) marks left padding with 0; `cache` is a densa
        ModelCache (created here when `use_cache` and none is given) and is returned as `output.cache`."""
        if use_cache is None:
            use_cache = self.config.use_cache and not self.training
        if use_cache and cache is None:
            cache = self.model.new_cache()
        out = self.model(input_ids, labels=labels, cache=cache, attention_mask=attention_mask)
        logits = out.logits[:, -logits_to_keep:] if logits_to_keep else out.logits
        return CausalLMOutputWithPast(loss=out.loss, logits=logits, cache=cache if use_cache else None)

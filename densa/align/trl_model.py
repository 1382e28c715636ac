"""The densa model as TRL's trainers need it: `DensaForCausalLM` plus a backbone that returns hidden states.

TRL 1.16's GRPOTrainer scores completions with a fused, chunked LM head: it calls `model.base_model(input_ids,
attention_mask, use_cache=False)`, expects `.last_hidden_state`, and applies `get_output_embeddings()` itself.
`DensaModel.forward` returns logits, so this subclass exposes a backbone view (embeddings → blocks → final norm,
the same modules, nothing copied). TRL right-pads completions; densa's positions accept left padding only, so the
backbone treats the trailing padding as real tokens: causal attention means they cannot change any earlier
position, and TRL masks their labels.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from transformers import PreTrainedTokenizerBase
from transformers.modeling_outputs import BaseModelOutput

from densa.hf.configuration_densa import DensaConfig
from densa.hf.modeling_densa import DensaForCausalLM
from densa.model.cache import Positions
from densa.model.model import DensaModel


class _Backbone:
    """Callable view of a DensaModel without its LM head (not a Module: it must not re-register parameters)."""

    def __init__(self, model: DensaModel) -> None:
        self.model = model

    def __call__(self, input_ids: Tensor, attention_mask: Tensor | None = None, **_: Any) -> BaseModelOutput:
        m = self.model
        if attention_mask is not None:
            attention_mask = (attention_mask.long().cumsum(1) > 0).long()  # right padding counts as real (see above)
        pos = Positions.build(*input_ids.shape, input_ids.device, attention_mask, None)
        x = m.embed_tokens(input_ids)  # (B, T, D)
        for layer in m.layers:
            x, _ = layer(x, pos, None)  # routing metrics are dropped: GRPO adds no router loss
        return BaseModelOutput(last_hidden_state=m.norm(x))


class DensaForTRL(DensaForCausalLM):
    """`DensaForCausalLM` whose `base_model` is the hidden-state backbone TRL's fused LM head calls."""

    @property
    def base_model(self) -> Any:  # type: ignore[override]
        return _Backbone(self.model)

    @classmethod
    def wrap(cls, model: DensaModel, tokenizer: PreTrainedTokenizerBase) -> DensaForTRL:
        """An HF model that *shares* `model`'s parameters (training it trains `model`)."""
        config = DensaConfig.from_model_config(model.config, bos_token_id=tokenizer.bos_token_id,
                                               eos_token_id=tokenizer.eos_token_id,
                                               pad_token_id=tokenizer.pad_token_id, architectures=["DensaForCausalLM"])
        with torch.device("meta"):
            hf = cls(config)
        hf.model = model
        return hf

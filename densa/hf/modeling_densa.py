"""`DensaForCausalLM`: a Hugging Face `PreTrainedModel` + `GenerationMixin` around `DensaModel`.

The wrapper holds a `DensaModel` under `self.model` (so checkpoints name its weights `model.…`) and runs its modules
through `DensaBackbone`: embeddings → blocks → final norm, the same modules and the same per-row positions as
`DensaModel.forward`, plus what the Hugging Face ecosystem expects of a causal LM:

- `model.base_model` is that backbone and returns `last_hidden_state` (TRL's fused, chunked LM head calls it);
- activation (gradient) checkpointing of every block, `supports_gradient_checkpointing = True`;
- the standard `forward` keywords: `use_cache`, `cache` / `past_key_values`, `position_ids` and `cache_position`
  (checked against the positions densa derives from the mask: packed sequences are refused, not mis-read),
  `inputs_embeds`, `output_hidden_states`, `return_dict`, `logits_to_keep`, `num_items_in_batch`; other keywords
  (TRL's, transformers' loss kwargs) are accepted and ignored, as Hugging Face models do;
  `output_attentions=True` is refused (chunked attention has no full attention map to return).

The cache is densa's `ModelCache` (EMA state + open chunk K/V for Mega layers, a growing K/V cache for dense ones),
so `generate()` decodes with it; transformers' DynamicCache is not used. `DensaModel.forward` is the reference: the
tests check that this forward gives the same logits and loss (MoE router losses included).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from densa.hf.configuration_densa import DensaConfig
from densa.model.cache import ModelCache, Positions
from densa.model.compile import CompileConfig, inference_steps
from densa.model.ema import DampedEMA
from densa.model.layers import Rotary
from densa.model.model import DensaModel, collect_routing
from densa.model.moe import MoE, Routed

COMPILE_BACKEND = "inductor"  # torch.compile backend when `config.compile` is on (tests use "aot_eager")


@dataclass
class DensaBackboneOutput(BaseModelOutputWithPast):
    """`last_hidden_state` (B, T, D) after the final norm; `hidden_states`: the embeddings and each block's output
    (the last one normed), when asked; `aux_loss`: the MoE router losses in training mode (else None)."""

    aux_loss: Tensor | None = None


@dataclass
class DensaCausalLMOutput(CausalLMOutputWithPast):
    aux_loss: Tensor | None = None  # MoE router losses (training mode), already included in `loss`


class DensaBackbone(nn.Module):
    """A densa model without its LM head: a view of `DensaModel`'s embeddings, blocks and norm (shared, not copied).

    `checkpoint` is the activation-checkpointing function (None: off); it applies in training mode with gradients
    enabled and no cache. Take the view fresh from `model.base_model`: it reads the checkpointing state then."""

    def __init__(self, model: DensaModel, checkpoint: Any = None, training: bool = False) -> None:
        super().__init__()
        self.config = model.config  # densa's ModelConfig
        self.embed_tokens, self.layers, self.norm = model.embed_tokens, model.layers, model.norm
        self.checkpoint = checkpoint
        self.training = training  # the owner's mode (set directly: the shared modules keep their own flags)

    def forward(self, input_ids: Tensor | None = None, attention_mask: Tensor | None = None,
                position_ids: Tensor | None = None, cache: ModelCache | None = None,
                inputs_embeds: Tensor | None = None, output_hidden_states: bool = False,
                cache_position: Tensor | None = None, **_: Any) -> DensaBackboneOutput:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        if cache is not None and len(cache.layers) != len(self.layers):
            raise ValueError(f"cache has {len(cache.layers)} layers, model has {len(self.layers)}; "
                             "create it with model.model.new_cache()")
        if input_ids is not None:
            check_input_ids(input_ids, self.config.vocab_size)
            x = self.embed_tokens(input_ids)  # (B, T, D)
        else:
            x = inputs_embeds
        B, T = x.shape[:2]
        if cache is None and attention_mask is not None:
            attention_mask = trailing_padding_as_tokens(attention_mask)
        pos = Positions.build(B, T, x.device, attention_mask, cache)
        check_positions(pos, position_ids, cache_position, cache)
        if cache is not None:
            cache.reserve(cache.steps + T)  # as DensaModel.forward: a static K/V cache grows before the layers
        states = [x] if output_hidden_states else []
        checkpoint = self.checkpoint if self.training and torch.is_grad_enabled() and cache is None else None
        routed: list[Routed | None] = []
        for i, layer in enumerate(self.layers):
            if checkpoint is not None:
                x, r = checkpointed_block(checkpoint, layer, x, pos)
            else:
                x, r = layer(x, pos, cache.layers[i] if cache is not None else None)
            routed.append(r)
            if output_hidden_states:
                states.append(x)
        if cache is not None:
            pos.advance(cache)
        x = self.norm(x)
        _, aux_loss, _ = collect_routing(routed)
        hidden = (*states[:-1], x) if output_hidden_states else None
        return DensaBackboneOutput(last_hidden_state=x, cache=cache, hidden_states=hidden, aux_loss=aux_loss)


def check_input_ids(input_ids: Tensor, vocab_size: int) -> None:
    if not isinstance(input_ids, Tensor) or input_ids.dtype not in (torch.int64, torch.int32) or input_ids.dim() != 2:
        got = tuple(input_ids.shape) if isinstance(input_ids, Tensor) else type(input_ids).__name__
        raise TypeError(f"input_ids must be an int64 tensor of shape (batch, time); got {got}")
    if input_ids.numel() and (int(input_ids.min()) < 0 or int(input_ids.max()) >= vocab_size):
        raise ValueError(f"input_ids contains a token id outside the vocabulary [0, {vocab_size})")


def trailing_padding_as_tokens(attention_mask: Tensor) -> Tensor:
    """densa's positions take left padding only. Right padding (training batches, TRL's completions) is read as real
    tokens: every densa layer is causal, so they change no earlier position, and their labels are -100. A mask with
    a hole between real tokens is returned unchanged (Positions.build then rejects it)."""
    real = attention_mask.bool()
    if bool(real.all()):
        return attention_mask
    started = real.long().cumsum(1) > 0  # at or after the row's first real token
    ended = real.flip(1).long().cumsum(1).flip(1) == 0  # after the row's last real token
    if bool((real | ~started | ended).all()):
        return started.to(attention_mask.dtype)
    return attention_mask


def check_positions(pos: Positions, position_ids: Tensor | None, cache_position: Tensor | None,
                    cache: ModelCache | None) -> None:
    """densa derives positions from the mask and the cache; explicit ones must agree (packed sequences do not)."""
    if position_ids is not None:
        expected = pos.ids_BT if pos.valid_BT is None else pos.ids_BT.masked_fill(~pos.valid_BT, -1)
        given = position_ids.to(expected.device).expand_as(expected)
        given = given if pos.valid_BT is None else given.masked_fill(~pos.valid_BT, -1)
        if not torch.equal(given, expected):
            raise ValueError("position_ids disagree with the positions densa derives from attention_mask (left "
                             "padding only); packed sequences (padding_free) are not supported by densa models")
    if cache_position is not None and int(cache_position.reshape(-1)[0]) != (cache.steps if cache else 0):
        raise ValueError(f"cache_position starts at {int(cache_position.reshape(-1)[0])} but the cache holds "
                         f"{cache.steps if cache else 0} steps")


def checkpointed_block(checkpoint: Any, layer: nn.Module, x: Tensor, pos: Positions) -> tuple[Tensor, Routed | None]:
    """One block under activation checkpointing. The router loss travels as an output of the checkpoint, so it gets
    gradients with reentrant checkpointing too; the recompute in backward must not count a MoE FFN's step
    statistics (`update_routing`'s input) a second time, so they are restored after it."""
    moes = [m for m in layer.modules() if isinstance(m, MoE)]
    box: list[Routed | None] = []

    def run(x_BTD: Tensor) -> tuple[Tensor, Tensor | None]:
        saved = [m._stats for m in moes]
        y, routed = layer(x_BTD, pos, None)
        if box:  # the recompute
            for m, stats in zip(moes, saved, strict=True):
                m._stats = stats
        else:
            box.append(routed)
        return y, routed.aux_loss if routed is not None else None

    y, aux_loss = checkpoint(run, x)
    routed = box[0]
    if routed is not None and aux_loss is not None:
        routed = dataclasses.replace(routed, aux_loss=aux_loss)
    return y, routed


class DensaPreTrainedModel(PreTrainedModel):
    config_class = DensaConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    _no_split_modules = ["MegaBlock", "LlamaBlock"]
    _is_stateful = True  # recurrent EMA state: no assisted decoding / cache cropping
    supports_gradient_checkpointing = True
    gradient_checkpointing = False  # transformers sets this flag (and `_gradient_checkpointing_func`) on the model

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

    @property
    def base_model(self) -> DensaBackbone:  # type: ignore[override]
        """The backbone (no LM head), returning `last_hidden_state`; a fresh view sharing this model's modules."""
        return self.backbone()

    def backbone(self) -> DensaBackbone:
        checkpoint = getattr(self, "_gradient_checkpointing_func", None) if self.gradient_checkpointing else None
        return DensaBackbone(self.model, checkpoint, self.training)

    def get_input_embeddings(self) -> torch.nn.Embedding:
        return self.model.embed_tokens

    def set_input_embeddings(self, value: torch.nn.Embedding) -> None:
        self.model.embed_tokens = value

    def get_output_embeddings(self) -> torch.nn.Linear:
        return self.model.lm_head

    def _compiled_step(self, input_ids: Tensor | None, attention_mask: Tensor | None, cache: ModelCache | None,
                       inputs_embeds: Tensor | None, labels: Tensor | None, output_hidden_states: bool | None
                       ) -> Tensor | None:
        """With `config.compile` on (densa/model/compile.py's switch), a generation step (one new real token per
        row of a prefilled cache, nothing else asked for) runs densa's compiled decode step: logits (B, 1, V).
        None: the general path below (prompts, training, hidden states, and every step when the switch is off)."""
        if (self.config.compile == "off" or self.training or cache is None or cache.steps == 0 or input_ids is None
                or input_ids.dim() != 2 or input_ids.shape[1] != 1 or inputs_embeds is not None or labels is not None
                or output_hidden_states):
            return None
        if attention_mask is not None and not bool(attention_mask[:, -1].all()):
            return None  # a padding column in a step: only the general path handles it
        steps = inference_steps(self.model, CompileConfig(mode=self.config.compile, backend=COMPILE_BACKEND))
        if not steps.compiled:  # "auto" off a GPU
            return None
        check_input_ids(input_ids, self.config.vocab_size)  # as the general path: a clear error, not an index fault
        return steps.decode(input_ids, cache)[0][:, None]

    def forward(self, input_ids: Tensor | None = None, attention_mask: Tensor | None = None,
                position_ids: Tensor | None = None, cache: ModelCache | None = None,
                inputs_embeds: Tensor | None = None, labels: Tensor | None = None, use_cache: bool | None = None,
                logits_to_keep: int | Tensor = 0, output_hidden_states: bool | None = None,
                output_attentions: bool | None = None, return_dict: bool | None = None,
                past_key_values: ModelCache | None = None, num_items_in_batch: int | Tensor | None = None,
                **kwargs: Any) -> DensaCausalLMOutput | tuple:
        """HF-style forward. `attention_mask` (B, seen + T): 0 marks padding (left; right padding only without a
        cache, read as tokens). `cache` (or its older name `past_key_values`) is a densa ModelCache, created here
        when `use_cache` and none is given, and returned as `output.cache`. With `labels`, the loss is the mean
        next-token cross-entropy (+ MoE router losses in training); with `num_items_in_batch` (transformers'
        Trainer under gradient accumulation) it is scaled to this batch's share of that many labelled tokens."""
        cache_position = kwargs.pop("cache_position", None)  # not in the signature: transformers warns on it
        if output_attentions:
            raise ValueError("output_attentions=True is not supported: densa's attention is computed inside chunks "
                             "(Mega) and returns no attention weights")
        cache = cache if cache is not None else past_key_values
        if cache is not None and not isinstance(cache, ModelCache):
            raise TypeError(f"cache must be densa's ModelCache (model.model.new_cache()); got {type(cache).__name__}")
        if use_cache is None:
            use_cache = cache is not None or (self.config.use_cache and not self.training)
        if use_cache and self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            use_cache = False  # a cache is mutated in place: it cannot be recomputed
        if use_cache and cache is None:
            cache = self.model.new_cache()
        logits = self._compiled_step(input_ids, attention_mask, cache if use_cache else None, inputs_embeds, labels,
                                     output_hidden_states)
        if logits is not None:
            result = DensaCausalLMOutput(logits=logits, cache=cache)
            return result if return_dict is not False else result.to_tuple()
        out = self.backbone()(input_ids, attention_mask, position_ids, cache if use_cache else None, inputs_embeds,
                              bool(output_hidden_states), cache_position)
        hidden = out.last_hidden_state  # (B, T, D)
        if isinstance(logits_to_keep, int):
            keep = slice(-logits_to_keep, None) if logits_to_keep else slice(None)
        else:
            keep = logits_to_keep  # (K,) position indices
        loss = None
        if labels is None:
            logits = self.model.lm_head(hidden[:, keep]).float()  # only the kept positions pay for the LM head
        else:
            if labels.shape != hidden.shape[:2]:
                raise ValueError(f"labels shape {tuple(labels.shape)} != input shape {tuple(hidden.shape[:2])}")
            logits = self.model.lm_head(hidden).float()
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                                   ignore_index=-100)
            if out.aux_loss is not None:  # training-mode MoE: the router losses join the objective
                loss = loss + out.aux_loss
            if num_items_in_batch is not None:
                loss = loss * (labels[:, 1:] != -100).sum() / num_items_in_batch
            logits = logits[:, keep]
        result = DensaCausalLMOutput(loss=loss, logits=logits, cache=cache if use_cache else None,
                                     hidden_states=out.hidden_states, aux_loss=out.aux_loss)
        return result if return_dict is not False else result.to_tuple()

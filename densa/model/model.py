"""DensaModel: embeddings → blocks → RMSNorm → LM head. Each layer's block type comes from
`ModelConfig.layer_mixers`: "mega" (EMA + chunked gated attention, densa/model/mega.py), "attention" (the
Llama-style dense baseline, densa/model/attention.py) or "deltanet" (the gated delta rule, densa/model/deltanet.py);
a hybrid layout (`attention_every`) mixes full attention into the others. All share embeddings, head, loss, cache
API and generation, so comparisons are like for like.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from densa.config import ModelConfig
from densa.generation import generate
from densa.model.attention import LlamaBlock
from densa.model.cache import ModelCache, Positions
from densa.model.deltanet import GatedDeltaBlock
from densa.model.layers import RMSNorm
from densa.model.mega import MegaBlock
from densa.model.moe import MoE, Routed

BLOCKS: dict[str, type[nn.Module]] = {"mega": MegaBlock, "attention": LlamaBlock, "deltanet": GatedDeltaBlock}

# output projections get the GPT-2 depth-scaled init std / sqrt(2 * layers)
_RESIDUAL_OUTPUTS = ("o_proj", "down_proj")


@dataclass
class ModelOutput:
    logits: Tensor  # (B, T, vocab), fp32
    loss: Tensor | None = None  # mean next-token cross-entropy over labelled positions (+ MoE aux losses in training)
    aux: dict[str, Tensor] = field(default_factory=dict)  # ce_loss, aux_loss and per-layer MoE routing metrics
    # (layers, B, T) FFN experts each token used in each layer (int64); None when the FFN is dense. The measurement
    # core (densa/measure.py) costs a forward from it; serve, eval, studies and inspect-routing read it here.
    ffn_experts: Tensor | None = None


def collect_routing(routed: list[Routed | None]) -> tuple[dict[str, Tensor], Tensor | None, Tensor | None]:
    """What the blocks' MoE FFNs returned in one forward: per-layer metrics (`layers.{i}.{name}`), in training mode
    their weighted aux losses summed (also reported, detached, as `aux_loss`), and the (layers, B, T) FFN experts
    per token (None when no layer routed)."""
    aux: dict[str, Tensor] = {}
    total: Tensor | None = None
    for i, r in enumerate(routed):
        if r is None:
            continue
        aux.update({f"layers.{i}.{name}": value for name, value in r.metrics.items()})
        if r.aux_loss is not None:
            total = r.aux_loss if total is None else total + r.aux_loss
    if total is not None:
        aux["aux_loss"] = total.detach()
    used = [r.ffn_experts_BL for r in routed if r is not None]
    return aux, total, torch.stack(used) if len(used) == len(routed) and used else None


class DensaModel(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(BLOCKS[mixer](config) for mixer in config.layer_mixers)  # hybrid: per layer
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        std = self.config.initializer_range
        for name, module in self.named_modules():
            if isinstance(module, nn.Linear):
                scale = 1 / math.sqrt(2 * self.config.num_hidden_layers) if name.endswith(_RESIDUAL_OUTPUTS) else 1
                nn.init.normal_(module.weight, 0.0, std * scale)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, 0.0, std)
            elif isinstance(module, MoE):
                module.reset_parameters()  # fused 3-D experts and the router are not nn.Linear

    def new_cache(self, max_length: int | None = None) -> ModelCache:
        """An empty decoding cache (one entry per layer); pass it to forward() call after call. `max_length`
        reserves the static K/V slots of dense layers up front, so decoding that far never reallocates."""
        cache = ModelCache([layer.new_cache() for layer in self.layers])
        if max_length:
            cache.reserve(max_length)
        return cache

    def forward(self, input_ids: Tensor, labels: Tensor | None = None, cache: ModelCache | None = None,
                attention_mask: Tensor | None = None, logits_to_keep: int = 0) -> ModelOutput:
        """Logits for every position; with `labels` (same shape as input_ids, -100 = ignore) also the loss of
        predicting labels[t+1] from positions <= t. With `cache`, input_ids continue the cached sequence.
        `attention_mask` (B, T) or, Hugging Face style, (B, cached + T): 0 marks left padding, which then changes
        nothing for the row's real tokens (each row behaves as if it were alone). `logits_to_keep` > 0 computes
        the logits of the last that many positions only (prefill for generation needs just the last)."""
        self._check_inputs(input_ids, labels, cache, logits_to_keep)
        pos = Positions.build(*input_ids.shape, input_ids.device, attention_mask, cache)
        if cache is not None:
            cache.reserve(cache.steps + input_ids.shape[1])
        logits, routed = self._layers_and_head(input_ids, pos, cache, logits_to_keep)
        if cache is not None:
            pos.advance(cache)
        aux, aux_loss, ffn_experts = collect_routing(routed)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                                   ignore_index=-100)
            aux["ce_loss"] = loss.detach()
            if aux_loss is not None:  # training-mode MoE: the weighted router losses join the objective
                loss = loss + aux_loss
        return ModelOutput(logits=logits, loss=loss, aux=aux, ffn_experts=ffn_experts)

    def decode_step(self, input_ids_B1: Tensor, cache: ModelCache, extent: int | None = None
                    ) -> tuple[Tensor, Tensor | None]:
        """One decoding step of a prefilled cache: (B, 1) tokens -> (logits (B, V) fp32, FFN experts per token
        (layers, B) or None). Fixed shapes, cache buffers written in place, no host sync and no input check (the
        tokens are the model's own samples), so it compiles to one graph. The caller reserves a slot first and
        counts the step after (`densa.model.compile.Steps.decode` does both); `forward` is the checked reference.
        `extent` (eager callers: cache.steps + 1) limits dense layers to the slots in use; a compiled step leaves it
        None and attends over the whole reserved buffer, so its shapes never change."""
        pos = Positions.step(cache, extent)
        logits_B1V, routed = self._layers_and_head(input_ids_B1, pos, cache, 1)
        cache.positions.add_(1)
        used = [r.ffn_experts_BL[:, 0] for r in routed if r is not None]
        return logits_B1V[:, 0], torch.stack(used) if used and len(used) == len(routed) else None

    def _layers_and_head(self, input_ids: Tensor, pos: Positions, cache: ModelCache | None,
                         logits_to_keep: int) -> tuple[Tensor, list[Routed | None]]:
        x = self.embed_tokens(input_ids)
        routed: list[Routed | None] = []
        for i, layer in enumerate(self.layers):
            x, r = layer(x, pos, cache.layers[i] if cache is not None else None)
            routed.append(r)
        if logits_to_keep:
            x = x[:, -logits_to_keep:]
        return self.lm_head(self.norm(x)).float(), routed

    @torch.no_grad()
    def update_routing(self) -> dict[str, float | list[float]]:
        """Per-step routing updates of every MoE layer; returns their monitoring dict (`layers.{i}.{name}`).

        Contract (the trainer's): call once per optimizer step, right after `optimizer.step()`, on every rank (it
        all-reduces when torch.distributed is initialised; under DDP call it on `ddp_model.module`). In between,
        every training-mode forward of the step (all micro-batches of gradient accumulation) adds its routing
        counts; this call turns the global batch's counts into the budget controller's and the balance bias's
        updates and resets them. Eval-mode forwards count nothing. Models without MoE layers return {}.
        """
        metrics: dict[str, float | list[float]] = {}
        for i, layer in enumerate(self.layers):
            if isinstance(layer.mlp, MoE):
                layer_metrics = layer.mlp.update_routing(where=f"layers.{i}")
                metrics.update({f"layers.{i}.{name}": value for name, value in layer_metrics.items()})
        return metrics

    def _check_inputs(self, input_ids: Tensor, labels: Tensor | None, cache: ModelCache | None,
                      logits_to_keep: int) -> None:
        if not isinstance(input_ids, Tensor) or input_ids.dtype not in (torch.int64, torch.int32):
            got = input_ids.dtype if isinstance(input_ids, Tensor) else type(input_ids).__name__
            raise TypeError(f"input_ids must be an int64 tensor of shape (batch, time); got {got}")
        if input_ids.dim() != 2 or input_ids.shape[1] == 0:
            raise ValueError(f"input_ids must have shape (batch, time) with time >= 1; got {tuple(input_ids.shape)}")
        lo, hi = int(input_ids.min()), int(input_ids.max())
        if lo < 0 or hi >= self.config.vocab_size:
            bad = lo if lo < 0 else hi
            raise ValueError(f"input_ids contains token id {bad}, outside the vocabulary [0, {self.config.vocab_size})")
        if logits_to_keep < 0 or (logits_to_keep and labels is not None):
            raise ValueError(f"logits_to_keep={logits_to_keep}: must be >= 0, and 0 (all positions) with labels")
        if labels is not None and labels.shape != input_ids.shape:
            raise ValueError(f"labels shape {tuple(labels.shape)} != input_ids shape {tuple(input_ids.shape)}")
        if cache is not None and len(cache.layers) != len(self.layers):
            raise ValueError(f"cache has {len(cache.layers)} layers, model has {len(self.layers)}; "
                             "create it with model.new_cache()")

    @torch.no_grad()
    def generate(self, input_ids: Tensor, **kwargs) -> Tensor:
        """See densa.generation.generate."""
        return generate(self, input_ids, **kwargs)

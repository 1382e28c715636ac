"""How each benchmarked model runs in its best form, "eager" and "compiled", so every comparison is fair.

- densa / dense (DensaModel): both modes go through densa's one compile switch, `densa.model.compile.
  inference_steps` (prefill = the checked forward with `logits_to_keep=1`, decode = the fixed-shape
  `decode_step`): eager = `compile="off"` with the `nn.Linear`s on oneDNN-packed weights (densa/model/fastlinear.py,
  fp32 or bf16); compiled = `compile="on"` (inductor; CUDA graphs on CUDA), weights unpacked (inductor generates its
  own matmul calls).
- hf (transformers' `LlamaForCausalLM`): eager = `DynamicCache`, SDPA, linears packed like densa's; compiled =
  its static cache (`StaticCache`) + `torch.compile` of the forward, as transformers' docs recommend for decoding.

`decoder(kind, model, mode, batch, max_len)` returns a `Decoder`: `prefill(ids_BT)` runs a prompt into a fresh
cache (returning the last position's logits) and `step(ids_B1)` decodes one more token with that cache.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from densa.model.compile import inference_steps
from densa.model.fastlinear import pack_linears

MODES = ("eager", "compiled")


def compile_switch() -> str:
    """What densa's compiled mode runs (recorded in every bench's JSON)."""
    return "densa.model.compile.inference_steps(compile='on')"


@dataclass
class Decoder:
    prefill: Callable[[Tensor], Tensor]  # (B, T) prompt -> (B, V) logits of the last position, fresh cache
    step: Callable[[Tensor], Tensor]  # (B, 1) next token -> (B, V) logits, same cache


def prepare(model: nn.Module, mode: str, weights: torch.dtype = torch.float32) -> None:
    """Put `model` in the form `mode` runs it in: eager packs its linears (in `weights` dtype)."""
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; expected one of {MODES}")
    model.eval()
    if mode == "eager":
        pack_linears(model, weights)


def decoder(kind: str, model: nn.Module, mode: str, max_len: int) -> Decoder:
    """A prefill/step pair for `model` (already `prepare`d for `mode`); `kind` "hf" is transformers' Llama."""
    if kind == "hf":
        return _hf_decoder(model, mode, max_len)
    steps = inference_steps(model, "on" if mode == "compiled" else "off")
    state: dict[str, object] = {}

    def prefill(ids_BT: Tensor) -> Tensor:
        state["cache"] = model.new_cache(max_len)  # dense layers reserve their K/V slots once
        return steps.prefill(ids_BT, state["cache"]).logits[:, -1]

    def step(ids_B1: Tensor) -> Tensor:
        return steps.decode(ids_B1, state["cache"])[0]

    return Decoder(prefill, step)


def _hf_decoder(model: nn.Module, mode: str, max_len: int) -> Decoder:
    from transformers import DynamicCache, StaticCache

    forward = torch.compile(model) if mode == "compiled" else model
    state: dict[str, object] = {}

    def run(ids_BT: Tensor) -> Tensor:
        start = state["pos"]
        positions_BT = torch.arange(start, start + ids_BT.shape[1]).expand(ids_BT.shape[0], -1)
        state["pos"] = start + ids_BT.shape[1]
        out = forward(input_ids=ids_BT, position_ids=positions_BT, cache=state["cache"], use_cache=True,
                      logits_to_keep=1)
        return out.logits[:, -1]

    def prefill(ids_BT: Tensor) -> Tensor:
        if mode == "compiled":
            state["cache"] = StaticCache(config=model.config, max_cache_len=max_len)
        else:
            state["cache"] = DynamicCache(config=model.config)
        state["pos"] = 0
        return run(ids_BT)

    return Decoder(prefill, run)

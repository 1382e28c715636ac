"""The one switch for compiled inference: `inference_steps(model, compile)` returns a model's prefill and decode
callables, eager or `torch.compile`d, cached per model. `generate()`, the serve engine and the benches call it.

A decoding step of a small model is a few MFLOPs, so on CPU eager decoding is nearly all per-operator overhead
(Python dispatch, many small element-wise ops); a compiled step fuses those ops, and on a GPU CUDA graphs remove the
launches. The decode step (`DensaModel.decode_step`) is built for it: fixed shapes, cache buffers written in place,
no host sync, so it traces to one graph per cache layout. Layout changes are the only recompilations: a dense
model's K/V capacity doubling, serve's batch size changing (after the first change torch marks the dimension
dynamic), and an MoE FFN's data-dependent dispatch (graph breaks, not recompilations).

Modes: "off" is eager; "on" compiles the decode step (inductor; on CUDA `reduce-overhead`, i.e. CUDA graphs);
"auto" is "on" where it measurably wins and "off" elsewhere: on CUDA on, on CPU off — there a compile costs tens of
seconds to minutes on 2 busy cores (docs/architecture.md, "The decoding step and the compile switch", has the
figures), so it pays only for long serving runs, which opt in with `--compile on`. Prefill stays eager: prompt
lengths vary, and a prefill is one call per request with large ops, where dispatch overhead matters least; it
computes only the logits it needs (`logits_to_keep`).

The plain references stay beside the fast path and tests/test_compile.py checks they agree: `forward` (validated,
any shape) against `decode_step` eager and compiled.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

if TYPE_CHECKING:
    from densa.model.cache import ModelCache
    from densa.model.model import DensaModel, ModelOutput

COMPILE_MODES = ("auto", "on", "off")


@dataclass(frozen=True)
class CompileConfig:
    """`mode` in COMPILE_MODES; `backend` is torch.compile's (tests use "aot_eager", which traces and
    functionalises like inductor but generates no C++, to stay fast)."""

    mode: str = "auto"
    backend: str = "inductor"

    def __post_init__(self) -> None:
        if self.mode not in COMPILE_MODES:
            raise ValueError(f"compile={self.mode!r}: expected one of {', '.join(COMPILE_MODES)}")

    def enabled(self, device: torch.device) -> bool:
        """Whether to compile for a model on `device`: "auto" compiles on CUDA only."""
        return self.mode == "on" or (self.mode == "auto" and device.type == "cuda")


class InferenceSteps:
    """A model's prefill and decode callables (eager, or with a compiled decode step)."""

    def __init__(self, model: DensaModel, compiled: bool, backend: str = "inductor") -> None:
        self.model, self.compiled = model, compiled
        self._decode = model.decode_step
        if compiled:
            on_cuda = next(model.parameters()).device.type == "cuda"
            mode = "reduce-overhead" if on_cuda and backend == "inductor" else None
            self._decode = torch.compile(model.decode_step, backend=backend, mode=mode)

    def prefill(self, input_ids: Tensor, cache: ModelCache, attention_mask: Tensor | None = None,
                logits_to_keep: int = 1) -> ModelOutput:
        """The checked forward of the prompt into `cache`; by default only the last position's logits."""
        return self.model(input_ids, cache=cache, attention_mask=attention_mask, logits_to_keep=logits_to_keep)

    def decode(self, input_ids_B1: Tensor, cache: ModelCache) -> tuple[Tensor, Tensor | None]:
        """One token per row of a prefilled cache: (logits (B, V), FFN experts (layers, B) or None). The slot is
        reserved and the step counted here, outside the compiled region (Python ints there would recompile)."""
        cache.reserve(cache.steps + 1)
        if self.compiled:  # fixed shapes: attend over the reserved buffer
            out = self._decode(input_ids_B1, cache)
        else:  # eager: dense layers read only the slots in use (a reserved 8k buffer would cost 8k keys a step)
            out = self._decode(input_ids_B1, cache, cache.steps + 1)
        cache.steps += 1
        return out


def compile_training(model: nn.Module, compile: str | CompileConfig) -> bool:
    """Compile `model`'s forward in place (`nn.Module.compile`) when the switch says so, for training: its state
    dict keeps its names, and a DDP or FSDP2 wrapper around it, the training step and validation all call the
    compiled forward. Returns whether it compiled. `densa train`'s `train.compile` (default "off": on this CPU the
    compiled training step measured 0.90-1.12x eager in `densa bench train`, no consistent win)."""
    cfg = compile if isinstance(compile, CompileConfig) else CompileConfig(mode=compile)
    if not cfg.enabled(next(model.parameters()).device):
        return False
    model.compile(backend=cfg.backend)
    return True


def inference_steps(model: DensaModel, compile: str | CompileConfig = "auto") -> InferenceSteps:
    """The model's prefill/decode callables under the switch `compile` ("auto" | "on" | "off", or a
    CompileConfig); compiled ones are made once per model and reused."""
    cfg = compile if isinstance(compile, CompileConfig) else CompileConfig(mode=compile)
    device = next(model.parameters()).device
    key = (cfg.enabled(device), cfg.backend)
    per_model: dict[tuple[bool, str], InferenceSteps] = model.__dict__.setdefault("_inference_steps", {})
    if key not in per_model:
        per_model[key] = InferenceSteps(model, *key)
    return per_model[key]

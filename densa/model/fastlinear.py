"""Inference linear layers on oneDNN-packed weights (CPU): the fast matmul path for decoding and prefill.

Why (docs/benchmarks.md, "Matmuls at the machine's bandwidth"): at batch 1 a fp32 `F.linear` on CPU goes to MKL's
gemv, which on this AMD EPYC read a 576×49152 weight (SmolLM2's tied head, 113 MB) at ~9 GB/s on one thread and
~4 GB/s at 8 rows; the same weight reordered once into oneDNN's blocked layout (`torch.ops.mkldnn.
_reorder_linear_weight`) and multiplied with `torch.ops.mkldnn._linear_pointwise` reached ~12 GB/s at 1 row and ~11
at 8, and was no slower than MKL at 512 rows. bf16 weights (AVX-512 BF16) halve the bytes read again; the input is
rounded to bf16 for the matmul and the output returned in the input's dtype.

`pack_linears(model, dtype)` swaps every `nn.Linear` of a model for a `PackedLinear` in place: the module keeps the
original `weight` / `bias` Parameters (so tied weights stay tied and `state_dict` is unchanged) plus the packed
copy, which is used only when no gradient is needed; with autograd on it falls back to `F.linear` on the original
weight. The packed copy is a snapshot: re-pack after changing weights. Off CPU (or without oneDNN) nothing is
packed: on CUDA the fast path is cuBLAS in bf16 (`model.to(torch.bfloat16)`) under CUDA graphs, not this module.
`F.linear` stays the reference the packed path is tested against (tests/test_moe.py is MoE's; tests/test_bench.py
checks this one).

Sibling projections that read the same input (a module's `fusable` names: q/k/v, gate/up) are also packed as one
stacked weight (`FusedPacked`, kept as a plain attribute `fused`, so `state_dict` is unchanged) that the module uses
when no gradient is needed: one matmul instead of two or three. On SmolLM2's 30 layers of shapes, from memory at
batch 1: 20.1 → 15.6 ms for q/k/v + gate/up (8.6 → 11.1 GB/s; 2 threads, quiet machine).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def available() -> bool:
    """oneDNN (mkldnn) is built into this torch and usable on CPU."""
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


class PackedLinear(nn.Module):
    """`nn.Linear` for inference with a oneDNN-packed weight in `dtype` (float32 or bfloat16)."""

    def __init__(self, linear: nn.Linear, dtype: torch.dtype = torch.float32, batch_hint: int = 1) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight  # the same Parameter: tying and state_dict are unchanged
        self.bias = linear.bias
        self.dtype = dtype
        with torch.no_grad():
            # the packed layout depends a little on the expected row count; 1 is the decode case
            self.packed = torch.ops.mkldnn._reorder_linear_weight(self.weight.detach().to(dtype), batch_hint)
            self.packed_bias = None if self.bias is None else self.bias.detach().to(dtype)

    def forward(self, x: Tensor) -> Tensor:
        if torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad):
            return F.linear(x, self.weight, self.bias)  # training / autograd: the plain path
        y = torch.ops.mkldnn._linear_pointwise(x.to(self.dtype).contiguous(), self.packed, self.packed_bias,
                                               "none", [], "")
        return y.to(x.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, dtype={self.dtype}"


@dataclass
class FusedPacked:
    """Bias-free sibling linears on one input, packed as one oneDNN weight (rows stacked in `names` order). A
    snapshot like `PackedLinear`'s: re-pack after changing weights."""

    names: tuple[str, ...]
    sizes: list[int]  # output rows of each sibling
    weights: list[nn.Parameter]  # the originals, to tell when autograd needs the plain path
    packed: Tensor
    dtype: torch.dtype

    def usable(self, x: Tensor) -> bool:
        """Inference only, and not under torch.compile (which generates its own matmuls)."""
        grad = torch.is_grad_enabled() and (x.requires_grad or any(w.requires_grad for w in self.weights))
        return not grad and not torch.compiler.is_compiling()

    def __call__(self, x: Tensor) -> tuple[Tensor, ...]:
        y = torch.ops.mkldnn._linear_pointwise(x.to(self.dtype).contiguous(), self.packed, None, "none", [], "")
        return y.to(x.dtype).split(self.sizes, dim=-1)


def fused_outputs(module: nn.Module, x: Tensor) -> tuple[Tensor, ...]:
    """The outputs of `module`'s `fusable` projections on `x`: one packed matmul when `pack_linears` fused them and
    no gradient is needed, else each projection (the reference)."""
    fused: FusedPacked | None = getattr(module, "fused", None)
    if fused is not None and fused.usable(x):
        return fused(x)
    return tuple(getattr(module, name)(x) for name in module.fusable)


def _fuse(module: nn.Module, dtype: torch.dtype, batch_hint: int) -> bool:
    linears = [getattr(module, name, None) for name in getattr(module, "fusable", ())]
    if not linears or not all(isinstance(lin, PackedLinear) and lin.bias is None for lin in linears):
        return False
    with torch.no_grad():
        stacked = torch.cat([lin.weight.detach() for lin in linears]).to(dtype)
        packed = torch.ops.mkldnn._reorder_linear_weight(stacked, batch_hint)
    module.fused = FusedPacked(tuple(module.fusable), [lin.out_features for lin in linears],
                               [lin.weight for lin in linears], packed, dtype)
    return True


def pack_linears(model: nn.Module, dtype: torch.dtype = torch.float32, batch_hint: int = 1) -> int:
    """Replace every CPU `nn.Linear` in `model` by a `PackedLinear` (in place); returns how many were packed
    (0 when oneDNN is unavailable or the model is not on CPU)."""
    if dtype not in (torch.float32, torch.bfloat16):
        raise ValueError(f"packed linear weights are float32 or bfloat16, not {dtype}")
    if not available():
        return 0
    count = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear and child.weight.device.type == "cpu":
                setattr(parent, name, PackedLinear(child, dtype, batch_hint))
                count += 1
    for module in model.modules():
        _fuse(module, dtype, batch_hint)
    return count


def unpack_linears(model: nn.Module) -> int:
    """Undo `pack_linears`: back to plain `nn.Linear` modules holding the same Parameters; returns the count."""
    count = 0
    for module in model.modules():
        if isinstance(getattr(module, "fused", None), FusedPacked):
            del module.fused
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, PackedLinear):
                linear = nn.Linear(child.in_features, child.out_features, bias=child.bias is not None,
                                   device="meta")
                linear.weight, linear.bias = child.weight, child.bias
                setattr(parent, name, linear)
                count += 1
    return count

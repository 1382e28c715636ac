"""The mixture-of-experts FFN: router → routed SwiGLU experts (+ identity experts, + an optional shared expert).

Design choices (docs/moe.md, 'Design'):
- Experts are stored fused as 3-D parameters in the transformers v5 layout (MixtralExperts): gate_up_proj [E, 2F, D]
  with the gate rows first, down_proj [E, D, F], so weights load into HF / vLLM layouts unchanged.
- Dispatch is dropless: sort the (token, slot) pairs by expert once, drop the zero-computation slots (they sort to
  the tail because their ids are >= E), gather the rows, run the experts as two grouped matmuls
  (`torch._grouped_mm`, or a `split` + `unbind` loop where it is unavailable or misaligned), scale by the gate
  weight, and combine with `index_add`. Work, and so time, follows the routed pairs: skipped slots cost nothing.
  `moe_reference` beside it is the plain per-token loop the fast path is tested against.
- A few tokens (T·K ≤ E: batch-1 decoding, or a few sequences) on CUDA or under torch.compile take the gathered
  path (`impl="gathered"` anywhere; eager on CPU the grouped path measured faster, see `uses_gathered`): keep the
  FFN slots (ids < E), gather those experts' weights (S, 2F, D) and (S, D, F) and run them as one batched matmul
  each; a tiny (T, S) combine matmul carries the gate weights back to the tokens. No sort, no grouped matmul, no
  scatter; zero-computation slots are dropped before any weight is read, so they cost nothing. At batch 1 it reads
  only the chosen experts' weights (index_select copies them once; the copy is what the matmul streams).
- Eager CPU inference on up to 8E slots (T·K ≤ 8E: decoding at batch 1–8) runs the chosen experts as two fused
  gather-reductions (`_reduced`): `reduce_experts`, compiled once by inductor, reads each chosen expert's rows
  straight from the fused weights (no copy, no sort, none of the E per-expert matmuls that CPU `_grouped_mm` runs
  whether an expert has rows or not) in one generated kernel per projection. Where that compile is unavailable
  (no C++ compiler) it loops instead, two `F.linear` per chosen expert on views of the weights (`_looped`), which
  costs a dispatch per expert: SmolLM2-sized experts (30 layers x 8 of 16 experts, 576 x 96) took 19.2 / 19.9 ms
  per token that way, 9.1 / 6.8 ms reduced, against 16.6 / 15.6 ms for the dense FFN on packed weights (two runs
  of `densa bench moe`, docs/benchmarks.md).
- Identity experts add w·x (an axpy, no GEMM); null experts add nothing.
- Monitoring: each forward records the router losses and cheap batch metrics in `aux`; in training mode it also
  accumulates the step's load statistics, which `update_routing()` (once per optimizer step) all-reduces over the
  ranks, turns into the per-step bias updates (densa/model/router.py) and returns as the monitoring dict.

Shape suffixes: B sequences, L positions, T = B·L tokens, D hidden, E FFN experts, K slots per token,
F expert width, S routed (token, FFN expert) pairs, n pairs of one expert.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils._python_dispatch import _get_current_dispatch_mode

from densa.config import ModelConfig
from densa.counting import ffn_flops_per_token
from densa.model.layers import SwiGLU
from densa.model.router import BudgetRouter, Routing, SoftmaxTopKRouter


def moe_reference(x_TD: Tensor, ids_TK: Tensor, weights_TK: Tensor, gate_up_proj: Tensor, down_proj: Tensor,
                  num_null: int = 0) -> Tensor:
    """out_t = Σ_k w_tk · expert_{id_tk}(x_t), one token and one slot at a time. Ids >= E are zero-computation:
    the first `num_null` of them output 0, the rest (identity) output x_t."""
    E = gate_up_proj.shape[0]
    rows = []
    for t in range(x_TD.shape[0]):
        y_D = torch.zeros_like(x_TD[t])
        for e, w in zip(ids_TK[t].tolist(), weights_TK[t].to(x_TD.dtype), strict=True):
            if e < E:
                gate, up = (gate_up_proj[e] @ x_TD[t]).chunk(2)
                y_D = y_D + w * (down_proj[e] @ (F.silu(gate) * up))
            elif e >= E + num_null:
                y_D = y_D + w * x_TD[t]
        rows.append(y_D)
    return torch.stack(rows)


def reduce_experts(x_TD: Tensor, tok_S: Tensor, ids_S: Tensor, w_S: Tensor, gate_up_proj: Tensor,
                   down_proj: Tensor) -> Tensor:
    """out_t = Σ_s [tok_s = t] w_s · expert_{ids_s}(x_t) over S (token, FFN expert) pairs, written as gathers
    inside reductions. Run eagerly, the gathers copy the chosen weights (this is the readable form, tested against
    `moe_reference`); compiled (`_compiled_reduce`), inductor fuses each gather into its reduction, so each chosen
    expert's weights are read once, in place."""
    x_SD = x_TD[tok_S]
    gate_S2F = (gate_up_proj[ids_S] * x_SD[:, None, :]).sum(-1)  # (S, 2F): the chosen expert's rows · x
    gate_SF, up_SF = gate_S2F.chunk(2, dim=-1)
    a_SF = F.silu(gate_SF) * up_SF * w_S[:, None]
    y_SD = (down_proj[ids_S] * a_SF[:, None, :]).sum(-1)  # (S, D)
    return torch.zeros_like(x_TD).index_add(0, tok_S, y_SD)


_REDUCE: dict[str, object] = {}  # "fn": the compiled reduce_experts; "failed": why compiling it failed


def _compiled_reduce() -> object | None:
    """`reduce_experts` compiled by inductor (dynamic shapes: one compile serves every S, T and layer size), or
    None once a compile has failed in this process (then the looped path runs)."""
    if "failed" in _REDUCE:
        return None
    if "fn" not in _REDUCE:
        _REDUCE["fn"] = torch.compile(reduce_experts, dynamic=True)
    return _REDUCE["fn"]


class Experts(nn.Module):
    """E SwiGLU experts, fused. forward(x, ids, weights) computes the FFN slots (ids < E) and drops the rest."""

    impl = "auto"  # "auto" | "grouped_mm" | "split" | "gathered" | "reduced" | "looped": a runtime choice
    reduce_decode = True  # "auto" runs up to 8E slots through the compiled `_reduced`; False: as before (benches)

    def __init__(self, num_experts: int, hidden: int, width: int) -> None:
        super().__init__()
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * width, hidden))  # initialised by MoE
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden, width))

    def forward(self, x_TD: Tensor, ids_TK: Tensor, weights_TK: Tensor) -> Tensor:
        if self.uses_gathered(x_TD, ids_TK.shape[1]):
            return self._gathered(x_TD, ids_TK, weights_TK)
        if self.uses_reduced(x_TD, weights_TK):
            return self._reduced(x_TD, ids_TK, weights_TK)
        if self.uses_looped(x_TD, weights_TK):
            return self._looped(x_TD, ids_TK, weights_TK)
        K, E = ids_TK.shape[1], self.gate_up_proj.shape[0]
        ids_S = ids_TK.flatten()
        order_S = ids_S.argsort(stable=True)  # sort the (token, slot) pairs by expert, once
        counts_E = torch.bincount(ids_S, minlength=E)[:E]
        n = int(counts_E.sum())  # host sync: the number of FFN pairs; the ZC pairs at the tail are dropped
        if n == 0:  # still touch the weights (a zero gradient), so that under DDP / FSDP2 a rank whose tokens all
            # skipped the FFN experts joins their gradient reduction like the others (docs/design-notes.md,
            # 'Distributed pitfalls': rank-divergent routing)
            return torch.zeros_like(x_TD) + 0 * (self.gate_up_proj.sum() + self.down_proj.sum())
        order_S = order_S[:n]
        tok_S = order_S // K
        # index_select, not x_TD[tok_S]: the advanced-index backward (index_put with accumulate) took ~8x longer
        # on CPU (65-80 ms against 8 ms at 16k pairs × 384, docs/moe.md)
        x_SD = x_TD.index_select(0, tok_S)
        w_S1 = weights_TK.flatten().index_select(0, order_S).to(x_TD.dtype)[:, None]
        run = self._grouped_mm if self.uses_grouped_mm(x_SD) else self._split
        return torch.zeros_like(x_TD).index_add(0, tok_S, run(x_SD, w_S1, counts_E))

    def uses_gathered(self, x_TD: Tensor, slots_per_token: int) -> bool:
        """The gathered path for a few tokens: on CUDA at T·K <= E (no expert gathered more often than the grouped
        path reads it; one device copy and one kernel per bmm), and under torch.compile at T·K <= 4E, where it runs
        with fixed shapes (`_gathered_static`): the alternative there, the fp32 split loop, breaks the graph and
        recompiles per expert count. cpu-small-moe decoding at batch 8, compiled, measured 8.6 ms/step this way
        against 22.0 with the split loop (2 threads, quiet machine; docs/benchmarks.md, "Compiled decoding").
        Eager on CPU "auto" never gathers: the copy doubles the bytes moved (256 µs against grouped_mm's 203 at
        batch 1), and batch-1 steps take `_looped` instead."""
        if self.impl != "auto":
            return self.impl == "gathered"
        slots, E = x_TD.shape[0] * slots_per_token, self.gate_up_proj.shape[0]
        compiling, cpu = torch.compiler.is_compiling(), x_TD.device.type == "cpu"
        # compiled on CPU, up to 4E slots (batch-8 decoding): re-reading some experts' weights costs less than the
        # split loop's graph breaks and recompilations (measured on CPU only; CUDA keeps E)
        return slots <= (4 * E if compiling and cpu else E) and (compiling or x_TD.device.type == "cuda")

    def uses_reduced(self, x_TD: Tensor, weights_TK: Tensor) -> bool:
        """Eager CPU inference on up to 8E slots (T·K <= 8E: decoding at batch 1 to 8 and more) runs the compiled
        gather-reductions (`_reduced`). Per layer call, reduced against sort + `_grouped_mm` (2 threads): cpu-small-
        moe 86 / 221 / 492 / 838 / 1,602 µs against 194 / 684 / 826 / 1,078 / 1,561 at 1 / 8 / 32 / 64 / 128
        tokens; SmolLM2-sized experts (K=8 of E=16, 576 x 96) 357 / 829 / 1,169 / 1,871 / 3,131 against 728 /
        1,616 / 1,502 / 1,937 / 2,684 at 1 / 8 / 16 / 32 / 64 tokens. 8E is where both still win; beyond, the
        grouped matmul reads each expert once while the reductions read it once per slot.
        It once ran on the main thread only: `densa serve`'s engine thread measured it slower. The cause was not
        the kernel but the thread: the model had been loaded on the main thread, and with two OS threads running
        parallel kernels libgomp stops spin-waiting, so every kernel on either thread pays a wake-up
        (`Engine.run`; `densa serve` now decodes on its main thread)."""
        if self.impl != "auto":
            return self.impl == "reduced"
        return (self.reduce_decode and weights_TK.numel() <= 8 * self.gate_up_proj.shape[0]
                and self._eager_cpu_inference(x_TD, weights_TK) and _compiled_reduce() is not None)

    def uses_looped(self, x_TD: Tensor, weights_TK: Tensor) -> bool:
        """The fallback for batch-1 decoding (T·K <= E) where `_reduced` is off or its compile failed: each chosen
        FFN expert is two `F.linear` on views of the fused weights. No sort, no grouped matmul over all E experts
        (on CPU `_grouped_mm` runs one matmul per expert, empty or not), no weight copy. Measured in `densa bench
        moe` (`decode_looped_us` against `decode_grouped_us` and `decode_reduced_us`; docs/benchmarks.md)."""
        if self.impl != "auto":
            return self.impl == "looped"
        return weights_TK.numel() <= self.gate_up_proj.shape[0] and self._eager_cpu_inference(x_TD, weights_TK)

    def _eager_cpu_inference(self, x_TD: Tensor, weights_TK: Tensor) -> bool:
        """No gradient needed (to the input, the experts or the router's gate weights), on CPU, not under
        torch.compile or a dispatch mode (FLOP counting)."""
        return (not self._needs_grad(x_TD, weights_TK) and x_TD.device.type == "cpu"
                and not torch.compiler.is_compiling() and _get_current_dispatch_mode() is None)

    def _needs_grad(self, x_TD: Tensor, weights_TK: Tensor) -> bool:
        return torch.is_grad_enabled() and (x_TD.requires_grad or weights_TK.requires_grad
                                            or self.gate_up_proj.requires_grad)

    def _looped(self, x_TD: Tensor, ids_TK: Tensor, weights_TK: Tensor) -> Tensor:
        """out_t = Σ_k w_tk · expert_{id_tk}(x_t) over the FFN slots, one token and one chosen expert at a time
        (one host read of the routing; zero-computation slots are skipped before any weight is touched).
        Inference-only: the gate weights are read as numbers, so no gradient would reach the router."""
        if self._needs_grad(x_TD, weights_TK):
            raise RuntimeError("Experts.impl='looped' is inference-only; run it under torch.no_grad()")
        E = self.gate_up_proj.shape[0]
        out_TD = torch.zeros_like(x_TD)
        for t, (ids, weights) in enumerate(zip(ids_TK.tolist(), weights_TK.tolist(), strict=True)):
            x_D, out_D = x_TD[t], out_TD[t]
            for e, w in zip(ids, weights, strict=True):
                if e < E:
                    gate_F, up_F = F.linear(x_D, self.gate_up_proj[e]).chunk(2)
                    out_D.add_(F.linear(F.silu(gate_F) * up_F, self.down_proj[e]), alpha=w)
        return out_TD

    def _reduced(self, x_TD: Tensor, ids_TK: Tensor, weights_TK: Tensor) -> Tensor:
        """The FFN slots through the compiled `reduce_experts` (inference-only, like `_looped`, which it falls back
        to, with a warning, if the compile fails)."""
        if self._needs_grad(x_TD, weights_TK):
            raise RuntimeError("Experts.impl='reduced' is inference-only; run it under torch.no_grad()")
        E = self.gate_up_proj.shape[0]
        tok_S, slot_S = (ids_TK < E).nonzero(as_tuple=True)  # the FFN slots; zero-computation ones cost nothing
        if len(tok_S) == 0:
            return torch.zeros_like(x_TD)
        args = (x_TD, tok_S, ids_TK[tok_S, slot_S], weights_TK[tok_S, slot_S].to(x_TD.dtype), self.gate_up_proj,
                self.down_proj)
        fn = _compiled_reduce()
        if fn is None:
            return self._looped(x_TD, ids_TK, weights_TK)
        if "ok" in _REDUCE:
            return fn(*args)
        try:  # the first call compiles: a machine without a C++ compiler falls back to the looped path
            out = fn(*args)
        except Exception as exc:  # noqa: BLE001 - any compile failure: keep serving, slower
            _REDUCE["failed"] = f"{type(exc).__name__}: {exc}"
            warnings.warn(f"densa: compiling the MoE decode kernel failed ({_REDUCE['failed'][:200]}); "
                          "falling back to one matmul per expert", stacklevel=2)
            return self._looped(x_TD, ids_TK, weights_TK)
        _REDUCE["ok"] = True
        return out

    def _gathered(self, x_TD: Tensor, ids_TK: Tensor, weights_TK: Tensor) -> Tensor:
        """The small-batch path: only the chosen FFN experts' weights are read, in one batched matmul each."""
        T, E = x_TD.shape[0], self.gate_up_proj.shape[0]
        if torch.compiler.is_compiling():
            return self._gathered_static(x_TD, ids_TK, weights_TK)
        tok_S, slot_S = (ids_TK < E).nonzero(as_tuple=True)  # the FFN slots; zero-computation ones are dropped here
        if len(tok_S) == 0:
            return torch.zeros_like(x_TD) + 0 * (self.gate_up_proj.sum() + self.down_proj.sum())  # as in forward
        ids_S = ids_TK[tok_S, slot_S]
        # row vector @ transposed weight (S, 1, D) @ (S, D, 2F): F.linear's layout. The column form W @ x measured
        # 7-10x slower on CPU (a batched gemv path), hence this orientation.
        x_S1D = x_TD.index_select(0, tok_S)[:, None, :]
        gate_S1F, up_S1F = torch.bmm(x_S1D, self.gate_up_proj.index_select(0, ids_S).transpose(1, 2)).chunk(2, -1)
        y_SD = torch.bmm(F.silu(gate_S1F) * up_S1F, self.down_proj.index_select(0, ids_S).transpose(1, 2))[:, 0]
        # combine: out_t = Σ_s [tok_s = t] w_s y_s as a (T, S) @ (S, D) matmul (the gate weights ride along)
        w_S = weights_TK[tok_S, slot_S].to(x_TD.dtype)
        combine_TS = (tok_S[None, :] == torch.arange(T, device=x_TD.device)[:, None]).to(x_TD.dtype) * w_S
        return combine_TS @ y_SD

    def _gathered_static(self, x_TD: Tensor, ids_TK: Tensor, weights_TK: Tensor) -> Tensor:
        """`_gathered` with fixed shapes, for torch.compile: every one of the T·K slots runs, a zero-computation slot
        on expert 0 with weight 0. `nonzero` would make the number of FFN slots data-dependent: a graph break in
        every MoE layer and a recompilation per count, which cost more than the at most K − (FFN slots) extra
        expert passes of a decoding step (docs/benchmarks.md, "Compiled decoding")."""
        T, K, E = *ids_TK.shape, self.gate_up_proj.shape[0]
        ffn_TK = ids_TK < E
        ids_S = torch.where(ffn_TK, ids_TK, 0).flatten()  # S = T·K
        w_S = (weights_TK * ffn_TK).flatten().to(x_TD.dtype)
        x_S1D = x_TD.repeat_interleave(K, dim=0)[:, None, :]
        gate_S1F, up_S1F = torch.bmm(x_S1D, self.gate_up_proj.index_select(0, ids_S).transpose(1, 2)).chunk(2, -1)
        y_SD = torch.bmm(F.silu(gate_S1F) * up_S1F, self.down_proj.index_select(0, ids_S).transpose(1, 2))[:, 0]
        return (w_S[:, None] * y_SD).view(T, K, -1).sum(1)

    def uses_grouped_mm(self, x_SD: Tensor) -> bool:
        """`torch._grouped_mm` when available and safe: on CPU (kernel since torch 2.9) with 16-byte-aligned strides
        and pointers (else "strides should be multiple of 16 bytes"; transformers PR #46743), on CUDA in bf16."""
        if self.impl != "auto":
            return self.impl == "grouped_mm"
        if not hasattr(torch, "_grouped_mm") or x_SD.device.type not in ("cpu", "cuda"):
            return False
        if x_SD.dtype != torch.bfloat16 and (x_SD.device.type == "cuda" or torch.compiler.is_compiling()):
            # the CUDA fast path is bf16 (SM90), and so is the op's fake-tensor (meta) rule that torch.compile
            # traces with (torch 2.13 rejects fp32 there); other cases take the split loop
            return False
        size = x_SD.element_size()
        aligned = all(n * size % 16 == 0 for n in self.down_proj.shape[1:])
        return aligned and all(t.data_ptr() % 16 == 0 for t in (x_SD, self.gate_up_proj, self.down_proj))

    def _grouped_mm(self, x_SD: Tensor, w_S1: Tensor, counts_E: Tensor) -> Tensor:
        offs_E = counts_E.cumsum(0).to(torch.int32)  # end row of each expert's group
        gate, up = torch._grouped_mm(x_SD, self.gate_up_proj.transpose(-2, -1), offs=offs_E).chunk(2, dim=-1)
        # the gate weight scales the F-wide activation rather than the D-wide output: same maths, fewer multiplies
        return torch._grouped_mm(F.silu(gate) * up * w_S1, self.down_proj.transpose(-2, -1), offs=offs_E)

    def _split(self, x_SD: Tensor, w_S1: Tensor, counts_E: Tensor) -> Tensor:
        # unbind, never self.gate_up_proj[e] in the loop: autograd would build a full-size zero gradient per expert
        # (16-18 s against under 1 s; docs/design-notes.md, 'Expert dispatch without per-expert indexing')
        sizes = counts_E.tolist()
        ys = []
        for x_nD, w_n1, gate_up_2FD, down_DF in zip(x_SD.split(sizes), w_S1.split(sizes),
                                                      self.gate_up_proj.unbind(0), self.down_proj.unbind(0),
                                                      strict=True):
            if len(x_nD):
                gate, up = F.linear(x_nD, gate_up_2FD).chunk(2, dim=-1)
                ys.append(F.linear(F.silu(gate) * up * w_n1, down_DF))
        return torch.cat(ys)


def expert_load(ids_TK: Tensor, num_experts: int) -> tuple[Tensor, Tensor]:
    """(tokens per FFN expert (E,) in fp64, maxvio = (max − mean) / mean load) of one forward's routing."""
    counts_E = torch.bincount(ids_TK.flatten(), minlength=num_experts)[:num_experts].double()
    return counts_E, (counts_E.max() - counts_E.mean()) / counts_E.mean().clamp_min(1e-9)


@dataclass
class Routed:
    """What one MoE forward routed; it travels up through the block into `ModelOutput` (never kept on the module)."""

    ffn_experts_BL: Tensor  # (B, L) FFN experts each token used (identity/null slots excluded)
    ids_TK: Tensor  # the slots' expert ids, for the metrics
    num_experts: int
    aux_loss: Tensor | None = None  # the weighted router losses, training mode only
    _metrics: dict[str, Tensor] | None = None

    @property
    def metrics(self) -> dict[str, Tensor]:
        """mean_ffn_experts, all_null_rate, maxvio_batch (+ the router losses in training), computed on first use:
        a decoding step reads only `ffn_experts_BL`, and these few ops per layer were a tenth of its MoE time."""
        if self._metrics is None:
            with torch.no_grad():
                self.set_metrics(expert_load(self.ids_TK, self.num_experts)[1])
        return self._metrics

    def set_metrics(self, maxvio: Tensor) -> None:
        """The batch metrics from this forward's maxvio (training computes it anyway for the step's statistics)."""
        ffn_T = self.ffn_experts_BL.flatten()
        self._metrics = {"mean_ffn_experts": ffn_T.float().mean(), "all_null_rate": (ffn_T == 0).float().mean(),
                         "maxvio_batch": maxvio.float()}


class MoE(nn.Module):
    """The MoE FFN of one block (ffn="moe": BudgetRouter; ffn="topk_moe": SoftmaxTopKRouter). Module names follow
    transformers' MixtralSparseMoeBlock (`gate`, `experts`) and Qwen2-MoE (`shared_expert`, `shared_expert_gate`)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        E, D, F_ = cfg.num_experts, cfg.hidden_size, cfg.expert_intermediate_size
        dynamic = cfg.ffn == "moe"
        self.num_experts, self.top_k = E, cfg.num_experts_per_tok
        self.num_null = cfg.num_null_experts if dynamic else 0
        self.num_identity = cfg.num_identity_experts if dynamic else 0
        self.active_experts = cfg.target_active_experts if dynamic else cfg.num_experts_per_tok
        self.gate: BudgetRouter | SoftmaxTopKRouter = BudgetRouter(cfg) if dynamic else SoftmaxTopKRouter(cfg)
        self.experts = Experts(E, D, F_)
        self.shared_expert = SwiGLU(D, F_) if cfg.shared_expert else None
        self.shared_expert_gate = nn.Linear(D, 1, bias=False) if cfg.shared_expert else None
        self.cfg = cfg  # FLOPs of a routing outcome: densa.counting.ffn_flops_per_token(cfg, experts)
        # the step's load statistics: a plain attribute, not a buffer, because DDP's broadcast_buffers would replace
        # every rank's counts with rank 0's before each forward
        self._stats: Tensor | None = None
        self.std = cfg.initializer_range
        self.down_std = cfg.initializer_range / math.sqrt(2 * cfg.num_hidden_layers)  # as DensaModel's down_proj
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Router and experts ~ N(0, initializer_range), down_proj depth-scaled as in DensaModel; routing biases 0.
        (The shared expert is nn.Linear, which DensaModel.init_weights initialises.)"""
        nn.init.normal_(self.gate.weight, 0.0, self.std)
        nn.init.normal_(self.experts.gate_up_proj, 0.0, self.std)
        nn.init.normal_(self.experts.down_proj, 0.0, self.down_std)
        for buffer in self.gate.buffers():
            buffer.zero_()

    def forward(self, x_BLD: Tensor, return_routing: bool = False) -> Tensor | tuple[Tensor, Routed]:
        """(B, L, D) -> (B, L, D); with `return_routing`, also what was routed (a `Routed`), which the blocks pass
        up into `ModelOutput` — routing never lives on the module between calls."""
        B, L, D = x_BLD.shape
        x_TD = x_BLD.reshape(B * L, D)
        r = self.gate(x_TD)
        out_TD = self.experts(x_TD, r.ids_TK, r.weights_TK)
        if self.num_identity:
            identity_T = (r.weights_TK * (r.ids_TK >= self.num_experts + self.num_null)).sum(-1)
            out_TD = out_TD + identity_T.to(x_TD.dtype)[:, None] * x_TD
        if self.shared_expert is not None:
            out_TD = out_TD + torch.sigmoid(self.shared_expert_gate(x_TD)) * self.shared_expert(x_TD)
        routed = self._record(r, B, L)
        out_BLD = out_TD.view(B, L, D)
        return (out_BLD, routed) if return_routing else out_BLD

    def _record(self, r: Routing, B: int, L: int) -> Routed:
        E, K = self.num_experts, self.top_k
        ffn_T = (r.ids_TK < E).sum(-1).detach()
        routed = Routed(ffn_experts_BL=ffn_T.view(B, L), ids_TK=r.ids_TK.detach(), num_experts=E)
        if not self.training:
            return routed
        with torch.no_grad():
            counts_E, maxvio = expert_load(r.ids_TK, E)
            routed.set_metrics(maxvio)
        losses = self.gate.losses(r, B)
        routed.metrics.update({name: value.detach() for name, (_, value) in losses.items()})
        routed.aux_loss = sum(coef * value for coef, value in losses.values())
        with torch.no_grad():
            probs_TX = r.scores_TX / r.scores_TX.sum(-1, keepdim=True)
            entropy = torch.special.entr(probs_TX).sum() / math.log(probs_TX.shape[-1])
            z_sum = routed.metrics["z_loss"] * len(ffn_T)  # Σ_t logsumexp(logits_t)^2
            hist_K1 = torch.bincount(ffn_T, minlength=K + 1).double()
            # layout: counts_E | hist_K1 (tokens using 0..K FFN experts) | Σ maxvio_batch, forwards, Σ entropy, Σ lse²
            stats = torch.cat([counts_E, hist_K1, torch.stack([maxvio, maxvio.new_ones(()), entropy.double(),
                                                               z_sum.double()])])
        self._stats = stats if self._stats is None else self._stats + stats
        return routed

    @torch.no_grad()
    def update_routing(self, where: str = "moe") -> dict[str, float | list[float]]:
        """Once per optimizer step, on every rank: all-reduce the step's load statistics (the global batch), apply
        the router's bias updates, reset the statistics and return the monitoring dict (empty if no token was
        routed in training mode since the last call)."""
        E, K = self.num_experts, self.top_k
        stats = self._stats
        if stats is None:  # still take part in the all-reduce, so ranks stay in step
            stats = torch.zeros(E + K + 5, dtype=torch.float64, device=self.gate.weight.device)
        self._stats = None
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(stats)  # global-batch load (Qiu et al., arXiv 2501.11873)
        counts_E, hist_K1 = stats[:E], stats[E : E + K + 1]
        maxvio_sum, forwards, entropy_sum, z_sum = stats[E + K + 1 :].tolist()
        tokens = float(hist_K1.sum())
        if tokens == 0:
            return {}
        metrics = self.load_metrics(counts_E, hist_K1)
        metrics.update(maxvio_batch=maxvio_sum / forwards, router_entropy=entropy_sum / tokens,
                       router_z=math.sqrt(z_sum / tokens))  # RMS of the logits' logsumexp
        metrics.update(self.gate.update(counts_E, metrics["mean_ffn_experts"], where))
        return metrics

    def load_metrics(self, counts_E: Tensor, hist_K1: Tensor) -> dict[str, float | list[float]]:
        """Balance and compute metrics from per-expert load and the histogram of FFN experts per token."""
        E, K = self.num_experts, self.top_k
        counts_E, hist_K1 = counts_E.double(), hist_K1.double()
        tokens, mean = hist_K1.sum(), counts_E.mean().clamp_min(1e-9)
        cdf_K1 = hist_K1.cumsum(0) / tokens
        mean_ffn = float((hist_K1 * torch.arange(K + 1, device=hist_K1.device)).sum() / tokens)
        share_E = counts_E / counts_E.sum().clamp_min(1e-9)
        flops = ffn_flops_per_token(self.cfg, mean_ffn)
        topk_flops = ffn_flops_per_token(self.cfg, K)
        return {
            "tokens_per_expert": counts_E.tolist(),
            "load_cv": float(counts_E.std(correction=0) / mean),
            "maxvio_global": float((counts_E.max() - mean) / mean),  # Loss-Free Balancing, arXiv 2408.15664
            "load_entropy": float(torch.special.entr(share_E).sum() / math.log(E)) if E > 1 else 1.0,
            "dead_experts": float((counts_E < mean / 10).sum()),  # load below 1/(10E) of the slots
            "mean_ffn_experts": mean_ffn,
            **{f"p{p}_ffn_experts": float((cdf_K1 < p / 100 - 1e-9).sum()) for p in (10, 50, 90)},
            "all_null_rate": float(hist_K1[0] / tokens),
            "flops_per_token": flops,  # routed experts + router + shared expert, forward
            "topk_flops_per_token": topk_flops,  # the same layer with all K slots on FFN experts
            "flops_fraction": flops / topk_flops,
        }

    def inactive_parameters(self) -> int:
        """Expert parameters a token leaves untouched on average (the budget target, or K, experts are active)."""
        per_expert = self.experts.gate_up_proj[0].numel() + self.experts.down_proj[0].numel()
        return round((self.num_experts - self.active_experts) * per_expert)

"""The training loop's torch.distributed plumbing: one process, DDP or FSDP2 under torchrun, CPU (gloo) or CUDA (nccl).

Why it looks like this (docs/training.md, 'Distributed: torchrun, DDP and FSDP2'; docs/design-notes.md,
'Distributed pitfalls'):
- torchrun sets RANK / WORLD_SIZE / LOCAL_RANK; `setup` initialises the process group from them. Without torchrun a
  recipe that asks for ddp or fsdp2 simply trains in one process, so the same recipe runs everywhere.
- `train.batch_size` is the *global* micro-batch. Rank r trains rows [r·B/W, (r+1)·B/W) of exactly the batch one
  process would train (densa/data/pretrain.py), every row has the same number of tokens, and DDP / FSDP2 average the
  gradients over ranks, so W processes compute the same mean loss and gradient as one process, up to float rounding.
- DDP with `forward_sync_buffers=False`: the only buffers that change are the MoE routing biases, which
  `model.update_routing()` updates identically on every rank from all-reduced routing counts. Broadcasting rank 0's
  copy each forward would hide a drift; tests/test_distributed.py checks instead that the ranks agree.
- FSDP2: `fully_shard` every block, then the root, on an explicit 1-D device mesh (without it a gloo
  group on a GPU machine moves parameters to CUDA). The MoE experts are fused 3-D parameters: every rank that routes
  any token gets a gradient for the whole tensor (zeros for the experts it did not use), so reduce-scatter sums the
  same tensors on every rank however routing diverges (per-expert modules give silently wrong gradients on gloo).
- Checkpoints stay in the single-process format: full (unsharded) model and optimizer state dicts from
  `torch.distributed.checkpoint.state_dict`, written by rank 0 alone. Optimizer states are keyed by parameter name,
  not position, so a checkpoint written by W processes loads into any other number of processes.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Literal

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.tensor import DTensor

from densa.model.model import DensaModel
from densa.train.state import load_training_checkpoint

Mode = Literal["auto", "none", "ddp", "fsdp2"]
FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)  # gathered, on CPU (rank 0's copy for FSDP2)


@dataclass(frozen=True)
class Dist:
    """Where this process stands: the wrapping in use, its rank among `world_size`, and its device."""

    mode: Literal["none", "ddp", "fsdp2"] = "none"
    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        """Rank 0 alone writes run.json, metrics, TensorBoard events and checkpoints, and shows the progress bar."""
        return self.rank == 0

    @property
    def active(self) -> bool:
        """Inside a process group: every rank must take part in every collective, so no rank may skip work."""
        return self.world_size > 1 or self.mode != "none"


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def setup(mode: Mode = "auto") -> Dist:
    """Initialise torch.distributed when torchrun launched this process (once; a second call reuses the group) and
    say how to train. auto = ddp with more than one process, else none. Backend nccl on CUDA, gloo on CPU."""
    if mode not in ("auto", "none", "ddp", "fsdp2"):
        raise ValueError(f"train.distributed={mode!r}: choose from auto, none, ddp, fsdp2")
    if not launched_by_torchrun() and not dist.is_initialized():
        return Dist()  # one process: ddp / fsdp2 recipes run unwrapped
    world = int(os.environ.get("WORLD_SIZE", "1")) if not dist.is_initialized() else dist.get_world_size()
    if mode == "none" and world > 1:
        raise ValueError(f"train.distributed=none but torchrun started {world} processes; use ddp or fsdp2 "
                         "(or auto), or launch one process")
    cuda = torch.cuda.is_available()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(minutes=30))
    chosen = ("ddp" if world > 1 else "none") if mode == "auto" else mode
    return Dist(chosen, dist.get_rank(), world, device)


def shutdown() -> None:
    """Destroy the process group, if any (the command's last act)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def wrap(model: DensaModel, ctx: Dist) -> nn.Module:
    """The module to call for training forwards. DDP wraps `model`; FSDP2 shards `model` in place and returns it
    (always call the root: a child called directly skips the root's all-gather). Build the optimizers
    after this, over `model.parameters()` (FSDP2 replaces them with DTensors)."""
    model.to(ctx.device)
    if ctx.mode == "ddp":
        device_ids = [ctx.device.index] if ctx.device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(model, device_ids=device_ids, forward_sync_buffers=False)
    if ctx.mode == "fsdp2":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh(ctx.device.type, (ctx.world_size,))
        for block in model.layers:
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)  # embedding, final norm and (tied) head
    return model


def set_grad_sync(wrapped: nn.Module, sync: bool) -> None:
    """Reduce gradients over ranks in this micro-batch's backward (the last of the step) or only accumulate them
    locally (the others). Call before the micro-batch's forward: DDP decides at forward time."""
    if isinstance(wrapped, nn.parallel.DistributedDataParallel):
        wrapped.require_backward_grad_sync = sync
    elif hasattr(wrapped, "set_requires_gradient_sync"):  # an FSDP2 module
        wrapped.set_requires_gradient_sync(sync)


def reshard(model: nn.Module) -> None:
    """After forwards without a backward (evaluation): FSDP2 leaves the root's parameters unsharded until the next
    backward, and while they are, `model.parameters()` returns the unsharded tensors rather than the sharded ones
    the optimizer holds (state dicts then fail with KeyError). Reshard them; elsewhere a no-op."""
    if hasattr(model, "reshard") and hasattr(model, "set_requires_gradient_sync"):  # an FSDP2 module
        model.reshard()


def all_reduce_sum(values: list[float], ctx: Dist) -> list[float]:
    """Sum `values` over ranks (one collective; float64 so counts stay exact)."""
    if ctx.world_size == 1:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=ctx.device)
    dist.all_reduce(t)
    return t.tolist()


def clip_grad_norm(params: list[Tensor], max_norm: float) -> float:
    """Clip the global gradient norm and return it (before clipping). On FSDP2's DTensor gradients the norm is
    already global (the sharded norms are reduced); under DDP every rank holds the averaged gradient."""
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    if isinstance(norm, DTensor):
        norm = norm.full_tensor()
    return norm.item()


def saveable_model(model: DensaModel, ctx: Dist) -> DensaModel | None:
    """A plain (unsharded, CPU) DensaModel holding `model`'s weights for rank 0 to save; None on other ranks.
    Under FSDP2 this gathers every parameter (a collective: call it on every rank)."""
    if ctx.mode != "fsdp2":
        return model if ctx.is_main else None
    state = get_model_state_dict(model, options=FULL)  # full tensors on rank 0, {} elsewhere
    if not ctx.is_main:
        return None
    with torch.device("meta"):
        plain = DensaModel(model.config)
    plain.load_state_dict(state, assign=True)
    if model.config.tie_word_embeddings:
        plain.lm_head.weight = plain.embed_tokens.weight
    return plain


def optimizer_states(model: DensaModel, optimizers: list[torch.optim.Optimizer]) -> list[dict]:
    """Full optimizer state dicts keyed by parameter name (collective under FSDP2), one per optimizer."""
    return [get_optimizer_state_dict(model, opt, options=FULL) for opt in optimizers]


def load_checkpoint(path: Path, model: DensaModel, ctx: Dist) -> dict:
    """Load checkpoint `path`'s weights into `model` (sharding them under FSDP2) and return its training state."""
    if ctx.mode != "fsdp2":
        return load_training_checkpoint(path, model)
    plain = DensaModel(model.config)  # full weights on CPU; every rank slices out its own shard
    state = load_training_checkpoint(path, plain)
    set_model_state_dict(model, plain.state_dict(), options=StateDictOptions(full_state_dict=True))
    return state


def load_optimizer_states(model: DensaModel, optimizers: list[torch.optim.Optimizer], states: list[dict]) -> None:
    """Restore optimizer states saved by `optimizer_states` with any number of processes (resharded as needed)."""
    if len(states) != len(optimizers):
        raise ValueError(f"the checkpoint holds {len(states)} optimizer state(s) but this run has {len(optimizers)}; "
                         "resume with the optimizer setting the run was started with")
    for opt, state in zip(optimizers, states, strict=True):
        if all(isinstance(i, int) for group in state["param_groups"] for i in group["params"]):
            opt.load_state_dict(state)  # written before checkpoints keyed parameters by name: one process only
            continue
        set_optimizer_state_dict(model, opt, state, options=StateDictOptions(full_state_dict=True))


def barrier(ctx: Dist) -> None:
    if ctx.world_size > 1:
        dist.barrier()

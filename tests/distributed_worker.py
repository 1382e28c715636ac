"""One rank of tests/test_distributed.py's 2-process gloo session (launched with torchrun; not a test module itself).

    python tests/distributed_worker.py DATA ROOT          # forks 2 ranks with torchrun's environment variables
    python -m torch.distributed.run --standalone --nproc-per-node 2 tests/distributed_worker.py DATA ROOT

Runs, in one process group: short trainings of the tiny dense and MoE presets under DDP and FSDP2, a resume of a
1-process checkpoint (ROOT/single-tiny-cut) under FSDP2, the expert-gradient checks (docs/design-notes.md,
'Distributed pitfalls': rank-divergent routing), and last `densa train` itself (ROOT/cli-fsdp2). Rank 0 writes
ROOT/distributed.json, which the tests read.
"""

import copy
import json
import os
import socket
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.nn.parallel import DistributedDataParallel

from densa.cli import main as cli_main
from densa.config import from_preset
from densa.model.model import DensaModel
from densa.model.moe import MoE
from densa.train import distributed
from densa.train.config import TrainConfig
from densa.train.loop import train

torch.set_num_threads(1)
# the bare MoE of the gradient check returns a view; nothing here changes it in place
# (docs/design-notes.md, 'Distributed pitfalls': views)
warnings.filterwarnings("ignore", message="FSDP2-wrapped module .FSDPMoE. returned a view")
PEAK = 1e11
# name -> (preset, ModelConfig overrides); a fixed budget bias isolates the one MoE update that is per-rank
VARIANTS = {"tiny": ("tiny", {}), "tiny-moe": ("tiny-moe", {}),
            "tiny-moe-fixed-budget": ("tiny-moe", {"budget_update_rate": 0.0})}


def config(data: str, **changes) -> TrainConfig:
    """Must match tests/test_distributed.py's single-process runs."""
    base = dict(data=data, batch_size=4, context=32, steps=4, warmup_steps=2, log_interval=1, eval_interval=2,
                eval_batches=1, checkpoint_interval=2, keep_last=5, tensorboard=False)
    return TrainConfig(**{**base, **changes})


def routing_state(model: DensaModel) -> list[list[float]]:
    """Every MoE layer's balance and budget biases (must be identical on all ranks)."""
    return [layer.mlp.gate.expert_bias.tolist() + [float(layer.mlp.gate.zc_bias)]
            for layer in model.layers if isinstance(layer.mlp, MoE)]


def gathered(value):
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, value)
    return out


def full_grad(p: torch.Tensor) -> torch.Tensor:
    g = p.grad
    return g.full_tensor() if hasattr(g, "full_tensor") else g


def grad_check(mode: str, ctx: distributed.Dist, reference: torch.nn.Module, global_x: torch.Tensor, loss_fn) -> dict:
    """Gradients of `reference` on the whole global batch (this process alone) against a DDP / FSDP2 copy that sees
    only this rank's rows; max |Δ| over all parameters and over the fused expert weights, plus per-rank usage."""
    model = copy.deepcopy(reference)
    loss_fn(reference, global_x).backward()
    if isinstance(model, DensaModel):
        wrapped = distributed.wrap(model, distributed.Dist(mode, ctx.rank, ctx.world_size, ctx.device))
    elif mode == "ddp":
        wrapped = DistributedDataParallel(model, forward_sync_buffers=False)
    else:
        wrapped = fully_shard(model, mesh=init_device_mesh("cpu", (ctx.world_size,)))
    rows = global_x.tensor_split(ctx.world_size)[ctx.rank]
    loss_fn(wrapped, rows).backward()
    usage = [m._stats[: m.num_experts].tolist() for m in model.modules() if isinstance(m, MoE)]
    worst, worst_expert, grad_scale = 0.0, 0.0, 0.0
    for (name, p), q in zip(reference.named_parameters(), model.parameters(), strict=True):
        diff = (full_grad(q) - p.grad).abs().max().item()
        worst = max(worst, diff)
        if "experts." in name:
            worst_expert = max(worst_expert, diff)
            grad_scale = max(grad_scale, p.grad.abs().max().item())
    return {"max_abs_diff": worst, "max_abs_diff_experts": worst_expert, "expert_grad_max": grad_scale,
            "usage_per_rank": gathered(usage)}


def lm_loss(model, ids):
    return model(ids, labels=ids).loss


def moe_loss(moe, x):
    out, routed = moe(x, return_routing=True)  # the router losses travel with the output (training mode)
    return out.square().mean() + routed.aux_loss


def split_routing_moe() -> tuple[MoE, torch.Tensor]:
    """A tiny-moe FFN and a global batch whose first half routes only to FFN experts and second half only to
    zero-computation experts: with 2 ranks, rank 1 computes no expert at all (the most divergent routing)."""
    cfg = from_preset("tiny-moe", max_all_null_rate=1.0)
    torch.manual_seed(1)
    moe = MoE(cfg).train()
    E, D = cfg.num_experts, cfg.hidden_size
    with torch.no_grad():
        moe.gate.weight[:E, 0] = -1.0  # feature 0 > 0 pushes tokens to the ZC experts, < 0 to the FFN experts
        moe.gate.weight[E:, 0] = 1.0
    x = torch.randn(4, 8, D)
    x[:2, :, 0], x[2:, :, 0] = -20.0, 20.0
    return moe, x


def main(data: str, root: Path) -> None:
    started = time.perf_counter()
    ctx = distributed.setup("ddp")
    results: dict = {"world_size": ctx.world_size, "runs": {}, "grads": {}}
    for mode in ("ddp", "fsdp2"):
        for name, (preset, overrides) in VARIANTS.items():
            torch.manual_seed(0)
            model = DensaModel(from_preset(preset, vocab_size=300, **overrides))
            run = root / f"{mode}-{name}"
            res = train(model.config, config(data, distributed=mode), run, progress=False, peak=PEAK, model=model)
            results["runs"][f"{mode}-{name}"] = {"losses": res.losses, "val_loss": res.val_loss,
                                                   "routing_per_rank": gathered(routing_state(model))}
    # a NaN loss on rank 1 alone in step 2: both ranks must skip that step (and neither may hang)
    torch.manual_seed(0)
    model = DensaModel(from_preset("tiny", vocab_size=300))
    calls = {"n": 0}

    def poison(module, args, output):
        calls["n"] += module.training
        if module.training and ctx.rank == 1 and calls["n"] == 2:
            output.loss = output.loss * float("nan")
        return output
    model.register_forward_hook(poison)
    res = train(model.config, config(data, distributed="fsdp2", steps=3, checkpoint_interval=3), root / "fsdp2-nan",
                progress=False, peak=PEAK, model=model)
    results["runs"]["fsdp2-nan-on-rank-1"] = {"losses_per_rank": gathered([str(x) for x in res.losses]),
                                              "skipped_per_rank": gathered(res.skipped_steps)}
    res = train(from_preset("tiny", vocab_size=300), config(data, distributed="fsdp2"), root / "single-tiny-cut",
                resume=True, progress=False, peak=PEAK)
    results["runs"]["fsdp2-resumed-from-1-process"] = {"losses": res.losses}

    for mode in ("ddp", "fsdp2"):
        torch.manual_seed(0)
        model = DensaModel(from_preset("tiny-moe", vocab_size=300)).train()
        ids = torch.randint(0, 300, (4, 33), generator=torch.Generator().manual_seed(2))
        results["grads"][f"{mode}-model"] = grad_check(mode, ctx, model, ids, lm_loss)
        moe, x = split_routing_moe()
        results["grads"][f"{mode}-split-routing-moe"] = grad_check(mode, ctx, moe, x, moe_loss)
    results["seconds"] = time.perf_counter() - started
    if ctx.is_main:
        (root / "distributed.json").write_text(json.dumps(results, indent=1))
    # last: the command line under torchrun (it destroys the process group when done)
    recipe = Path(__file__).parents[1] / "recipes" / "tiny-train.yaml"
    cli_main(["train", "--config", str(recipe), "--out", str(root / "cli-fsdp2"), "--no-progress",
              "--set", f"train.data={data}", "--set", "model.vocab_size=300", "--set", "train.steps=2",
              "--set", "train.context=32", "--set", "train.distributed=fsdp2", "--set", "train.tensorboard=false"])


def _rank(rank: int, world: int, port: int, data: str, root: Path) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))  # what torchrun sets
    main(data, root)


def launch(data: str, root: Path, world: int = 2) -> None:
    """Start `world` ranks by forking this process: they inherit its imports, which saves the ~10 s per fresh
    interpreter that torchrun would spend importing torch and densa on a loaded 2-core machine."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_rank, args=(world, port, data, root), nprocs=world, start_method="fork")


if __name__ == "__main__":
    if distributed.launched_by_torchrun():
        main(sys.argv[1], Path(sys.argv[2]))
    else:
        launch(sys.argv[1], Path(sys.argv[2]))

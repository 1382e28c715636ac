"""The training loop: one process, or DDP / FSDP2 under torchrun (densa/train/distributed.py, training.md §4).

One optimizer step: for each of `grad_accum` micro-batches, forward (bf16 autocast optional) and backward of
loss / grad_accum; clip the global gradient norm; step the optimizers; `model.update_routing()` (MoE budget controller
and balance bias; a no-op for dense models). A NaN/inf loss or gradient norm skips the step (counted); `max_nan_steps`
of them in a row stop the run with the last good checkpoint kept. Everything is seeded: the same recipe gives the same
losses, and a resumed run continues exactly where the checkpoint left off.

Under torchrun every rank runs this same loop on its rows of each global batch (`batch_size` is global); the logged
loss is all-reduced over the ranks, NaN skipping is agreed by all of them, and rank 0 alone writes files.

Files under the run folder: `run.json` (the model and train configs), `metrics.jsonl` (one JSON record per line, see
docs/training.md) and `checkpoints/` (densa/train/state.py).
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor
from tqdm import tqdm

from densa.config import ModelConfig
from densa.counting import flops_per_token
from densa.data.prepare import load_manifest
from densa.data.pretrain import PretrainLoader, eval_batches
from densa.data.reference import reference_cost
from densa.model.model import DensaModel
from densa.train import distributed
from densa.train.config import TrainConfig
from densa.train.optim import build_optimizers, lr_multiplier, set_lr
from densa.train.peak import peak_flops
from densa.train.selection import rho1_objective
from densa.train.state import (
    latest_checkpoint,
    rng_state,
    save_training_checkpoint,
    set_rng_state,
)
from densa.train.tensorboard import TensorBoardLog

METRICS = "metrics.jsonl"


@dataclass
class TrainResult:
    run_dir: Path
    step: int  # optimizer steps done (in total, across resumes)
    losses: list[float] = field(default_factory=list)  # training loss of each step this call ran (nan if skipped)
    val_loss: float | None = None  # last validation cross-entropy (nats/token)
    val_bpb: float | None = None  # last validation bits per byte
    tokens_per_s: float = 0.0  # training throughput of this call
    mfu: float = 0.0  # against the measured matmul peak
    skipped_steps: int = 0
    checkpoint: Path | None = None
    flops: float = 0.0  # total so far: training FLOPs (3x forward per token) + the reference model's cost


def check_writable(out: Path) -> None:
    """Fail before any work if `out` cannot be created or written."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out, prefix=".write-test."):
            pass
    except OSError as exc:
        raise OSError(f"--out {out}: cannot write there ({exc.strerror or exc})") from None


@torch.no_grad()
def evaluate(model: DensaModel, batches: list[Tensor], bf16: bool,
             ctx: distributed.Dist | None = None) -> tuple[float, int]:
    """Mean next-token cross-entropy over `batches` (eval mode) and the number of predicted tokens. Under
    torch.distributed each rank evaluates its share of every batch's rows (all of them when the batch has fewer rows
    than there are ranks, counted once in all) and the sums are all-reduced: the single-process figure."""
    ctx = ctx or distributed.Dist()
    model.eval()
    total, n = 0.0, 0.0
    for batch in batches:  # (B, T+1)
        share = 1.0
        if ctx.world_size > 1 and len(batch) >= ctx.world_size:
            batch = batch.tensor_split(ctx.world_size)[ctx.rank]
        elif ctx.world_size > 1:
            share = 1 / ctx.world_size
        batch = batch.to(ctx.device)
        with torch.autocast(ctx.device.type, torch.bfloat16, enabled=bf16):
            out = model(batch, labels=batch)
        k = (batch.numel() - batch.shape[0]) * share
        total += out.aux["ce_loss"].item() * k
        n += k
    total, n = distributed.all_reduce_sum([total, n], ctx)
    distributed.reshard(model)
    model.train()
    return total / n, round(n)


def _trim_metrics(path: Path, step: int) -> None:
    """On resume, drop records past the checkpoint's step (the interrupted run's tail is redone)."""
    if path.is_file():
        kept = [line for line in path.read_text().splitlines() if line and json.loads(line).get("step", 0) <= step]
        path.write_text("".join(line + "\n" for line in kept))


def _plain(value):
    return value.tolist() if isinstance(value, Tensor) else value


def train(model_cfg: ModelConfig, cfg: TrainConfig, out: str | Path, resume: bool = False, progress: bool = True,
          model: DensaModel | None = None, peak: float | None = None) -> TrainResult:
    """Train `model_cfg` (or the given `model`) as `cfg` says, writing into `out`."""
    out = Path(out)
    check_writable(out)
    checkpoints = out / "checkpoints"
    previous = latest_checkpoint(checkpoints)
    if previous is not None and not resume:
        raise FileExistsError(f"{out} already holds checkpoints (latest {previous.name}); pass --resume to continue "
                              "that run or choose another --out")
    if resume and previous is None:
        raise FileNotFoundError(f"--resume: {checkpoints} holds no complete checkpoint to resume from")
    manifest = load_manifest(cfg.data)
    if manifest["vocab_size"] > model_cfg.vocab_size:
        raise ValueError(f"{cfg.data} was tokenized with {manifest['vocab_size']} token ids but the model's "
                         f"vocab_size is {model_cfg.vocab_size}; set model.vocab_size >= {manifest['vocab_size']}")
    ctx = distributed.setup(cfg.distributed)  # torchrun: process group, rank, device
    torch.manual_seed(cfg.seed)
    model = model if model is not None else DensaModel(model_cfg)
    model.train()
    wrapped = distributed.wrap(model, ctx)  # what the training forward calls: DDP(model), or model sharded in place
    optimizers = build_optimizers(model, cfg)  # after wrapping: FSDP2 replaced the parameters with DTensors
    loader = PretrainLoader(cfg.data, "train", cfg.batch_size, cfg.context, cfg.seed, cfg.sampling,
                            rank=ctx.rank, world_size=ctx.world_size, reference=cfg.token_selection == "rho1",
                            curriculum=cfg.curriculum, total_batches=cfg.steps * cfg.grad_accum)
    valid = eval_batches(cfg.data, cfg.batch_size, cfg.context, cfg.eval_batches)
    valid_split = manifest["splits"]["valid"]
    tokens_per_byte = valid_split["tokens"] / max(1, valid_split["bytes"])

    step, skipped = 0, 0
    if resume:
        state = distributed.load_checkpoint(previous, model, ctx)
        distributed.load_optimizer_states(model, optimizers, state["optimizers"])
        loader.load_state_dict(state["data"])
        set_rng_state(state["rng"])
        step, skipped = int(state["step"]), int(state["skipped_steps"])
        if ctx.is_main:
            _trim_metrics(out / METRICS, step)
    elif ctx.is_main:
        (out / "run.json").write_text(json.dumps({"model": model_cfg.to_dict(), "train": cfg.to_dict(),
                                                  "world_size": ctx.world_size, "distributed": ctx.mode}, indent=2))

    params = [p for p in model.parameters() if p.requires_grad]
    tokens_per_step = cfg.batch_size * cfg.context * cfg.grad_accum
    flops_per_step = flops_per_token(model_cfg, cfg.context).training * tokens_per_step
    uses_reference = cfg.token_selection != "none" or cfg.curriculum != "none"
    reference_flops = reference_cost(manifest) if uses_reference else 0.0  # charged once, before step 1
    peak = (peak if peak is not None else peak_flops(cfg.bf16)) * ctx.world_size  # each process's device counts
    result = TrainResult(out, step, skipped_steps=skipped, checkpoint=previous)
    consecutive_nan = 0
    start_step, start_time = step, time.perf_counter()
    window_time, window_steps = start_time, 0
    bar = tqdm(total=cfg.steps, initial=step, disable=not (progress and ctx.is_main), unit="step",
               dynamic_ncols=True, leave=True)
    tb = TensorBoardLog.open(out / "tb") if cfg.tensorboard and ctx.is_main else None
    with open(out / METRICS if ctx.is_main else os.devnull, "a") as metrics:

        def record(**fields) -> None:
            plain = {k: _plain(v) for k, v in fields.items()}
            metrics.write(json.dumps(plain) + "\n")
            metrics.flush()
            if tb is not None:
                tb.write(plain)

        while step < cfg.steps:
            multiplier = lr_multiplier(step, cfg)
            set_lr(optimizers, multiplier)
            loss_sum = ce_sum = 0.0
            finite = True
            for micro in range(cfg.grad_accum):
                batch = loader.next_batch().to(ctx.device)  # (B/W, T+1): predict tokens 1..T from 0..T-1
                distributed.set_grad_sync(wrapped, micro == cfg.grad_accum - 1)  # reduce in the last backward
                with torch.autocast(ctx.device.type, torch.bfloat16, enabled=cfg.bf16):
                    output = wrapped(batch, labels=batch)
                if cfg.token_selection == "rho1":  # Rho-1: CE over the top tokens by excess loss replaces CE over all
                    ref_loss = loader.reference_batch(loader.index - 1).to(ctx.device)[:, 1:]  # (B/W, T)
                    output.loss = rho1_objective(output, batch, ref_loss, cfg.select_fraction)
                if not finite or not torch.isfinite(output.loss):
                    finite = False
                    if not ctx.active:
                        continue  # ranks cannot skip: every rank must run every forward and backward (collectives)
                (output.loss / cfg.grad_accum).backward()
                loss_sum += output.loss.item() / cfg.grad_accum
                ce_sum += output.aux["ce_loss"].item() / cfg.grad_accum
            if ctx.active:  # the global batch's loss; a step is skipped on every rank if any rank's loss was not finite
                loss_sum, ce_sum, bad = distributed.all_reduce_sum([loss_sum, ce_sum, float(not finite)], ctx)
                loss_sum, ce_sum, finite = loss_sum / ctx.world_size, ce_sum / ctx.world_size, bad == 0
            grad_norm = float("nan")
            if finite:
                max_norm = cfg.grad_clip if cfg.grad_clip > 0 else float("inf")
                grad_norm = distributed.clip_grad_norm(params, max_norm)
                finite = math.isfinite(grad_norm)
            if finite:
                for opt in optimizers:
                    opt.step()
            for opt in optimizers:
                opt.zero_grad(set_to_none=True)
            routing = model.update_routing()
            step += 1
            window_steps += 1
            bar.update(1)
            if not finite:
                skipped += 1
                consecutive_nan += 1
                result.losses.append(float("nan"))
                record(kind="skip", step=step, skipped_steps=skipped)
                if consecutive_nan >= cfg.max_nan_steps:
                    bar.close()
                    kept = latest_checkpoint(checkpoints)
                    raise RuntimeError(f"loss or gradient was NaN/inf for {consecutive_nan} consecutive steps (up to "
                                       f"step {step}); stopped. Last good checkpoint: "
                                       f"{kept if kept else 'none (no checkpoint was written yet)'}")
                continue
            consecutive_nan = 0
            result.losses.append(loss_sum)
            now = time.perf_counter()
            tokens_per_s = tokens_per_step * step_rate(window_steps, now - window_time)
            mfu = flops_per_step * step_rate(window_steps, now - window_time) / peak
            bar.set_postfix_str(f"loss {ce_sum:.3f} lr {cfg.lr * multiplier:.2e} tok/s {tokens_per_s:,.0f} "
                                f"MFU {mfu:.1%}", refresh=False)
            if step % cfg.log_interval == 0 or step == cfg.steps:
                routing_fields = {f"routing/{k}": v for k, v in routing.items()}
                record(kind="train", step=step, loss=loss_sum, ce_loss=ce_sum, lr=cfg.lr * multiplier,
                       grad_norm=grad_norm, tokens=step * tokens_per_step, tokens_per_s=tokens_per_s, mfu=mfu,
                       skipped_steps=skipped, flops=reference_flops + step * flops_per_step, **routing_fields)
                window_time, window_steps = now, 0
            if step % cfg.eval_interval == 0 or step == cfg.steps:
                val_loss, val_tokens = evaluate(model, valid, cfg.bf16, ctx)
                result.val_loss, result.val_bpb = val_loss, val_loss / math.log(2) * tokens_per_byte
                record(kind="eval", step=step, val_loss=val_loss, val_bpb=result.val_bpb, val_tokens=val_tokens,
                       flops=reference_flops + step * flops_per_step)
                if progress:
                    bar.write(f"step {step}: validation loss {val_loss:.4f}, {result.val_bpb:.4f} bits/byte")
                window_time, window_steps = time.perf_counter(), 0  # do not count evaluation as training time
            if step % cfg.checkpoint_interval == 0 or step == cfg.steps:
                state = {"step": step, "skipped_steps": skipped,
                         "optimizers": distributed.optimizer_states(model, optimizers),
                         "data": loader.state_dict(), "rng": rng_state(), "train_config": cfg.to_dict()}
                plain = distributed.saveable_model(model, ctx)  # gathered under FSDP2; None on ranks > 0
                result.checkpoint = checkpoints / f"step-{step}"
                if plain is not None:
                    result.checkpoint = save_training_checkpoint(checkpoints, step, plain, state, cfg.keep_last,
                                                                 Path(cfg.data) / "tokenizer")
                distributed.barrier(ctx)  # no rank runs ahead of a checkpoint that is not written yet
                window_time, window_steps = time.perf_counter(), 0
    bar.close()
    if tb is not None:
        tb.close()
    elapsed = time.perf_counter() - start_time
    done = step - start_step
    result.step, result.skipped_steps = step, skipped
    result.flops = reference_flops + step * flops_per_step
    result.tokens_per_s = tokens_per_step * step_rate(done, elapsed)
    result.mfu = flops_per_step * step_rate(done, elapsed) / peak
    return result


def step_rate(steps: int, seconds: float) -> float:
    return steps / seconds if seconds > 0 else 0.0

"""The training loop: one process, or DDP / FSDP2 under torchrun (densa/train/distributed.py; docs/training.md,
'Distributed: torchrun, DDP and FSDP2').

`train_step` is one optimizer step, callable on its own with any DensaModel, micro-batches and optimizers: for each
micro-batch, forward (bf16 autocast optional; Rho-1 token selection when the micro-batch carries reference losses)
and backward of loss / micro-batches; clip the global gradient norm; step the optimizers; `model.update_routing()`
(MoE budget controller and balance bias; a no-op for dense models). A NaN/inf loss or gradient norm skips the
update. `train` is the loop around it: data, learning rate, metrics, validation, checkpoints, resume, progress;
`max_nan_steps` skipped steps in a row stop the run with the last good checkpoint kept. Everything is seeded: the
same recipe gives the same losses, and a resumed run continues exactly where the checkpoint left off.

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
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn
from tqdm import tqdm

from densa.config import ModelConfig
from densa.counting import flops_per_token
from densa.data.prepare import load_manifest
from densa.data.pretrain import PretrainLoader, eval_batches
from densa.data.reference import reference_cost
from densa.data.tokenizer import load_tokenizer
from densa.measure import nats_to_bits_per_byte, predicted_bytes, token_byte_lengths
from densa.model.compile import CompileConfig, compile_training
from densa.model.model import DensaModel
from densa.train import distributed
from densa.train.config import TrainConfig
from densa.train.optim import build_optimizers, lr_multiplier, set_lr
from densa.train.peak import peak_flops
from densa.train.selection import rho1_objective
from densa.train.state import (
    latest_checkpoint,
    load_newest_intact,
    remove_stale_temporaries,
    rng_state,
    save_training_checkpoint,
    set_rng_state,
)
from densa.train.tensorboard import TensorBoardLog

METRICS = "metrics.jsonl"
COMPILE_BACKEND = "inductor"  # torch.compile backend of `train.compile` (tests use "aot_eager": no C++ build)


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


# --------------------------------------------------------------------------------------------- one optimizer step


@dataclass
class MicroBatch:
    input_ids: Tensor  # (B, T+1) token ids: the model predicts tokens 1..T from 0..T-1
    reference_loss: Tensor | None = None  # (B, T) a reference model's per-token loss: the step then trains Rho-1


@dataclass
class StepResult:
    loss: float  # the optimised objective (CE + MoE aux losses), mean over micro-batches and ranks (NaN/inf too)
    ce_loss: float  # the cross-entropy alone, likewise
    grad_norm: float  # global gradient norm before clipping; nan when a loss was not finite (no norm was taken)
    skipped: bool  # a loss or the gradient norm was NaN/inf: the optimizers did not step
    routing: dict[str, float | list[float]] = field(default_factory=dict)  # model.update_routing(); {} when dense


def train_step(model: DensaModel, micro_batches: Sequence[MicroBatch], optimizers: Sequence[torch.optim.Optimizer],
               *, grad_clip: float = 1.0, bf16: bool = False, select_fraction: float = 0.6,
               wrapped: nn.Module | None = None, ctx: distributed.Dist | None = None) -> StepResult:
    """One optimizer step of `model` over `micro_batches` (gradient accumulation: each backward is of loss / their
    number). A micro-batch with `reference_loss` is trained on the top `select_fraction` of its tokens by excess
    loss (Rho-1, densa/train/selection.py). `grad_clip` > 0 clips the global gradient norm. A non-finite loss or
    gradient norm skips the update; gradients are dropped either way. The learning rate is the caller's
    (densa.train.optim.set_lr). Under torch.distributed pass `ctx` and the DDP/FSDP2-wrapped module as `wrapped`:
    every rank then runs every forward and backward, and a step is skipped on all ranks if any rank's loss was not
    finite."""
    ctx = ctx or distributed.Dist()
    wrapped = wrapped if wrapped is not None else model
    n = len(micro_batches)
    loss_sum = ce_sum = 0.0
    finite = True
    for i, micro in enumerate(micro_batches):
        batch = micro.input_ids.to(ctx.device)
        distributed.set_grad_sync(wrapped, i == n - 1)  # reduce over ranks in the last backward only
        with torch.autocast(ctx.device.type, torch.bfloat16, enabled=bf16):
            output = wrapped(batch, labels=batch)
        loss = output.loss
        if micro.reference_loss is not None:  # Rho-1: CE over the top tokens by excess loss replaces CE over all
            loss = rho1_objective(output, batch, micro.reference_loss.to(ctx.device), select_fraction)
        value = loss.item()
        loss_sum += value / n
        ce_sum += output.aux["ce_loss"].item() / n
        finite = finite and math.isfinite(value)
        if not finite and not ctx.active:
            continue  # alone, skip the backward; ranks cannot: every rank must run every backward (collectives)
        (loss / n).backward()
    if ctx.active:  # the global batch's loss; a step is skipped on every rank if any rank's loss was not finite
        loss_sum, ce_sum, bad = distributed.all_reduce_sum([loss_sum, ce_sum, float(not finite)], ctx)
        loss_sum, ce_sum, finite = loss_sum / ctx.world_size, ce_sum / ctx.world_size, bad == 0
    grad_norm = float("nan")
    if finite:
        params = [p for p in model.parameters() if p.requires_grad]
        grad_norm = distributed.clip_grad_norm(params, grad_clip if grad_clip > 0 else float("inf"))
        finite = math.isfinite(grad_norm)
    if finite:
        for opt in optimizers:
            opt.step()
    for opt in optimizers:
        opt.zero_grad(set_to_none=True)
    routing = model.update_routing()
    return StepResult(loss_sum, ce_sum, grad_norm, skipped=not finite, routing=routing)


# --------------------------------------------------------------------------------------------- validation


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


@dataclass
class Validation:
    loss: float  # mean next-token cross-entropy, nats/token
    bpb: float  # bits per byte
    tokens: int  # predicted tokens


def validate(model: DensaModel, batches: list[Tensor], valid_bytes: int, bf16: bool,
             ctx: distributed.Dist) -> Validation:
    """The run's held-out figures, the one place the loop measures them: cross-entropy over the fixed validation
    batches (shared out over ranks), and bits per byte with the measurement core's rule (densa/measure.py): Σ nats
    of the predicted tokens / ln 2 / their UTF-8 bytes (`valid_bytes`, from `predicted_bytes`)."""
    loss, tokens = evaluate(model, batches, bf16, ctx)
    return Validation(loss, nats_to_bits_per_byte(loss * tokens, valid_bytes), tokens)


# --------------------------------------------------------------------------------------------- the run


def check_writable(out: Path) -> None:
    """Fail before any work if `out` cannot be created or written."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out, prefix=".write-test."):
            pass
    except OSError as exc:
        raise OSError(f"--out {out}: cannot write there ({exc.strerror or exc})") from None


def trim_metrics(path: Path, step: int) -> None:
    """On resume, drop records past the checkpoint's step (the interrupted run's tail is redone) and lines that do
    not parse (a record torn by a kill mid-write), the latter with a warning. Rewritten atomically."""
    if not path.is_file():
        return
    kept, torn = [], []
    for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            record = None
        if not isinstance(record, dict):
            torn.append(number)
        elif record.get("step", 0) <= step:
            kept.append(line)
    if torn:
        warnings.warn(f"{path}: dropped {len(torn)} unreadable line(s) (line {', '.join(map(str, torn))}), "
                      "left by an interrupted write", stacklevel=2)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(line + "\n" for line in kept))
    os.replace(tmp, path)


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
    compile_training(model, CompileConfig(mode=cfg.compile, backend=COMPILE_BACKEND))  # in place, inside any wrapper
    optimizers = build_optimizers(model, cfg)  # after wrapping: FSDP2 replaced the parameters with DTensors
    rho1 = cfg.token_selection == "rho1"
    loader = PretrainLoader(cfg.data, "train", cfg.batch_size, cfg.context, cfg.seed, cfg.sampling,
                            rank=ctx.rank, world_size=ctx.world_size, reference=rho1,
                            curriculum=cfg.curriculum, total_batches=cfg.steps * cfg.grad_accum)
    valid = eval_batches(cfg.data, cfg.batch_size, cfg.context, cfg.eval_batches)
    token_bytes = token_byte_lengths(load_tokenizer(Path(cfg.data) / "tokenizer"), model_cfg.vocab_size)
    valid_bytes = sum(predicted_bytes(batch, token_bytes) for batch in valid)

    step, skipped = 0, 0
    if resume:  # the newest checkpoint that loads; a damaged newer one is named in a warning and left in place
        previous, state = load_newest_intact(checkpoints, lambda path: distributed.load_checkpoint(path, model, ctx),
                                             warn=ctx.is_main)
        distributed.load_optimizer_states(model, optimizers, state["optimizers"])
        loader.load_state_dict(state["data"])
        set_rng_state(state["rng"])
        step, skipped = int(state["step"]), int(state["skipped_steps"])
        if ctx.is_main:
            trim_metrics(out / METRICS, step)
            remove_stale_temporaries(checkpoints)
    elif ctx.is_main:  # a fresh run: no records of an earlier attempt that never reached a checkpoint
        (out / METRICS).unlink(missing_ok=True)
        (out / "run.json").write_text(json.dumps({"model": model_cfg.to_dict(), "train": cfg.to_dict(),
                                                  "world_size": ctx.world_size, "distributed": ctx.mode}, indent=2))

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

        def next_micro_batch() -> MicroBatch:
            batch = loader.next_batch()  # (B/W, T+1)
            return MicroBatch(batch, loader.reference_batch(loader.index - 1)[:, 1:] if rho1 else None)  # (B/W, T)

        while step < cfg.steps:
            multiplier = lr_multiplier(step, cfg)
            set_lr(optimizers, multiplier)
            done = train_step(model, [next_micro_batch() for _ in range(cfg.grad_accum)], optimizers,
                              grad_clip=cfg.grad_clip, bf16=cfg.bf16, select_fraction=cfg.select_fraction,
                              wrapped=wrapped, ctx=ctx)
            step += 1
            window_steps += 1
            bar.update(1)
            if done.skipped:
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
            result.losses.append(done.loss)
            now = time.perf_counter()
            tokens_per_s = tokens_per_step * step_rate(window_steps, now - window_time)
            mfu = flops_per_step * step_rate(window_steps, now - window_time) / peak
            bar.set_postfix_str(f"loss {done.ce_loss:.3f} lr {cfg.lr * multiplier:.2e} tok/s {tokens_per_s:,.0f} "
                                f"MFU {mfu:.1%}", refresh=False)
            if step % cfg.log_interval == 0 or step == cfg.steps:
                routing_fields = {f"routing/{k}": v for k, v in done.routing.items()}
                record(kind="train", step=step, loss=done.loss, ce_loss=done.ce_loss, lr=cfg.lr * multiplier,
                       grad_norm=done.grad_norm, tokens=step * tokens_per_step, tokens_per_s=tokens_per_s, mfu=mfu,
                       skipped_steps=skipped, flops=reference_flops + step * flops_per_step, **routing_fields)
                window_time, window_steps = now, 0
            if step % cfg.eval_interval == 0 or step == cfg.steps:
                val = validate(model, valid, valid_bytes, cfg.bf16, ctx)
                result.val_loss, result.val_bpb = val.loss, val.bpb
                record(kind="eval", step=step, val_loss=val.loss, val_bpb=val.bpb, val_tokens=val.tokens,
                       flops=reference_flops + step * flops_per_step)
                if progress:
                    bar.write(f"step {step}: validation loss {val.loss:.4f}, {val.bpb:.4f} bits/byte")
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
    done_steps = step - start_step
    result.step, result.skipped_steps = step, skipped
    result.flops = reference_flops + step * flops_per_step
    result.tokens_per_s = tokens_per_step * step_rate(done_steps, elapsed)
    result.mfu = flops_per_step * step_rate(done_steps, elapsed) / peak
    return result


def step_rate(steps: int, seconds: float) -> float:
    return steps / seconds if seconds > 0 else 0.0

"""Distil a converted model against the frozen original: KL between next-token distributions on shipped text.

Why: splitting an FFN into experts and skipping some of them changes each layer's output; the router fit and the
zc_bias only decide *which* experts to skip. Training the converted model to reproduce the original's next-token
distribution (ToMoE's KD loss, ZEDA's SFT on teacher outputs, CMoE's short LoRA) lets the experts that run make up
for those that do not, with a far richer signal per token than the one-hot language-modelling loss.

Loss, per predicted position: forward KL(p_teacher ‖ p_student) (default) or reverse KL(p_student ‖ p_teacher),
both at temperature τ (logits / τ, loss × τ²), averaged over positions.
Data: windows of the corpus' training split (`windows_NL`, in order, cycled). On-policy steps (`on_policy` = their
share, spread evenly) keep the first context − `sample_tokens` tokens of each window as a prompt, let the student
sample the rest (temperature 1) and score only those positions (GKD, Agarwal et al. 2024; on-policy distillation).
What trains (`mode`): "moe" = routers and experts; "all" = every weight; "lora" = routers + rank-r adapters
W + B·A on every linear map of the blocks (attention projections and the fused experts, per expert), merged into
the weights at the end, so the result is an ordinary checkpoint. In training mode the budget controller moves each
layer's zc_bias every step toward the bias that met the budget on the step's tokens (`update_routing`), so the
budget holds while the weights move.
Resumable: every `checkpoint_every` steps the student, the optimizer, the step, the elapsed CPU and wall time and
the validation record go to `run_dir/distill-state.pt`; `resume=True` continues from it. With `validate`, the
student is scored every `eval_every` steps and at the end, and the step with the best validation score is the one
returned: the number of steps is chosen on the validation split.
Shape suffixes: B batch, L positions, V vocabulary, N windows, P prompt tokens.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import parametrize
from tqdm import tqdm

from densa.model.model import DensaModel
from densa.model.moe import Experts, MoE

Mode = Literal["moe", "all", "lora"]
DEFAULT_LR = {"moe": 1e-4, "all": 5e-5, "lora": 1e-3}


@dataclass(kw_only=True)
class DistillConfig:
    steps: int = 100  # optimizer steps
    mode: Mode = "moe"
    lr: float = 0.0  # AdamW peak (warm-up over a tenth of the steps, cosine to a tenth); 0 = the mode's default
    batch_size: int = 4
    context: int = 256
    lora_rank: int = 8
    on_policy: float = 0.0  # share of steps on the student's own samples
    sample_tokens: int = 64  # tokens the student samples per sequence on an on-policy step
    kl: Literal["forward", "reverse"] = "forward"
    temperature: float = 1.0
    grad_clip: float = 1.0
    checkpoint_every: int = 50
    eval_every: int = 0  # validation every N steps (0 = only at the end)
    seed: int = 0

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ValueError(f"--distill-steps {self.steps}: must be >= 1")
        if self.mode not in DEFAULT_LR:
            raise ValueError(f"--distill {self.mode!r}: choose moe, all or lora")
        if self.kl not in ("forward", "reverse"):
            raise ValueError(f"--distill-kl {self.kl!r}: choose forward or reverse")
        if not 0 <= self.on_policy <= 1:
            raise ValueError(f"--on-policy {self.on_policy}: must be in [0, 1] (a share of the steps)")
        if self.on_policy and not 0 < self.sample_tokens < self.context:
            raise ValueError(f"sample_tokens={self.sample_tokens}: must be in (0, context={self.context})")
        for name in ("batch_size", "context", "lora_rank", "checkpoint_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)}: must be >= 1")
        if self.temperature <= 0:
            raise ValueError(f"temperature={self.temperature}: must be > 0")

    def peak_lr(self) -> float:
        return self.lr or DEFAULT_LR[self.mode]

    def on_policy_step(self, step: int) -> bool:
        """Steps spread evenly: step i is on-policy when ⌊(i+1)·share⌋ > ⌊i·share⌋."""
        return math.floor((step + 1) * self.on_policy) > math.floor(step * self.on_policy)


class LowRank(nn.Module):
    """Parametrization W ↦ W + B·A of a (…, out, in) weight; B starts at 0, so training starts from W."""

    def __init__(self, weight: Tensor, rank: int) -> None:
        super().__init__()
        *batch, out, inp = weight.shape
        self.A = nn.Parameter(torch.randn(*batch, rank, inp, dtype=weight.dtype) / math.sqrt(inp))
        self.B = nn.Parameter(torch.zeros(*batch, out, rank, dtype=weight.dtype))

    def forward(self, weight: Tensor) -> Tensor:
        return weight + self.B @ self.A


def add_lora(model: DensaModel, rank: int) -> list[nn.Parameter]:
    """Adapters on every linear map of the blocks (not the router, embeddings or head); returns their parameters."""
    params = []
    for block in model.layers:
        for module in block.modules():
            names = ["weight"] if type(module) is nn.Linear else ["gate_up_proj", "down_proj"] \
                if isinstance(module, Experts) else []
            for name in names:
                lora = LowRank(getattr(module, name).detach(), rank)
                parametrize.register_parametrization(module, name, lora)
                params += [lora.A, lora.B]
    return params


def merge_lora(model: DensaModel) -> None:
    """Fold every adapter into its weight: the model is plain again (same state-dict keys as before `add_lora`)."""
    for module in list(model.modules()):
        if parametrize.is_parametrized(module):
            for name in list(module.parametrizations):
                parametrize.remove_parametrizations(module, name, leave_parametrized=True)


def trainable(model: DensaModel, cfg: DistillConfig) -> list[nn.Parameter]:
    """Set requires_grad for `cfg.mode` (module docstring); returns the parameters to optimise."""
    routers = [m.gate.weight for m in model.modules() if isinstance(m, MoE)]
    if not routers:
        raise ValueError("the model has no MoE layers to distil")
    for p in model.parameters():
        p.requires_grad_(cfg.mode == "all")
    if cfg.mode == "moe":
        for m in model.modules():
            if isinstance(m, MoE):
                m.requires_grad_(True)
    if cfg.mode == "lora":
        torch.manual_seed(cfg.seed)  # the adapters' A
        adapters = add_lora(model, cfg.lora_rank)
        for p in [*routers, *adapters]:
            p.requires_grad_(True)
    return [p for p in model.parameters() if p.requires_grad]


def kl_loss(student_BLV: Tensor, teacher_BLV: Tensor, mask_BL: Tensor, kl: str, temperature: float) -> Tensor:
    """Mean over masked positions of KL(teacher ‖ student) ("forward") or KL(student ‖ teacher) ("reverse")."""
    s = F.log_softmax(student_BLV.float() / temperature, dim=-1)
    t = F.log_softmax(teacher_BLV.float() / temperature, dim=-1)
    p, log_p, log_q = (t.exp(), t, s) if kl == "forward" else (s.exp(), s, t)
    per_BL = (p * (log_p - log_q)).sum(-1)
    return (per_BL * mask_BL).sum() / mask_BL.sum().clamp_min(1) * temperature**2


@dataclass
class DistillState:
    step: int = 0
    cpu_seconds: float = 0.0
    wall_seconds: float = 0.0
    losses: list[float] | None = None
    val: list[tuple[int, float]] | None = None  # (step, validation score)
    best_step: int = 0
    best_val: float = math.inf


def distill(student: DensaModel, teacher: DensaModel, windows_NL: Tensor, run_dir: str | Path, cfg: DistillConfig,
            validate: Callable[[DensaModel], float] | None = None, resume: bool = False,
            progress: bool = True) -> dict:
    """Train `student` in place against `teacher` (module docstring); returns the run's figures."""
    if windows_NL.shape[1] < cfg.context:
        raise ValueError(f"distillation windows hold {windows_NL.shape[1]} tokens; context {cfg.context} needs more")
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    state_path, best_path = run_dir / "distill-state.pt", run_dir / "distill-best.pt"
    params = trainable(student, cfg)
    opt = torch.optim.AdamW(params, lr=cfg.peak_lr(), weight_decay=0.0, betas=(0.9, 0.95))
    warm = max(1, cfg.steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: min((i + 1) / warm, 0.1 + 0.45 * (
        1 + math.cos(math.pi * min(1.0, max(0, i - warm) / max(1, cfg.steps - warm))))))
    st = DistillState(losses=[], val=[])
    if resume and state_path.is_file():
        saved = torch.load(state_path, weights_only=False)
        if _settings(saved["config"]) != _settings(asdict(cfg)):
            raise ValueError(f"{state_path}: saved with different distillation settings; start afresh without "
                             "--resume or use the same settings")
        student.load_state_dict(saved["student"])
        opt.load_state_dict(saved["optimizer"])
        sched.load_state_dict(saved["scheduler"])
        st = DistillState(**saved["state"])
    teacher.eval()
    best: dict[str, Tensor] | None = None
    bar = tqdm(total=cfg.steps, initial=st.step, desc=f"distil ({cfg.mode})", unit="step", disable=not progress)
    cpu0, wall0 = time.process_time() - st.cpu_seconds, time.perf_counter() - st.wall_seconds
    try:
        while st.step < cfg.steps:
            loss = _step(student, teacher, windows_NL, st.step, cfg, params, opt)
            sched.step()
            st.step += 1
            st.losses.append(loss)
            st.cpu_seconds, st.wall_seconds = time.process_time() - cpu0, time.perf_counter() - wall0
            bar.update(1)
            bar.set_postfix(kl=f"{loss:.4f}", cpu_s=f"{st.cpu_seconds:.0f}")
            last = st.step == cfg.steps
            if validate is not None and (last or (cfg.eval_every and st.step % cfg.eval_every == 0)):
                score = validate(student)
                st.val.append((st.step, score))
                if score < st.best_val:
                    st.best_step, st.best_val = st.step, score
                    best = copy.deepcopy(student.state_dict())
                    _save_atomic(best, best_path)
            if last or st.step % cfg.checkpoint_every == 0:
                _save_atomic({"config": asdict(cfg), "student": student.state_dict(), "optimizer": opt.state_dict(),
                              "scheduler": sched.state_dict(), "state": asdict(st)}, state_path)
    finally:
        bar.close()
        student.eval()
    if validate is not None and st.best_step < st.step:  # fewer steps validated better: keep that student
        student.load_state_dict(best if best is not None else torch.load(best_path, weights_only=True))
    if cfg.mode == "lora":
        merge_lora(student)
    for p in student.parameters():
        p.requires_grad_(True)
    return {"distill_mode": cfg.mode, "distill_steps": cfg.steps, "distill_lr": cfg.peak_lr(),
            "distill_on_policy": cfg.on_policy, "distill_kl": cfg.kl,
            "distill_tokens": cfg.steps * cfg.batch_size * cfg.context, "distill_first_kl": st.losses[0],
            "distill_last_kl": st.losses[-1], "distill_cpu_seconds": st.cpu_seconds,
            "distill_wall_seconds": st.wall_seconds, "distill_val": st.val,
            "distill_best_step": st.best_step if validate is not None else st.step,
            "distill_best_val": st.best_val if validate is not None else None}


def _settings(config: dict) -> dict:
    """The settings a resumed run must share with the saved one (how often it checkpoints may differ)."""
    return {k: v for k, v in config.items() if k != "checkpoint_every"}


def _save_atomic(obj: Any, path: Path) -> None:
    """torch.save through a temporary file and a rename: a run killed while saving keeps its last checkpoint."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(obj, tmp)
    tmp.replace(path)


def _step(student: DensaModel, teacher: DensaModel, windows_NL: Tensor, step: int, cfg: DistillConfig,
          params: list[nn.Parameter], opt: torch.optim.Optimizer) -> float:
    """One optimizer step on batch `step` (windows in order, cycled); returns the KL."""
    B, L, N = cfg.batch_size, cfg.context, len(windows_NL)
    rows = [(step * B + b) % N for b in range(B)]
    ids_BL = windows_NL[rows, :L]
    mask_BL = torch.ones(B, L)
    if cfg.on_policy_step(step):
        P = L - cfg.sample_tokens
        gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
        student.eval()
        with torch.no_grad(), parametrize.cached():
            ids_BL = student.generate(ids_BL[:, :P], max_new_tokens=cfg.sample_tokens, temperature=1.0,
                                      generator=gen)
        mask_BL[:, : P - 1] = 0  # score only the positions after the prompt: the student's own continuation
    with torch.no_grad():
        teacher_BLV = teacher(ids_BL).logits
    student.train()
    with parametrize.cached():
        loss = kl_loss(student(ids_BL).logits, teacher_BLV, mask_BL, cfg.kl, cfg.temperature)
        opt.zero_grad(set_to_none=True)
        loss.backward()
    if cfg.grad_clip:
        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
    opt.step()
    student.update_routing()  # the budget controller's step (module docstring)
    return float(loss.detach())

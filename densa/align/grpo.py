"""Token-value RL: GRPO through TRL's GRPOTrainer with the correctness + token-value reward (densa/align/rewards.py).

Loss type `dr_grpo` (default) or `dapo` only. TRL's `grpo` loss averages each completion's token losses over its own
length, 1/|o_i|, which by itself favours short completions with positive advantage and long ones with negative
advantage — a length bias in the optimiser that would confound a study of what the *reward* does to length. `dr_grpo`
divides by the constant max_completion_length · G instead; `dapo` by the batch's token count.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset
from trl import GRPOConfig, GRPOTrainer

from densa.align.config import Recipe
from densa.align.logs import JsonlLog
from densa.align.policy import load_policy
from densa.align.rewards import checked, trl_reward
from densa.align.sft import finish_run, task_examples
from densa.align.trl_model import DensaForTRL
from densa.model.model import DensaModel

CURVES = [("reward", "mean reward"), ("completions/mean_length", "mean completion tokens"),
          ("accuracy", "accuracy (sampled, T=1)")]


def load_reward(spec: str) -> Callable[..., list[float]]:
    """`module:function` → the function (a user reward in TRL's signature, added to the token-value reward)."""
    module, sep, name = spec.partition(":")
    if not sep:
        raise ValueError(f"reward.custom={spec!r}: expected module:function")
    try:
        fn = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as exc:
        raise ValueError(f"reward.custom={spec!r}: cannot import it ({exc})") from None
    if not callable(fn):
        raise ValueError(f"reward.custom={spec!r}: not callable")
    return fn


def run_grpo(recipe: Recipe, out: str | Path, progress: bool = True, policy: tuple[DensaModel, Any] | None = None,
             extra_rewards: list[Callable[..., list[float]]] = (), evaluate: bool = True) -> dict[str, Any]:
    """GRPO from `recipe.policy` (or an in-memory `policy`); writes out/model, metrics.jsonl, align.png."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cfg = recipe.grpo
    torch.manual_seed(cfg.seed)
    train, heldout = task_examples(recipe, cfg.seed)
    model, tok = policy if policy is not None else load_policy(recipe.policy)
    model.train()
    rewards = [trl_reward(recipe.reward), *extra_rewards]
    if recipe.reward.custom:
        rewards.append(load_reward(recipe.reward.custom))
    data = Dataset.from_list([{"prompt": e["prompt"], "answer": e["answer"]} for e in train])
    args = GRPOConfig(
        output_dir=str(out / "trainer"), use_cpu=not torch.cuda.is_available(), bf16=False,
        per_device_train_batch_size=cfg.prompts_per_step * cfg.num_generations, num_generations=cfg.num_generations,
        max_completion_length=cfg.max_completion_length, temperature=cfg.temperature, learning_rate=cfg.lr,
        lr_scheduler_type="constant", max_steps=cfg.steps, loss_type=cfg.loss_type, beta=cfg.beta,
        scale_rewards=cfg.scale_rewards, logging_steps=cfg.log_interval, seed=cfg.seed, save_strategy="no",
        report_to=[], gradient_checkpointing=False, disable_tqdm=not progress, shuffle_dataset=True)
    trainer = GRPOTrainer(model=DensaForTRL.wrap(model, tok), reward_funcs=[checked(f) for f in rewards],
                          train_dataset=data, processing_class=tok, args=args,
                          callbacks=[JsonlLog(out / "metrics.jsonl")])
    title = f"densa align: GRPO ({cfg.loss_type}), reward = correct + {recipe.reward.weight:g}·{recipe.reward.length}"
    return finish_run(trainer, model, tok, out, CURVES, "align.png", title, cfg.steps,
                      heldout if evaluate else None, recipe.task.max_new_tokens, progress)

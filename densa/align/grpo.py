"""Token-value RL: GRPO through TRL's GRPOTrainer with the correctness + token-value reward (densa/align/rewards.py).

Loss type `dr_grpo` (default) or `dapo` only. TRL's `grpo` loss averages each completion's token losses over its own
length, 1/|o_i|, which by itself favours short completions with positive advantage and long ones with negative
advantage — a length bias in the optimiser that would confound a study of what the *reward* does to length. `dr_grpo`
divides by the constant max_completion_length · G instead; `dapo` by the batch's token count.

`TokenValueGRPOTrainer` adds what TRL 1.16 lacks for densa's models:
- dynamic sampling (`grpo.dynamic_sampling`, DAPO / DLER): after scoring, a group whose samples all passed or all
  failed (rewards.keep_groups) gets zero advantage and an empty completion mask, so it adds no gradient and no
  tokens to the `dapo` normaliser. Dropped groups are not refilled by resampling (DAPO oversamples); the share
  kept is logged as `dynamic_sampling/kept_groups`.
- the KL anchor to the SFT model (`grpo.beta` > 0): TRL builds its reference model from a hub id, which a wrapped
  densa model lacks, so the reference is a frozen copy of the starting policy, wrapped the same way.
Clip-higher (`grpo.epsilon_high`) and batch-wise normalisation (`grpo.scale_rewards: batch`) are TRL's own.
"""

from __future__ import annotations

import copy
import importlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset
from trl import GRPOConfig, GRPOTrainer
from trl.trainer.grpo_trainer import add_fused_lm_head

from densa.align.config import Recipe
from densa.align.logs import JsonlLog
from densa.align.policy import load_policy
from densa.align.rewards import TokenValueReward, checked, keep_groups, trl_reward
from densa.align.sft import checkpointing, finish_run, task_examples
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


class TokenValueGRPOTrainer(GRPOTrainer):
    """GRPOTrainer plus dynamic sampling and a KL anchor to a frozen copy of the starting policy (module docstring)."""

    def __init__(self, *args: Any, reward: TokenValueReward, dynamic_sampling: bool, kl_beta: float,
                 tokenizer: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)  # built with beta = 0: TRL cannot load a densa reference by hub id
        self.token_value = reward
        self.dynamic_sampling = dynamic_sampling
        if kl_beta > 0:
            policy = self.accelerator.unwrap_model(self.model)
            ref = DensaForTRL.wrap(copy.deepcopy(policy.model), tokenizer).to(self.accelerator.device).eval()
            ref.requires_grad_(False)
            add_fused_lm_head(ref, temperature=self.temperature, cast_lm_head_to_fp32=self.args.cast_lm_head_to_fp32)
            self.ref_model, self.beta = ref, kl_beta

    def _generate_and_score_completions(self, inputs: list[dict[str, Any]]) -> dict[str, Any]:
        out = super()._generate_and_score_completions(inputs)
        if self.dynamic_sampling and self.model.training:
            keep = torch.tensor(keep_groups(self.token_value.passed, self.num_generations),
                                device=out["advantages"].device)
            if keep.numel() == out["advantages"].numel():  # one process: the recorded batch is this batch
                out["advantages"] = out["advantages"] * keep
                out["completion_mask"] = out["completion_mask"] * keep[:, None].to(out["completion_mask"].dtype)
                out["num_items_in_batch"] = out["completion_mask"].sum()
                self._metrics["train"]["dynamic_sampling/kept_groups"].append(keep.float().mean().item())
        return out


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
    token_value = trl_reward(recipe.reward)
    rewards = [token_value, *extra_rewards]
    if recipe.reward.custom:
        rewards.append(load_reward(recipe.reward.custom))
    data = Dataset.from_list([{"prompt": e["prompt"], "answer": e["answer"]} for e in train])
    args = GRPOConfig(
        output_dir=str(out / "trainer"), use_cpu=not torch.cuda.is_available(), bf16=cfg.precision == "bf16",
        per_device_train_batch_size=cfg.prompts_per_step * cfg.num_generations, num_generations=cfg.num_generations,
        max_completion_length=cfg.max_completion_length, temperature=cfg.temperature, learning_rate=cfg.lr,
        lr_scheduler_type="constant", max_steps=cfg.steps, loss_type=cfg.loss_type, beta=0.0,
        scale_rewards=cfg.scale_rewards, epsilon=cfg.epsilon, epsilon_high=cfg.epsilon_high or None,
        logging_steps=cfg.log_interval, seed=cfg.seed, **checkpointing(cfg.save_every),
        report_to=[], gradient_checkpointing=False, disable_tqdm=not progress, shuffle_dataset=True)
    trainer = TokenValueGRPOTrainer(model=DensaForTRL.wrap(model, tok), reward_funcs=[checked(f) for f in rewards],
                                    train_dataset=data, processing_class=tok, args=args,
                                    callbacks=[JsonlLog(out / "metrics.jsonl")], reward=token_value,
                                    dynamic_sampling=cfg.dynamic_sampling, kl_beta=cfg.beta, tokenizer=tok)
    title = f"densa align: GRPO ({cfg.loss_type}), reward = correct + {recipe.reward.weight:g}·{recipe.reward.length}"
    return finish_run(trainer, model, tok, out, CURVES, "align.png", title, cfg.steps,
                      heldout if evaluate else None, recipe.task.max_new_tokens, progress)

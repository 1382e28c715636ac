"""Rewards for token-value RL: correctness plus a token-value (length) term, in TRL's reward-function signature.

For the G completions y_1..y_G of one prompt, with c_i = 1[answer after the last `####` equals the gold answer]
and n_i = completion length in tokens:

    r_i = c_i + w · L_i + O_i

`length` chooses L_i (the token-value term):
- `none`:   L_i = 0 (the correctness-only control).
- `kimi`:   Kimi k1.5: λ_i = 0.5 − (n_i − n_min)/(n_max − n_min) over the group (λ_i = 0 when all lengths are equal);
            L_i = λ_i if correct, min(0, λ_i) if wrong — a short wrong answer is never rewarded.
- `arora`:  Arora & Zanette: L_i = −c_i · σ((n_i − mean_correct)/std_correct), the statistics over the group's
            *correct* completions (z = 0 when fewer than two are correct or all have one length), so r_i =
            c_i · (1 − w·σ(z_i)) and wrong answers get 0 whatever their length. w is their α.
O_i is DAPO's soft overlong punishment when `overlong_cache` > 0: 0 while n_i ≤ L_max − cache, falling linearly to
−1 at L_max = `max_completion_length` (it caps length; it does not reward brevity).

With w < 1 (kimi) or w < 1 (arora) the order the issue asks for holds inside a group: a shorter correct answer
scores above a longer correct one, and both above any wrong answer (tests/test_align.py checks it).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from densa.align.problems import extract_answer

LengthTerm = Literal["none", "kimi", "arora"]


@dataclass(kw_only=True)
class RewardConfig:
    length: LengthTerm = "kimi"
    weight: float = 0.5  # w above
    overlong_cache: int = 0  # DAPO soft overlong punishment window in tokens; 0 disables it
    max_completion_length: int = 128  # set from grpo.max_completion_length
    custom: str = ""  # optional `module:function` reward in TRL's signature, added to this one

    def __post_init__(self) -> None:
        if self.length not in ("none", "kimi", "arora"):
            raise ValueError(f"reward.length={self.length!r}: choose from none, kimi, arora")
        if not 0 <= self.weight < 1:
            raise ValueError(f"reward.weight={self.weight}: must be in [0, 1) so that any correct answer outscores "
                             "any wrong one")
        if not 0 <= self.overlong_cache < self.max_completion_length:
            raise ValueError(f"reward.overlong_cache={self.overlong_cache}: must be in [0, max_completion_length="
                             f"{self.max_completion_length})")


def completion_text(completion: Any) -> str:
    """TRL passes conversational completions as a list of messages, plain ones as a string."""
    if isinstance(completion, list):
        return "".join(m.get("content", "") for m in completion if isinstance(m, dict))
    return str(completion)


def correctness(completions: Sequence[Any], answers: Sequence[Any]) -> list[float]:
    return [float(extract_answer(completion_text(c)) == int(a)) for c, a in zip(completions, answers, strict=True)]


def length_term(correct: Sequence[float], lengths: Sequence[int], kind: LengthTerm) -> list[float]:
    """L_i for one group (the completions of one prompt); see the module docstring."""
    if kind == "none":
        return [0.0] * len(lengths)
    if kind == "kimi":
        lo, hi = min(lengths), max(lengths)
        lam = [0.5 - (n - lo) / (hi - lo) if hi > lo else 0.0 for n in lengths]
        return [x if c else min(0.0, x) for x, c in zip(lam, correct, strict=True)]
    right = [n for n, c in zip(lengths, correct, strict=True) if c]
    mean = sum(right) / len(right) if right else 0.0
    std = math.sqrt(sum((n - mean) ** 2 for n in right) / len(right)) if right else 0.0
    return [-c * _sigmoid((n - mean) / std if len(right) > 1 and std > 0 else 0.0)
            for n, c in zip(lengths, correct, strict=True)]


def overlong_penalty(lengths: Sequence[int], max_len: int, cache: int) -> list[float]:
    """DAPO Eq. 13 (same as trl.rewards.get_soft_overlong_punishment)."""
    if cache <= 0:
        return [0.0] * len(lengths)
    start = max_len - cache
    return [0.0 if n <= start else -1.0 if n > max_len else (start - n) / cache for n in lengths]


def token_value_rewards(completions: Sequence[Any], lengths: Sequence[int], answers: Sequence[Any],
                        groups: Sequence[Any], cfg: RewardConfig) -> list[float]:
    """r_i for a batch; `groups[i]` identifies the prompt of completion i (its group for the length term)."""
    correct = correctness(completions, answers)
    rewards = [0.0] * len(correct)
    for key in dict.fromkeys(groups):
        idx = [i for i, g in enumerate(groups) if g == key]
        terms = length_term([correct[i] for i in idx], [lengths[i] for i in idx], cfg.length)
        over = overlong_penalty([lengths[i] for i in idx], cfg.max_completion_length, cfg.overlong_cache)
        for i, t, o in zip(idx, terms, over, strict=True):
            rewards[i] = correct[i] + cfg.weight * t + o
    return rewards


def trl_reward(cfg: RewardConfig) -> Callable[..., list[float]]:
    """The reward as a TRL reward function; the dataset's `answer` column is the gold answer."""

    def token_value(prompts: list[Any], completions: list[Any], completion_ids: list[list[int]],
                    answer: list[Any], log_metric: Callable[[str, float], None] | None = None,
                    **_: Any) -> list[float]:
        groups = [repr(p) for p in prompts]
        if log_metric is not None:  # the sampled accuracy, separately from the shaped reward
            log_metric("accuracy", sum(correctness(completions, answer)) / max(len(completions), 1))
        return token_value_rewards(completions, [len(ids) for ids in completion_ids], answer, groups, cfg)

    token_value.__name__ = f"correct_{cfg.length}" if cfg.length != "none" else "correct"
    return token_value


def checked(fn: Callable[..., Any]) -> Callable[..., list[float]]:
    """Wrap a reward function so that a broken one stops training with one clear line instead of a deep traceback
    (or, worse, NaN advantages that silently zero the update)."""
    name = getattr(fn, "__name__", repr(fn))

    def reward(*args: Any, **kwargs: Any) -> list[float]:
        n = len(kwargs.get("completions", args[1] if len(args) > 1 else []))
        try:
            values = fn(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - any failure inside user code becomes one message
            raise RuntimeError(f"reward function {name!r} raised {type(exc).__name__}: {exc}") from exc
        if not isinstance(values, list | tuple) or len(values) != n:
            got = f"{len(values)} values" if isinstance(values, list | tuple) else type(values).__name__
            raise RuntimeError(f"reward function {name!r} returned {got} for {n} completions "
                               "(expected one float per completion)")
        for i, v in enumerate(values):
            if v is None:
                continue  # TRL: None skips that completion
            if not isinstance(v, int | float) or not math.isfinite(v):
                raise RuntimeError(f"reward function {name!r} returned {v!r} for completion {i} "
                                   "(rewards must be finite numbers)")
        return [None if v is None else float(v) for v in values]

    reward.__name__ = name
    return reward


def _sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))

"""Rewards for token-value RL: correctness plus a token-value (length) term, in TRL's reward-function signature.

For the G completions y_1..y_G of one prompt, with c_i = 1[the answer after the last `####` is right: the gold
integer, or `unknown` on an unanswerable problem] and n_i = completion length in tokens:

    r_i = c_i + w · L_i + O_i

`length` chooses L_i (the token-value term):
- `none`:       L_i = 0 (the correctness-only control).
- `kimi`:       Kimi k1.5: λ_i = 0.5 − (n_i − n_min)/(n_max − n_min) over the whole group (0 when all lengths are
                equal); L_i = λ_i if correct, min(0, λ_i) if wrong. It penalises *every* rollout for length.
- `arora`:      Arora & Zanette: L_i = −c_i · σ((n_i − mean_correct)/std_correct), the statistics over the group's
                *correct* completions (z = 0 when fewer than two are correct or all have one length).
- `gated`:      correctness-gated and group-relative (prime-rl): the Kimi λ computed over the group's *correct*
                completions only, L_i = c_i · (0.5 − (n_i − min_c)/(max_c − min_c)) (0 when fewer than two
                distinct correct lengths), and 0 for every wrong answer: only correct samples are rewarded for
                brevity, so failing fast earns nothing.
- `shortest`:   ShorterBetter: L_i = −c_i · min(1, (n_i − n_sol)/n_sol) with n_sol the group's shortest correct
                length (0 when none is correct). ShorterBetter also scores the wrong samples' distance to n_sol; it
                is gated here, as above, because a short wrong answer must never beat a long wrong one.
- `truncation`: DLER's truncation penalty: a completion longer than `truncate_at` tokens scores as if it were wrong,
                r_i = c_i · 1[n_i ≤ truncate_at] (w is not used). DLER pairs it with batch-wise reward
                normalisation (`grpo.scale_rewards: batch`), higher clipping (`grpo.epsilon_high`) and dynamic
                sampling (`grpo.dynamic_sampling`), all wired in densa/align/grpo.py.
O_i is DAPO's soft overlong punishment when `overlong_cache` > 0: 0 while n_i ≤ L_max − cache, falling linearly to
−1 at L_max = `max_completion_length` (it caps length; it does not reward brevity).

`passed_i` = c_i, and for `truncation` c_i · 1[n_i ≤ truncate_at]: what dynamic sampling looks at (a group whose
samples all passed or all failed carries no correctness signal and is dropped).

With w < 1 the order the issue asks for holds inside a group for every term but `truncation`: a shorter correct
answer scores above a longer correct one, and both above any wrong answer (tests/test_align_rewards.py checks it on
hand-made groups; `truncation` scores an over-long correct answer like a wrong one, by design).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from densa.align.problems import is_correct

LengthTerm = Literal["none", "kimi", "arora", "gated", "shortest", "truncation"]
LENGTH_TERMS = ("none", "kimi", "arora", "gated", "shortest", "truncation")


@dataclass(kw_only=True)
class RewardConfig:
    length: LengthTerm = "kimi"
    weight: float = 0.5  # w above
    overlong_cache: int = 0  # DAPO soft overlong punishment window in tokens; 0 disables it
    max_completion_length: int = 128  # set from grpo.max_completion_length
    truncate_at: int = 0  # `truncation` only: completions longer than this many tokens score as wrong
    custom: str = ""  # optional `module:function` reward in TRL's signature, added to this one

    def __post_init__(self) -> None:
        if self.length not in LENGTH_TERMS:
            raise ValueError(f"reward.length={self.length!r}: choose from {', '.join(LENGTH_TERMS)}")
        if self.length == "truncation" and not 0 < self.truncate_at <= self.max_completion_length:
            raise ValueError(f"reward.truncate_at={self.truncate_at}: reward.length=truncation needs it in [1, "
                             f"max_completion_length={self.max_completion_length}]")
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
    """c_i: 1.0 for the gold integer (or `unknown` where the gold answer is None: an unanswerable problem)."""
    return [float(is_correct(completion_text(c), a)) for c, a in zip(completions, answers, strict=True)]


def length_term(correct: Sequence[float], lengths: Sequence[int], kind: LengthTerm) -> list[float]:
    """L_i for one group (the completions of one prompt); see the module docstring (`truncation` has none)."""
    if kind in ("none", "truncation"):
        return [0.0] * len(lengths)
    if kind == "kimi":
        lo, hi = min(lengths), max(lengths)
        lam = [0.5 - (n - lo) / (hi - lo) if hi > lo else 0.0 for n in lengths]
        return [x if c else min(0.0, x) for x, c in zip(lam, correct, strict=True)]
    right = [n for n, c in zip(lengths, correct, strict=True) if c]
    if kind == "gated":
        lo, hi = (min(right), max(right)) if right else (0, 0)
        return [c * (0.5 - (n - lo) / (hi - lo)) if hi > lo else 0.0 for n, c in zip(lengths, correct, strict=True)]
    if kind == "shortest":
        sol = max(min(right), 1) if right else 1
        return [-c * min(1.0, (n - sol) / sol) for n, c in zip(lengths, correct, strict=True)]
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


def passed(correct: Sequence[float], lengths: Sequence[int], cfg: RewardConfig) -> list[float]:
    """passed_i: correct, and for `truncation` also no longer than `truncate_at` (what dynamic sampling reads)."""
    if cfg.length != "truncation":
        return [float(c) for c in correct]
    return [float(c and n <= cfg.truncate_at) for c, n in zip(correct, lengths, strict=True)]


def token_value_rewards(completions: Sequence[Any], lengths: Sequence[int], answers: Sequence[Any],
                        groups: Sequence[Any], cfg: RewardConfig) -> list[float]:
    """r_i for a batch; `groups[i]` identifies the prompt of completion i (its group for the length term)."""
    correct = correctness(completions, answers)
    base = passed(correct, lengths, cfg)
    rewards = [0.0] * len(correct)
    for key in dict.fromkeys(groups):
        idx = [i for i, g in enumerate(groups) if g == key]
        terms = length_term([correct[i] for i in idx], [lengths[i] for i in idx], cfg.length)
        over = overlong_penalty([lengths[i] for i in idx], cfg.max_completion_length, cfg.overlong_cache)
        for i, t, o in zip(idx, terms, over, strict=True):
            rewards[i] = base[i] + cfg.weight * t + o
    return rewards


def keep_groups(passed_flags: Sequence[float], group_size: int) -> list[bool]:
    """Dynamic sampling (DAPO, DLER): per completion, whether its group is kept — a group of `group_size`
    consecutive completions whose samples all passed or all failed is dropped (it carries no correctness signal)."""
    if len(passed_flags) % group_size:
        raise ValueError(f"{len(passed_flags)} completions do not split into groups of {group_size}")
    keep = []
    for start in range(0, len(passed_flags), group_size):
        group = passed_flags[start:start + group_size]
        keep += [0 < sum(group) < len(group)] * len(group)
    return keep


def advantages(rewards: Sequence[float], group_size: int, scale: str) -> list[float]:
    """GRPO advantages as TRL 1.16 computes them: r_i minus its group's mean, divided by the group's std (`group`),
    the whole batch's std (`batch`: DLER's batch-wise normalisation, which keeps a group of near-equal rewards from
    being blown up to unit scale) or nothing (`none`); std is the unbiased one, plus 1e-4."""
    out = []
    batch_std = _std(rewards) if len(rewards) > 1 else 0.0
    for start in range(0, len(rewards), group_size):
        group = rewards[start:start + group_size]
        mean = sum(group) / len(group)
        std = {"group": _std(group) if len(group) > 1 else 0.0, "batch": batch_std, "none": None}[scale]
        out += [(r - mean) / (std + 1e-4) if std is not None else r - mean for r in group]
    return out


class TokenValueReward:
    """The reward as a TRL reward function (the dataset's `answer` column is the gold answer). It keeps the last
    batch's `passed` flags for the trainer's dynamic sampling, and logs the sampled accuracy."""

    def __init__(self, cfg: RewardConfig) -> None:
        self.cfg = cfg
        self.passed: list[float] = []
        self.__name__ = f"correct_{cfg.length}" if cfg.length != "none" else "correct"

    def __call__(self, prompts: list[Any], completions: list[Any], completion_ids: list[list[int]],
                 answer: list[Any], log_metric: Callable[[str, float], None] | None = None,
                 **_: Any) -> list[float]:
        groups = [repr(p) for p in prompts]
        lengths = [len(ids) for ids in completion_ids]
        correct = correctness(completions, answer)
        self.passed = passed(correct, lengths, self.cfg)
        if log_metric is not None:  # the sampled accuracy, separately from the shaped reward
            log_metric("accuracy", sum(correct) / max(len(completions), 1))
        return token_value_rewards(completions, lengths, answer, groups, self.cfg)


def trl_reward(cfg: RewardConfig) -> TokenValueReward:
    return TokenValueReward(cfg)


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


def _std(values: Sequence[float]) -> float:
    mean = sum(values) / len(values)
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def _sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))

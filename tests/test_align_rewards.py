"""Token-value rewards on hand-made groups (densa/align/rewards.py): each term, dynamic sampling, advantages."""

import math

import pytest
import torch
from trl.trainer.utils import nanstd

from densa.align.rewards import (
    RewardConfig,
    TokenValueReward,
    advantages,
    keep_groups,
    length_term,
    token_value_rewards,
)

# one hand-made group of six completions for gold answer 2: three correct (8, 12, 20 tokens), three wrong
# (3 tokens: failing fast; 14 and 30 tokens)
TEXTS = ["1+1=2. #### 2", "1+1=2. So #### 2", "Let me think. 1+1=2. Check: 1+1=2. #### 2", "#### 3",
         "1+1=3. #### 3", "Let me think step by step, very carefully, and at length. #### 5"]
LENGTHS = [8, 12, 20, 3, 14, 30]
CORRECT, FAST_WRONG, WRONG = [0, 1, 2], 3, [4, 5]


def rewards(cfg: RewardConfig, texts=TEXTS, lengths=LENGTHS, answer=2) -> list[float]:
    return token_value_rewards(texts, lengths, [answer] * len(texts), ["p"] * len(texts), cfg)


@pytest.mark.parametrize("cfg", [RewardConfig(length="gated", weight=0.5), RewardConfig(length="shortest", weight=0.9),
                                 RewardConfig(length="kimi", weight=0.5), RewardConfig(length="arora", weight=0.4)])
def test_shorter_correct_beats_longer_correct_beats_any_wrong(cfg):
    r = rewards(cfg)
    assert r[0] > r[1] > r[2] > max(r[i] for i in [FAST_WRONG, *WRONG]), r
    assert r[FAST_WRONG] <= 0  # a short wrong answer is never rewarded


@pytest.mark.parametrize("kind", ["gated", "shortest", "arora"])
def test_gated_terms_never_reward_failing_fast(kind):
    """Correctness-gated shaping: every wrong answer gets exactly 0, short or long; Kimi's does not."""
    r = rewards(RewardConfig(length=kind, weight=0.5))
    assert [r[i] for i in [FAST_WRONG, *WRONG]] == [0.0, 0.0, 0.0]
    kimi = rewards(RewardConfig(length="kimi", weight=0.5))
    assert kimi[FAST_WRONG] == 0.0 > kimi[WRONG[1]]  # Kimi penalises the long wrong one: failing fast beats it


def test_gated_is_kimis_lambda_over_the_correct_samples_only():
    terms = length_term([1, 1, 1, 0, 0, 0], LENGTHS, "gated")
    assert terms == pytest.approx([0.5, 0.5 - 4 / 12, -0.5, 0, 0, 0])
    assert length_term([1, 0, 0], [10, 2, 30], "gated") == [0.0, 0.0, 0.0]  # one correct: nothing to compare


def test_shortest_correct_sample_reward():
    """ShorterBetter: distance to the group's shortest correct length, relative to it, capped at 1."""
    assert length_term([1, 1, 1, 0, 0, 0], LENGTHS, "shortest") == pytest.approx([0, -0.5, -1.0, 0, 0, 0])
    assert length_term([0, 0], [5, 9], "shortest") == [0.0, 0.0]  # no correct sample: no length signal
    r = rewards(RewardConfig(length="shortest", weight=0.5))
    assert r[:3] == pytest.approx([1.0, 0.75, 0.5])


def test_dler_truncation_penalty():
    """A correct answer over the limit scores like a wrong one; w is not used."""
    cfg = RewardConfig(length="truncation", truncate_at=12, weight=0.5, max_completion_length=32)
    assert rewards(cfg) == [1.0, 1.0, 0.0, 0.0, 0.0, 0.0]
    reward = TokenValueReward(cfg)
    reward(prompts=["p"] * 6, completions=TEXTS, completion_ids=[[0] * n for n in LENGTHS], answer=[2] * 6)
    assert reward.passed == [1.0, 1.0, 0.0, 0.0, 0.0, 0.0]  # what dynamic sampling reads
    with pytest.raises(ValueError, match="truncate_at"):
        RewardConfig(length="truncation")
    with pytest.raises(ValueError, match="truncate_at"):
        RewardConfig(length="truncation", truncate_at=200, max_completion_length=128)


def test_unanswerable_reward_pays_only_the_honest_answer():
    texts = ["No start count. #### unknown", "5+3=8. #### 8", "Let me think. It cannot be determined. #### unknown"]
    r = token_value_rewards(texts, [6, 8, 12], [None] * 3, ["p"] * 3, RewardConfig(length="gated", weight=0.5))
    assert r == [1.25, 0.0, 0.75]  # honest and short > honest and long > an invented number


def test_dynamic_sampling_drops_all_right_and_all_wrong_groups():
    passed = [1, 1, 1, 1] + [0, 0, 0, 0] + [1, 0, 0, 1]
    assert keep_groups(passed, 4) == [False] * 8 + [True] * 4
    with pytest.raises(ValueError, match="groups of 4"):
        keep_groups([1, 0, 1], 4)


def test_batch_normalisation_matches_trl_and_differs_from_group():
    """Two groups: one with a large reward spread, one whose rewards differ only by a small length term."""
    r = [1.0, 0.0, 1.0, 0.0] + [1.0, 0.95, 1.0, 0.95]
    t = torch.tensor(r).view(2, 4)
    centred = (t - t.mean(1, keepdim=True)).flatten()
    assert advantages(r, 4, "batch") == pytest.approx((centred / (nanstd(torch.tensor(r)) + 1e-4)).tolist(), rel=1e-5)
    group = (centred / (nanstd(t, dim=1).repeat_interleave(4) + 1e-4)).tolist()
    assert advantages(r, 4, "group") == pytest.approx(group, rel=1e-5)
    # per-group scaling blows the 0.05 length difference up to the same size as right-vs-wrong; the batch std keeps
    # it small (DLER's point)
    assert abs(advantages(r, 4, "group")[4]) == pytest.approx(abs(advantages(r, 4, "group")[0]), rel=1e-2)
    assert abs(advantages(r, 4, "batch")[4]) < 0.1 * abs(advantages(r, 4, "batch")[0])
    assert advantages(r, 4, "none")[:2] == [0.5, -0.5]
    assert all(math.isfinite(a) for a in advantages([1.0] * 4, 4, "group"))

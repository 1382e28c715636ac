"""Distillation of a converted model against the original (densa/moefy/distill.py): the KL falls, the budget holds,
only the chosen weights move, adapters merge into a plain model, an interrupted run resumes to the same weights,
and validation picks the step."""

import dataclasses

import pytest
import torch
from torch.nn.utils import parametrize

import densa.moefy.distill as distill_module
from densa.config import from_preset
from densa.model.model import DensaModel
from densa.moefy.convert import MoefyConfig, convert, with_budget
from densa.moefy.distill import DistillConfig, distill, kl_loss


@pytest.fixture(scope="module")
def setup():
    """A tiny dense Llama-style densa model with peaked outputs, its 50% conversion, and training windows."""
    torch.manual_seed(0)
    dense = DensaModel(from_preset("tiny", mixer="attention", ffn="swiglu", intermediate_size=128,
                                   initializer_range=0.2)).eval()
    g = torch.Generator().manual_seed(1)
    calib, text = torch.randint(0, 256, (8, 64), generator=g), torch.randint(0, 256, (16, 64), generator=g)
    conversion = convert(dense, calib, MoefyConfig(experts=8, budget=0.5, shared=0.25, router_steps=20),
                         progress=False)
    return dense, conversion, text


def test_distillation_lowers_the_kl_moves_only_the_moe_and_holds_the_budget(setup, tmp_path):
    dense, conversion, text = setup
    student = with_budget(conversion, 0.5)
    before = {k: v.clone() for k, v in student.state_dict().items()}
    kl_before = _kl(student, dense, text)
    report = distill(student, dense, text, tmp_path, DistillConfig(steps=12, lr=1e-2, batch_size=4, context=64),
                     progress=False)
    assert _kl(student, dense, text) < 0.85 * kl_before and report["distill_cpu_seconds"] > 0
    changed = {k for k, v in student.state_dict().items() if not torch.equal(v, before[k])}
    assert changed and all(".mlp." in k for k in changed)  # routers, experts and the controller's zc_bias
    assert any(k.endswith("experts.down_proj") for k in changed)
    with torch.no_grad():
        used = student(text).ffn_experts.float().mean()
    assert abs(float(used) - 4) < 0.5


@torch.no_grad()
def _kl(student, teacher, text):
    return float(kl_loss(student(text).logits, teacher(text).logits, torch.ones(text.shape), "forward", 1.0))


def test_lora_adapters_merge_into_an_ordinary_model(setup, tmp_path):
    dense, conversion, text = setup
    student = with_budget(conversion, 0.5)
    keys = set(student.state_dict())
    embed = student.embed_tokens.weight.clone()
    q = student.layers[0].self_attn.q_proj.weight.clone()
    distill(student, dense, text, tmp_path, DistillConfig(steps=3, mode="lora", lora_rank=2, lr=1e-2, batch_size=2,
                                                          context=64), progress=False)
    assert set(student.state_dict()) == keys
    assert not any(parametrize.is_parametrized(m) for m in student.modules())
    assert torch.equal(student.embed_tokens.weight, embed)
    assert not torch.equal(student.layers[0].self_attn.q_proj.weight, q)  # the adapter, merged


def test_an_interrupted_run_resumes_to_the_same_weights(setup, tmp_path, monkeypatch):
    dense, conversion, text = setup
    cfg = DistillConfig(steps=4, lr=3e-3, batch_size=2, context=64, checkpoint_every=2, on_policy=0.5,
                        sample_tokens=16)
    whole = with_budget(conversion, 0.5)
    distill(whole, dense, text, tmp_path / "whole", cfg, progress=False)
    step = distill_module._step

    def crash_at_3(student, teacher, windows, i, *args):
        if i == 3:
            raise KeyboardInterrupt
        return step(student, teacher, windows, i, *args)

    monkeypatch.setattr(distill_module, "_step", crash_at_3)
    parts = with_budget(conversion, 0.5)
    with pytest.raises(KeyboardInterrupt):
        distill(parts, dense, text, tmp_path / "parts", cfg, progress=False)
    monkeypatch.setattr(distill_module, "_step", step)
    assert not list((tmp_path / "parts").glob("*.tmp"))  # checkpoints are written whole, then renamed
    with pytest.raises(ValueError, match="different distillation settings"):
        distill(with_budget(conversion, 0.5), dense, text, tmp_path / "parts", dataclasses.replace(cfg, lr=1e-3),
                resume=True, progress=False)
    resumed = with_budget(conversion, 0.5)  # a fresh conversion, as `densa moefy --resume` rebuilds it
    report = distill(resumed, dense, text, tmp_path / "parts", dataclasses.replace(cfg, checkpoint_every=1),
                     resume=True, progress=False)  # how often it checkpoints may change on resume
    assert len(report["distill_val"]) == 0 and report["distill_steps"] == 4
    for (name, a), b in zip(whole.state_dict().items(), resumed.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0, msg=name)


def test_validation_chooses_the_step(setup, tmp_path):
    dense, conversion, text = setup
    student = with_budget(conversion, 0.5)
    scores, kept = iter([3.0, 1.0, 2.0]), {}

    def validate(model):
        kept[len(kept) + 1] = {k: v.clone() for k, v in model.state_dict().items()}
        return next(scores)

    report = distill(student, dense, text, tmp_path, DistillConfig(steps=3, lr=3e-3, batch_size=2, context=64,
                                                                   eval_every=1), validate=validate, progress=False)
    assert report["distill_best_step"] == 2 and [s for s, _ in report["distill_val"]] == [1, 2, 3]
    for name, value in student.state_dict().items():
        assert torch.equal(value, kept[2][name]), name


def test_on_policy_steps_are_spread_and_settings_are_checked():
    cfg = DistillConfig(steps=8, on_policy=0.25)
    assert [i for i in range(8) if cfg.on_policy_step(i)] == [3, 7]
    with pytest.raises(ValueError, match="--on-policy 2"):
        DistillConfig(on_policy=2)
    with pytest.raises(ValueError, match="--distill 'full'"):
        DistillConfig(mode="full")

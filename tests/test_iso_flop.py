"""The iso-FLOP study: equal-FLOP steps, matched variants, the ratio's interpolation, a tiny end-to-end run."""

import argparse
import json
from pathlib import Path

import pytest

from densa.counting import count_parameters, ffn_flops_per_token, flops_per_token
from densa.model.model import DensaModel
from densa.study import iso_flop
from densa.study.iso_flop import VARIANTS, equal_flop_steps, load_study, spent_training_flops_per_token, variant_config
from densa.study.iso_flop_analysis import first_crossing, flops_to_reach, loss_ratios

RECIPES = Path(__file__).resolve().parents[1] / "recipes"


def test_equal_flop_steps_spend_the_budget():
    assert equal_flop_steps(1e12, 7.5e6, 1024) == round(1e12 / 7.5e6 / 1024)
    assert equal_flop_steps(1e3, 7.5e6, 1024) == 1  # never zero steps
    study, base, train = load_study(RECIPES / "iso-flop-cpu.yaml", [], None)
    tokens = train["batch_size"] * train["context"]
    for variant in VARIANTS.values():
        per_token = flops_per_token(variant_config(base, variant), train["context"]).training
        steps = equal_flop_steps(study.budgets[0], per_token, tokens)
        # the run's FLOPs land within half a step of the budget, whatever the variant costs per token
        assert abs(steps * tokens * per_token - study.budgets[0]) <= 0.5 * tokens * per_token


def test_topk_moe_matches_densa_in_params_and_active_flops():
    _, base, train = load_study(RECIPES / "iso-flop-quick.yaml", [], None)
    # the same mixer on both sides, so only the FFN differs: densa's dynamic MoE against the top-k MoE
    densa, topk = variant_config(base, VARIANTS["attention_moe"]), variant_config(base, VARIANTS["topk_moe"])
    assert topk.num_experts_per_tok == round(densa.target_active_experts)
    assert topk.expert_intermediate_size == densa.expert_intermediate_size == base.expert_intermediate_size
    p_dyn, p_topk = count_parameters(DensaModel(densa)), count_parameters(DensaModel(topk))
    router_rows = (densa.num_null_experts + densa.num_identity_experts) * densa.hidden_size * densa.num_hidden_layers
    assert p_dyn.total - p_topk.total == router_rows  # the same experts; only the zero-computation router rows differ
    f_dyn, f_topk = (flops_per_token(c, train["context"]).total for c in (densa, topk))
    assert f_dyn == pytest.approx(f_topk, rel=0.01)


def test_first_crossing_interpolates_and_reports_never():
    curve = [[10.0, 5.0], [20.0, 4.0], [30.0, 3.0]]
    assert first_crossing(curve, 3.5) == pytest.approx(25.0)  # halfway between 4.0 and 3.0
    assert first_crossing(curve, 4.0) == pytest.approx(20.0)
    assert first_crossing(curve, 6.0) == 10.0  # already below at the first evaluation
    assert first_crossing(curve, 2.9) is None
    # non-monotone curve: the first crossing counts, not a later one
    assert first_crossing([[1.0, 5.0], [2.0, 3.0], [3.0, 4.0], [4.0, 2.0]], 3.5) == pytest.approx(1.75)
    assert flops_to_reach([curve, [[5.0, 4.5], [15.0, 3.4]]], 3.5) == pytest.approx(5 + 10 * 1.0 / 1.1)
    assert flops_to_reach([curve], 1.0) is None


def _record(variant, seed, flops, curve, budget_index=0):
    return {"variant": variant, "seed": seed, "budget_index": budget_index, "training_flops": flops,
            "curve": curve}


def test_loss_ratio_on_synthetic_curves():
    records = [
        _record("dense", 0, 100.0, [[50.0, 4.0], [100.0, 3.0]]),
        _record("dense", 1, 100.0, [[50.0, 4.2], [100.0, 3.2]]),
        # densa reaches 3.0 at 40 (seed 0) and 3.2 at 60 (seed 1)
        _record("densa", 0, 100.0, [[20.0, 3.5], [60.0, 2.5]]),
        _record("densa", 1, 100.0, [[20.0, 4.0], [60.0, 3.2], [100.0, 3.0]]),
        _record("topk_moe", 0, 100.0, [[50.0, 3.9], [100.0, 3.5]]),  # never reaches 3.0
    ]
    r = loss_ratios(records, "densa", 0)
    assert r["per_seed"][0]["ratio"] == pytest.approx(0.4)
    assert r["per_seed"][1]["ratio"] == pytest.approx(0.6)
    assert r["ratio"] == pytest.approx(0.5) and r["ci_low"] < 0.5 < r["ci_high"]
    never = loss_ratios(records, "topk_moe", 0)
    assert never["ratio"] is None and never["never_reached"] == [0]
    assert never["per_seed"][0]["lower_bound"] == pytest.approx(1.0)


def test_spent_flops_follow_the_routing_log():
    _, base, train = load_study(RECIPES / "iso-flop-quick.yaml", [], None)
    cfg = variant_config(base, VARIANTS["densa"])
    analytic = flops_per_token(cfg, train["context"])
    assert spent_training_flops_per_token(cfg, train["context"], []) == analytic.training
    one_less = ffn_flops_per_token(cfg) - ffn_flops_per_token(cfg, cfg.target_active_experts - 1)
    log = [{"kind": "train", **{f"routing/layers.{i}.mean_ffn_experts": cfg.target_active_experts - 1
                                for i in range(cfg.num_hidden_layers)}}]
    spent = spent_training_flops_per_token(cfg, train["context"], log)
    assert spent == pytest.approx(analytic.training - 3 * one_less * cfg.num_hidden_layers)


def test_every_iso_flop_recipe_loads():
    for recipe in sorted(RECIPES.glob("iso-flop-*.yaml")):
        study, base, _ = load_study(recipe, [], None)
        assert study.budgets == sorted(study.budgets) and base.vocab_size == study.vocab_size


def test_bad_overrides_are_clear():
    with pytest.raises(ValueError, match="SECTION.KEY=VALUE"):
        load_study(RECIPES / "iso-flop-quick.yaml", ["budgets=[1]"], None)
    with pytest.raises(ValueError, match="must include 'dense'"):
        load_study(RECIPES / "iso-flop-quick.yaml", ["study.variants=[densa]"], None)
    with pytest.raises(ValueError, match="study.seeds='x': expected int"):
        load_study(RECIPES / "iso-flop-quick.yaml", ["study.seeds=x"], None)
    with pytest.raises(ValueError, match="study.budgets='abc': expected a list of FLOP counts"):
        load_study(RECIPES / "iso-flop-quick.yaml", ["study.budgets=abc"], None)


def test_quick_study_writes_every_key(tmp_path):
    overrides = ["study.variants=[densa, dense]", "study.budgets=[1.5e9, 3.0e9]", "study.evals_per_run=2",
                 "study.eval_windows=4", "study.decode_tokens=2", "data.vocab_size=300", "train.batch_size=4",
                 "train.context=32", "train.eval_batches=1", "study.eval_tasks=[]"]
    args = argparse.Namespace(config=None, quick=True, seeds=1, overrides=overrides, no_progress=True)
    flat = iso_flop.run(args, tmp_path)
    for key in ("flops_to_dense_loss_ratio", "flops_to_dense_loss_ratio_ci", "flops_to_dense_loss_never_reached",
                "densa_val_bpb", "dense_val_bpb", "densa_inference_flops_per_token", "dense_ms_per_token",
                "best_quality_per_inference_flop"):
        assert key in flat
    detail = json.loads((tmp_path / "iso-flop-detail.json").read_text())
    runs = detail["runs"]
    assert len(runs) == 4 and all(len(r["curve"]) >= 2 for r in runs)
    for r in runs:  # equal FLOPs: every run lands within a few percent of its budget
        assert r["training_flops"] == pytest.approx(r["budget"], rel=0.15)
    assert (tmp_path / "iso-flop-pareto.png").stat().st_size > 0
    assert not list(tmp_path.glob("runs/*/checkpoints"))  # checkpoints are not kept by default
    # a second call reuses the finished runs instead of training again
    again = iso_flop.run(args, tmp_path)
    assert again["densa_val_bpb"] == flat["densa_val_bpb"]

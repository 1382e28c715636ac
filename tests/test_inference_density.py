"""densa study inference-density: the pre-registered selection, the summary keys and the held-out halves (the
study's training runs are the iso-FLOP study's, tested there; `--quick` runs end to end in minutes)."""

from pathlib import Path

import pytest

from densa.config import from_preset
from densa.model.model import DensaModel
from densa.study.inference_density import BASELINES, pick_finalist, render_table, summarise
from densa.study.iso_flop import CLASSIC, VARIANTS, load_study, variant_config

RECIPES_DIR = Path(__file__).resolve().parents[1] / "recipes"


def record(name, seed, val_id, test_bpb, flops=1e6, budget_index=0):
    curve = [[1e9, 5.0, 4.0], [2e9, 4.0 + seed * 0.01 - (0.2 if name != "dense" else 0), 3.5]]
    held = {"val": {"bits_saved_per_gflop": val_id, "bpb": test_bpb, "flops_per_token": flops},
            "test": {"bits_saved_per_gflop": (8 - test_bpb) / (flops / 1e9), "bpb": test_bpb, "flops_per_token": flops}}
    return {"variant": name, "seed": seed, "budget_index": budget_index, "budget": 2e9, "training_flops": 2e9,
            "curve": curve, "heldout": held, "params_total": 10, "params_active": 5, "train_s": 1.0}


def test_finalist_is_picked_on_the_validation_half_among_densa_arms():
    records = [record("densa", 0, 10.0, 3.0), record("delta_moe", 0, 12.0, 3.5), record("dense", 0, 99.0, 2.0),
               record("topk_moe", 0, 50.0, 2.0), record("mega_moe_lean", 1, 80.0, 2.0)]  # seed 1: not a pick
    assert pick_finalist(records, 0) == "delta_moe"  # baselines are never the finalist; the test half is unused
    assert set(BASELINES) == {"dense", "topk_moe"}


def test_summary_keys_are_ratios_of_test_half_figures():
    records = [record(n, s, 1.0, bpb, flops) for n, bpb, flops in (("densa", 3.0, 2e6), ("dense", 3.5, 1e6),
                                                                    ("topk_moe", 3.2, 1e6), ("delta_moe", 3.1, 1.5e6))
               for s in (0, 1, 2)]
    latency = {"densa": 4.0, "dense": 2.0, "topk_moe": 3.0, "delta_moe": 1.0}
    flat, table = summarise(records, latency, [2e9], "delta_moe", usd_per_hour=0.1)
    id_ = {n: (8 - table[n]["test_bpb"]) / (table[n]["inference_flops_per_token"] / 1e9) for n in table}
    assert flat["id_vs_dense"] == pytest.approx(id_["delta_moe"] / id_["dense"])
    assert flat["id_vs_topk"] == pytest.approx(id_["delta_moe"] / id_["topk_moe"])
    assert flat["densa_id_vs_dense"] == pytest.approx(id_["densa"] / id_["dense"])
    assert flat["ms_per_token_vs_dense"] == pytest.approx(0.5)
    assert flat["flops_to_dense_loss_ratio"] is not None and flat["flops_to_dense_loss_ratio"] < 1
    assert table["densa"]["seeds"] == 3 and table["densa"]["test_bpb_ci"][0] is not None
    assert "delta_moe **(finalist)**" in render_table(table, flat)


def test_every_lever_builds_and_the_recipes_load():
    assert set(CLASSIC) == {"densa", "dense", "topk_moe", "mega_topk", "mega_dense", "attention_moe"}
    for recipe in ("inference-density-quick.yaml", "inference-density-cpu.yaml", "inference-density-gpu.yaml"):
        study, base, train = load_study(RECIPES_DIR / recipe, [], None)
        assert train["context"] >= (128 if "quick" in recipe else 512)
        for name in study.variants:
            cfg = variant_config(base, VARIANTS[name])
            assert cfg.mixer == VARIANTS[name].mixer
    base = from_preset("tiny", ffn="moe", num_experts=8, num_experts_per_tok=4, num_null_experts=2,
                       num_identity_experts=2, target_active_experts=3.0, num_hidden_layers=3)
    for variant in VARIANTS.values():
        DensaModel(variant_config(base, variant))  # every arm is a valid model

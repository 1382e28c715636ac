"""Intelligence Density that a model cannot win by being small: chance-corrected quality, no ratio at chance,
intervals that resample the denominators, dropped resamples counted, Pareto comparisons at matched cost, chance
levels read from the shipped data, the busy-machine check, and the report saying what is missing."""

import numpy as np
import pytest

from densa.eval import density, machine_load, measure, report, scores
from densa.eval.benchmarks import TASKS, TaskSpec


def mc_rows(correct, flops_per_token=1e9, tokens=10, items=None):
    """Multiple-choice item rows (log-likelihood scoring: no output tokens)."""
    return [{"item": (items or [f"x/{i}" for i in range(len(correct))])[i], "ok": True, "metrics": {"acc": float(c)},
             "prompt_tokens": tokens, "output_tokens": 0, "processed_tokens": tokens, "prompt_bytes": 4 * tokens,
             "output_bytes": 0, "flops": flops_per_token * tokens, "wall_s": 0.1} for i, c in enumerate(correct)]


PRICES = {"input": 2.0, "output": 8.0, "blended": 3.5}


def test_quality_definitions():
    assert density.chance_corrected(0.625, 0.25) == pytest.approx(0.5)
    assert density.chance_corrected(0.25, 0.25) == 0.0 and density.chance_corrected(0.1, 0.25) < 0
    np.testing.assert_allclose(density.chance_corrected(np.array([1.0, 0.5]), np.array([0.5, 0.5])), [1.0, 0.0])
    assert density.bits_saved(1.5) == 6.5
    with pytest.raises(ValueError, match="chance level"):
        density.chance_corrected(0.5, 1.0)
    assert density.density(0.3, 0.01, [0.1, 0.5]).value == pytest.approx(30.0)
    assert density.density(0.3, 0.01, [-0.05, 0.5]).missing == density.AT_CHANCE
    assert density.density(-0.3, 0.01, [-0.5, -0.1]).missing == density.BELOW_CHANCE
    assert density.density(0.3, None, [0.1, 0.5], "FLOP").missing == "no FLOP figure"
    assert density.density(None, 0.01).missing == "no quality figure"


def test_a_small_model_at_chance_gets_no_density_and_a_real_one_does():
    """The issue's case: a tiny model at chance on a two-choice task used to get 10x the density of a real model."""
    rng = np.random.default_rng(0)
    tiny = scores.summarize("winogrande", mc_rows(rng.random(20) < 0.4, flops_per_token=1.5e7), PRICES,
                            chance=np.full(20, 0.5))
    real = scores.summarize("winogrande", mc_rows(np.arange(40) % 10 < 8, flops_per_token=2.9e8), PRICES,
                            chance=np.full(40, 0.5))
    assert tiny["at_chance"] and tiny["intelligence_density"]["per_gflop"] is None
    assert tiny["intelligence_density"]["missing"]["per_gflop"] == "at chance"
    assert not real["at_chance"] and real["quality"] == pytest.approx((0.8 - 0.5) / 0.5)
    assert real["intelligence_density"]["per_gflop"] == pytest.approx(0.6 / 0.29)
    assert real["intelligence_density"]["per_usd"] == pytest.approx(0.6 / 2.0)  # all input tokens: $2 per 1M


def test_intervals_resample_the_denominators_and_count_dropped_resamples():
    rows = mc_rows([1.0] * 6)  # quality 1 on every resample: any width comes from the denominator
    for i, row in enumerate(rows):  # FLOPs per token and the share of (dearer) output tokens vary by item
        row["flops"] = 1e10 * (1 + i)
        row["output_tokens"], row["processed_tokens"] = i, 10 + i
    r = scores.summarize("winogrande", rows, PRICES, chance=np.full(6, 0.5))
    d = r["intelligence_density"]
    assert r["quality_ci"] == [1.0, 1.0]
    assert d["per_gflop_ci"][0] < d["per_gflop"] < d["per_gflop_ci"][1]
    assert d["per_usd_ci"][0] < d["per_usd"] < d["per_usd_ci"][1]
    assert d["dropped_resamples"] == {"quality": 0, "per_gflop": 0, "per_usd": 0}
    # an item set where most items cost nothing: resamples without the priced item have no finite ratio
    free = mc_rows([1.0] * 5)
    for row in free[1:]:
        row["flops"] = 0.0
    r = scores.summarize("winogrande", free, PRICES, chance=np.full(5, 0.5))
    dropped = r["intelligence_density"]["dropped_resamples"]["per_gflop"]
    assert 250 < dropped < 420  # P(item 0 never drawn in 5) = 0.8^5 = 0.33
    ci, n_dropped = scores.bootstrap(lambda idx: np.where(idx[:, 0] == 0, np.inf, 1.0), 4)
    assert ci == [1.0, 1.0] and 200 < n_dropped < 300


def test_missing_figures_are_named_not_printed(monkeypatch):
    endpoint = mc_rows([1, 1, 1, 0, 1, 1, 1, 1])
    for row in endpoint:
        row["flops"] = None
    r = scores.summarize("winogrande", endpoint, PRICES, chance=np.full(8, 0.5))
    assert r["intelligence_density"]["per_gflop"] is None
    assert "no FLOP figure" in r["intelligence_density"]["missing"]["per_gflop"]
    assert r["intelligence_density"]["per_usd"] is not None
    monkeypatch.setitem(TASKS, "riddles", TaskSpec("riddles", "x", "exact_match", "generate", None))
    rows = [dict(row, metrics={"exact_match": 1.0}) for row in mc_rows([1, 1])]
    r = scores.summarize("riddles", rows, PRICES)
    assert r["quality"] is None and r["chance"] is None
    assert r["intelligence_density"]["missing"]["per_gflop"] == "no chance level defined for riddles"


def test_bits_per_byte_quality_is_bits_saved_per_byte():
    rows = [{"item": f"d/{i}", "ok": True, "metrics": {"bits_per_byte": [-np.log(2) * 2.0 * b, b]},
             "prompt_tokens": 100, "output_tokens": 0, "processed_tokens": 100, "prompt_bytes": b, "output_bytes": 0,
             "flops": 1e9 * 100, "wall_s": 1.0} for i, b in enumerate([400, 400, 400])]
    r = scores.summarize("bpb_wikitext2", rows, PRICES)
    assert r["score"] == pytest.approx(2.0) and r["quality"] == pytest.approx(6.0) and r["chance"] is None
    d = r["intelligence_density"]
    assert d["unit"] == "byte" and d["per_gflop_cost"] == pytest.approx(0.25)  # 100 GFLOP over 400 bytes
    assert d["per_gflop"] == pytest.approx(6.0 / 0.25)


def test_chance_levels_come_from_the_shipped_data():
    pytest.importorskip("lm_eval")
    from densa.eval.chance import choices_per_item, item_chance, task_chance

    choices = choices_per_item("arc_easy")
    three, five = (next(i for i, n in choices.items() if n == k) for k in (3, 5))
    np.testing.assert_allclose(item_chance("arc_easy", [three, five]), [1 / 3, 1 / 5])
    assert 0.249 < task_chance("arc_easy", list(choices)) < 0.251  # mostly 4 choices
    assert task_chance("boolq", ["densa_boolq/0", "densa_boolq/7"]) == 0.5
    assert task_chance("gsm8k", ["densa_gsm8k_cot/0"]) == 0.0 and item_chance("bpb_wikitext2", ["x"]) is None
    with pytest.raises(ValueError, match="no item"):
        item_chance("boolq", ["densa_boolq/999999"])


def test_pareto_comparison_at_matched_cost():
    small = density.Point("small", 1.0, 0.05, (-0.1, 0.2))
    big = density.Point("big", 10.0, 0.4, (0.3, 0.5))
    mid = density.Point("mid", 5.0, 0.5, (0.4, 0.6))
    assert density.dominates(mid, big) and not density.dominates(big, mid)
    assert density.compare(big, mid) == "mid is better at ≤ big's cost (quality intervals overlap)"
    assert density.compare(small, big) == "neither: small is cheaper, big is better"
    assert [v for *_, v in density.matched_cost([small, mid])] == ["neither: small is cheaper, mid is better"]


def test_busy_machine_verdict():
    quiet = machine_load.verdict([50.0, 52.0], [51.0, 50.0], 0.05, [10.0, 10.5, 10.2])
    assert not quiet["busy"] and quiet["peak_gflops_per_s"] == 52.0
    busy = machine_load.verdict([50.0], [20.0], 1.9, [10.0, 30.0, 12.0])
    assert busy["busy"] and len(busy["reasons"]) == 3
    assert "reference matmul ran at 50.0 GFLOP/s before" in busy["reasons"][1]
    import torch

    assert min(machine_load.reference_gflops(torch.device("cpu"), torch.float32, seconds=0.01)) > 0
    assert machine_load.OtherLoad().start().stop() is None or machine_load.OtherLoad().start().stop() >= 0


def test_prices_carry_the_rounds_spread_and_the_idealised_cost():
    rounds = [([0.1], [0.01] * 4, [0.4], [0.02] * 4), ([0.1], [0.01] * 4, [0.8], [0.04] * 4)]
    latency = measure._summary(rounds, 4, 128, 5)
    latency["machine"] = machine_load.verdict([100.0], [100.0], 0.0, [10.0, 10.0])
    p = measure.prices(latency, 0.1)
    lo, hi = p["range"]["blended"]
    assert lo < hi and p["rounds"] == 2 and lo <= p["blended"] <= hi
    r = scores.summarize("winogrande", mc_rows([1, 1, 0, 1]), p, chance=np.full(4, 0.5))
    # 1 GFLOP per token at a measured 100 GFLOP/s: 10 ms per token, $0.1/hour -> $0.2778 per 1M tokens
    assert r["idealised"]["ms_per_token"] == pytest.approx(10.0)
    assert r["idealised"]["usd_per_1m_tokens"] == pytest.approx(0.1 / 3600 * 0.01 * 1e6)


def test_report_leads_with_quality_vs_cost_and_names_what_is_missing(tmp_path):
    rounds = [([0.1], [0.01] * 4, [0.4], [0.02] * 4), ([0.1], [0.03] * 4, [0.4], [0.02] * 4)]
    latency = measure._summary(rounds, 4, 128, 5)
    latency["machine"] = machine_load.verdict([100.0], [40.0], 1.5, [10.0, 30.0])
    p = measure.prices(latency, 0.1)
    base = {"metric": "acc", "higher_is_better": True, "ttft_ms": latency["ttft_ms"],
            "ms_per_token": latency["ms_per_token"], "throughput_tokens_per_s": latency["throughput_tokens_per_s"],
            "latency_probe": {"batch_size": 4}, "usd_per_1m_tokens": p, "contamination": None}
    records = []
    for model, correct, fpt in (("tiny", [1, 0, 0, 1, 0, 1, 0, 0], 1e7), ("real", [1, 1, 1, 1, 1, 1, 1, 0], 3e8)):
        rows = mc_rows(correct, flops_per_token=fpt)
        records.append(base | {"model": model, "label": model, "task": "winogrande"}
                       | scores.summarize("winogrande", rows, p, chance=np.full(8, 0.5)))
    meta = {"settings": {"limit": 8, "seed": 0, "batch_size": 4}, "densa_version": "0", "lm_eval_version": "0",
            "usd_per_hour": 0.1, "hardware": "cpu-2core", "models": {}, "tasks": {"winogrande": {"n_total": 1267}}}
    report.write_report(tmp_path, meta, records)
    md = (tmp_path / "report.md").read_text()
    assert md.index("Who is better at matched cost") < md.index("Intelligence Density (quality per cost")
    # per GFLOP the tiny model is cheaper (a trade-off); at the same measured ms and $ the real one is better
    assert "| neither: tiny is cheaper, real is better (quality intervals overlap) | real is better at ≤ tiny's" in md
    assert "| tiny | winogrande |" in md and "at chance" in md
    assert "Warning:" in md and "busy" in md and "idealised" in md
    assert (tmp_path / "quality_vs_cost.png").is_file()


def test_quickstart_report_uses_the_shared_definitions(tmp_path):
    from densa.report import quickstart

    def row(params, bpb, gflops_per_token, **extra):
        return {"params": params, "active": params, "heldout_bpb": bpb, "gflops_per_token": gflops_per_token,
                "bytes_per_token": 4.0, "gflops_per_byte": gflops_per_token / 4.0, **extra}

    rows = {"densa": row(18_000_000, 1.37, 0.016, training_flops=1e13, steps=100, tokens_per_s=800.0),
            "dense baseline": row(6_900_000, 1.66, 0.015, training_flops=1e13, steps=112, tokens_per_s=2500.0),
            "smollm2-135m": row(134_000_000, 0.82, 0.29, note="pretrained")}
    d = quickstart.bits_saved_per_gflop(rows["densa"])
    assert d.value == pytest.approx((8 - 1.37) / 0.004)
    assert quickstart.bits_saved_per_gflop(row(1, 8.5, 0.01)).missing == density.AT_CHANCE  # worse than raw bytes
    pair = ("densa", "smollm2-135m", "neither: densa is cheaper, smollm2-135m is better")
    assert pair in quickstart.matched_cost(rows)
    records, names = [], {"tiny": "densa", "real": "smollm2-135m"}
    for model, correct, fpt in (("tiny", [1, 0, 0, 1, 0, 1, 0, 0] * 2, 1.6e7), ("real", [1] * 7 + [0] + [1] * 7 + [0],
                                                                                  2.9e8)):
        records.append({"model": model, "task": "winogrande"}
                       | scores.summarize("winogrande", mc_rows(correct, fpt), PRICES, chance=np.full(16, 0.5)))
    suite = quickstart.suite_table(records, names, 16)
    assert suite["rows"][0][-1] == "at chance" and suite["rows"][1][-1] == f"{0.75 / 0.29:.2f}"
    assert suite["matched"] == [["winogrande", "densa vs smollm2-135m",
                                 "neither: densa is cheaper, smollm2-135m is better"]]
    md, _ = quickstart.write_report(rows, suite, tmp_path, preset="cpu-small", corpus="tinystories", text_bytes=1000,
                                    wall_s=1.0)
    text = md.read_text()
    assert text.index("Quality against inference cost") < text.index("## Intelligence Density")
    assert "at chance" in text and f"**{d.text()}**" in text


def test_rescoring_the_committed_quickstart_leaves_no_ratio_at_chance():
    """docs/results/quickstart-before-issue-14.json (a quickstart run scored with the old definition): every
    eval-suite score's interval includes chance, so no model keeps a ratio."""
    pytest.importorskip("lm_eval")
    from pathlib import Path

    from densa.eval.rescore import table

    lines = table(Path(__file__).parents[1] / "docs" / "results" / "quickstart-before-issue-14.json").splitlines()[2:]
    assert len(lines) == 6
    assert all(line.split(" | ")[6] == "at chance" for line in lines)
    assert "| densa | piqa | 0.400 [0.200, 0.600] | 0.500 | 25.9 |" in lines[1]

"""`densa eval`: local lm-eval tasks load offline with the standard prompts, records carry every field, bootstrap
intervals, resume, failed items, one-line errors, the latency probe's decoding loop against `generate`, MoE spend."""

import json
import math

import numpy as np
import pytest
import torch
import yaml
from conftest import tiny_model

from densa.checkpoint import save_checkpoint
from densa.data.corpora import corpus_texts
from densa.data.tokenizer import train_tokenizer
from densa.eval import api, benchmarks, measure, runner, scores
from densa.eval.report import pareto_front

pytest.importorskip("lm_eval")

REQUIRED = ["model", "task", "score", "score_ci", "n_items", "output_tokens_mean", "flops_per_token", "ttft_ms",
            "ms_per_token", "usd_per_1m_tokens", "intelligence_density", "token_value", "combined"]


def make_checkpoint(path, **overrides):
    save_checkpoint(tiny_model(vocab_size=320, max_position_embeddings=512, **overrides), path)
    text = next(corpus_texts("tinyshakespeare"))[:60_000]
    train_tokenizer([text], vocab_size=320).save_pretrained(str(path))
    return path


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("eval") / "ck")


@pytest.fixture(scope="module")
def run(checkpoint, tmp_path_factory):
    root = tmp_path_factory.mktemp("eval-run")
    # a "training corpus" that contains the first evaluated ARC-Easy item verbatim
    index = benchmarks.all_items("arc_easy").index(benchmarks.subset("arc_easy", 2, 0)[0])
    from densa.eval.items import item_texts

    (root / "corpus.txt").write_text("Some unrelated text.\n" + item_texts("arc_easy")[index][0] + "\n")
    records = api.evaluate([str(checkpoint)], "arc_easy,gsm8k,bpb", 2, root / "out", batch_size=2, max_gen_toks=4,
                           progress=False, contamination_corpus=str(root / "corpus.txt"))
    out = root / "out"
    return out, records


def test_records_have_every_field_and_the_report_is_written(run):
    out, records = run
    assert [r["task"] for r in records] == ["arc_easy", "gsm8k", "bpb_wikitext2"]
    for r in records:
        assert set(REQUIRED) <= set(r), set(REQUIRED) - set(r)
        assert r["n_items"] == 2 and r["complete"] and r["n_failed"] == 0
        assert r["score_ci"][0] <= r["score"] <= r["score_ci"][1]
        assert r["flops_per_token"] > 0 and r["ttft_ms"]["batch_1"]["median"] > 0
        assert r["usd_per_1m_tokens"]["blended"] > 0
    by_task = {r["task"]: r for r in records}
    assert by_task["bpb_wikitext2"]["token_value"] is None and by_task["bpb_wikitext2"]["combined"] is None
    assert by_task["bpb_wikitext2"]["intelligence_density"]["unit"] == "byte"  # bits saved per GFLOP per byte
    arc = by_task["arc_easy"]
    assert 0.2 <= arc["chance"] <= 1 / 3 and arc["at_chance"]  # two items cannot clear chance: no density
    assert arc["intelligence_density"]["per_gflop"] is None and arc["intelligence_density"]["missing"]
    prices = arc["usd_per_1m_tokens"]
    assert prices["rounds"] == measure.PROBE_ROUNDS and prices["range"]["blended"][0] <= prices["range"]["blended"][1]
    assert prices["machine"]["peak_gflops_per_s"] > 0 and isinstance(prices["machine"]["busy"], bool)
    assert arc["idealised"]["usd_per_1m_tokens"] > 0
    assert by_task["bpb_wikitext2"]["score"] > 1.0  # an untrained model: several bits per byte
    assert by_task["gsm8k"]["token_value"]["per_1k_bytes"] is not None and by_task["gsm8k"]["output_tokens_mean"] > 0
    assert by_task["arc_easy"]["token_value"] is None and by_task["arc_easy"]["output_tokens_mean"] == 0
    saved = json.loads((out / "results.json").read_text())
    assert saved["records"] == json.loads(json.dumps(records))
    assert saved["meta"]["subsets"]["gsm8k"] == benchmarks.subset("gsm8k", 2, 0)
    assert saved["meta"]["densa_version"] and saved["meta"]["run_config_hash"]
    for name in ("report.md", "report.html", "quality_vs_cost.png", "token_value.png"):
        assert (out / name).is_file(), name
    card = yaml.safe_load(next((out / "model_cards").glob("*.yaml")).read_text())
    assert len(card["model-index"][0]["results"]) == 3


def test_contaminated_items_are_marked(run):
    out, records = run
    arc = records[0]["contamination"]
    assert arc["flagged_items"] == [benchmarks.subset("arc_easy", 2, 0)[0]] and arc["n_flagged_in_subset"] == 1
    assert arc["rate"] == pytest.approx(1 / 2376) and arc["score_clean"] is not None
    assert records[1]["contamination"]["n_flagged_in_subset"] == 0 and records[2]["contamination"] is None
    report_md = (out / "report.md").read_text()
    assert "1 flagged" in report_md and f"`{arc['flagged_items'][0]}`" in report_md  # the item itself is named
    assert arc["flagged_items"][0] in (out / "report.html").read_text()


def test_standard_prompts(run):
    out, records = run
    rows = {}
    for path in (out / "items").rglob("*.jsonl"):
        rows[path.stem] = [json.loads(line) for line in path.read_text().splitlines()]
    gsm = rows["gsm8k"][0]["prompt"]
    assert gsm.startswith("Q: There are 15 trees in the grove.") and gsm.count("The answer is") == 8
    assert gsm.endswith("\nA:")
    assert rows["arc_easy"][0]["prompt"].startswith("Question: ") and rows["arc_easy"][0]["prompt"].endswith(
        "\nAnswer:")


def test_mmlu_five_shot_prompt():
    from lm_eval.tasks import get_task_dict

    task = get_task_dict(["densa_mmlu_anatomy"], benchmarks.task_manager())["densa_mmlu_anatomy"]
    task.build_all_requests(samples=[0], rank=0, world_size=1)
    (context, continuation) = task.instances[0].args
    assert context.startswith("The following are multiple choice questions (with answers) about anatomy.\n\n")
    assert context.count("\nAnswer: ") == 5 and context.endswith("\nAnswer:") and continuation == " A"
    assert [i.args[1] for i in task.instances] == [" A", " B", " C", " D"]


def test_task_data_and_gold_answers():
    gsm = benchmarks.load_subtasks("gsm8k")["densa_gsm8k_cot"]
    assert len(gsm.eval_docs) == 1319 and gsm.doc_to_target(gsm.eval_docs[0]) == "18"
    sizes = {"arc_easy": 2376, "arc_challenge": 1172, "piqa": 1838, "winogrande": 1267, "boolq": 3270,
             "openbookqa": 500, "bpb_wikitext2": 62}
    for task, n in sizes.items():
        assert len(benchmarks.all_items(task)) == n, task
    assert benchmarks.subset("piqa", 5, 0) == benchmarks.subset("piqa", 5, 0) != benchmarks.subset("piqa", 5, 1)


def test_humaneval_task_uses_the_sandbox_stop_sequences():
    from densa.eval import humaneval

    task = yaml.safe_load((benchmarks.TASK_DIR / "humaneval.yaml").read_text().replace("!function", ""))
    assert task["generation_kwargs"]["until"] == humaneval.STOP_SEQUENCES


def test_resume_skips_finished_items(run, checkpoint, monkeypatch):
    out, records = run
    with pytest.raises(FileExistsError, match="--resume"):
        api.evaluate([str(checkpoint)], "arc_easy,gsm8k,bpb", 2, out, progress=False)
    items = next((out / "items").iterdir()) / "arc_easy.jsonl"
    lines = items.read_text().splitlines()
    items.write_text(lines[0] + "\n")  # as if the run had stopped after the first item
    calls = []
    real = runner._evaluate
    monkeypatch.setattr(runner, "_evaluate", lambda *a: calls.append(a[3]) or real(*a))
    again = api.evaluate([str(checkpoint)], "arc_easy,gsm8k,bpb", 2, out, batch_size=2, max_gen_toks=4,
                         progress=False, resume=True)
    assert calls == [[json.loads(lines[1])["item"]]]
    assert [r["score"] for r in again] == [r["score"] for r in records]
    with pytest.raises(ValueError, match="limit"):
        api.evaluate([str(checkpoint)], "arc_easy,gsm8k,bpb", 3, out, progress=False, resume=True)


def test_a_crashing_item_is_recorded_and_the_run_continues(checkpoint, tmp_path, monkeypatch):
    bad = benchmarks.subset("arc_easy", 4, 0)[1]
    real = runner._evaluate

    def flaky(model, task, subtasks, chunk):
        if bad in chunk:
            raise RuntimeError("simulated model crash")
        return real(model, task, subtasks, chunk)

    monkeypatch.setattr(runner, "_evaluate", flaky)
    (record,) = api.evaluate([str(checkpoint)], "arc_easy", 4, tmp_path / "out", batch_size=2, progress=False)
    assert record["n_items"] == 3 and record["n_failed"] == 1 and record["complete"]
    rows = [json.loads(x) for x in next((tmp_path / "out" / "items").rglob("*.jsonl")).read_text().splitlines()]
    failed = [r for r in rows if not r["ok"]]
    assert [r["item"] for r in failed] == [bad] and "simulated model crash" in failed[0]["error"]


def test_unknown_task_or_model_is_a_one_line_error(tmp_path, capsys):
    from densa.cli import main

    with pytest.raises(ValueError, match="unknown task 'nope'; choose from hellaswag, .*bpb"):
        benchmarks.parse_tasks("arc_easy,nope")
    assert main(["eval", str(tmp_path / "missing"), "--tasks", "arc_easy", "--out", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "missing" in err and "openai:URL#MODEL_NAME" in err
    assert main(["eval", "openai:localhost#x", "--tasks", "arc_easy", "--out", str(tmp_path / "o2")]) == 1
    assert "openai:URL#MODEL_NAME" in capsys.readouterr().err
    assert main(["eval", "x", "--tasks", "nope", "--out", str(tmp_path / "o3")]) == 1
    assert "unknown task 'nope'" in capsys.readouterr().err


def test_bootstrap_interval_matches_the_normal_approximation():
    rng = np.random.default_rng(1)
    x = (rng.random(400) < 0.3).astype(float)
    lo, hi = scores.bootstrap_ci(lambda idx: x[idx].mean(-1), len(x))
    half = 1.96 * math.sqrt(x.mean() * (1 - x.mean()) / len(x))
    assert lo < x.mean() < hi
    assert abs((hi - lo) / 2 - half) < 0.15 * half
    assert scores.bootstrap_ci(lambda idx: x[idx].mean(-1), 0) is None
    # a ratio's interval resamples numerator and denominator together
    num, den = np.ones(50), np.full(50, 4.0)
    assert scores.bootstrap_ci(lambda idx: num[idx].sum(-1) / den[idx].sum(-1), 50) == [0.25, 0.25]


def test_summarize_ratios_by_hand():
    """The published functional forms on four hand-made generative items (docs/eval.md, Scores)."""
    def row(correct, prompt, output, out_bytes, flops):
        return {"ok": True, "metrics": {"exact_match,strict-match": correct}, "prompt_tokens": prompt,
                "output_tokens": output, "processed_tokens": prompt + output, "prompt_bytes": 4 * prompt,
                "output_bytes": out_bytes, "flops": flops, "wall_s": 0.5}

    rows = [row(1.0, 10, 5, 20, 3e9), row(0.0, 10, 15, 60, 5e9), row(1.0, 20, 10, 40, 6e9), row(0.0, 20, 10, 40, 6e9),
            {"item": "x", "ok": False, "error": "boom"}]
    prices = {"input": 2.0, "output": 8.0, "blended": (3 * 2.0 + 8.0) / 4}
    r = scores.summarize("gsm8k", rows, prices)
    assert r["n_items"] == 4 and r["n_failed"] == 1 and r["score"] == 0.5
    assert r["flops_per_token"] == pytest.approx(20e9 / 100)  # Σ flops / Σ processed tokens
    d = r["intelligence_density"]
    assert r["chance"] == 0.0 and r["quality"] == 0.5  # GSM8K is not guessed: quality = score
    assert d["per_gflop_cost"] == pytest.approx(0.2)  # 0.2 GFLOP per token
    assert d["per_usd_cost"] == pytest.approx((60 * 2.0 + 40 * 8.0) / 100)  # $ per 1M of the task's own tokens
    # 2 of 4 correct: a resample of four misses has quality 0, so the interval reaches chance and there is no ratio
    assert r["at_chance"] and d["per_gflop"] is None and d["missing"] == {"per_gflop": "at chance",
                                                                            "per_usd": "at chance"}
    assert r["token_value"]["per_1k_tokens"] == pytest.approx(1000 * 2 / 40)
    assert r["token_value"]["per_1k_bytes"] == pytest.approx(1000 * 2 / 160)
    usd = (60 * 2.0 + 40 * 8.0) / 1e6  # input tokens at the input price, output tokens at the output price
    assert r["usd_per_item"] == pytest.approx(usd / 4)
    assert r["combined"]["correct_per_usd"] == pytest.approx(2 / usd)
    lo, hi = r["token_value"]["per_1k_tokens_ci"]
    assert lo <= r["token_value"]["per_1k_tokens"] <= hi


def test_percentiles_nearest_rank():
    assert measure.percentiles(list(range(1, 11))) == {"median": 5.5, "p90": 9}  # ceil(0.9 · 10) = 9th value
    assert measure.percentiles(list(range(1, 16)))["p90"] == 14
    assert measure.percentiles([7.0]) == {"median": 7.0, "p90": 7.0}
    assert measure.percentiles([]) == {"median": None, "p90": None}


def test_pareto_front():
    assert pareto_front([(1.0, 0.5), (2.0, 0.4), (3.0, 0.7), (0.5, 0.2)]) == [3, 0, 2]


def test_timed_greedy_matches_generate():
    model = tiny_model()
    prompts = torch.randint(0, model.config.vocab_size, (3, 12))
    tokens, ttft, steps = measure.timed_greedy(model, prompts, 6)
    reference = model.generate(prompts, max_new_tokens=6)[:, 12:]
    assert torch.equal(tokens, reference) and ttft > 0 and len(steps) == 5


def test_moe_spend_lies_between_no_experts_and_all_slots(tmp_path):
    from densa.counting import flops_per_token
    from densa.eval.models import load

    path = make_checkpoint(tmp_path / "moe", ffn="moe")
    model = load(str(path), batch_size=1)
    text = next(corpus_texts("tinyshakespeare"))[:2000]
    spent = measure.moe_spent_flops_per_token(model, [text])
    cfg = model.model.config
    n = len(runner.encode_text(model.tokenizer, text))
    analytic = flops_per_token(cfg, n).total
    from densa.counting import ffn_flops_per_token

    layers = cfg.num_hidden_layers
    lo = analytic - layers * (ffn_flops_per_token(cfg) - ffn_flops_per_token(cfg, 0))  # no token uses an expert
    hi = lo + layers * (ffn_flops_per_token(cfg, cfg.num_experts_per_tok) - ffn_flops_per_token(cfg, 0))
    assert lo <= spent <= hi


def test_the_compile_switch_reaches_the_hugging_face_model(checkpoint):
    """`densa eval --compile on` sets the in-process model's `DensaConfig.compile`, which generate()'s steps read
    (tests/test_hf.py checks the compiled generation equals the eager one)."""
    from densa.eval.models import load

    assert load(str(checkpoint), batch_size=1).lm.model.config.compile == "off"
    assert load(str(checkpoint), batch_size=1, compile="on").lm.model.config.compile == "on"


def test_a_generation_past_the_timeout_is_recorded_as_failed(checkpoint, tmp_path):
    (record,) = api.evaluate([str(checkpoint)], "gsm8k", 1, tmp_path / "out", max_gen_toks=4, item_timeout_s=1e-4,
                             progress=False)
    assert record["n_items"] == 0 and record["n_failed"] == 1 and record["score"] is None
    row = json.loads(next((tmp_path / "out" / "items").rglob("*.jsonl")).read_text())
    assert not row["ok"] and "timed out" in row["error"]

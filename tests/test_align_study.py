"""The token-value study's protocol (densa/study/token_value.py): validation-only tuning, one test scoring per arm,
a separate SFT model per seed, every arm (failed ones too) in the JSON, an ordered trial log; and the unanswerable
problems with their invented-number audit."""

import argparse
import json
import shutil

import pytest
from transformers import LlamaConfig, LlamaForCausalLM

from densa.align.evaluate import Output, audit_unanswerable
from densa.align.policy import chat_tokenizer, train_task_tokenizer
from densa.align.problems import (
    abstains,
    extract_answer,
    heldout_and_ood,
    is_correct,
    sft_examples,
    split,
    train_split,
    unanswerable,
    validation_split,
)
from densa.config import ConfigError
from densa.study.token_value import Scorer, Splits, load_study, read_tuning_record, run, select


def test_unanswerable_problems_miss_or_contradict_a_needed_quantity():
    items = unanswerable("heldout", 60)
    assert items == unanswerable("heldout", 60) and items[:10] == unanswerable("heldout", 10)  # seeded, prefix-stable
    assert {u.kind for u in items} == {"missing_start", "missing_step", "contradiction"}
    assert {u.num_ops for u in unanswerable("ood", 20)} == {4}
    for u in items:
        if u.kind == "missing_start":
            assert f"{u.person} has some {u.item}." in u.question
        elif u.kind == "missing_step":
            assert " some" in u.question and f"{u.person} has some" not in u.question
        else:
            counts = [s for s in u.question.split(". ") if s.startswith(f"{u.person} has ") and u.item in s]
            assert len(counts) == 2 and counts[0] != counts[1]
        assert u.answer is None and abstains(u.concise()) and abstains(u.verbose())
        assert extract_answer(u.concise()) is None and len(u.verbose()) > 2 * len(u.concise())
    examples = sft_examples(items[:3], 0.0, 0)
    assert [e["answer"] for e in examples] == [None] * 3 and examples[0]["completion"][0]["content"].endswith("unknown")


def test_validation_split_is_disjoint_from_test_and_train():
    heldout, _ = heldout_and_ood(200, 0)
    validation = validation_split(200, 200)
    train = train_split(3000, 200, 200)
    assert not {p.question for p in validation} & {p.question for p in heldout}
    assert not {p.question for p in train} & ({p.question for p in validation} | {p.question for p in heldout})
    assert validation != split("heldout", 200)


def test_invented_number_audit():
    assert is_correct("#### unknown", None) and not is_correct("#### 4", None) and is_correct("2+2=4. #### 4", 4)
    assert extract_answer("#### 5 then #### unknown") is None  # the *last* final answer counts

    class Tok:
        def decode(self, ids, skip_special_tokens=True):
            return "".join(chr(i) for i in ids)

    texts = ("#### unknown", "#### 12", "I am not sure", "#### 3")
    outs = [Output([ord(c) for c in text], None, True) for text in texts]
    assert audit_unanswerable(outs, Tok()) == {"invented_rate": 0.5, "honest_rate": 0.25, "no_answer_rate": 0.25}
    assert audit_unanswerable(outs[:1], Tok(), budget=3)["no_answer_rate"] == 1.0  # cut before the answer


def test_selection_rule_uses_validation_only_and_prefers_the_shortest_that_keeps_accuracy():
    def m(acc, tokens, invented=0.2):
        return {"accuracy": acc, "mean_tokens": tokens, "invented_rate": invented}

    sft = m(0.90, 60)
    assert select({"sft": sft, "a": m(0.895, 30), "b": m(0.90, 20), "c": m(0.80, 10)}, ["a", "b", "c"])[0] == "b"
    # an invented-number rate above SFT's disqualifies, however short
    assert select({"sft": sft, "a": m(0.90, 30), "b": m(0.90, 10, 0.5)}, ["a", "b"])[0] == "a"
    name, why = select({"sft": sft, "a": m(0.70, 30), "b": m(0.85, 40)}, ["a", "b"])
    assert name == "b" and "no candidate" in why
    # every candidate keeps accuracy but invents more: the fallback says so (what the small-model run met)
    name, why = select({"sft": sft, "a": m(0.895, 20, 0.6), "b": m(0.90, 20, 0.5)}, ["a", "b"])
    assert name == "b" and "['a', 'b'] kept validation accuracy within 1 point but invented numbers" in why
    assert select({"sft": sft}, ["a", "b"]) == (None, "every candidate failed; nothing to confirm")


def test_scorer_refuses_a_second_test_scoring(tmp_path):
    scorer = Scorer(Splits.build(2, 2, 1, 1), 4, False)
    scorer.scored.append(("seed0/rl_tv", "test"))
    with pytest.raises(RuntimeError, match="already scored on the test split"):
        scorer.score("seed0/rl_tv", tmp_path, "test")
    with pytest.raises(ValueError, match="choose validation or test"):
        scorer.score("x", tmp_path, "heldout")
    with pytest.raises(ValueError, match="tuning_seed"):
        load_study(None, 200)


def test_study_end_to_end_on_a_hugging_face_llama_folder(tmp_path):
    """The SmolLM2 arm's code path (policy.path = an HF Llama folder) with a failing candidate and two seeds."""
    examples = sft_examples(train_split(200, 20), 0.5, 0) + sft_examples(unanswerable("train", 20), 0.5, 0)
    tok = train_task_tokenizer([e["prompt"][-1]["content"] + "\n" + e["completion"][0]["content"] for e in examples],
                               300)
    chat_tokenizer(tok)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=256)
    LlamaForCausalLM(cfg).save_pretrained(str(tmp_path / "llama"))
    tok.save_pretrained(str(tmp_path / "llama"))
    (tmp_path / "study.yaml").write_text(json.dumps({"study": {
        "sft_recipe": "recipes/sft-arithmetic-smollm2.yaml", "key_suffix": "_smollm2", "seeds": 2,
        "validation": 4, "heldout": 4, "ood": 2, "unanswerable": 2, "bootstrap": 50, "budgets": [4],
        "candidates": {"gated": ["reward.length=gated"], "broken": ["reward.custom=no_such_module:fn"],
                       "dler": ["reward.length=truncation", "reward.truncate_at=6", "grpo.dynamic_sampling=true",
                                "grpo.scale_rewards=batch", "grpo.epsilon_high=0.28", "grpo.beta=0.04"]}}}))
    args = argparse.Namespace(config=str(tmp_path / "study.yaml"), seeds=None, quick=False, no_progress=True,
                              overrides=[f"policy.path={tmp_path / 'llama'}", "sft.steps=1", "sft.batch_size=2",
                                         "task.train_size=16", "grpo.steps=1", "grpo.prompts_per_step=2",
                                         "grpo.num_generations=2", "grpo.max_completion_length=8",
                                         "reward.overlong_cache=2", "task.max_new_tokens=8"])
    r = run(args, tmp_path / "out")
    assert r["seeds_smollm2"] == 2 and r["selected_smollm2"] in ("gated", "dler")
    assert r["candidates_smollm2"]["broken"]["status"] == "failed"
    trials = r["trials_smollm2"]
    assert [t["arm"] for t in trials] == ["tuning/sft", "tuning/gated", "tuning/broken", "tuning/dler",
                                          "seed0/sft", "seed0/rl_correct", "seed0/rl_tv",
                                          "seed1/sft", "seed1/rl_correct", "seed1/rl_tv"]
    assert [t["order"] for t in trials] == list(range(1, 11))
    assert "no_such_module" in trials[2]["error"] and trials[2]["scored_on"] is None
    assert [(t["status"], t["scored_on"], t["error"]) for t in trials[1:4:2]] == [("ok", "validation", "")] * 2
    assert {t["scored_on"] for t in trials[5:] if t["kind"] == "rl"} == {"test"}
    assert trials[4]["seed"] == 0 and trials[7]["seed"] == 1  # a separate SFT model per seed
    assert trials[5]["from_sft"] != trials[8]["from_sft"]
    for key in ("token_reduction", "accuracy_delta", "accuracy_delta_ci95_seeds", "rl_tv_invented_rate",
                "sft_invented_rate", "rl_tv_ood_invented_rate", "sft_ood_accuracy", "goal_met", "goal_invented_met"):
        assert f"{key}_smollm2" in r, key
    assert set(r["validation_smollm2"]) == {"sft", "gated", "dler"}
    assert (tmp_path / "out" / "trials.jsonl").read_text().count("\n") == 10
    assert (tmp_path / "out" / "token-value.md").is_file()

    # a rerun with the same --out (a resumed study) trains nothing, decodes nothing and reports the same figures
    weights = sorted((tmp_path / "out").rglob("model.safetensors"))
    stamps = [w.stat().st_mtime_ns for w in weights]
    scores = len(list((tmp_path / "out" / "scores").glob("*.json")))
    again = run(args, tmp_path / "out")
    assert [w.stat().st_mtime_ns for w in weights] == stamps and len(weights) >= 7
    assert len(list((tmp_path / "out" / "scores").glob("*.json"))) == scores == 9  # 3 validation + 6 test
    assert again["trials_smollm2"] == trials
    for key in ("token_reduction", "accuracy_delta", "sft_accuracy", "rl_tv_invented_rate", "selected"):
        assert again[f"{key}_smollm2"] == r[f"{key}_smollm2"], key

    # scores and trial log copied to another machine (no model folders) + the record of the tuning phase: the study
    # neither trains nor decodes again and reports the same test figures (the SmolLM2 arm across sessions)
    record = {"tuning_seed": 100, "failed": ["broken"], "validation": r["validation_smollm2"],
              "candidates": json.loads((tmp_path / "study.yaml").read_text())["study"]["candidates"]}
    (tmp_path / "record.json").write_text(json.dumps(record))
    moved = tmp_path / "copied"
    moved.mkdir()
    shutil.copytree(tmp_path / "out" / "scores", moved / "scores")
    shutil.copy(tmp_path / "out" / "trials.jsonl", moved / "trials.jsonl")
    args.overrides.append(f"study.tuning_record={tmp_path / 'record.json'}")
    copied = run(args, moved)
    assert not list(moved.rglob("model.safetensors"))
    assert copied["tuning_record_smollm2"] == str(tmp_path / "record.json")
    for key in ("token_reduction", "accuracy_delta", "sft_accuracy", "rl_tv_invented_rate", "selected",
                "selection_reason", "validation"):
        assert copied[f"{key}_smollm2"] == r[f"{key}_smollm2"], key
    assert "read from" in (moved / "token-value.md").read_text()


def test_a_tuning_record_must_match_the_study_it_stands_for(tmp_path):
    cfg = load_study(None, None, ["study.tuning_record=" + str(tmp_path / "none.json")])
    with pytest.raises(ConfigError, match="no such file"):
        read_tuning_record(cfg)
    m = {"accuracy": 0.8, "mean_tokens": 20.0, "invented_rate": 0.5}
    record = {"tuning_seed": cfg.tuning_seed, "candidates": cfg.candidates, "failed": ["dler"],
              "validation": {name: m for name in ("sft", *cfg.candidates) if name != "dler"}}
    cfg.tuning_record = str(tmp_path / "record.json")
    (tmp_path / "record.json").write_text(json.dumps(record))
    assert "dler" not in read_tuning_record(cfg) and "gated" in read_tuning_record(cfg)
    for change in ({"tuning_seed": 7}, {"candidates": {"gated": ["reward.weight=0.9"]}}):
        (tmp_path / "record.json").write_text(json.dumps({**record, **change}))
        with pytest.raises(ConfigError, match="another config"):
            read_tuning_record(cfg)
    (tmp_path / "record.json").write_text(json.dumps({**record, "failed": []}))
    with pytest.raises(ConfigError, match=r"no validation figures for \['dler'\]"):
        read_tuning_record(cfg)
    with pytest.raises(ConfigError, match="unknown study key"):
        load_study(None, None, ["study.no_such_key=1"])
    assert load_study(None, None, ["study.validation=7"]).validation == 7

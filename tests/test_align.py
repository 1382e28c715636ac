"""densa sft / align / study token-value: smoke tests (the study itself runs outside CI, docs/alignment.md)."""

import json
import math

import pytest
import torch
from datasets import Dataset
from transformers import LlamaConfig, LlamaForCausalLM
from trl import SFTConfig, SFTTrainer

from densa.align.config import load_recipe
from densa.align.evaluate import budget_curve, generate_greedy
from densa.align.grpo import run_grpo
from densa.align.logs import JsonlLog
from densa.align.policy import chat_tokenizer, save_policy, train_task_tokenizer
from densa.align.preference import simpo_loss
from densa.align.problems import extract_answer, gsm8k, heldout_and_ood, messages, sft_examples, split, train_split
from densa.align.rewards import RewardConfig, checked, token_value_rewards
from densa.align.sft import assistant_mask, run_sft
from densa.align.trl_model import DensaForTRL
from densa.cli import main
from densa.config import ConfigError, from_preset
from densa.model.model import DensaModel
from densa.resolve import resolve

OPS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}


@pytest.fixture(scope="module")
def policy(tmp_path_factory):
    """A tiny random policy with a task tokenizer, saved as a MODEL folder."""
    examples = sft_examples(train_split(300, 20), 0.5, 0)
    tok = train_task_tokenizer([e["prompt"][-1]["content"] + "\n" + e["completion"][0]["content"] for e in examples],
                               300)
    chat_tokenizer(tok)
    torch.manual_seed(0)
    model = DensaModel(from_preset("tiny", vocab_size=len(tok), mixer="attention", num_hidden_layers=1))
    path = save_policy(model, tok, tmp_path_factory.mktemp("policy") / "model")
    return model.eval(), tok, path


def test_generator_is_seeded_and_its_answers_are_right():
    a, b = split("train", 200), split("train", 200)
    assert a == b
    heldout, ood = heldout_and_ood(100, 50)
    assert not {p.question for p in train_split(500, 100)} & {p.question for p in heldout}
    assert {len(p.steps) for p in a} == {1, 2, 3} and {len(p.steps) for p in ood} == {4}
    for p in a + ood:
        total = p.steps[0][0]
        assert str(total) in p.question
        for left, op, right, result in p.steps:
            assert left == total and OPS[op](left, right) == result
            total = result
        assert total == p.answer >= 0
        assert extract_answer(p.concise()) == extract_answer(p.verbose()) == p.answer
        assert len(p.verbose()) > 2 * len(p.concise())
    assert any("has" in p.question.split(".")[1] for p in a)  # distractor sentences occur


def test_extract_answer_and_gsm8k():
    assert extract_answer("so 3+4=7 #### 7") == 7
    assert extract_answer("#### 1,234 then #### -5") == -5
    assert extract_answer("no answer 12") is None
    rows = gsm8k("test")
    assert len(rows) == 1319 and rows[0]["answer"] == 18 and "<<" not in rows[0]["completion"][0]["content"]


def test_sft_trainer_labels_only_the_assistant_turn(policy):
    model, tok, _ = policy
    examples = sft_examples(train_split(8, 0), 0.5, 1)
    trainer = SFTTrainer(
        model=DensaForTRL.wrap(model, tok), processing_class=tok,
        train_dataset=Dataset.from_list([{"prompt": e["prompt"], "completion": e["completion"]} for e in examples]),
        args=SFTConfig(output_dir="/tmp/densa-test-sft", use_cpu=True, per_device_train_batch_size=8, max_steps=1,
                       report_to=[], save_strategy="no", gradient_checkpointing=False, shuffle_dataset=False,
                       completion_only_loss=True, dataset_num_proc=None))
    batch = next(iter(trainer.get_train_dataloader()))
    seen = set()
    for ids, labels in zip(batch["input_ids"].tolist(), batch["labels"].tolist(), strict=True):
        text = tok.decode(ids, skip_special_tokens=False)
        e = next(e for e in examples if e["prompt"][-1]["content"] in text)
        seen.add(e["prompt"][-1]["content"])
        ref_ids, ref_labels = assistant_mask(tok, e["prompt"], e["completion"])
        got = [(i, lab) for i, lab in zip(ids, labels, strict=True) if i != tok.pad_token_id]
        assert [i for i, _ in got] == ref_ids
        assert [lab for _, lab in got] == ref_labels  # -100 on the whole prompt, ids on the assistant turn
        answer = tok.decode([lab for lab in ref_labels if lab != -100])
        assert answer.startswith(e["completion"][0]["content"]) and "<|im_end|>" in answer
        assert e["prompt"][-1]["content"] not in answer
    assert len(seen) == len(examples)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_sft_runs_on_a_hugging_face_llama_folder(policy, tmp_path, precision):
    _, tok, _ = policy
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=256)
    LlamaForCausalLM(cfg).save_pretrained(str(tmp_path / "llama"))
    tok.save_pretrained(str(tmp_path / "llama"))
    recipe = load_recipe("recipes/sft-arithmetic.yaml", [f"policy.path={tmp_path / 'llama'}", "sft.steps=2",
                                                         "sft.batch_size=4", "task.train_size=16",
                                                         "task.heldout_size=4", f"sft.precision={precision}"])
    result = run_sft(recipe, tmp_path / "sft", progress=False, evaluate=False)
    tuned = resolve(result["model"]).model
    assert tuned.config.mixer == "attention"  # a densa checkpoint of the tuned Llama
    assert all(p.dtype == torch.float32 for p in tuned.parameters())  # bf16 is autocast; the weights stay fp32
    logs = [json.loads(x) for x in (tmp_path / "sft" / "metrics.jsonl").read_text().splitlines()]
    assert logs[-1]["step"] == 2 and math.isfinite(logs[-1]["train_loss"])


def test_reward_ranks_shorter_correct_above_longer_correct_above_wrong():
    completions = ["1+1=2. #### 2", "Let me think. 1+1=2. Let me check: 1+1=2. #### 2", "#### 3",
                   "Let me think step by step, very carefully, and at length. #### 5"]
    lengths = [8, 20, 3, 24]
    for cfg in (RewardConfig(length="kimi", weight=0.5), RewardConfig(length="arora", weight=0.4),
                RewardConfig(length="kimi", weight=0.9, overlong_cache=8, max_completion_length=32)):
        r = token_value_rewards(completions, lengths, [2] * 4, ["p"] * 4, cfg)
        assert r[0] > r[1] > max(r[2], r[3]), (cfg, r)
        assert r[2] <= 0  # a short wrong answer is never rewarded
    plain = token_value_rewards(completions, lengths, [2] * 4, ["p"] * 4, RewardConfig(length="none"))
    assert plain == [1.0, 1.0, 0.0, 0.0]
    over = token_value_rewards(["#### 2"] * 2, [10, 40], [2, 2], ["p"] * 2,
                               RewardConfig(length="none", overlong_cache=16, max_completion_length=32))
    assert over == [1.0, 0.0]  # DAPO soft overlong punishment: -1 beyond L_max
    with pytest.raises(ValueError, match="weight"):
        RewardConfig(weight=1.5)


@pytest.mark.parametrize(("broken", "message"), [
    (lambda **kw: 1 / 0, "raised ZeroDivisionError"),
    (lambda completions, **kw: [math.nan] * len(completions), "returned nan"),
    (lambda completions, **kw: [1.0], "returned 1 values for 4 completions"),
])
def test_broken_reward_fails_with_a_clear_message(broken, message):
    with pytest.raises(RuntimeError, match=message):
        checked(broken)(prompts=["p"] * 4, completions=["a"] * 4, completion_ids=[[1]] * 4)


def test_a_few_grpo_steps_run_and_log(policy, tmp_path):
    _, _, path = policy
    recipe = load_recipe("recipes/align-arithmetic.yaml", [
        f"policy.path={path}", "grpo.steps=2", "grpo.prompts_per_step=2", "grpo.num_generations=4",
        "grpo.max_completion_length=12", "grpo.log_interval=1", "task.train_size=32", "task.heldout_size=8",
        "task.max_new_tokens=12", "reward.overlong_cache=4"])
    result = run_grpo(recipe, tmp_path / "run", progress=False)
    logs = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logs if "reward" in r] == [1, 2]
    assert all("completions/mean_length" in r and "accuracy" in r for r in logs if "reward" in r)
    assert (tmp_path / "run" / "align.png").is_file() and (tmp_path / "run" / "model" / "tokenizer.json").is_file()
    assert 0 <= result["heldout"]["accuracy"] <= 1 and result["heldout"]["mean_tokens"] <= 12


def test_grpo_with_a_broken_reward_stops_with_one_line(policy, tmp_path):
    model, tok, _ = policy
    recipe = load_recipe("recipes/align-arithmetic.yaml", [
        "grpo.steps=1", "grpo.prompts_per_step=1", "grpo.num_generations=2", "grpo.max_completion_length=4",
        "task.train_size=8", "task.heldout_size=2", "reward.overlong_cache=0"])

    def nan_reward(completions, **_):
        return [math.nan] * len(completions)

    with pytest.raises(RuntimeError, match="reward function 'nan_reward' returned nan for completion 0"):
        run_grpo(recipe, tmp_path / "run", progress=False, policy=(model, tok), extra_rewards=[nan_reward],
                 evaluate=False)


def test_budget_curve_equals_capped_greedy_decoding(policy):
    model, tok, _ = policy
    problems, _ = heldout_and_ood(6, 0)
    prompts, answers = [messages(p.question, system=False) for p in problems], [p.answer for p in problems]
    full = generate_greedy(model, tok, prompts, answers, max_new_tokens=12)
    for k in (3, 7):
        capped = generate_greedy(model, tok, prompts, answers, max_new_tokens=k)
        assert [o.tokens for o in capped] == [o.tokens[:k] for o in full]  # the fast path's premise, checked
        assert budget_curve(full, tok, [k])[k] == sum(o.correct(tok) for o in capped) / len(capped)


def test_trl_backbone_matches_the_model_with_right_padding(policy):
    model, tok, _ = policy
    hf = DensaForTRL.wrap(model, tok)
    ids = torch.randint(5, len(tok), (2, 9))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0  # TRL right-pads completions
    hidden = hf.base_model(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
    logits = hf.get_output_embeddings()(hidden)
    torch.testing.assert_close(logits[0], model(ids[:1]).logits[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logits[1, :6], model(ids[1:, :6]).logits[0], atol=1e-5, rtol=1e-5)


def test_simpo_step_prefers_the_shorter_correct_answer(policy):
    model, tok, _ = policy
    model = DensaModel(model.config)
    model.load_state_dict(policy[0].state_dict())
    p = train_split(4, 0)
    pairs = [{"prompt": tok(tok.apply_chat_template(messages(x.question, system=False), tokenize=False,
                                                    add_generation_prompt=True), add_special_tokens=False)["input_ids"],
              "chosen": tok(x.concise() + "<|im_end|>", add_special_tokens=False)["input_ids"],
              "rejected": tok(x.verbose() + "<|im_end|>", add_special_tokens=False)["input_ids"]} for x in p]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    margins = []
    for _ in range(3):
        loss, stats = simpo_loss(model, pairs, beta=2.0, gamma=1.0, pad_id=tok.pad_token_id)
        opt.zero_grad()
        loss.backward()
        opt.step()
        margins.append(stats["margin"])
    assert math.isfinite(loss.item()) and margins[-1] > margins[0]


def test_recipe_errors_name_the_field(tmp_path, capsys):
    with pytest.raises(ConfigError, match="grpo.loss_type='grpo'"):
        load_recipe("recipes/align-arithmetic.yaml", ["grpo.loss_type=grpo"])
    with pytest.raises(ConfigError, match="unknown section"):
        load_recipe(None, ["colour.red=1"])
    assert main(["align", "--config", "recipes/align-arithmetic.yaml", "--out", str(tmp_path / "x"),
                 "--set", "reward.length=long"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "reward.length='long'" in err


def test_token_value_seed_interval_covers_the_spread_between_rl_seeds():
    """The item bootstrap holds each RL run fixed; the seed interval is the t interval of the per-seed values."""
    from scipy import stats

    from densa.study.token_value import _seed_intervals

    class Out:
        def __init__(self, correct: int, n: int):
            self.ok, self.tokens = correct, [0] * n

        def correct(self, tok, budget=None):
            return self.ok

    def run(correct, n):
        return {"tok": None, "test": [Out(c, n) for c in correct], "test_reference": [1] * len(correct)}

    sft = [run([1, 1, 1, 0], 10)] * 3
    rl = [run([1, 0, 1, 0], 5), run([1, 1, 1, 0], 4), run([0, 0, 1, 0], 6)]  # deltas −25, 0, −50; cuts .5, .6, .4
    ci = _seed_intervals(rl, sft)
    half = stats.t.ppf(0.975, 2) * 25 / math.sqrt(3)  # sd of (−25, 0, −50) is 25
    assert ci["accuracy_delta"] == pytest.approx([-25 - half, -25 + half])
    half = stats.t.ppf(0.975, 2) * 0.1 / math.sqrt(3)
    assert ci["token_reduction"] == pytest.approx([0.5 - half, 0.5 + half])
    assert _seed_intervals(rl[:1], sft[:1])["accuracy_delta"] == [None, None]


def test_grpo_with_dler_options_and_a_kl_anchor_runs_and_logs(policy, tmp_path):
    """Dynamic sampling, batch-wise normalisation, clip-higher, the truncation penalty and the KL anchor to the
    starting (SFT) policy, together through TRL: the kept share of groups and the KL are logged."""
    _, _, path = policy
    recipe = load_recipe("recipes/align-token-value-study.yaml", [
        f"policy.path={path}", "grpo.steps=2", "grpo.prompts_per_step=2", "grpo.num_generations=4",
        "grpo.max_completion_length=12", "grpo.log_interval=1", "task.train_size=32", "task.heldout_size=8",
        "task.max_new_tokens=12", "reward.overlong_cache=0", "reward.length=truncation", "reward.truncate_at=8",
        "grpo.dynamic_sampling=true", "grpo.scale_rewards=batch", "grpo.epsilon_high=0.28", "grpo.beta=0.04",
        "grpo.loss_type=dapo", "task.unanswerable_fraction=0.2"])
    run_grpo(recipe, tmp_path / "run", progress=False, evaluate=False)
    logs = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in logs if "reward" in r]
    assert len(steps) == 2 and all("kl" in r and 0 <= r["dynamic_sampling/kept_groups"] <= 1 for r in steps)


class _Stop(Exception):
    pass


@pytest.mark.parametrize("method", ["sft", "grpo"])
def test_a_stopped_run_resumes_from_its_checkpoint_to_the_same_weights(policy, tmp_path, monkeypatch, method):
    """A run killed after its step-2 checkpoint, rerun with the same OUT, continues from step 2 (not from the start)
    and ends at the weights of an uninterrupted run, with one log record per step."""
    _, _, path = policy
    if method == "sft":
        recipe = load_recipe("recipes/sft-arithmetic.yaml", [f"policy.path={path}", "sft.steps=4", "sft.batch_size=4",
                                                             "sft.save_every=2", "sft.log_interval=1",
                                                             "task.train_size=32", "task.heldout_size=4"])
        run = run_sft
    else:
        recipe = load_recipe("recipes/align-arithmetic.yaml", [
            f"policy.path={path}", "grpo.steps=4", "grpo.prompts_per_step=2", "grpo.num_generations=4",
            "grpo.max_completion_length=12", "grpo.log_interval=1", "grpo.save_every=2", "task.train_size=32",
            "task.heldout_size=4", "task.max_new_tokens=12", "reward.overlong_cache=4"], method="grpo")
        run = run_grpo
    run(recipe, tmp_path / "whole", progress=False, evaluate=False)

    def stop_after_3(self, args, state, control, **_):
        if state.global_step == 3:
            raise _Stop

    monkeypatch.setattr(JsonlLog, "on_step_end", stop_after_3, raising=False)
    with pytest.raises(_Stop):
        run(recipe, tmp_path / "parts", progress=False, evaluate=False)
    assert (tmp_path / "parts" / "trainer" / "checkpoint-2").is_dir() and not (tmp_path / "parts" / "model").exists()
    monkeypatch.undo()
    resumed_steps = []
    monkeypatch.setattr(JsonlLog, "on_step_begin", lambda self, args, state, control, **_: resumed_steps.append(
        state.global_step), raising=False)
    run(recipe, tmp_path / "parts", progress=False, evaluate=False)
    assert resumed_steps == [2, 3] and not (tmp_path / "parts" / "trainer").exists()
    whole, parts = resolve(str(tmp_path / "whole" / "model")).model, resolve(str(tmp_path / "parts" / "model")).model
    for (name, a), b in zip(whole.state_dict().items(), parts.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0, msg=name)
    logged = [json.loads(x)["step"] for x in (tmp_path / "parts" / "metrics.jsonl").read_text().splitlines()]
    assert sorted(set(logged)) == [1, 2, 3, 4] and logged == sorted(logged)

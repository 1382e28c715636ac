"""The exported model in the Hugging Face ecosystem, with densa *not importable*: `pipeline("text-generation")`,
TRL's `GRPOTrainer` (its defaults: gradient checkpointing, fused LM head on `model.base_model`) and `SFTTrainer`
on a remote-code export made by `densa init --tokenizer` + `densa export`. One subprocess runs all three (imports
dominate its time); the tests read its report."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from densa.cli import main
from densa.data.tokenizer import load_tokenizer, train_tokenizer
from densa.resolve import resolve

TEXT = "the cat sat on the mat. the dog ate the bone. a cat and a dog sat. " * 40
PROMPT = "the cat"

ECOSYSTEM = textwrap.dedent("""
    import json, sys
    sys.modules["densa"] = None  # densa must not be importable here: the export carries its own code
    try:
        import densa  # noqa: F401
        raise SystemExit("densa is importable")
    except ImportError:
        pass
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline
    from trl import GRPOConfig, GRPOTrainer, SFTConfig, SFTTrainer

    folder, prompt, work = sys.argv[1:4]
    report = {}
    pipe = pipeline("text-generation", model=folder, trust_remote_code=True)
    report["pipeline"] = pipe(prompt, max_new_tokens=6, min_new_tokens=6, do_sample=False)[0]["generated_text"]
    report["model_module"] = type(pipe.model).__module__

    def train(trainer):
        before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
        trainer.train()
        after = trainer.model.state_dict()
        losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
        return {"steps": trainer.state.global_step, "losses": losses,
                "changed": sum(not torch.equal(before[k], after[k]) for k in before),
                "checkpointing": trainer.model.is_activation_checkpointing}

    tok = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)
    common = dict(use_cpu=True, report_to=[], max_steps=2, per_device_train_batch_size=2, logging_steps=1,
                  save_strategy="no", disable_tqdm=True, seed=0)
    prompts = Dataset.from_dict({"prompt": ["the cat", "the dog", "a mat", "the bone"]})
    grpo = GRPOConfig(output_dir=work + "/grpo", num_generations=2, max_completion_length=8, **common)
    report["grpo"] = train(GRPOTrainer(model=model, reward_funcs=[lambda completions, **_: [float(len(c)) for c
                                       in completions]], train_dataset=prompts, processing_class=tok, args=grpo))
    report["grpo"]["default_checkpointing"] = grpo.gradient_checkpointing
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)
    texts = Dataset.from_dict({"text": ["the cat sat on the mat.", "the dog ate the bone.", "a cat sat.", "a dog."]})
    sft = SFTConfig(output_dir=work + "/sft", max_length=16, **common)
    report["sft"] = train(SFTTrainer(model=model, train_dataset=texts, processing_class=tok, args=sft))
    print(json.dumps(report))
""")


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    """`densa init --tokenizer` then `densa export --remote-code`: (folder, stderr of both commands)."""
    root = tmp_path_factory.mktemp("ecosystem")
    train_tokenizer([TEXT], 300).save_pretrained(str(root / "tok"))
    argv = ["init", "--preset", "tiny", "--set", "vocab_size=320", "--tokenizer", str(root / "tok")]
    assert main([*argv, "--out", str(root / "ck")]) == 0
    assert main(["export", str(root / "ck"), "--to", "hf", "--remote-code", "--out", str(root / "hf")]) == 0
    return root


@pytest.fixture(scope="module")
def ecosystem(export):
    env = {**os.environ, "HF_HOME": str(export / "hf_home"), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run([sys.executable, "-c", ECOSYSTEM, str(export / "hf"), PROMPT, str(export / "work")],
                          capture_output=True, text=True, env=env, cwd=export, stdin=subprocess.DEVNULL, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_init_and_export_carry_the_tokenizer(export, capsys):
    for folder in ("ck", "hf"):
        assert (export / folder / "tokenizer.json").is_file(), folder
    assert len(load_tokenizer(export / "hf")) == len(load_tokenizer(export / "tok"))
    config = json.loads((export / "hf" / "config.json").read_text())
    tok = load_tokenizer(export / "tok")
    assert (config["eos_token_id"], config["pad_token_id"]) == (tok.eos_token_id, tok.pad_token_id)


def test_missing_tokenizer_is_a_warning_and_a_misfit_an_error(tmp_path, capsys):
    assert main(["init", "--preset", "tiny", "--out", str(tmp_path / "ck")]) == 0
    err = capsys.readouterr().err
    assert "warning" in err and "has no tokenizer" in err and "--tokenizer DIR" in err
    assert main(["export", str(tmp_path / "ck"), "--to", "hf", "--out", str(tmp_path / "hf")]) == 0
    err = capsys.readouterr().err
    assert "warning" in err and "has no tokenizer" in err and not (tmp_path / "hf" / "tokenizer.json").exists()
    # --tokenizer supplies one at export time
    train_tokenizer([TEXT], 260).save_pretrained(str(tmp_path / "tok"))
    assert main(["export", str(tmp_path / "ck"), "--to", "hf", "--tokenizer", str(tmp_path / "tok"),
                 "--out", str(tmp_path / "hf2")]) == 1  # 260 entries > the tiny preset's 256
    assert "260 entries but the model's vocabulary is 256" in capsys.readouterr().err
    assert main(["init", "--preset", "tiny", "--tokenizer", str(tmp_path / "tok"), "--out", str(tmp_path / "c2")]) == 1
    err = capsys.readouterr().err
    assert "do not fit the model's vocabulary of 256; pass --set vocab_size=260" in err and err.count("\n") == 1


def test_pipeline_text_generation_without_densa(export, ecosystem):
    assert ecosystem["model_module"].startswith("transformers_modules")
    resolved = resolve(str(export / "ck"))
    ids = resolved.tokenizer(PROMPT, return_tensors="pt").input_ids
    expected = resolved.tokenizer.decode(resolved.model.generate(ids, max_new_tokens=6)[0])
    assert ecosystem["pipeline"] == expected  # greedy: the same continuation densa itself generates


def test_grpo_trains_the_export_without_densa(ecosystem):
    grpo = ecosystem["grpo"]
    assert grpo["default_checkpointing"] and grpo["checkpointing"]  # TRL's default, supported now
    assert grpo["steps"] == 2 and len(grpo["losses"]) == 2 and all(torch.isfinite(torch.tensor(grpo["losses"])))
    assert grpo["changed"] > 0  # the optimizer moved the weights


def test_sft_trains_the_export_without_densa(ecosystem):
    sft = ecosystem["sft"]
    assert sft["steps"] == 2 and sft["changed"] > 0
    assert all(4.0 < loss < 7.0 for loss in sft["losses"])  # an untrained 320-token model: about ln(320) = 5.8

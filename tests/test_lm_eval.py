"""lm-evaluation-harness runs on a densa export: in process (HFLM) and through the `lm_eval` command line, on small
local tasks (no hub access) covering log-likelihood (multiple choice) and generate_until."""

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import tiny_model

from densa.checkpoint import save_checkpoint
from densa.data.corpora import corpus_texts
from densa.data.tokenizer import train_tokenizer
from densa.hf.export import export_hf
from densa.resolve import resolve

lm_eval = pytest.importorskip("lm_eval")

QUESTIONS = [
    {"question": "Which is a colour?", "choices": ["red", "dog", "run", "ten"], "answer": 0},
    {"question": "Which is an animal?", "choices": ["blue", "cat", "walk", "two"], "answer": 1},
    {"question": "Which is a number?", "choices": ["green", "cow", "jump", "six"], "answer": 3},
    {"question": "Which is a verb?", "choices": ["pink", "hen", "swim", "one"], "answer": 2},
]
MC_TASK = """task: densa_tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: answer
metric_list:
  - metric: acc
"""
GEN_TASK = """task: densa_tiny_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_target: "{{{{choices[answer]}}}}"
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 6
  do_sample: false
metric_list:
  - metric: exact_match
"""


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("lm_eval")
    text = next(corpus_texts("tinyshakespeare"))[:60_000]
    torch.manual_seed(0)
    save_checkpoint(tiny_model(vocab_size=320), root / "ck")
    train_tokenizer([text], vocab_size=320).save_pretrained(str(root / "ck"))
    export_hf(resolve(str(root / "ck")), root / "export", remote_code=True)
    data = root / "questions.jsonl"
    data.write_text("".join(json.dumps(q) + "\n" for q in QUESTIONS))
    (root / "tasks").mkdir()
    (root / "tasks" / "mc.yaml").write_text(MC_TASK.format(data=data))
    (root / "tasks" / "gen.yaml").write_text(GEN_TASK.format(data=data))
    return root


def test_hflm_in_process(export_dir):
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    lm = HFLM(pretrained=str(export_dir / "export"), device="cpu", batch_size=2)
    results = simple_evaluate(model=lm, tasks=["densa_tiny_mc", "densa_tiny_gen"],
                              task_manager=TaskManager(include_path=str(export_dir / "tasks")))
    mc, gen = results["results"]["densa_tiny_mc"], results["results"]["densa_tiny_gen"]
    assert 0.0 <= mc["acc,none"] <= 1.0 and 0.0 <= gen["exact_match,none"] <= 1.0
    assert len(results["samples"]["densa_tiny_gen"]) == len(QUESTIONS)


def test_lm_eval_command_line(export_dir, tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    cmd = [sys.executable, "-m", "lm_eval", "--model", "hf", "--model_args",
           f"pretrained={export_dir / 'export'},trust_remote_code=True", "--tasks", "densa_tiny_mc",
           "--include_path", str(export_dir / "tasks"), "--device", "cpu", "--batch_size", "2",
           "--output_path", str(tmp_path / "out")]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "densa_tiny_mc" in proc.stdout
    assert list((tmp_path / "out").rglob("results*.json"))

"""`densa eval openai:URL#NAME` and `openai-chat:URL#NAME` against `densa serve --api-key` (a subprocess on 127.0.0.1):
through /v1/completions a served model scores exactly what the same model scores in process, item by item (lm-eval's
`local-completions`: echo + logprobs for log-likelihood, the server's /tokenize for token counts); through a
`--chat-only` server the generation tasks score what the model scores in process with its chat template. The key
travels in an environment variable and is written nowhere; a wrong key, a wrong model name, a dead endpoint or a
completions model pointed at a chat-only server is one line."""

import json
import os
import re
import subprocess
import sys
import time
from contextlib import contextmanager

import pytest
from conftest import tiny_model
from test_eval import make_checkpoint

from densa.checkpoint import save_checkpoint
from densa.eval import api

pytest.importorskip("lm_eval")

KEY = "sk-densa-endpoint-test-3141"
ENV = "DENSA_EVAL_TEST_KEY"


@contextmanager
def serve(checkpoint, *flags):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "densa", "serve", str(checkpoint), "--port", "0", "--threads", "1",
                             "--api-key", KEY, *flags], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=env)
    deadline, url = time.monotonic() + 90, None
    while url is None and time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line and proc.poll() is not None:
            break
        found = re.search(r"(http://127\.0\.0\.1:\d+/v1)", line)
        url = found.group(1) if found else None
    if url is None:
        proc.kill()
        pytest.fail(f"densa serve did not start: {proc.stdout.read()[-2000:]}")
    try:
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    checkpoint = make_checkpoint(tmp_path_factory.mktemp("served") / "tiny")
    with serve(checkpoint) as url:
        yield checkpoint, url


@pytest.fixture(scope="module")
def served_chat(tmp_path_factory):
    """A chat-only server; its model's context holds an 8-shot GSM8K or 5-shot MMLU prompt in the tiny tokenizer."""
    checkpoint = tmp_path_factory.mktemp("served-chat") / "tiny"
    make_checkpoint(checkpoint)
    save_checkpoint(tiny_model(vocab_size=320, max_position_embeddings=8192), checkpoint, overwrite=True)
    with serve(checkpoint, "--chat-only") as url:
        yield checkpoint, url


@pytest.fixture
def key(monkeypatch):
    monkeypatch.setenv(ENV, KEY)


def _items(out, task):
    path = next((out / "items").rglob(f"{task}.jsonl"))
    return sorted((row["item"], row["output"], row["metrics"]) for row in map(json.loads,
                                                                                path.read_text().splitlines()))


def _no_key_in(out):
    for path in out.rglob("*"):
        assert not path.is_file() or KEY.encode() not in path.read_bytes(), path


def test_endpoint_scores_equal_in_process_scores(served, key, tmp_path):
    checkpoint, url = served
    tasks = "arc_easy,gsm8k"
    local = api.evaluate([str(checkpoint)], tasks, 2, tmp_path / "local", batch_size=2, max_gen_toks=6,
                         progress=False)
    remote = api.evaluate([f"openai:{url}#tiny"], tasks, 2, tmp_path / "remote", batch_size=2, max_gen_toks=6,
                          progress=False, api_key_env=ENV)
    for a, b in zip(local, remote, strict=True):
        assert b["model"] == f"openai:{url}#tiny" and b["n_items"] == 2 and b["n_failed"] == 0
        assert a["score"] == b["score"] and a["metrics"] == b["metrics"], a["task"]
        if a["task"] == "arc_easy":  # the server's /tokenize = the local tokenizer
            assert a["prompt_tokens_mean"] == b["prompt_tokens_mean"]
        else:  # generation: the tokens the server billed (the 8-shot prompt left-cut to the context by lm-eval)
            assert b["task_cost"]["tokens_from"] == ["usage"] and b["prompt_tokens_mean"] <= a["prompt_tokens_mean"]
        assert b["ttft_ms"]["batch_1"]["median"] > 0 and b["usd_per_1m_tokens"]["output"] > 0
        assert b["flops_per_token"] is None  # an endpoint's architecture is unknown
    assert _items(tmp_path / "local", "gsm8k") == _items(tmp_path / "remote", "gsm8k")  # same greedy generations
    assert _items(tmp_path / "local", "arc_easy") == _items(tmp_path / "remote", "arc_easy")
    _no_key_in(tmp_path / "remote")


def test_chat_only_endpoint_scores_equal_in_process_chat_scores(served_chat, key, tmp_path):
    checkpoint, url = served_chat
    tasks = "gsm8k,mmlu_gen"
    local = api.evaluate([str(checkpoint)], tasks, 2, tmp_path / "local", batch_size=2, max_gen_toks=6,
                         progress=False, chat_template=True)
    remote = api.evaluate([f"openai-chat:{url}#tiny"], tasks, 2, tmp_path / "remote", batch_size=2, max_gen_toks=6,
                          progress=False, api_key_env=ENV, price_in=0.5, price_out=1.5)
    for a, b in zip(local, remote, strict=True):
        assert b["n_items"] == 2 and b["n_failed"] == 0
        assert a["score"] == b["score"] and a["metrics"] == b["metrics"], a["task"]
        assert b["task_cost"]["tokens_from"] == ["usage"] and b["task_cost"]["usd_total"] > 0
        assert _items(tmp_path / "local", a["task"]) == _items(tmp_path / "remote", a["task"])
    _no_key_in(tmp_path / "remote")


def test_bad_endpoints_are_one_line_errors(served, served_chat, key, tmp_path, monkeypatch, capsys):
    import socket

    from densa.cli import main

    def run(model, out, task="arc_easy"):
        code = main(["eval", model, "--tasks", task, "--limit", "1", "--out", str(tmp_path / out),
                     "--api-key-env", ENV, "--no-progress"])
        err = capsys.readouterr().err.strip()
        assert code == 1 and len(err.splitlines()) == 1, err
        assert not (tmp_path / out / "results.json").exists()
        return err

    _, url = served
    assert "serves 'tiny', not 'nope'" in run(f"openai:{url}#nope", "a")
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    assert "cannot reach the endpoint" in run(f"openai:http://127.0.0.1:{port}/v1#tiny", "b")
    _, chat_url = served_chat
    err = run(f"openai:{chat_url}#tiny", "c", "gsm8k")  # no /v1/completions there
    assert "404" in err and "chat" in err
    monkeypatch.setenv(ENV, "sk-wrong")
    err = run(f"openai:{url}#tiny", "d")
    assert "401" in err and f"${ENV} was refused" in err and "sk-wrong" not in err

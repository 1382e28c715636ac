"""`densa eval openai:URL#NAME`: a model served by `densa serve` (a subprocess on 127.0.0.1) scores exactly what the
same model scores in process, item by item, through lm-eval's `local-completions` (echo + logprobs for
log-likelihood, /v1/completions for generation, the server's /tokenize for token counts)."""

import json
import os
import re
import subprocess
import sys
import time

import pytest
from test_eval import make_checkpoint

from densa.eval import api

pytest.importorskip("lm_eval")


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    checkpoint = make_checkpoint(tmp_path_factory.mktemp("served") / "tiny")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "densa", "serve", str(checkpoint), "--port", "0", "--threads", "1"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
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
    yield checkpoint, url
    proc.terminate()
    proc.wait(timeout=30)


def test_endpoint_scores_equal_in_process_scores(served, tmp_path):
    checkpoint, url = served
    tasks = "arc_easy,gsm8k"
    local = api.evaluate([str(checkpoint)], tasks, 2, tmp_path / "local", batch_size=2, max_gen_toks=6,
                         progress=False)
    remote = api.evaluate([f"openai:{url}#tiny"], tasks, 2, tmp_path / "remote", batch_size=2, max_gen_toks=6,
                          progress=False)
    for a, b in zip(local, remote, strict=True):
        assert b["model"] == f"openai:{url}#tiny" and b["n_items"] == 2 and b["n_failed"] == 0
        assert a["score"] == b["score"] and a["metrics"] == b["metrics"], a["task"]
        assert a["prompt_tokens_mean"] == b["prompt_tokens_mean"]  # the server's /tokenize = the local tokenizer
        assert b["ttft_ms"]["batch_1"]["median"] > 0 and b["usd_per_1m_tokens"]["output"] > 0
        assert b["flops_per_token"] is None  # an endpoint's architecture is unknown
    items = {}
    for name in ("local", "remote"):
        path = next((tmp_path / name / "items").rglob("gsm8k.jsonl"))
        items[name] = sorted((row["item"], row["output"], row["metrics"]) for row in map(json.loads,
                                                                                            path.read_text().splitlines()))
    assert items["local"] == items["remote"]  # the same greedy generations, item by item


def test_a_wrong_model_name_or_a_dead_endpoint_is_a_one_line_error(served, tmp_path, capsys):
    import socket

    from densa.cli import main

    _, url = served
    assert main(["eval", f"openai:{url}#nope", "--tasks", "arc_easy", "--limit", "1", "--out",
                 str(tmp_path / "a")]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "serves 'tiny', not 'nope'" in err
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    assert main(["eval", f"openai:http://127.0.0.1:{port}/v1#tiny", "--tasks", "arc_easy", "--limit", "1", "--out",
                 str(tmp_path / "b")]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "cannot reach the endpoint" in err

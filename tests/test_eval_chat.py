"""`densa eval openai-chat:URL#MODEL` against a small fake OpenAI server (stdlib http.server in a thread): the key goes
out as a Bearer token and nowhere else, 429/5xx are retried, a refused key / malformed JSON / unknown model / dead
endpoint is one line with no score written, log-likelihood tasks are refused, an interrupted run resumes, and each
task's cost (usage tokens, reasoning tokens, $ at list prices, max_gen_toks hits) lands in results and the report.
Also the generative MMLU task: its prompt is log-likelihood MMLU's, and its answer-letter extraction."""

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from densa.cli import main
from densa.eval import api, benchmarks, endpoint, measure
from densa.eval.tasks.mmlu_gen.mmlu_gen_data import extract_letter

pytest.importorskip("lm_eval")

KEY = "sk-test-not-a-real-key-4242"
ANSWER = {"role": "assistant", "content": "Let me think. The answer is 7."}
USAGE = {"prompt_tokens": 100, "completion_tokens": 12, "total_tokens": 112,
         "completion_tokens_details": {"reasoning_tokens": 5}}


class Fake(BaseHTTPRequestHandler):
    """GET /v1/models, POST /v1/chat/completions (streamed for the latency probe). `script`: status codes (or
    "garbage" for a body that is not JSON) answered to the next non-streamed chat requests, then 200s."""

    script: list = []
    seen: list = []
    key = KEY

    def log_message(self, *args):  # quiet
        pass

    def _send(self, status, body, content_type="application/json"):
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        if status == 429:
            self.send_header("Retry-After", "0")
        self.end_headers()
        self.wfile.write(data)

    def _authorized(self):
        self.seen.append(self.headers.get("Authorization"))
        if self.headers.get("Authorization") != f"Bearer {self.key}":
            self._send(401, {"error": {"message": "invalid api key", "type": "authentication_error"}})
            return False
        return True

    def do_GET(self):
        if self._authorized():
            self._send(200, {"object": "list", "data": [{"id": "fake", "object": "model"}]})

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if not self._authorized():
            return
        if self.path != "/v1/chat/completions" or body.get("model") != "fake":
            self._send(404, {"error": {"message": f"no route or model for {self.path}"}})
            return
        if body.get("stream"):
            chunks = [{"choices": [{"index": 0, "delta": {"content": piece}, "finish_reason": None}]}
                      for piece in ("The", " answer", " is", " 7")]
            data = "".join(f"data: {json.dumps(c)}\n\n" for c in chunks) + "data: [DONE]\n\n"
            self._send(200, data.encode(), "text/event-stream")
            return
        step = self.script.pop(0) if self.script else 200
        if step == "garbage":
            self._send(200, b"<html>not json</html>", "text/html")
        elif step != 200:
            self._send(step, {"error": {"message": f"status {step}"}})
        else:
            self._send(200, {"id": "x", "object": "chat.completion", "model": "fake", "usage": USAGE,
                             "choices": [{"index": 0, "message": ANSWER, "finish_reason": "length"}]})


@pytest.fixture
def fake(monkeypatch):
    monkeypatch.setattr(endpoint, "RETRY_BASE_S", 0.01)
    monkeypatch.setattr(measure, "PROBE_ROUNDS", 1)
    monkeypatch.setenv("FAKE_KEY", KEY)
    Fake.script, Fake.seen = [], []
    server = ThreadingHTTPServer(("127.0.0.1", 0), Fake)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()
    server.server_close()


def run(url, out, tasks="gsm8k", **kwargs):
    return api.evaluate([f"openai-chat:{url}#fake"], tasks, 2, out, batch_size=1, progress=False,
                        api_key_env="FAKE_KEY", **kwargs)


def cli(*args):
    return main(["eval", *args, "--api-key-env", "FAKE_KEY", "--batch-size", "1", "--no-progress"])


def test_chat_endpoint_is_keyed_retried_and_metered(fake, tmp_path, capsys):
    Fake.script = [429, 503]  # the first generation is answered twice with a retryable error
    [record] = run(fake, tmp_path / "out", price_in=1.0, price_out=2.0)
    assert record["n_items"] == 2 and record["n_failed"] == 0
    assert set(Fake.seen) == {f"Bearer {KEY}"}
    cost = record["task_cost"]
    assert cost["output_tokens"]["total"] == 24 and cost["output_tokens"]["median"] == 12
    assert cost["reasoning_tokens"]["total"] == 10 and cost["tokens_from"] == ["usage"]
    assert cost["usd_total"] == pytest.approx(2 * (100 * 1.0 + 12 * 2.0) / 1e6)
    assert cost["price_source"].startswith("list price") and len(cost["hit_max_gen_toks"]) == 2
    assert record["usd_per_1m_tokens"]["input"] == 1.0 and record["usd_per_1m_tokens"]["output"] == 2.0
    rows = [json.loads(line) for line in next((tmp_path / "out" / "items").rglob("gsm8k.jsonl")).read_text()
            .splitlines()]
    for row in rows:
        assert row["output"] == ANSWER["content"] and row["lm_eval"]["filtered"]["strict-match"] == ["7"]
        assert row["finish_reason"] == "length" and row["hit_max_gen_toks"] and row["wall_s"] > 0
        assert json.loads(row["prompt"])[-1]["role"] == "user"  # the prompt went out as chat messages
    report = (tmp_path / "out" / "report.md").read_text()
    assert "What each task cost" in report and "stopped at `max_gen_toks`" in report
    assert "2 of 2 generations stopped at max_gen_toks" in capsys.readouterr().err
    for path in (tmp_path / "out").rglob("*"):  # the key is nowhere in what the run wrote
        assert not path.is_file() or KEY.encode() not in path.read_bytes(), path


def test_a_refused_or_missing_key_is_one_line_and_nothing_is_scored(fake, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("FAKE_KEY", "sk-wrong")
    assert cli(f"openai-chat:{fake}#fake", "--tasks", "gsm8k", "--limit", "1", "--out", str(tmp_path / "a")) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "401" in err and "$FAKE_KEY was refused" in err and "sk-wrong" not in err
    monkeypatch.delenv("FAKE_KEY")
    assert cli(f"openai-chat:{fake}#fake", "--tasks", "gsm8k", "--limit", "1", "--out", str(tmp_path / "b")) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "needs an API key: set $FAKE_KEY" in err
    assert not list(tmp_path.rglob("results.json")) and not list(tmp_path.rglob("*.jsonl"))


def test_malformed_json_unknown_model_and_dead_endpoint_are_one_line(fake, tmp_path, capsys):
    Fake.script = ["garbage"]
    assert cli(f"openai-chat:{fake}#fake", "--tasks", "gsm8k", "--limit", "1", "--out", str(tmp_path / "a")) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "malformed JSON" in err
    assert not list(tmp_path.rglob("results.json")) and not list(tmp_path.rglob("*.jsonl"))
    assert cli(f"openai-chat:{fake}#nope", "--tasks", "gsm8k", "--limit", "1", "--out", str(tmp_path / "b")) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "serves 'fake', not 'nope'" in err
    dead = "http://127.0.0.1:9/v1"  # the discard port: nobody answers HTTP there
    assert cli(f"openai-chat:{dead}#fake", "--tasks", "gsm8k", "--limit", "1", "--out", str(tmp_path / "c")) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "cannot reach the endpoint" in err


def test_log_likelihood_tasks_are_refused_for_a_chat_endpoint(fake, tmp_path, capsys):
    assert cli(f"openai-chat:{fake}#fake", "--tasks", "arc_easy,gsm8k,mmlu", "--out", str(tmp_path / "a")) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "arc_easy, mmlu need /v1/completions with prompt logprobs" in err
    assert "mmlu_gen" in err and Fake.seen == [] and not (tmp_path / "a").exists()


def test_an_endpoint_still_failing_after_retries_stops_the_run_and_resume_finishes_it(fake, tmp_path):
    Fake.script = [503] * (endpoint.RETRIES + 1)  # the first item: every try answered 503
    with pytest.raises(endpoint.EndpointError, match=r"503.*after 5 tries; rerun with --resume"):
        run(fake, tmp_path / "out")
    assert not list((tmp_path / "out").rglob("*.jsonl"))  # nothing recorded for the failed item
    [record] = run(fake, tmp_path / "out", resume=True)
    assert record["n_items"] == 2 and record["n_failed"] == 0 and record["complete"]


def test_generative_mmlu_asks_the_log_likelihood_prompt_of_the_same_questions(monkeypatch):
    from lm_eval.tasks import get_task_dict

    tm = benchmarks.task_manager()
    ll = get_task_dict(["densa_mmlu_anatomy"], tm)["densa_mmlu_anatomy"]
    gen = get_task_dict(["densa_mmlu_gen_anatomy"], tm)["densa_mmlu_gen_anatomy"]
    doc = gen.test_docs()[3]
    assert gen.fewshot_context(doc, 5) == ll.fewshot_context(ll.test_docs()[3], 5)
    assert gen.fewshot_context(doc, 5).endswith("Answer:") and gen.doc_to_target(doc) in "ABCD"
    # --limit draws the same positions for both (the item lists are the same subjects in the same order)
    monkeypatch.setattr(benchmarks, "all_items", lambda name: [f"{name}_subject/{i}" for i in range(14042)])
    assert [i.split("/")[1] for i in benchmarks.subset("mmlu_gen", 7, 3)] == \
        [i.split("/")[1] for i in benchmarks.subset("mmlu", 7, 3)]


@pytest.mark.parametrize(("text", "letter"), [
    (" B", "B"), (" B\n\nThe following", "B"), ("C.", "C"), ("(D) because", "D"), ("**A**", "A"),
    ("The answer is (B).", "B"), ("I think the correct answer is C", "C"), ("Answer: D", "D"),
    ("**Answer:** A", "A"), ("A) 42", "A"), ("A good question; the answer is B.", "B"),
    ("A good question.", "[invalid]"), ("Both are wrong", "[invalid]"), ("", "[invalid]"), (" a", "[invalid]"),
])
def test_answer_letter_extraction(text, letter):
    assert extract_letter(text) == letter

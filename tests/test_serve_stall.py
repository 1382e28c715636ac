"""`densa serve` cannot be stalled by one request: bodies over the size limit get 413 before they are read, prompts
are parsed and tokenized off the event loop (so /health and running streams keep answering), undecodable text is a
400, and a tokenizer larger than the model's vocabulary is refused at start."""

import json
import threading
import time

import pytest
import requests
from conftest import tiny_model, tiny_server

from densa.data.corpora import corpus_texts
from densa.data.tokenizer import train_tokenizer
from densa.serve.app import ServeConfig, build_app

VOCAB, CONTEXT = 320, 256
HEALTH_LIMIT_S = 1.0  # /health and the gap between two streamed tokens must stay below this throughout


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer([next(corpus_texts("tinyshakespeare"))[:60_000]], vocab_size=VOCAB)


@pytest.fixture(scope="module")
def model():
    return tiny_model(vocab_size=VOCAB)


def serve(model, tokenizer, **overrides):
    return tiny_server(model, tokenizer, CONTEXT, **overrides)


@pytest.fixture(scope="module")
def url(model, tokenizer):
    with serve(model, tokenizer) as base:
        yield base


class Watch:
    """While active: clients streaming completions back to back (one event per token) and a /health poller;
    records /health latencies and the longest silence inside any stream."""

    def __init__(self, base: str, streams: int = 2) -> None:
        self.base, self.stop = base, threading.Event()
        self.health_s: list[float] = []
        self.gaps_s: list[float] = []
        self.tokens = 0
        self.threads = [threading.Thread(target=self._health)] + [threading.Thread(target=self._stream)
                                                                  for _ in range(streams)]

    def _health(self) -> None:
        with requests.Session() as s:
            while not self.stop.is_set():
                start = time.perf_counter()
                assert s.get(self.base + "/health", timeout=30).status_code == 200
                self.health_s.append(time.perf_counter() - start)
                time.sleep(0.02)

    def _stream(self) -> None:
        body = {"model": "tiny", "prompt": "Long", "max_tokens": 200, "stream": True, "ignore_eos": True,
                "logprobs": 0, "temperature": 0}
        with requests.Session() as s:
            while not self.stop.is_set():
                with s.post(self.base + "/v1/completions", json=body, stream=True, timeout=30) as r:
                    last = None
                    for line in r.iter_lines():
                        if not line.startswith(b"data: "):
                            continue
                        now = time.perf_counter()
                        if last is not None:
                            self.gaps_s.append(now - last)
                        last, self.tokens = now, self.tokens + 1
                        if self.stop.is_set():
                            break

    def __enter__(self) -> "Watch":
        for t in self.threads:
            t.start()
        deadline = time.monotonic() + 30
        while self.tokens < 10 or not self.health_s:  # streams running, /health answered
            if time.monotonic() > deadline:
                self.__exit__()
                raise AssertionError("the streams or /health never started")
            time.sleep(0.01)
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(timeout=30)

    def check(self) -> None:
        assert max(self.health_s) < HEALTH_LIMIT_S, f"/health took {max(self.health_s):.2f} s"
        assert max(self.gaps_s) < HEALTH_LIMIT_S, f"a stream stalled for {max(self.gaps_s):.2f} s"


def _post(base: str, path: str, body: dict | bytes) -> tuple[requests.Response, float]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    start = time.perf_counter()
    r = requests.post(base + path, data=data, headers={"Content-Type": "application/json"}, timeout=60)
    return r, time.perf_counter() - start


def test_a_10_mb_request_beside_streams_is_refused_at_once_with_413(url):
    """Under the default 1 MiB limit a 10 MB prompt is answered 413 without being read (its Content-Length says
    enough), as is a chunked body without a length once it passes the limit; streams and /health never notice."""
    assert ServeConfig("m").max_request_bytes == 1 << 20
    big = {"model": "tiny", "prompt": "x" * 10_000_000, "max_tokens": 1}
    with Watch(url) as watch:
        r, took = _post(url, "/v1/completions", big)
        chunked = requests.post(url + "/v1/chat/completions", data=(b"x" * 65536 for _ in range(40)), timeout=60)
        time.sleep(0.2)
    assert r.status_code == 413 and took < 5
    error = r.json()["error"]
    assert error["code"] == "request_too_large" and "--max-request-bytes" in error["message"]
    assert f"({len(json.dumps(big))} bytes)" in error["message"]
    assert chunked.status_code == 413 and chunked.json()["error"]["code"] == "request_too_large"
    watch.check()
    metrics = requests.get(url + "/metrics", timeout=5).text
    assert 'densa_requests_total{endpoint="/v1/completions",status="413"} 1' in metrics


def test_large_allowed_prompts_are_tokenized_off_the_event_loop(model, tokenizer):
    """With the limit raised to 2 MiB, a 1.1 MB prompt is accepted and refused as past the context by its length
    alone, before any tokenization; a 630 kB prompt (280k tokens, one to two seconds of tokenizer work here; half
    that once answered /health only twice in a full CI run) is tokenized in a worker thread while /health answers
    again and again and a stream keeps flowing."""
    huge = "the king " * 122_000
    chat = {"model": "tiny", "messages": [{"role": "user", "content": huge}]}
    with serve(model, tokenizer, max_request_bytes=2 << 20) as base, Watch(base, streams=1) as watch:
        r, _ = _post(base, "/v1/completions", {"model": "tiny", "prompt": huge, "max_tokens": 4})
        assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
        assert "at least 84462 prompt tokens (by its length)" in r.text  # 1.098 MB / 13 bytes, the longest token
        r, _ = _post(base, "/v1/chat/completions", chat)
        assert r.status_code == 400 and r.json()["error"]["param"] == "messages" and "by its length" in r.text
        answered_before = len(watch.health_s)
        r, _ = _post(base, "/tokenize", {"prompt": "the king " * 70_000})
        answered_during = len(watch.health_s) - answered_before
    answer = r.json()
    assert r.status_code == 200 and answer["count"] == len(answer["tokens"]) > 280_000
    assert answered_during >= 3  # /health answered while the prompt was being tokenized
    watch.check()


@pytest.mark.parametrize(("path", "body", "param"), [
    ("/v1/completions", b'{"model": "tiny", "prompt": "a\\ud800b"}', "prompt"),
    ("/v1/completions", b'{"model": "tiny", "prompt": ["fine", "\\udc00"]}', "prompt"),
    ("/v1/chat/completions", b'{"model": "tiny", "messages": [{"role": "user", "content": "\\uDBFF!"}]}',
     "messages"),
    ("/tokenize", b'{"prompt": "\\ud800"}', "prompt"),
    ("/tokenize", '{"prompt": "\\ud800"}'.encode("utf-16"), "prompt"),  # JSON may come as UTF-16
    ("/v1/completions", b'{"model": "tiny", "prompt": "\xff\xfe"}', None),  # not UTF-8
    ("/v1/completions", '{"model": "tiny", "prompt": "caf\u00e9"}'.encode("latin-1"), None),
])
def test_undecodable_text_is_a_400(url, path, body, param):
    r, _ = _post(url, path, body)
    assert r.status_code == 400
    assert r.json()["error"]["param"] == param


def test_a_surrogate_pair_is_text(url):
    r, _ = _post(url, "/v1/completions", b'{"model": "tiny", "prompt": "hi \\ud83d\\ude00", "max_tokens": 2}')
    assert r.status_code == 200 and r.json()["usage"]["prompt_tokens"] >= 4


def test_a_tokenizer_larger_than_the_vocabulary_is_refused_at_start(tokenizer, tmp_path, capsys):
    big = train_tokenizer([next(corpus_texts("tinyshakespeare"))[:60_000]], vocab_size=VOCAB + 40)
    with pytest.raises(ValueError, match=r"the tokenizer has 360 entries but the model's vocabulary has 320"):
        build_app(tiny_model(vocab_size=VOCAB), big, ServeConfig("tiny"))

    from densa.checkpoint import save_checkpoint
    from densa.cli import main

    save_checkpoint(tiny_model(vocab_size=VOCAB), tmp_path / "ck")
    big.save_pretrained(str(tmp_path / "tok"))
    assert main(["serve", str(tmp_path / "ck"), "--tokenizer", str(tmp_path / "tok"), "--port", "0"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "360 entries" in err and "320" in err
    assert main(["serve", str(tmp_path / "ck"), "--max-request-bytes", "0"]) == 1
    assert "--max-request-bytes must be >= 1, got 0" in capsys.readouterr().err

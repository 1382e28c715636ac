"""`densa serve`: continuous batching equals decoding alone, and a live server on 127.0.0.1 driven by the official
`openai` client (streaming included), lm-eval's `local-completions` model, malformed requests, the API key, the
bounded queue, disconnects, timeouts, metering and /metrics."""

import json
import threading
import time

import openai
import pytest
import requests
import torch
from conftest import VARIANTS, tiny_model, tiny_server

from densa.data.corpora import corpus_texts
from densa.data.tokenizer import train_tokenizer
from densa.generation import generate
from densa.model import fastlinear
from densa.serve.batching import concat_caches, drop_rows, pad_prompts
from densa.serve.engine import Engine, QueueFull, Request, SamplingParams
from densa.serve.metrics import ServerMetrics

VOCAB, CONTEXT = 320, 256


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer([next(corpus_texts("tinyshakespeare"))[:60_000]], vocab_size=VOCAB)


@pytest.fixture(scope="module")
def model():
    return tiny_model(vocab_size=VOCAB)


def serve(model, tokenizer, **overrides):
    return tiny_server(model, tokenizer, CONTEXT, **{"max_queue": 16, **overrides})


@pytest.fixture(scope="module")
def url(model, tokenizer):
    with serve(model, tokenizer) as base:
        yield base


@pytest.fixture(scope="module")
def client(url):
    return openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)


def greedy_alone(model, prompt: list[int], n: int) -> list[int]:
    return generate(model, torch.tensor([prompt]), max_new_tokens=n)[0, len(prompt):].tolist()


# ---- continuous batching = each request alone ----
@pytest.mark.parametrize("name", ["mega", "megalodon-all", "dense-gqa", "moe"])
def test_continuous_schedule_matches_each_request_alone(name):
    """Rows join a running batch (some prefilled together with left padding) and leave it at different steps, across
    attention-chunk boundaries (chunk 16); every row's greedy tokens equal decoding it alone."""
    m = tiny_model(ffn="moe", num_experts=8, num_experts_per_tok=2, num_null_experts=1, num_identity_experts=1,
                   target_active_experts=1.5) if name == "moe" else tiny_model(**VARIANTS[name])
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 256, (n,), generator=g).tolist() for n in (5, 17, 3, 30)]
    lengths = [24, 12, 20, 9]
    alone = [greedy_alone(m, p, n) for p, n in zip(prompts, lengths, strict=True)]
    joins = {4: [2], 9: [3]}  # step -> rows that join then
    with torch.inference_mode():
        ids, mask = pad_prompts(prompts[:2])
        cache = m.new_cache()
        first = m(ids, cache=cache, attention_mask=mask).logits[:, -1].argmax(-1).tolist()
        rows, out = [0, 1], {0: [first[0]], 1: [first[1]]}
        for step in range(1, 40):
            for j in joins.get(step, []):
                joined = m.new_cache()
                out[j] = [int(m(torch.tensor([prompts[j]]), cache=joined).logits[0, -1].argmax())]
                cache = concat_caches(cache, joined)
                rows.append(j)
            keep = [i for i, r in enumerate(rows) if len(out[r]) < lengths[r]]
            rows = [rows[i] for i in keep]
            if not rows:
                break
            drop_rows(cache, keep)
            logits = m(torch.tensor([[out[r][-1]] for r in rows]), cache=cache).logits[:, -1]
            for r, t in zip(rows, logits.argmax(-1).tolist(), strict=True):
                out[r].append(t)
    assert [out[i] for i in range(4)] == alone


def test_engine_batches_concurrent_requests_like_alone(model):
    """The scheduler thread itself: 6 requests submitted while others run, 4 slots; same tokens as alone (with plain
    linears, computed before the engine packs them)."""
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(0, VOCAB, (n,), generator=g).tolist() for n in (4, 9, 2, 14, 6, 11)]
    alone = [greedy_alone(model, p, 10 + 3 * i) for i, p in enumerate(prompts)]
    engine = Engine(model, ServerMetrics(), max_batch=4, max_queue=8)
    done = threading.Semaphore(0)
    reqs = [Request(p, SamplingParams(max_tokens=10 + 3 * i, temperature=0.0), lambda ev: done.release()
                    if ev.kind != "delta" else None, 60.0, lambda ids: "") for i, p in enumerate(prompts)]
    engine.start()
    try:
        for r in reqs[:3]:
            engine.submit(r)
        time.sleep(0.05)
        for r in reqs[3:]:
            engine.submit(r)
        for _ in reqs:
            assert done.acquire(timeout=30)
    finally:
        engine.stop()
    assert [r.generated for r in reqs] == alone
    assert max(r.batch_sizes / r.decode_steps for r in reqs) > 1  # they really shared forwards
    if fastlinear.available():  # eager on CPU the engine serves from oneDNN-packed linears (and gave the same tokens)
        assert any(isinstance(m, fastlinear.PackedLinear) for m in model.modules())


def test_engine_queue_is_bounded(model):
    engine = Engine(model, ServerMetrics(), max_batch=1, max_queue=2)  # not started: nothing leaves the queue
    make = lambda: Request([1, 2], SamplingParams(max_tokens=1), lambda ev: None, 60.0, lambda ids: "")  # noqa: E731
    engine.submit(make())
    engine.submit(make())
    with pytest.raises(QueueFull):
        engine.submit(make())


# ---- the live server through the openai client ----
def test_completions_match_greedy_generate_and_are_metered(client, model, tokenizer):
    assert [m.id for m in client.models.list().data] == ["tiny"]
    prompt = "ROMEO: what light"
    ids = tokenizer(prompt)["input_ids"]
    r = client.completions.create(model="tiny", prompt=prompt, max_tokens=12, temperature=0)
    want = greedy_alone(model, ids, 12)
    eos = tokenizer.eos_token_id
    want = want[: want.index(eos)] if eos in want else want
    assert r.choices[0].text == tokenizer.decode(want, skip_special_tokens=True)
    assert r.usage.prompt_tokens == len(ids) and r.usage.completion_tokens <= 12
    x = r.usage.x_densa
    assert x["flops"] > 0 and x["usd"] > 0 and 0 < x["ttft_s"] <= x["latency_s"] and x["compute_s"] > 0
    assert x["experts_per_token"] is None  # a dense-FFN model


def test_streaming_equals_non_streaming(client):
    kwargs = dict(model="tiny", prompt="To be, or not", max_tokens=20, temperature=0, stop=["\n\n"])
    whole = client.completions.create(**kwargs)
    chunks = list(client.completions.create(stream=True, **kwargs))
    assert "".join(c.choices[0].text for c in chunks) == whole.choices[0].text
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens

    messages = [{"role": "user", "content": "Speak."}]
    chat = client.chat.completions.create(model="tiny", messages=messages, max_tokens=15, temperature=0)
    stream = list(client.chat.completions.create(model="tiny", messages=messages, max_tokens=15, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert stream[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == chat.choices[0].message.content
    assert stream[-1].choices == [] and stream[-1].usage.total_tokens == chat.usage.total_tokens


def test_a_tiny_temperature_decodes_greedily(client):
    """logits / 1e-40 overflow to inf (NaN probabilities): such temperatures are greedy, as in vLLM, instead of an
    error for the whole batch."""
    kwargs = dict(model="tiny", prompt="To be", max_tokens=8)
    assert client.completions.create(temperature=1e-40, **kwargs).choices[0].text == \
        client.completions.create(temperature=0, **kwargs).choices[0].text


def test_sampling_with_a_seed_is_reproducible(client):
    kwargs = dict(model="tiny", prompt="Once", max_tokens=10, temperature=0.9, top_p=0.9, seed=7)
    assert client.completions.create(**kwargs).choices[0].text == client.completions.create(**kwargs).choices[0].text


def test_echo_logprobs_are_the_models(url, client, model):
    """Legacy `echo` + `logprobs` (+ `max_tokens` 0 or 1): per-token prompt logprobs with top alternatives, equal to
    the model's own log-softmax, for several token-id prompts in one request (lm-eval's loglikelihood call)."""
    prompts = [[5, 70, 100, 33, 2], [9, 12]]
    r = client.completions.create(model="tiny", prompt=prompts, max_tokens=0, echo=True, logprobs=2, temperature=0)
    assert r.usage.prompt_tokens == 7 and r.usage.x_densa["tokens_processed"] == 7 and r.usage.x_densa["flops"] > 0
    for choice, p in zip(r.choices, prompts, strict=True):
        lp = choice.logprobs
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([p])).logits[0], -1)
        assert lp.token_logprobs[0] is None and len(lp.token_logprobs) == len(p)
        want = [float(logp[t, p[t + 1]]) for t in range(len(p) - 1)]
        assert lp.token_logprobs[1:] == pytest.approx(want, abs=1e-4)
        assert all(len(top) == 2 for top in lp.top_logprobs[1:])
        assert max(lp.top_logprobs[1].values()) == pytest.approx(float(logp[0].max()), abs=1e-4)
    one = client.completions.create(model="tiny", prompt=prompts[0], max_tokens=1, echo=True, logprobs=1)
    assert len(one.choices[0].logprobs.token_logprobs) == len(prompts[0]) + 1


def test_streamed_echo_logprobs_equal_the_whole_answer(client):
    """Streaming with `echo` + `logprobs`: the same tokens, logprobs and text offsets as the non-streaming answer
    (the echoed prompt's text comes in the first chunk, its tokens in the next, so offsets must follow the tokens)."""
    kwargs = dict(model="tiny", prompt="To be, or", max_tokens=6, temperature=0, echo=True, logprobs=1,
                  extra_body={"ignore_eos": True})
    whole = client.completions.create(**kwargs).choices[0]
    chunks = [c.choices[0] for c in client.completions.create(stream=True, **kwargs) if c.choices]
    assert "".join(c.text for c in chunks) == whole.text
    streamed = [c.logprobs for c in chunks if c.logprobs is not None]
    assert [t for lp in streamed for t in lp.tokens] == whole.logprobs.tokens
    assert [o for lp in streamed for o in lp.text_offset] == whole.logprobs.text_offset
    assert whole.logprobs.text_offset[-1] > len("To be, or")  # generated tokens sit after the echoed prompt


def test_lm_eval_local_completions_against_the_server(url, model, tokenizer):
    """lm-eval's own `local-completions` model (remote tokenizer through /tokenizer_info and /tokenize) computes
    the same log-likelihood as the model."""
    from lm_eval.api.instance import Instance
    from lm_eval.models.openai_completions import LocalCompletionsAPI

    lm = LocalCompletionsAPI(base_url=url + "/v1/completions", model="tiny", max_length=CONTEXT, batch_size=2)
    assert lm.tokenizer_backend == "remote"
    pairs = [("Question: which is red? Answer:", " apple"), ("ROMEO:", " Juliet")]
    got = lm.loglikelihood([Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(pairs)])
    for (ctx, cont), (ll, _) in zip(pairs, got, strict=True):
        c_ids, x_ids = tokenizer(ctx)["input_ids"], tokenizer(cont)["input_ids"]
        ids = c_ids + x_ids
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([ids])).logits[0], -1)
        want = sum(float(logp[t - 1, ids[t]]) for t in range(len(c_ids), len(ids)))
        assert ll == pytest.approx(want, abs=1e-3)


# ---- robustness and security ----
BAD_REQUESTS = [
    ("/v1/completions", b"{not json", 400, None),
    ("/v1/completions", b"[1, 2]", 400, None),
    ("/v1/completions", {"model": "tiny", "prompt": "hi", "max_tokens": "5"}, 400, "max_tokens"),
    ("/v1/completions", {"model": "tiny", "prompt": 42}, 400, "prompt"),
    ("/v1/completions", {"model": "tiny", "prompt": "hi", "max_tokens": -1}, 400, "max_tokens"),
    ("/v1/completions", {"model": "tiny", "prompt": "hi", "max_tokens": 10**9}, 400, "max_tokens"),
    ("/v1/completions", {"model": "tiny", "prompt": "hi", "temperature": -1}, 400, "temperature"),
    ("/v1/completions", {"model": "tiny", "prompt": "hi", "seed": 2**64}, 400, "seed"),
    ("/v1/completions", {"model": "tiny", "prompt": "word " * 400, "max_tokens": 1}, 400, "prompt"),
    ("/v1/completions", {"model": "tiny", "prompt": [[1, 99999]]}, 400, "prompt"),
    ("/v1/completions", {"model": "gpt-4", "prompt": "hi"}, 404, "model"),
    ("/v1/completions", {"prompt": "hi"}, 400, "model"),
    ("/v1/chat/completions", {"model": "tiny", "messages": []}, 400, "messages"),
    ("/v1/chat/completions", {"model": "tiny", "messages": [{"role": "wizard", "content": "x"}]}, 400, "messages"),
    ("/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": "x"}], "n": 3}, 400, "n"),
    ("/v1/nowhere", {}, 404, None),
]


@pytest.mark.parametrize(("path", "body", "status", "param"), BAD_REQUESTS)
def test_bad_requests_get_openai_errors(url, path, body, status, param):
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = requests.post(url + path, data=data, headers={"Content-Type": "application/json"}, timeout=30)
    assert r.status_code == status
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert error["param"] == param


def test_server_keeps_serving_after_errors(url, client):
    for path, body, _, _ in BAD_REQUESTS[:5]:
        requests.post(url + path, data=body if isinstance(body, bytes) else json.dumps(body), timeout=30)
    assert requests.get(url + "/health", timeout=5).json()["status"] == "ok"
    assert client.completions.create(model="tiny", prompt="again", max_tokens=3).usage.completion_tokens >= 1


def test_api_key(model, tokenizer):
    with serve(model, tokenizer, api_key="s3cret") as base:
        assert requests.get(base + "/health", timeout=5).status_code == 200  # liveness probes need no key
        for headers in ({}, {"Authorization": "Bearer wrong"}):
            r = requests.get(base + "/v1/models", headers=headers, timeout=5)
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=base + "/v1", api_key="wrong", max_retries=0).models.list()
        good = openai.OpenAI(base_url=base + "/v1", api_key="s3cret", max_retries=0)
        assert good.completions.create(model="tiny", prompt="hi", max_tokens=2).choices


def _open_stream(base: str, max_tokens: int) -> requests.Response:
    body = {"model": "tiny", "prompt": "Long", "max_tokens": max_tokens, "stream": True, "ignore_eos": True,
            "logprobs": 0}
    r = requests.post(base + "/v1/completions", json=body, stream=True, timeout=30)
    assert r.status_code == 200
    return r


def _wait_idle(base: str) -> None:
    """The engine drops finished rows right after the step that finished them: wait for that, at most 10 s."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        health = requests.get(base + "/health", timeout=5).json()
        if health["active"] == 0 and health["queue_depth"] == 0:
            return
        time.sleep(0.02)
    raise AssertionError(f"the server still holds requests: {health}")


def test_full_queue_answers_429_and_disconnect_frees_the_slot(model, tokenizer):
    with serve(model, tokenizer, max_batch=1, max_queue=1) as base:
        running = _open_stream(base, 240)
        lines = running.iter_lines()
        next(line for line in lines if line.startswith(b"data: "))  # admitted: it holds the only slot
        waiting = _open_stream(base, 5)  # headers came back, so it sits in the queue
        r = requests.post(base + "/v1/completions", json={"model": "tiny", "prompt": "x", "max_tokens": 2},
                          timeout=30)
        assert r.status_code == 429 and r.json()["error"]["type"] == "rate_limit_error"
        running.close()  # the client goes away mid-stream
        assert b"[DONE]" in waiting.content  # ... so the queued request got the slot and finished
        _wait_idle(base)


def test_per_request_timeout(model, tokenizer):
    """One slot, two long requests: the running one and the one still queued both end with 408 at the deadline."""
    with serve(model, tokenizer, timeout_s=0.1, max_batch=1) as base:  # 250 tokens take >= 0.3 s
        body = {"model": "tiny", "prompt": "x", "max_tokens": 250, "ignore_eos": True}
        answers = []
        threads = [threading.Thread(target=lambda: answers.append(requests.post(base + "/v1/completions", json=body,
                                                                                timeout=30))) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert [r.status_code for r in answers] == [408, 408]
        assert all(r.json()["error"]["type"] == "timeout" for r in answers)
        _wait_idle(base)


def test_load_test_has_no_5xx_and_answers_every_accepted_request(model, tokenizer):
    """12 clients for 3 s against 2 slots and a queue of 3: some get 429, none gets a 5xx, and every accepted
    request (streaming or not) ends with a finish reason."""
    statuses, unanswered = [], []
    lock = threading.Lock()
    with serve(model, tokenizer, max_batch=2, max_queue=3) as base:
        stop_at = time.monotonic() + 3.0

        def client(k: int) -> None:
            with requests.Session() as s:
                while time.monotonic() < stop_at:
                    body = {"model": "tiny", "prompt": f"client {k}", "max_tokens": 8, "stream": k % 2 == 0}
                    r = s.post(base + "/v1/completions", json=body, timeout=60)
                    ok = True
                    if r.status_code == 200:
                        if body["stream"]:
                            events = [ln for ln in r.text.splitlines() if ln.startswith("data: ")]
                            ok = events[-1] == "data: [DONE]" and '"finish_reason": "' in events[-2]
                        else:
                            ok = r.json()["choices"][0]["finish_reason"] in ("stop", "length")
                    with lock:
                        statuses.append(r.status_code)
                        if not ok:
                            unanswered.append(r.text[-300:])

        threads = [threading.Thread(target=client, args=(k,)) for k in range(12)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        metrics = requests.get(base + "/metrics", timeout=5).text
    assert statuses.count(200) >= 10 and not [s for s in statuses if s >= 500]
    assert set(statuses) <= {200, 429} and not unanswered
    assert f'densa_requests_total{{endpoint="/v1/completions",status="200"}} {statuses.count(200)}' in metrics


def test_metrics_and_experts_per_token_on_a_moe_model(tokenizer):
    moe = tiny_model(vocab_size=VOCAB, ffn="moe", num_experts=8, num_experts_per_tok=2, num_null_experts=1,
                     num_identity_experts=1, target_active_experts=1.5)
    with serve(moe, tokenizer) as base:
        c = openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0)
        r = c.completions.create(model="tiny", prompt="Hello there", max_tokens=6, temperature=0)
        x = r.usage.x_densa
        assert 0 <= x["experts_per_token"] <= 2
        page = requests.get(base + "/metrics", timeout=5).text
    for series in ("densa_requests_total", "densa_prompt_tokens_total", "densa_completion_tokens_total",
                   "densa_request_latency_seconds_bucket", "densa_time_to_first_token_seconds_count",
                   "densa_queue_depth", "densa_active_requests", 'densa_ffn_experts_per_token_sum{layer="0"}'):
        assert series in page


def test_command_line(tmp_path, capsys):
    from densa.checkpoint import save_checkpoint
    from densa.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["serve", "--help"])
    assert exit_info.value.code == 0 and "--api-key" in capsys.readouterr().out
    save_checkpoint(tiny_model(), tmp_path / "ck")  # a checkpoint without a tokenizer
    assert main(["serve", str(tmp_path / "ck"), "--port", "0"]) == 1
    assert "ships no tokenizer; pass --tokenizer DIR" in capsys.readouterr().err
    assert main(["serve", str(tmp_path / "ck"), "--port", "70000"]) == 1  # not an OverflowError traceback
    assert "--port must be in 0..65535" in capsys.readouterr().err


def test_densa_serve_runs_the_engine_on_its_main_thread_and_drains_on_ctrl_c(model, tokenizer):
    """`densa serve` decodes on the thread that loaded the model (a second thread running torch's kernels makes
    libgomp stop spin-waiting: `Engine.run`) and serves HTTP from another; Ctrl-C finishes the request in flight,
    then both stop."""
    import os
    import signal

    import uvicorn

    from densa.serve.app import ServeConfig, build_app
    from densa.serve.command import bind, run_on_main_thread

    app = build_app(model, tokenizer, ServeConfig(model_name="tiny", context=CONTEXT), engine_thread=False)
    engine, decoding_threads = app.state.engine, set()
    step = engine._decode_step

    def recorded_step() -> None:
        decoding_threads.add(threading.current_thread())
        step()

    engine._decode_step = recorded_step
    sock = bind("127.0.0.1", 0)
    base = "http://{}:{}".format(*sock.getsockname()[:2])
    server = uvicorn.Server(uvicorn.Config(app, log_level="error"))
    answers: list[str] = []

    def client() -> None:
        deadline = time.monotonic() + 30
        while not server.started and time.monotonic() < deadline:
            time.sleep(0.01)
        stream = _open_stream(base, 40)
        lines = stream.iter_lines()
        next(line for line in lines if line.startswith(b"data: "))  # in flight
        os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C
        answers.extend(line.decode() for line in lines if line.startswith(b"data: "))

    threading.Thread(target=client, daemon=True).start()
    before = signal.getsignal(signal.SIGINT)
    run_on_main_thread(app, server, sock)  # returns once the request is answered and the server is down
    sock.close()
    assert decoding_threads == {threading.main_thread()}
    assert answers[-1] == "data: [DONE]"
    tokens = sum(len(json.loads(a[6:])["choices"][0]["logprobs"]["tokens"]) for a in answers[:-1])
    assert tokens == 39  # the request's 40 tokens, the first read before the signal
    assert signal.getsignal(signal.SIGINT) is before and not engine.running


def test_bench_phase_measures_a_live_server(url):
    """`densa bench serve`'s measurement on the tiny server: structure only (speed goals live in the bench)."""
    from densa.bench.serve import _phase

    result = _phase(url, "tiny", ["To be", "or not to be"], clients=2, requests_per_client=1, max_tokens=5)
    assert result["requests"] == 2 and result["tokens"] == 10  # ignore_eos: exactly max_tokens each
    assert result["tok_s"] > 0 and 0 < result["ttft_ms_p50"] <= result["ttft_ms_p90"]
    assert result["ms_per_token_p50"] > 0 and result["usd_per_1m_tokens"] > 0


def test_a_chat_template_error_is_a_400(tokenizer):
    """A template that refuses the messages (e.g. "roles must alternate") is the client's error, not a 500."""
    import copy

    from densa.serve.handlers import TextCodec
    from densa.serve.protocol import APIError

    strict = copy.deepcopy(tokenizer)
    strict.chat_template = ("{% if messages[0]['role'] != 'user' %}{{ raise_exception('the first message must be "
                            "from the user') }}{% endif %}{{ messages[0]['content'] }}")
    codec = TextCodec(strict)
    assert codec.chat_prompt([{"role": "user", "content": "hi"}])
    with pytest.raises(APIError, match="must be from the user") as info:
        codec.chat_prompt([{"role": "assistant", "content": "hi"}])
    assert info.value.status == 400 and info.value.param == "messages"

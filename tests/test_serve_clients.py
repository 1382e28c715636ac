"""`densa serve` as the clients see it, through the official `openai` client on a live server: the usage chunk of
`stream_options.include_usage`, correct `completion_tokens`, the per-request cost headers, and the chat-only mode
(with an API key) that `densa eval` uses as the stand-in for a hosted chat model."""

import openai
import pytest
import requests
from conftest import tiny_model, tiny_server

from densa.data.corpora import corpus_texts
from densa.data.tokenizer import train_tokenizer

VOCAB, CONTEXT = 320, 256
MESSAGES = [{"role": "user", "content": "Speak, friend."}]


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer([next(corpus_texts("tinyshakespeare"))[:60_000]], vocab_size=VOCAB)


@pytest.fixture(scope="module")
def model():
    return tiny_model(vocab_size=VOCAB)


def serve(model, tokenizer, **overrides):
    return tiny_server(model, tokenizer, CONTEXT, **overrides)


@pytest.fixture(scope="module")
def client(model, tokenizer):
    with serve(model, tokenizer) as base:
        yield openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0)


def test_include_usage_sends_one_usage_chunk_last(client):
    """As OpenAI: every chunk has `usage: null` but the last, which has empty `choices` and the usage (densa's
    `x_densa` included) equal to the non-streaming answer's; no chunk carries the usage twice."""
    kwargs = dict(model="tiny", messages=MESSAGES, max_tokens=12, temperature=0)
    whole = client.chat.completions.create(**kwargs)
    chunks = list(client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kwargs))
    assert all(c.usage is None and len(c.choices) == 1 for c in chunks[:-1])
    last = chunks[-1]
    assert last.choices == [] and last.object == "chat.completion.chunk" and last.id == chunks[0].id
    assert (last.usage.prompt_tokens, last.usage.completion_tokens, last.usage.total_tokens) == \
        (whole.usage.prompt_tokens, whole.usage.completion_tokens, whole.usage.total_tokens)
    assert last.usage.x_densa["usd"] > 0 and last.usage.x_densa["flops"] > 0
    assert "".join(c.choices[0].delta.content or "" for c in chunks[:-1]) == whole.choices[0].message.content

    plain = list(client.completions.create(model="tiny", prompt="To be", max_tokens=5, stream=True,
                                           stream_options={"include_usage": True}))
    assert [c.usage is None for c in plain] == [True] * (len(plain) - 1) + [False]
    assert plain[-1].choices == [] and plain[-1].usage.completion_tokens >= 1


def test_completion_tokens_count_every_generated_token(client):
    """`usage.completion_tokens` is the number of tokens the model generated, a stop token included (it cost a
    step, as vLLM counts it): one logprobs entry per token, streaming or not, and exactly max_tokens when the
    length ends the request."""
    chat = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=40, temperature=0,
                                          logprobs=True)
    assert len(chat.choices[0].logprobs.content) == chat.usage.completion_tokens
    stream = list(client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=40, temperature=0,
                                                 logprobs=True, stream=True, stream_options={"include_usage": True}))
    entries = sum(len(c.choices[0].logprobs.content) for c in stream if c.choices and c.choices[0].logprobs)
    assert entries == stream[-1].usage.completion_tokens == chat.usage.completion_tokens
    exact = client.completions.create(model="tiny", prompt="Once", max_tokens=9, extra_body={"ignore_eos": True})
    assert exact.usage.completion_tokens == 9 and exact.choices[0].finish_reason == "length"


def test_cost_headers_match_the_usage(client):
    raw = client.chat.completions.with_raw_response.create(model="tiny", messages=MESSAGES, max_tokens=4)
    usage = raw.parse().usage.x_densa
    assert float(raw.headers["x-densa-cost-usd"]) == usage["usd"] > 0
    assert float(raw.headers["x-densa-flops"]) == usage["flops"] > 0
    raw = client.completions.with_raw_response.create(model="tiny", prompt=["a", "b"], max_tokens=2)
    assert float(raw.headers["x-densa-cost-usd"]) == raw.parse().usage.x_densa["usd"]  # summed over prompts


def test_chat_only_with_an_api_key_behaves_like_a_hosted_chat_model(model, tokenizer):
    """`--chat-only --api-key`: the key first (401 everywhere but /health), then /v1/completions is a 404 with
    OpenAI's own message for a chat model on that route, the tokenizer routes are gone, and chat works, streaming
    with usage included."""
    with serve(model, tokenizer, chat_only=True, api_key="k3y") as base:
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=base + "/v1", api_key="wrong", max_retries=0).completions.create(
                model="tiny", prompt="hi")
        client = openai.OpenAI(base_url=base + "/v1", api_key="k3y", max_retries=0)
        with pytest.raises(openai.NotFoundError, match="This is a chat model") as info:
            client.completions.create(model="tiny", prompt="hi", max_tokens=2)
        assert info.value.status_code == 404 and info.value.body["param"] == "model"
        assert info.value.body["type"] == "invalid_request_error" and "--chat-only" in info.value.body["message"]
        auth = {"Authorization": "Bearer k3y"}
        for method, path in (("POST", "/tokenize"), ("POST", "/detokenize"), ("GET", "/tokenizer_info")):
            assert requests.request(method, base + path, json={}, headers=auth, timeout=5).status_code == 404
        assert [m.id for m in client.models.list().data] == ["tiny"]
        chunks = list(client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=5, stream=True,
                                                     stream_options={"include_usage": True}))
        assert chunks[-1].usage.completion_tokens >= 1
        assert requests.get(base + "/health", timeout=5).status_code == 200


def test_command_line_flags(capsys):
    from densa.cli import main

    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "--chat-only" in out and "--max-request-bytes MAX_REQUEST_BYTES" in out and "1048576" in out

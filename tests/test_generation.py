import pytest
import torch
from conftest import tiny_model

from densa.generation import sample_next


def test_greedy_cached_generation_equals_uncached_argmax_loop():
    model = tiny_model()
    prompt = torch.randint(0, 256, (2, 11))
    out = model.generate(prompt, max_new_tokens=30)
    assert out.shape == (2, 41)
    ids = prompt
    for _ in range(30):  # no cache: full forward each step
        ids = torch.cat([ids, model(ids).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out, ids)


def test_stop_tokens_and_max_length():
    model = tiny_model(mixer="attention")
    prompt = torch.randint(0, 256, (1, 5))
    free = model.generate(prompt, max_new_tokens=12)
    stop = int(free[0, 8])  # the 4th generated token
    out = model.generate(prompt, max_new_tokens=12, stop_tokens=[stop])
    first = (free[0, 5:] == stop).nonzero()[0].item()
    assert out.shape[1] == 5 + first + 1 and out[0, -1] == stop
    assert model.generate(prompt, max_new_tokens=0).shape == (1, 5)


def test_finished_rows_repeat_their_stop_token():
    model = tiny_model()
    prompt = torch.randint(0, 256, (3, 4))
    free = model.generate(prompt, max_new_tokens=6)
    stop = int(free[0, 5])  # row 0 stops after 2 tokens
    out = model.generate(prompt, max_new_tokens=6, stop_tokens=[stop])
    assert (out[0, 5:] == stop).all()


def test_sampling_is_seeded_and_filters():
    logits = torch.tensor([[0.0, 1.0, 2.0, 3.0, 4.0]]).repeat(2000, 1)
    g = torch.Generator().manual_seed(1)
    top2 = sample_next(logits, temperature=1.0, top_k=2, generator=g)
    assert set(top2.tolist()) == {3, 4}
    nucleus = sample_next(logits, temperature=1.0, top_p=0.5, generator=g)  # p(4)=0.64 alone reaches 0.5
    assert set(nucleus.tolist()) == {4}
    cold = sample_next(logits, temperature=1e-4, generator=g)
    assert set(cold.tolist()) == {4}
    a = sample_next(logits, 1.0, generator=torch.Generator().manual_seed(3))
    b = sample_next(logits, 1.0, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b) and len(set(a.tolist())) == 5


@pytest.mark.parametrize(("kwargs", "message"), [({"temperature": -1}, "temperature"), ({"top_k": 0}, "top_k"),
                                                 ({"top_p": 1.5}, "top_p")])
def test_bad_sampling_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        tiny_model().generate(torch.zeros(1, 2, dtype=torch.long), max_new_tokens=2, **kwargs)

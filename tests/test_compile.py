"""The compile switch (densa/model/compile.py) and the static decode step it compiles: the eager `decode_step`
equals the checked `forward`, the compiled step equals the eager one (logits within 1e-4, identical greedy tokens)
for the Mega, Megalodon-option, dense and MoE models, and 300 decoded tokens compile a bounded number of graphs.

Compiled runs use the "aot_eager" backend: it traces with dynamo and functionalises the in-place cache writes as
inductor does, but generates no C++ (an inductor compile takes minutes on 2 busy cores). Set
DENSA_INDUCTOR_TESTS=1 to run the inductor case too. All are marked `compile` (`pytest -m compile`)."""

import os

import pytest
import torch
import torch._dynamo
from conftest import VARIANTS, tiny_model

from densa.generation import generate
from densa.model.compile import CompileConfig, InferenceSteps, inference_steps

pytestmark = [pytest.mark.compile, pytest.mark.usefixtures("one_thread")]

MODELS = {"mega": VARIANTS["mega"], "megalodon-all": VARIANTS["megalodon-all"], "dense-gqa": VARIANTS["dense-gqa"],
          "moe": {"ffn": "moe", "num_experts": 8, "num_experts_per_tok": 2, "num_null_experts": 1,
                  "num_identity_experts": 1, "target_active_experts": 1.5}}


def left_padded_batch():
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 256, (3, 13), generator=g)
    mask = torch.ones(3, 13, dtype=torch.long)
    mask[1, :5] = 0  # rows at different positions: left padding
    mask[2, :12] = 0
    return ids, mask


def two_prefilled_caches(model):
    """The left-padded batch prefilled into two caches: (the greedy next tokens (B, 1), cache a, cache b)."""
    ids, mask = left_padded_batch()
    a, b = model.new_cache(), model.new_cache()
    with torch.no_grad():
        token = model(ids, cache=a, attention_mask=mask).logits[:, -1:].argmax(-1)
        model(ids, cache=b, attention_mask=mask)
    return token, a, b


@pytest.mark.parametrize("name", list(MODELS))
def test_eager_decode_step_equals_forward(name):
    """The static step (ring / slot buffers written in place) against the checked forward on the same cache type,
    with rows at different positions, across chunk boundaries (tiny chunk = 16)."""
    model = tiny_model(**MODELS[name])
    token, a, b = two_prefilled_caches(model)
    with torch.no_grad():
        steps = inference_steps(model, "off")
        for _ in range(25):
            ref = model(token, cache=a)
            logits, experts = steps.decode(token, b)
            torch.testing.assert_close(logits, ref.logits[:, 0], atol=1e-5, rtol=1e-5)
            assert (experts is None) == (ref.ffn_experts is None)
            if experts is not None:
                assert torch.equal(experts, ref.ffn_experts[..., 0])
            token = logits.argmax(-1, keepdim=True)
    assert a.steps == b.steps and torch.equal(a.positions, b.positions)


@pytest.mark.parametrize("name", ["mega", "megalodon-all"])
def test_eager_ring_extent_equals_the_whole_ring(name):
    """An eager Mega step reads only the ring slots its rows can see (`Positions.ring_extent`); a compiled one reads
    the whole ring, masked. Both ways from one prefill, rows at positions 13 / 8 / 1, 40 steps: every row crosses
    chunk boundaries (chunk 16), where the extent goes from `extent` to the host-read bound."""
    model = tiny_model(**MODELS[name])
    token, a, b = two_prefilled_caches(model)
    with torch.no_grad():
        steps = inference_steps(model, "off")  # eager: passes the extent, so the ring is sliced
        for _ in range(40):
            sliced, _ = steps.decode(token, a)
            b.reserve(b.steps + 1)
            whole, _ = model.decode_step(token, b)  # no extent, as a compiled step: the whole ring
            b.steps += 1
            torch.testing.assert_close(sliced, whole, atol=1e-5, rtol=1e-5)
            token = sliced.argmax(-1, keepdim=True)
    assert int(a.positions.min()) > model.config.attn_chunk_size


def compiled_equals_eager(name: str, backend: str) -> None:
    torch._dynamo.reset()
    model = tiny_model(**MODELS[name])
    ids, mask = left_padded_batch()
    eager, fast = inference_steps(model, "off"), inference_steps(model, CompileConfig("on", backend))
    assert fast.compiled and not eager.compiled
    a, b = model.new_cache(), model.new_cache()
    with torch.no_grad():
        token = eager.prefill(ids, a, mask).logits[:, -1:].argmax(-1)
        fast.prefill(ids, b, mask)
        tokens_a, tokens_b = token, token
        for _ in range(6):
            la, _ = eager.decode(tokens_a, a)
            lb, _ = fast.decode(tokens_b, b)
            torch.testing.assert_close(lb, la, atol=1e-4, rtol=1e-4)
            tokens_a, tokens_b = la.argmax(-1, keepdim=True), lb.argmax(-1, keepdim=True)
            assert torch.equal(tokens_a, tokens_b)


@pytest.mark.parametrize("name", list(MODELS))
def test_compiled_decode_equals_eager(name):
    compiled_equals_eager(name, "aot_eager")


@pytest.mark.skipif(not os.environ.get("DENSA_INDUCTOR_TESTS"), reason="inductor compiles for minutes on 2 cores; "
                    "set DENSA_INDUCTOR_TESTS=1")
@pytest.mark.parametrize("name", ["mega", "dense-gqa"])
def test_inductor_decode_equals_eager(name):
    compiled_equals_eager(name, "inductor")


@pytest.mark.parametrize(("name", "most"), [("mega", 1), ("dense-gqa", 2), ("moe", 1)])
def test_300_decoded_tokens_compile_a_bounded_number_of_graphs(name, most):
    """Mega: the ring never changes shape, one graph. Dense without a reserved length: the K/V capacity doubles
    5 times over 300 tokens; after the first change torch makes that dimension dynamic, so at most 2 graphs. MoE:
    the fixed-shape gathered experts, so no graph break however many FFN experts the tokens choose."""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    model = tiny_model(**MODELS[name])
    steps = inference_steps(model, CompileConfig("on", "eager"))  # graphs are dynamo's: any backend counts alike
    cache = model.new_cache()
    with torch.no_grad():
        token = steps.prefill(torch.randint(0, 256, (2, 7)), cache).logits[:, -1:].argmax(-1)
        # the eager prefill may compile the MoE experts' own kernel (densa/model/moe.py, reduce_experts): not the
        # decode step's graphs, which are counted from here
        before = torch._dynamo.utils.counters["stats"]["unique_graphs"]
        for _ in range(300):
            token = steps.decode(token, cache)[0].argmax(-1, keepdim=True)
    assert cache.steps == 307
    assert 1 <= torch._dynamo.utils.counters["stats"]["unique_graphs"] - before <= most


def test_generate_uses_the_switch_and_agrees():
    torch._dynamo.reset()
    model = tiny_model()
    prompt = torch.randint(0, 256, (2, 9))
    eager = generate(model, prompt, max_new_tokens=20, compile="off")
    fast = generate(model, prompt, max_new_tokens=20, compile=CompileConfig("on", "aot_eager"))
    assert torch.equal(eager, fast)
    assert inference_steps(model, CompileConfig("on", "aot_eager")).compiled  # made once, cached on the model
    assert inference_steps(model, CompileConfig("on", "aot_eager")) is inference_steps(
        model, CompileConfig("on", "aot_eager"))


def test_the_switch():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert not CompileConfig("auto").enabled(cpu) and CompileConfig("auto").enabled(cuda)
    assert CompileConfig("on").enabled(cpu) and not CompileConfig("off").enabled(cuda)
    assert isinstance(inference_steps(tiny_model(), "auto"), InferenceSteps)
    with pytest.raises(ValueError, match="compile='fast': expected one of auto, on, off"):
        CompileConfig("fast")

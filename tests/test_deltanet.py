"""The gated delta-rule mixer: loop reference == chunked training form == recurrent decoding step, all equal to the
flash-linear-attention project's pure-PyTorch reference; the block decodes with a cache, handles left padding and
mixes with full attention in a hybrid layout."""

import importlib.metadata
import importlib.util

import pytest
import torch
import torch.nn.functional as F

from densa.config import ConfigError, from_preset
from densa.counting import flops_per_token
from densa.model.delta_rule import delta_rule_chunked, delta_rule_loop, delta_rule_step
from densa.model.model import DensaModel

pytestmark = pytest.mark.usefixtures("one_thread")


def inputs(B=2, H=3, T=37, K=8, V=6, seed=0, state=True):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, T, K, generator=g)
    k = F.normalize(torch.randn(B, H, T, K, generator=g), dim=-1)
    v = torch.randn(B, H, T, V, generator=g)
    beta = torch.rand(B, H, T, generator=g)
    decay = -torch.rand(B, H, T, generator=g) * 0.7
    S0 = torch.randn(B, H, K, V, generator=g) * 0.1 if state else None
    return q, k, v, beta, decay, S0


@pytest.mark.parametrize("chunk", [1, 5, 8, 37, 64])
def test_chunked_equals_loop(chunk):
    q, k, v, beta, g, S0 = inputs()
    o_ref, s_ref = delta_rule_loop(q, k, v, beta, g, 8**-0.5, S0)
    o, s = delta_rule_chunked(q, k, v, beta, g, 8**-0.5, chunk, S0)
    torch.testing.assert_close(o, o_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(s, s_ref, atol=1e-5, rtol=1e-5)


def test_step_equals_loop():
    q, k, v, beta, g, S0 = inputs(T=12)
    o_ref, s_ref = delta_rule_loop(q, k, v, beta, g, 0.5, S0)
    S, outs = S0, []
    for t in range(12):
        o, S = delta_rule_step(q[:, :, t], k[:, :, t], v[:, :, t], beta[:, :, t], g[:, :, t], 0.5, S)
        outs.append(o)
    torch.testing.assert_close(torch.stack(outs, 2), o_ref, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(S, s_ref, atol=1e-6, rtol=1e-6)


def test_chunked_gradients_equal_loop():
    leaves = [t.requires_grad_() for t in inputs(T=21, state=False)[:5]]
    o_ref, _ = delta_rule_loop(*leaves, 0.3)
    grads_ref = torch.autograd.grad(o_ref.square().sum(), leaves)
    o, _ = delta_rule_chunked(*leaves, 0.3, 8)
    grads = torch.autograd.grad(o.square().sum(), leaves)
    for a, b in zip(grads, grads_ref, strict=True):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def _fla_naive():
    """fla/ops/gated_delta_rule/naive.py from the installed fla-core (flash-linear-attention's kernels package),
    loaded by path: importing the `fla` package itself would pull in Triton."""
    try:
        dist = importlib.metadata.distribution("fla-core")
    except importlib.metadata.PackageNotFoundError:
        return None
    path = next((f for f in dist.files or [] if str(f).endswith("gated_delta_rule/naive.py")), None)
    if path is None:
        return None
    spec = importlib.util.spec_from_file_location("fla_gated_delta_naive", dist.locate_file(path))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_matches_flash_linear_attention_reference():
    naive = _fla_naive()
    if naive is None:
        pytest.skip("fla-core (the test extra) is not installed")
    q, k, v, beta, g, S0 = inputs(T=29)
    to_fla = lambda t: t.transpose(1, 2)  # noqa: E731  fla: (B, T, H, ·)
    o_fla, s_fla = naive.naive_recurrent_gated_delta_rule(to_fla(q), to_fla(k), to_fla(v), to_fla(beta), to_fla(g),
                                                          scale=8**-0.5, initial_state=S0, output_final_state=True)
    o, s = delta_rule_chunked(q, k, v, beta, g, 8**-0.5, 8, S0)
    torch.testing.assert_close(o, to_fla(o_fla), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(s, s_fla, atol=1e-5, rtol=1e-5)
    o_chunk_fla, _ = naive.naive_chunk_gated_delta_rule(to_fla(q), to_fla(k), to_fla(v), to_fla(g), to_fla(beta),
                                                        chunk_size=8, scale=8**-0.5, initial_state=S0)
    torch.testing.assert_close(o, to_fla(o_chunk_fla), atol=1e-4, rtol=1e-4)


MODELS = {
    "deltanet": dict(mixer="deltanet", delta_chunk_size=8),
    "deltanet-hybrid-moe": dict(mixer="deltanet", attention_every=2, delta_chunk_size=8, ffn="moe", num_experts=16,
                                num_experts_per_tok=4, num_null_experts=2, num_identity_experts=2,
                                target_active_experts=3.0),
    "mega-hybrid": dict(mixer="mega", attention_every=2),
}


@pytest.mark.parametrize("name", list(MODELS))
def test_cached_decoding_and_left_padding(name):
    torch.manual_seed(0)
    model = DensaModel(from_preset("tiny", **MODELS[name])).eval()
    ids = torch.randint(0, 256, (2, 40))
    with torch.no_grad():
        full = model(ids).logits
        cache = model.new_cache()
        parts = [model(ids[:, :23], cache=cache).logits] + [model(ids[:, t:t + 1], cache=cache).logits
                                                            for t in range(23, 40)]
        torch.testing.assert_close(torch.cat(parts, 1), full, atol=1e-5, rtol=1e-5)
        mask = torch.ones(2, 40, dtype=torch.long)
        mask[1, :7] = 0
        padded = model(ids, attention_mask=mask).logits
        torch.testing.assert_close(padded[1, 7:], model(ids[1:, 7:]).logits[0], atol=1e-5, rtol=1e-5)


def test_hybrid_layout_and_flops():
    cfg = from_preset("tiny", num_hidden_layers=4, mixer="deltanet", attention_every=2)
    assert cfg.layer_mixers == ["deltanet", "attention", "deltanet", "attention"]
    model = DensaModel(cfg)
    assert [type(layer).__name__ for layer in model.layers] == ["GatedDeltaBlock", "LlamaBlock"] * 2
    # decoding cost: the delta rule's per-token FLOPs do not grow with the context; attention's do
    delta = from_preset("tiny", mixer="deltanet")
    assert flops_per_token(delta, 4096).attention == pytest.approx(flops_per_token(delta, 1024).attention)
    dense = from_preset("tiny", mixer="attention")
    assert flops_per_token(dense, 4096).attention > 3 * flops_per_token(dense, 1024).attention
    with pytest.raises(ConfigError, match="attention_every"):
        from_preset("tiny", attention_every=3)
    with pytest.raises(ConfigError, match="delta_chunk_size"):
        from_preset("tiny", mixer="deltanet", delta_chunk_size=0)

"""Whole-model behaviour for every variant: causality, loss at init, determinism, cached decoding, bad input."""

import math

import pytest
import torch
from conftest import tiny_model


def test_causal(variant):
    model = tiny_model(**variant)
    ids = torch.randint(0, 256, (2, 50))
    edited = ids.clone()
    edited[:, 33] = (edited[:, 33] + 1) % 256
    a, b = model(ids).logits, model(edited).logits
    torch.testing.assert_close(a[:, :33], b[:, :33], atol=1e-6, rtol=0)
    assert (a[:, 33:] - b[:, 33:]).abs().max() > 1e-4  # and the edit is seen from t on


def test_loss_at_init_is_about_ln_vocab(variant):
    model = tiny_model(**variant)
    ids = torch.randint(0, 256, (4, 64))
    loss = model(ids, labels=ids).loss.item()
    assert abs(loss - math.log(256)) < 0.1


def test_labels_are_shifted_and_ignore_index():
    model = tiny_model()
    ids = torch.randint(0, 256, (1, 20))
    out = model(ids, labels=ids)
    manual = torch.nn.functional.cross_entropy(out.logits[0, :-1], ids[0, 1:])
    torch.testing.assert_close(out.loss, manual)
    masked = ids.clone()
    masked[:, :10] = -100
    manual_half = torch.nn.functional.cross_entropy(out.logits[0, 9:-1], ids[0, 10:])
    torch.testing.assert_close(model(ids, labels=masked).loss, manual_half)


def test_deterministic_under_a_seed(variant):
    ids = torch.randint(0, 256, (2, 40))
    a, b = tiny_model(**variant), tiny_model(**variant)
    torch.testing.assert_close(a(ids).logits, b(ids).logits, atol=0, rtol=0)


@pytest.mark.parametrize("prefill", [1, 15, 16, 21])
def test_cached_decoding_matches_full_forward(variant, prefill):
    """Prefill, then one token at a time across >= 3 chunk boundaries (tiny chunk = 16 tokens)."""
    model = tiny_model(**variant)
    ids = torch.randint(0, 256, (2, 61))
    full = model(ids).logits
    cache = model.new_cache()
    steps = [model(ids[:, :prefill], cache=cache).logits]
    steps += [model(ids[:, t : t + 1], cache=cache).logits for t in range(prefill, 61)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-4, rtol=1e-4)
    assert cache.seen_tokens == 61


def test_cached_multi_token_steps_match(variant):
    model = tiny_model(**variant)
    ids = torch.randint(0, 256, (1, 70))
    full = model(ids).logits
    cache, outs, t = model.new_cache(), [], 0
    for n in (5, 13, 1, 20, 31):  # uneven pieces that straddle chunk boundaries
        outs.append(model(ids[:, t : t + n], cache=cache).logits)
        t += n
    torch.testing.assert_close(torch.cat(outs, dim=1), full, atol=1e-4, rtol=1e-4)


def test_mega_cache_memory_is_constant_dense_cache_grows():
    sizes = {}
    for mixer in ("mega", "attention"):
        model, cache = tiny_model(mixer=mixer), None
        cache = model.new_cache()
        ids = torch.randint(0, 256, (1, 200))
        model(ids[:, :16], cache=cache)
        grown = []
        for t in range(16, 200):
            model(ids[:, t : t + 1], cache=cache)
            if t % 16 == 15:  # same position inside the chunk each time
                grown.append(cache.nbytes())
        sizes[mixer] = grown
    assert len(set(sizes["mega"])) == 1  # EMA state + the open chunk's K/V only
    assert sizes["attention"] == sorted(sizes["attention"]) and sizes["attention"][-1] > 5 * sizes["attention"][0]


def test_bf16_autocast_forward_is_finite():
    model = tiny_model(complex_ema=True, timestep_norm=True)
    ids = torch.randint(0, 256, (2, 40))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(ids, labels=ids)
    assert torch.isfinite(out.logits).all() and torch.isfinite(out.loss)


def test_backward_reaches_every_parameter(variant):
    model = tiny_model(**variant).train()
    ids = torch.randint(0, 256, (2, 40))
    model(ids, labels=ids).loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing


def test_untied_head():
    model = tiny_model(tie_word_embeddings=False)
    assert model.lm_head.weight is not model.embed_tokens.weight


@pytest.mark.parametrize(("bad", "error", "message"), [
    (torch.randn(1, 4), TypeError, "int64 tensor of shape"),
    (torch.zeros(4, dtype=torch.long), ValueError, "shape \\(batch, time\\)"),
    (torch.zeros(1, 0, dtype=torch.long), ValueError, "time >= 1"),
    (torch.tensor([[1, 256]]), ValueError, "token id 256, outside the vocabulary \\[0, 256\\)"),
    (torch.tensor([[-1, 2]]), ValueError, "token id -1"),
    ([[1, 2]], TypeError, "got list"),
])
def test_bad_inputs_are_named(bad, error, message):
    with pytest.raises(error, match=message):
        tiny_model()(bad)


def test_labels_and_cache_mismatch():
    model = tiny_model()
    ids = torch.zeros(1, 4, dtype=torch.long)
    with pytest.raises(ValueError, match="labels shape"):
        model(ids, labels=torch.zeros(1, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="cache has 1 layers"):
        from densa.model.cache import ModelCache

        model(ids, cache=ModelCache(model.new_cache().layers[:1]))


def test_logits_to_keep_computes_only_the_last_positions():
    model = tiny_model()
    ids = torch.randint(0, 256, (2, 30))
    full = model(ids).logits
    last = model(ids, logits_to_keep=3).logits
    assert last.shape == (2, 3, 256)
    torch.testing.assert_close(last, full[:, -3:], atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="logits_to_keep=2: must be >= 0, and 0 \\(all positions\\) with labels"):
        model(ids, labels=ids, logits_to_keep=2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_equals_its_written_out_reference_with_gradients(dtype):
    from densa.model.layers import RMSNorm

    torch.manual_seed(0)
    norm = RMSNorm(48, eps=1e-5)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    x = torch.randn(3, 5, 48, dtype=dtype, requires_grad=True)
    fast = norm(x)
    assert fast.dtype == dtype
    torch.testing.assert_close(fast, norm.reference(x), atol=0, rtol=0)
    (gx_fast, gw_fast), (gx_ref, gw_ref) = (torch.autograd.grad(y.float().pow(2).sum(), (x, norm.weight))
                                            for y in (fast, norm.reference(x)))
    torch.testing.assert_close(gx_fast, gx_ref, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(gw_fast, gw_ref, atol=1e-5, rtol=1e-5)

"""Analytic FLOPs per token against torch.utils.flop_counter on the tiny preset.

What the counter sees and what it does not, and so how the two are compared:
- It counts matmuls (mm/addmm/bmm, einsums lowered to bmm): the projections, FFN, LM head and the chunked-EMA
  state einsums. These must match the analytic `linear + lm_head + ema_state` exactly. Its formula ignores dtype
  (a complex matmul counts as a real one), so the comparison uses the real EMA.
- It counts SDPA only when the math backend runs (the CPU flash kernel has no flop formula), and then as the full
  score matrix: the masked upper triangle and the padding of the last chunk included. We force the math backend and
  compare with our *useful* (causal) attention FLOPs scaled by keys-computed / keys-used. Mega's inference-time
  zero-padding of q/k to the value width (`_fused_width`, which exists only to reach the fused kernel) is switched
  off for the count: under the forced math backend it would only add multiplications by zero.
- It has no formula for FFTs, so `ema_fft` (an estimate, 2.5·n·log2 n per real FFT) is outside the comparison.
"""

from unittest import mock

import pytest
import torch
from conftest import tiny_model
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from densa.config import from_preset
from densa.counting import count_parameters, flops_per_token, mean_keys


def _counted(model, T: int) -> tuple[int, dict]:
    ids = torch.randint(0, model.config.vocab_size, (1, T))
    with (sdpa_kernel(SDPBackend.MATH), mock.patch("densa.model.mega._fused_width", return_value=0),
          FlopCounterMode(display=False) as counter, torch.no_grad()):
        model(ids)
    return counter.get_total_flops(), counter.get_flop_counts()["Global"]


@pytest.mark.parametrize("T", [64, 100])
def test_mega_flops_match_counter(T):
    # the counter's matmul formula ignores dtype, so a complex einsum counts as a real one: compare on the real EMA
    cfg = from_preset("tiny", complex_ema=False)
    total, ops = _counted(tiny_model(complex_ema=False), T)
    assert not any("fft" in str(op) for op in ops)  # the counter is blind to FFTs
    f = flops_per_token(cfg, T)
    c = min(cfg.attn_chunk_size, T)
    computed_keys = c * c * ((T + c - 1) // c) / T  # per query: padded c×c blocks over T queries
    attention_as_computed = f.attention * computed_keys / mean_keys(T, cfg.attn_chunk_size)
    expected = (f.linear + f.lm_head + f.ema_state + attention_as_computed) * T
    assert total == pytest.approx(expected, rel=1e-6)
    assert 0 < f.ema_fft < 0.2 * f.total  # the uncounted FFT part is small next to the matmuls


def test_complex_ema_state_contractions_cost_twice_the_real_ones():
    real, cplx = (flops_per_token(from_preset("tiny", complex_ema=c), 64) for c in (False, True))
    assert 2 * real.ema_state < cplx.ema_state < 4 * real.ema_state and cplx.linear == real.linear


def test_dense_flops_match_counter():
    cfg = from_preset("tiny", mixer="attention")
    T = 64
    total, _ = _counted(tiny_model(mixer="attention"), T)
    f = flops_per_token(cfg, T)
    attention_as_computed = f.attention * T / mean_keys(T, T)  # math SDPA computes the full T×T scores
    assert total == pytest.approx((f.linear + f.lm_head + attention_as_computed) * T, rel=1e-6)


def test_training_is_three_forwards_and_long_context_costs():
    cfg = from_preset("cpu-small")
    short, long = flops_per_token(cfg, 1024), flops_per_token(cfg, 16384)
    assert short.training == 3 * short.total
    assert long.attention == pytest.approx(short.attention, rel=0.01)  # chunked: flat in context length
    dense = from_preset("cpu-small", mixer="attention")
    assert flops_per_token(dense, 16384).attention > 15 * flops_per_token(dense, 1024).attention


def test_parameter_counts():
    model = tiny_model()
    counts = count_parameters(model)
    assert counts.total == sum(p.numel() for p in model.parameters())  # tied head counted once
    assert counts.embedding == 256 * 64 and counts.non_embedding == counts.total - counts.embedding
    assert counts.active == counts.total  # dense FFN: everything is active
    untied = count_parameters(tiny_model(tie_word_embeddings=False))
    assert untied.total == counts.total + 256 * 64

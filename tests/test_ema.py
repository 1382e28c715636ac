"""The EMA's three paths (loop reference, FFT, chunked) and the decoding step compute the same recurrence."""

import pytest
import torch

from densa.model.ema import DampedEMA, ema_chunked, ema_fft, ema_reference, ema_step, swap_time_channels


@pytest.mark.parametrize("complex_ema", [False, True], ids=["real", "complex"])
@pytest.mark.parametrize("length", [1, 7, 16, 37, 64, 100, 128])
def test_fft_and_chunked_match_loop(complex_ema, length):
    ema = DampedEMA(dim=8, ema_dim=4, chunk=16, complex_ema=complex_ema)
    co = ema.coeffs()
    x = torch.randn(2, 8, length)
    y_ref, s_ref = ema_reference(x, co)
    torch.testing.assert_close(ema_fft(x, co), y_ref, atol=1e-5, rtol=1e-5)
    for chunk in (4, 16, 1000):
        y, s = ema_chunked(x, co, chunk)
        torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(s, s_ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("complex_ema", [False, True], ids=["real", "complex"])
def test_chunked_continues_from_a_state_and_step_matches(complex_ema):
    ema = DampedEMA(dim=8, ema_dim=4, chunk=16, complex_ema=complex_ema)
    co = ema.coeffs()
    x = torch.randn(2, 8, 45)
    y_ref, s_ref = ema_reference(x, co)
    y1, s1 = ema_chunked(x[..., :19], co, 16)  # prefill 19, then 26 more from the carried state
    y2, s2 = ema_chunked(x[..., 19:], co, 16, s1)
    torch.testing.assert_close(torch.cat([y1, y2], -1), y_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(s2, s_ref, atol=1e-5, rtol=1e-5)
    state, ys = ema.new_state(2), []
    for t in range(45):
        y, state = ema_step(x[..., t], co, state)
        ys.append(y)
    torch.testing.assert_close(torch.stack(ys, -1), y_ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("complex_ema", [False, True], ids=["real", "complex"])
def test_decoding_reuses_step_coefficients_until_a_parameter_changes(complex_ema):
    """Inference keeps the step's coefficients; an in-place update (optimizer step) or load_state_dict renews them."""
    ema = DampedEMA(dim=8, ema_dim=4, chunk=16, complex_ema=complex_ema)
    other = DampedEMA(dim=8, ema_dim=4, chunk=16, complex_ema=complex_ema)
    x, state = torch.randn(2, 1, 8), ema.new_state(2)

    def expected(module):
        y, _ = ema_step(x[:, 0], module.coeffs(), state)
        return y + module.omega * x[:, 0]

    with torch.no_grad():
        first = ema.step_coeffs()
        assert ema.step_coeffs() is first  # kept
        torch.testing.assert_close(ema(x, state)[0][:, 0], expected(ema))
        ema.alpha.add_(0.5)  # what an optimizer step does
        assert ema.step_coeffs() is not first
        torch.testing.assert_close(ema(x, state)[0][:, 0], expected(ema))
        ema.load_state_dict(other.state_dict())
        torch.testing.assert_close(ema(x, state)[0][:, 0], expected(other))
        long = torch.randn(2, 40, 8)  # a prefill: the chunk powers are kept too, and renewed the same way

        def chunked(module):
            y, s = ema_chunked(swap_time_channels(long), module.coeffs(), 16, skip_D=module.omega)
            return swap_time_channels(y), s

        for _ in range(2):
            for got, want in zip(ema(long), chunked(ema), strict=True):
                torch.testing.assert_close(got, want)
            ema.delta.mul_(0.5)
        kept = ema.step_coeffs()
        ema.alpha.data.copy_(ema.alpha.data + 0.5)  # behind the version counter: clear_kept, or a mode switch
        ema.clear_kept()
        torch.testing.assert_close(ema(x, state)[0][:, 0], expected(ema))
        assert ema.step_coeffs() is not kept and ema.train().step_coeffs() is not ema.eval().step_coeffs()
    with torch.inference_mode():  # inference tensors have no version counter: computed each time
        frozen = DampedEMA(dim=8, ema_dim=4, chunk=16, complex_ema=complex_ema)
        frozen.load_state_dict(ema.state_dict())
        torch.testing.assert_close(frozen(x, state)[0][:, 0], expected(ema))
    y, _ = ema(x.requires_grad_(), state)  # with autograd: computed afresh, gradients reach the parameters
    y.sum().backward()
    assert ema.alpha.grad is not None


def test_long_sequence_memory_is_chunked():
    """The chunked path never builds a D×N×L kernel: its largest coefficient tensor is D×N×(chunk+1)."""
    ema = DampedEMA(dim=4, ema_dim=2, chunk=8)
    x = torch.randn(1, 5000, 4)
    y, state = ema(x)
    assert y.shape == (1, 5000, 4) and state.shape == (1, 4, 2)
    assert torch.isfinite(y).all()


def test_bf16_autocast_keeps_ema_in_fp32():
    ema = DampedEMA(dim=8, ema_dim=4, chunk=16)
    x = torch.randn(2, 40, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, state = ema(x.bfloat16())
    assert y.dtype == torch.bfloat16 and state.dtype == torch.float32
    ref, _ = ema(x)
    assert torch.isfinite(y).all() and (y.float() - ref).abs().max() < 0.1


def test_slow_decay_does_not_round_to_one():
    ema = DampedEMA(dim=2, ema_dim=2, chunk=8)
    with torch.no_grad():
        ema.alpha.fill_(-20.0)  # α·δ ~ 1e-9: 1 - αδ rounds to 1 in fp32, log1p keeps it
        ema.delta.fill_(-0.0)
    assert (ema.coeffs().log_q_DN < 0).all()

"""The neuron-level baseline (densa/moefy/teal.py): thresholds meet the target sparsity, the one-token sparse path
computes what the masked path does, sparsity 0 is the original, and decoding runs through the sparse path."""

import pytest
import torch

from densa.config import from_preset
from densa.model.model import DensaModel
from densa.moefy import teal


@pytest.fixture(scope="module")
def dense():
    torch.manual_seed(0)
    return DensaModel(from_preset("tiny", mixer="attention", ffn="swiglu", intermediate_size=128,
                                  initializer_range=0.1)).eval()


@pytest.fixture(scope="module")
def windows():
    return torch.randint(0, 256, (8, 64), generator=torch.Generator().manual_seed(1))


def test_thresholds_meet_the_target_sparsity_and_cost_less(dense, windows):
    model = teal.teal_model(dense, teal.calibrate(dense, windows, 0.5))
    with torch.no_grad():
        model(windows)
    shares = teal.ffn_shares(model)
    assert all(abs(s - 0.5) < 0.02 for s in shares)  # the calibration tokens themselves
    full = teal.teal_flops_per_token(model, 64, [1.0, 1.0])
    assert teal.teal_flops_per_token(model, 64, shares) < full
    assert full - teal.teal_flops_per_token(model, 64, shares) == pytest.approx(
        sum(1 - s for s in shares) * 6 * 64 * 128)


def test_sparse_path_equals_the_masked_path_and_zero_sparsity_is_the_original(dense, windows):
    model = teal.teal_model(dense, teal.calibrate(dense, windows, 0.5))
    x = torch.randint(0, 256, (1, 30))
    with torch.no_grad():
        for block in model.layers:
            h_11D = torch.randn(1, 1, 64)
            sparse = block.mlp(h_11D)  # one token, no grad: the row-gathering path
            with torch.enable_grad():
                masked = block.mlp(h_11D)  # the masked dense path
            torch.testing.assert_close(sparse, masked.detach(), atol=1e-5, rtol=1e-5)
        exact = teal.teal_model(dense, teal.calibrate(dense, windows, 0.0))
        torch.testing.assert_close(exact(x).logits, dense(x).logits)
        # cached decoding (one token a step: the sparse path) agrees with the full forward's greedy choice
        out = model.generate(x[:, :8], max_new_tokens=6)
        logits = model(out[:, :-1]).logits
    assert torch.equal(logits[0, 7:].argmax(-1), out[0, 8:])


def test_only_dense_swiglu_models_are_thresholded(windows):
    with pytest.raises(ValueError, match="TEAL thresholds a dense SwiGLU FFN"):
        teal.calibrate(DensaModel(from_preset("tiny-moe")), windows, 0.5)
    with pytest.raises(ValueError, match="sparsity 1.0: must be in"):
        teal.calibrate(DensaModel(from_preset("tiny", mixer="attention")), windows, 1.0)

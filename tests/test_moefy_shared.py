"""Shared experts in `densa moefy` (densa/moefy/shared.py): high-activation-rate neurons always on, the budget counts
them, exact with every expert active, and the checkpoint stays an ordinary densa model."""

import pytest
import torch

from densa.checkpoint import save_checkpoint
from densa.config import from_preset
from densa.model.model import DensaModel
from densa.moefy.calibrate import ffn_inputs
from densa.moefy.convert import MoefyConfig, convert, with_budget
from densa.moefy.shared import activation_rates, shared_split
from densa.resolve import resolve


@pytest.fixture(scope="module")
def dense():
    torch.manual_seed(0)
    return DensaModel(from_preset("tiny", mixer="attention", ffn="swiglu", intermediate_size=128,
                                  initializer_range=0.1)).eval()


@pytest.fixture(scope="module")
def windows():
    return torch.randint(0, 256, (8, 64), generator=torch.Generator().manual_seed(1))


def test_shared_split_takes_the_high_rate_neurons_and_clusters_the_rest():
    torch.manual_seed(0)
    T, E, F = 512, 8, 6
    hot = torch.randperm(E * F)[:F]  # planted: these neurons carry a large output on every token
    act_TI = torch.randn(T, E * F) * 0.1
    act_TI[:, hot] += 5
    groups = shared_split(act_TI, torch.ones(16, E * F), E, 1)
    assert groups.shape == (E, F) and torch.equal(groups.flatten().sort().values, torch.arange(E * F))
    assert torch.equal(groups[0], hot.sort().values)
    assert activation_rates(act_TI, torch.ones(16, E * F), active_share=F / (E * F))[hot].min() == 1.0


def test_shared_conversion_is_exact_at_full_budget_and_pins_the_shared_experts(dense, windows, tmp_path):
    conversion = convert(dense, windows, MoefyConfig(experts=8, budget=0.5, shared=0.25, router_steps=20),
                         progress=False)
    assert conversion.report["shared_experts"] == 2
    assert all(layer["label_k"] == 4 for layer in conversion.report["layers"])
    x = torch.randint(0, 256, (2, 40))
    with torch.no_grad():
        torch.testing.assert_close(with_budget(conversion, 1.0)(x).logits, dense(x).logits, atol=1e-5, rtol=0)
        used = conversion.model(windows).ffn_experts.float().mean((1, 2))  # the budget counts shared experts
    assert torch.allclose(used, torch.full_like(used, 4.0), atol=0.25)
    inputs = ffn_inputs(dense, windows, progress=False)
    for layer, x_TD in zip(conversion.model.layers, inputs, strict=True):
        ids_TK = layer.mlp.gate(torch.cat([x_TD, 3 * torch.randn_like(x_TD)])).ids_TK
        assert ((ids_TK == 0).any(1) & (ids_TK == 1).any(1)).all()  # on every token, even far off calibration
    save_checkpoint(conversion.model, tmp_path / "moe")
    loaded = resolve(str(tmp_path / "moe")).model
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).logits, conversion.model(x).logits)


def test_training_updates_keep_the_shared_experts_pinned(dense, windows):
    model = convert(dense, windows, MoefyConfig(experts=8, budget=0.5, shared=0.25, router_steps=5),
                    progress=False).model
    bias = [layer.mlp.gate.expert_bias.clone() for layer in model.layers]
    model.train()
    model(windows)
    model.update_routing()  # the balance update re-centres expert_bias: a no-op at mean 0
    for layer, before in zip(model.layers, bias, strict=True):
        torch.testing.assert_close(layer.mlp.gate.expert_bias, before, atol=1e-6, rtol=0)


@pytest.mark.parametrize(("kwargs", "message"), [
    (dict(shared=0.75, budget=0.5), "exceed the budget 0.5"),
    (dict(shared=0.01), "rounds to at least one"),
    (dict(shared=1.0, budget=1.0), "must be 0 or in"),
])
def test_bad_shared_shares_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        MoefyConfig(experts=8, **kwargs)

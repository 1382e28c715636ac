"""The mixture-of-experts FFN (issue 3): dispatch against the per-token reference, routing, the budget controller,
balancing, the transformers Mixtral peer check, counting, config errors and `densa inspect-routing`."""

import threading
import warnings

import pytest
import torch
from conftest import tiny_model
from torch.utils.flop_counter import FlopCounterMode

import densa.model.moe as moe_module
from densa.checkpoint import load_model, save_checkpoint
from densa.cli import main
from densa.config import ConfigError, from_preset
from densa.counting import count_parameters, ffn_flops_per_token, flops_per_token
from densa.model.layers import SwiGLU
from densa.model.model import DensaModel
from densa.model.moe import MoE, moe_reference
from densa.model.router import zc_thresholds

pytestmark = pytest.mark.usefixtures("one_thread")  # 60 routing steps: 20 s on two spinning threads, 0.15 s on one


def moe_layer(preset: str = "tiny-moe", **overrides) -> MoE:
    torch.manual_seed(0)
    return MoE(from_preset(preset, **overrides))


def tiny_moe_model(**overrides) -> DensaModel:
    torch.manual_seed(0)
    return DensaModel(from_preset("tiny-moe", **overrides)).eval()


def settle(layer: MoE, x: torch.Tensor, steps: int) -> list[dict]:
    """Training-mode forwards without an optimizer, each followed by the per-step routing update."""
    layer.train()
    history = []
    for _ in range(steps):
        with torch.no_grad():
            layer(x)
        history.append(layer.update_routing())
    return history


# --------------------------------------------------------------------------- dispatch

@pytest.mark.parametrize("impl", ["grouped_mm", "split", "gathered"])
def test_dispatch_matches_reference_forward_and_backward(impl):
    layer = moe_layer().train()
    layer.gate.zc_bias.fill_(0.06)  # enough zero-computation routing for null, identity and all-null tokens
    layer.experts.impl = impl
    x = torch.randn(2, 24, 64, requires_grad=True)
    grad = torch.randn(2, 24, 64)
    r = layer.gate(x.detach().view(48, 64))
    E, Zn = layer.num_experts, layer.num_null
    assert (r.ids_TK < E).any() and ((r.ids_TK >= E) & (r.ids_TK < E + Zn)).any() and (r.ids_TK >= E + Zn).any()
    assert ((r.ids_TK >= E).all(-1)).any()  # some token skips every FFN expert

    def grads(out):
        params = [x, layer.gate.weight, layer.experts.gate_up_proj, layer.experts.down_proj]
        return torch.autograd.grad(out, params, grad)

    fast = layer(x)
    r = layer.gate(x.view(48, 64))
    ref = moe_reference(x.view(48, 64), r.ids_TK, r.weights_TK, layer.experts.gate_up_proj,
                        layer.experts.down_proj, num_null=Zn).view(2, 24, 64)
    torch.testing.assert_close(fast, ref, rtol=1e-5, atol=1e-5)
    for g_fast, g_ref in zip(grads(fast), grads(ref), strict=True):
        torch.testing.assert_close(g_fast, g_ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("tokens", [1, 2])
def test_small_batch_gathers_only_the_chosen_experts(tokens):
    layer = moe_layer().eval()
    layer.gate.zc_bias.fill_(0.06)  # some zero-computation slots: they must cost nothing
    E, K, (_, two_f, D) = layer.num_experts, layer.top_k, layer.experts.gate_up_proj.shape
    x_TD = torch.randn(tokens, D)
    assert not layer.experts.uses_gathered(x_TD, K)  # CPU "auto": the grouped path (measured faster there)
    layer.experts.impl = "gathered"
    r = layer.gate(x_TD)
    S = int((r.ids_TK < E).sum())
    assert S < tokens * K  # some slots are zero-computation
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        out = layer.experts(x_TD, r.ids_TK, r.weights_TK)
    # two batched matmuls over the S FFN slots (3·D·F multiply-adds each) and the (T, S) @ (S, D) combine
    assert counter.get_total_flops() == 2 * S * 3 * D * (two_f // 2) + 2 * tokens * S * D
    ids_TK = r.ids_TK.clamp(max=E)  # null everything past the FFN experts: identity is MoE.forward's part
    ref = moe_reference(x_TD, ids_TK, r.weights_TK, layer.experts.gate_up_proj, layer.experts.down_proj, num_null=1)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    # the fixed-shape variant torch.compile traces (every slot runs, zero-computation ones at weight 0)
    torch.testing.assert_close(layer.experts._gathered_static(x_TD, r.ids_TK, r.weights_TK), ref, rtol=1e-5,
                               atol=1e-5)
    full = layer(x_TD[None])  # the whole layer, gathered, against the grouped path
    layer.experts.impl = "grouped_mm"
    torch.testing.assert_close(full, layer(x_TD[None]), rtol=1e-5, atol=1e-5)


def test_eager_cpu_decoding_loops_over_the_chosen_experts():
    """Batch-1 inference on CPU takes the looped path (no autograd, T·K <= E); training and larger batches keep
    the grouped dispatch; both equal the reference."""
    layer = moe_layer().eval()
    layer.gate.zc_bias.fill_(0.06)
    E, K, D = layer.num_experts, layer.top_k, layer.experts.gate_up_proj.shape[2]
    one, many = torch.randn(1, D), torch.randn(2 * E // K, D)
    with torch.no_grad():
        r, r_many = layer.gate(one), layer.gate(many)
        assert layer.experts.uses_looped(one, r.weights_TK)
        assert not layer.experts.uses_looped(many, r_many.weights_TK)
        out = layer.experts(one, r.ids_TK, r.weights_TK)
    assert not layer.experts.uses_looped(one, r.weights_TK)  # autograd on: the grouped path
    ids_TK = r.ids_TK.clamp(max=E)  # identity experts are MoE.forward's part
    ref = moe_reference(one, ids_TK, r.weights_TK, layer.experts.gate_up_proj, layer.experts.down_proj, num_null=1)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    layer.experts.impl = "looped"  # forced with autograd on: refused (it carries no gradient to the router)
    with pytest.raises(RuntimeError, match="inference-only"):
        layer.experts(one, r.ids_TK, r.weights_TK)
    layer.experts.impl = "auto"
    for p in layer.experts.parameters():  # frozen experts, trainable router: the router's gradient needs the
        p.requires_grad_(False)  # grouped path, so the looped one is not taken
    r_grad = layer.gate(one)
    assert r_grad.weights_TK.requires_grad and not layer.experts.uses_looped(one, r_grad.weights_TK)
    torch.autograd.grad(layer.experts(one, r_grad.ids_TK, r_grad.weights_TK).sum(), layer.gate.weight)


@pytest.mark.parametrize("tokens", [1, 3])
def test_reduced_experts_match_the_reference_and_fall_back_when_compiling_fails(tokens, monkeypatch):
    """Eager CPU decoding runs the compiled gather-reductions (`reduce_experts`): equal to the per-token reference
    (and to the same function run eagerly) with zero-computation slots dropped; a failed compile warns once and
    loops over the experts instead, with the same result."""
    layer = moe_layer().eval()
    layer.gate.zc_bias.fill_(0.06)
    E, D = layer.num_experts, layer.experts.gate_up_proj.shape[2]
    x_TD = torch.randn(tokens, D)
    with torch.no_grad():
        r = layer.gate(x_TD)
        ids_TK = r.ids_TK.clamp(max=E)  # identity experts are MoE.forward's part
        assert (ids_TK >= E).any() and (ids_TK < E).any()
        ref = moe_reference(x_TD, ids_TK, r.weights_TK, layer.experts.gate_up_proj, layer.experts.down_proj,
                            num_null=1)
        layer.experts.impl = "reduced"
        torch.testing.assert_close(layer.experts(x_TD, r.ids_TK, r.weights_TK), ref, rtol=1e-5, atol=1e-5)
        layer.experts.impl = "auto"
        assert moe_module._REDUCE.get("ok") and layer.experts.uses_reduced(x_TD, r.weights_TK)  # the automatic
        torch.testing.assert_close(layer.experts(x_TD, r.ids_TK, r.weights_TK), ref, rtol=1e-5, atol=1e-5)  # choice
        many = torch.randn(8 * E // layer.top_k + 1, D)  # past 8E slots: the grouped dispatch
        assert not layer.experts.uses_reduced(many, layer.gate(many).weights_TK)
        layer.experts.reduce_decode = False
        assert not layer.experts.uses_reduced(x_TD, r.weights_TK)
        layer.experts.reduce_decode = True
        elsewhere = []  # another thread (serve's engine) keeps the previous paths
        worker = threading.Thread(target=lambda: elsewhere.append(layer.experts.uses_reduced(x_TD, r.weights_TK)))
        worker.start()
        worker.join()
        assert elsewhere == [False]
        tok_S, slot_S = (r.ids_TK < E).nonzero(as_tuple=True)
        eager = moe_module.reduce_experts(x_TD, tok_S, r.ids_TK[tok_S, slot_S], r.weights_TK[tok_S, slot_S],
                                          layer.experts.gate_up_proj, layer.experts.down_proj)
        torch.testing.assert_close(eager, ref, rtol=1e-5, atol=1e-5)

        def broken(*args):
            raise RuntimeError("no C++ compiler")

        monkeypatch.setattr(moe_module, "_REDUCE", {"fn": broken})
        layer.experts.impl = "reduced"
        with pytest.warns(UserWarning, match="falling back"):
            torch.testing.assert_close(layer.experts(x_TD, r.ids_TK, r.weights_TK), ref, rtol=1e-5, atol=1e-5)
        assert "no C++ compiler" in moe_module._REDUCE["failed"]
        torch.testing.assert_close(layer.experts(x_TD, r.ids_TK, r.weights_TK), ref, rtol=1e-5, atol=1e-5)
    layer.experts.impl = "auto"
    with pytest.raises(RuntimeError, match="inference-only"):
        layer.experts._reduced(x_TD.requires_grad_(), r.ids_TK, r.weights_TK)


def test_grouped_mm_is_used_only_when_aligned():
    x = torch.randn(8, 64)
    assert moe_layer().experts.uses_grouped_mm(x)  # width 44 fp32 = 176 bytes: aligned
    assert not moe_layer(moe_intermediate_size=22).experts.uses_grouped_mm(x)  # 88 bytes: split fallback


@pytest.mark.parametrize("ffn", ["moe", "topk_moe"])
def test_one_expert_top1_is_the_dense_swiglu(ffn):
    extra = {"num_null_experts": 0, "num_identity_experts": 0, "target_active_experts": 1.0} if ffn == "moe" else {}
    layer = moe_layer("tiny", ffn=ffn, num_experts=1, num_experts_per_tok=1, moe_intermediate_size=176, **extra)
    dense = SwiGLU(64, 176)
    with torch.no_grad():
        layer.experts.gate_up_proj[0] = torch.cat([dense.gate_proj.weight, dense.up_proj.weight])
        layer.experts.down_proj[0] = dense.down_proj.weight
    x = torch.randn(3, 10, 64)
    torch.testing.assert_close(layer(x), dense(x), rtol=1e-5, atol=1e-6)


def test_shared_expert_adds_a_gated_dense_path():
    layer = moe_layer(shared_expert=True).eval()
    x = torch.randn(1, 8, 64)
    routed = layer(x) - torch.sigmoid(layer.shared_expert_gate(x)) * layer.shared_expert(x)
    layer.shared_expert = None
    torch.testing.assert_close(routed, layer(x))


# --------------------------------------------------------------------------- routing

def test_routing_and_model_are_causal():
    model = tiny_moe_model()
    ids = torch.randint(0, 256, (2, 40))
    changed = ids.clone()
    changed[:, 25:] = torch.randint(0, 256, (2, 15))
    with torch.no_grad():
        out_a, out_b = model(ids), model(changed)
    torch.testing.assert_close(out_a.logits[:, :25], out_b.logits[:, :25])
    assert out_a.ffn_experts.shape == (len(model.layers), 2, 40)  # routing travels in the output
    assert torch.equal(out_a.ffn_experts[:, :, :25], out_b.ffn_experts[:, :, :25])


def test_gate_weights_are_normalised_over_computing_experts():
    layer = moe_layer()
    layer.gate.zc_bias.fill_(0.06)
    r = layer.gate(torch.randn(64, 64))
    null_TK = (r.ids_TK >= layer.num_experts) & (r.ids_TK < layer.num_experts + layer.num_null)
    assert (r.weights_TK[null_TK] == 0).all()
    sums = r.weights_TK.sum(-1)
    all_null = null_TK.all(-1)
    torch.testing.assert_close(sums[~all_null], torch.ones_like(sums[~all_null]))
    assert (sums[all_null] == 0).all()


def test_zc_thresholds_predict_the_routing_at_any_bias():
    E, Z, K = 6, 3, 4
    raw_TX = torch.rand(50, E + Z)
    c_TM = zc_thresholds(raw_TX, E, K)
    for bias in (-0.5, -0.1, 0.0, 0.2, 0.7):
        ids_TK = (raw_TX + torch.tensor([0.0] * E + [bias] * Z)).topk(K, dim=-1).indices
        assert torch.equal((ids_TK >= E).sum(-1), (c_TM < bias).sum(-1))  # ZC slots per token


@pytest.mark.parametrize("target", [1.5, 3.0, 4.0])
def test_budget_controller_holds_the_target(target):
    layer = moe_layer(target_active_experts=target)
    x = torch.randn(4, 64, 64)
    history = settle(layer, x, 12)
    for metrics in history[2:]:  # after warm-up, every step within ±5%
        assert abs(metrics["mean_ffn_experts"] - target) <= 0.05 * target
    assert history[-1]["alarm"] == 0


def test_all_null_cap_wins_over_the_target():
    layer = moe_layer(target_active_experts=1.0, max_all_null_rate=0.1)
    last = settle(layer, torch.randn(4, 64, 64), 12)[-1]
    assert last["all_null_rate"] <= 0.1 + 0.03
    assert last["mean_ffn_experts"] > 1.0  # the target is given up rather than the cap


def test_alarm_when_a_layer_goes_all_zero_computation():
    layer = moe_layer().train()
    layer.gate.zc_bias.fill_(10.0)
    with torch.no_grad():
        layer(torch.randn(2, 16, 64))
    with pytest.warns(RuntimeWarning, match="zero-computation"):
        metrics = layer.update_routing(where="layers.3")
    assert metrics["alarm"] == 1 and metrics["all_null_rate"] == 1 and metrics["zc_share"] == 1


def test_balance_bias_reduces_maxvio():
    layer = moe_layer(balance_update_rate=1e-2, num_null_experts=0, num_identity_experts=0,
                      target_active_experts=4.0)
    x = torch.randn(4, 64, 64) + 1.0
    with torch.no_grad():  # skew the router: experts 0-3 score high for inputs with a positive mean
        layer.gate.weight[:4] += 0.02
    history = settle(layer, x, 60)
    first, last = history[0]["maxvio_global"], history[-1]["maxvio_global"]
    assert first > 1.0 and last < first / 3
    assert last <= 0.5 and history[-1]["dead_experts"] == 0
    assert abs(float(layer.gate.expert_bias.sum())) < 1e-5  # re-centred


def test_update_routing_contract():
    model = tiny_moe_model()
    ids = torch.randint(0, 256, (2, 32))
    model(ids)  # eval mode: metrics, no losses, nothing counted
    assert model.update_routing() == {}
    model.train()
    out = model(ids, labels=ids)
    assert {"ce_loss", "aux_loss", "layers.0.z_loss", "layers.1.balance_loss", "layers.0.maxvio_batch"} <= set(out.aux)
    torch.testing.assert_close(out.loss.detach(), out.aux["ce_loss"] + out.aux["aux_loss"])
    out.loss.backward()
    model(ids)  # a second micro-batch of the same step
    metrics = model.update_routing()
    assert sum(metrics["layers.0.tokens_per_expert"]) == pytest.approx(2 * 64 * metrics["layers.0.mean_ffn_experts"])
    for key in ("load_cv", "maxvio_global", "maxvio_batch", "load_entropy", "dead_experts", "router_entropy",
                "p10_ffn_experts", "p50_ffn_experts", "p90_ffn_experts", "all_null_rate", "flops_fraction", "zc_bias"):
        assert f"layers.1.{key}" in metrics
    assert model.layers[0].mlp.gate.zc_bias != 0  # the controller moved
    assert model.update_routing() == {}  # counts were reset


def test_routing_state_is_saved_with_the_checkpoint(tmp_path):
    model = tiny_model(ffn="moe")
    model.layers[1].mlp.gate.zc_bias.fill_(0.25)
    model.layers[0].mlp.gate.expert_bias.normal_()
    save_checkpoint(model, tmp_path / "m")
    loaded = load_model(tmp_path / "m")
    for a, b in zip(model.state_dict().values(), loaded.state_dict().values(), strict=True):
        assert torch.equal(a, b)


# --------------------------------------------------------------------------- peer check

def test_topk_moe_matches_transformers_mixtral_block():
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock, load_balancing_loss_func

    layer = moe_layer("tiny", ffn="topk_moe", num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32).train()
    hf_cfg = MixtralConfig(hidden_size=64, intermediate_size=32, num_local_experts=8, num_experts_per_tok=2)
    x = torch.randn(2, 12, 64)
    for implementation in ("eager", "grouped_mm"):
        hf_cfg._experts_implementation = implementation
        block = MixtralSparseMoeBlock(hf_cfg)
        block.load_state_dict({"gate.weight": layer.gate.weight, "experts.gate_up_proj": layer.experts.gate_up_proj,
                               "experts.down_proj": layer.experts.down_proj})
        out, routed = layer(x, return_routing=True)
        torch.testing.assert_close(out, block(x), rtol=1e-5, atol=1e-5)
    aux = routed.metrics
    logits, _, _ = block.gate(x)
    torch.testing.assert_close(aux["balance_loss"], load_balancing_loss_func((logits,), 8, 2))


# --------------------------------------------------------------------------- counting

def test_counting_with_moe():
    cfg = from_preset("tiny-moe")
    model = tiny_moe_model()
    counts = count_parameters(model)
    D, F, E = 64, 44, 16
    assert counts.total == sum(p.numel() for p in model.parameters())
    assert counts.total - counts.active == 2 * round((E - 3.0) * 3 * D * F)  # 2 layers, target 3 of 16 active
    dense = flops_per_token(from_preset("tiny"), 64)
    moe = flops_per_token(cfg, 64)
    assert moe.linear - dense.linear == 2 * (3.0 * 6 * D * F + 2 * D * 20 - 6 * D * 176)

    # the analytic FFN FLOPs against torch's counter, for the routed pairs the layer actually ran
    layer = model.layers[0].mlp
    layer.experts.impl = "split"  # torch's flop counter has no formula for _grouped_mm
    x = torch.randn(1, 64, D)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        _, routed = layer(x, return_routing=True)
    pairs = int(routed.ffn_experts_BL.sum())
    assert counter.get_total_flops() == pairs * 6 * D * F + 64 * 2 * D * 20
    topk = from_preset("tiny", ffn="topk_moe", num_experts=8, num_experts_per_tok=2, shared_expert=True)
    layer = MoE(topk)
    layer.experts.impl = "split"
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        layer(x)
    assert counter.get_total_flops() == 64 * ffn_flops_per_token(topk)


def test_moe_bench_keys():
    from densa.bench import moe

    result = moe.run_cases(tokens=64, hidden=32, dense_width=64, shapes={"": (8, 4, 16), "e8_": (4, 2, 32)},
                           rounds=1, settle_steps=3)
    for key in ("densa_ms", "hf_eager_ms", "hf_grouped_ms", "dense_ms", "ratio_vs_hf_eager", "ratio_vs_hf_grouped",
                "ratio_vs_dense", "dynamic_ms", "dynamic_active_fraction", "ratio_dynamic_vs_full", "half_ms",
                "e8_densa_ms", "e8_ratio_vs_hf_grouped"):
        assert result[key] > 0, key
    assert result["dynamic_active_fraction"] == pytest.approx(0.6, abs=0.1)
    decode = moe.decode_cases(rounds=1, calls=2, smol_layers=2)
    for key in ("decode_grouped_us", "decode_gathered_us", "decode_looped_us", "decode_reduced_us",
                "ratio_decode_looped_vs_grouped", "ratio_decode_reduced_vs_looped", "smol_decode_looped_us",
                "smol_decode_reduced_us", "ratio_smol_decode_reduced_vs_looped", "smol_decode_dense_us",
                "ratio_smol_decode_reduced_vs_dense"):
        assert decode[key] > 0, key
    assert 0 <= decode["decode_ffn_experts"] <= 4


# --------------------------------------------------------------------------- config and CLI

@pytest.mark.parametrize(("overrides", "message"), [
    ({"num_experts": 4, "num_experts_per_tok": 8, "num_null_experts": 1, "num_identity_experts": 1},
     "num_experts_per_tok=8: exceeds the routing pool num_experts + num_null_experts + num_identity_experts"),
    ({"target_active_experts": 9.0}, "target_active_experts=9.0: must be in (0, 8]"),
    ({"num_null_experts": 1, "num_identity_experts": 0}, "target_active_experts=6.0: must be in [7, 8]"),
    ({"target_active_experts": 0.3, "max_all_null_rate": 0.5}, "target_active_experts=0.3 with max_all_null_rate"),
    ({"max_all_null_rate": 1.5}, "max_all_null_rate=1.5: must be in [0, 1]"),
    ({"ffn": "topk_moe", "num_experts": 4}, "num_experts_per_tok=8: must be <= num_experts=4 for ffn='topk_moe'"),
    ({"num_experts": 0}, "num_experts=0: must be an integer >= 1"),
    ({"budget_update_rate": -1.0}, "budget_update_rate=-1.0: must be >= 0"),
    ({"ffn": "sparse"}, "ffn='sparse': must be one of"),
])
def test_impossible_moe_configs_are_rejected(overrides, message):
    with pytest.raises(ConfigError) as error:
        from_preset("tiny", **{"ffn": "moe", **overrides})
    assert message in str(error.value)


def test_inspect_routing_cli(tmp_path, capsys):
    out = str(tmp_path / "m")
    assert main(["init", "--preset", "tiny", "--set", "ffn=moe", "--out", out]) == 0
    capsys.readouterr()
    assert main(["inspect-routing", out, "--text", "hello"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "L0" in lines[1] and "L1" in lines[1] and "mean" in lines[1]
    rows = lines[2:7]
    assert [row.split()[1] for row in rows] == ["'h'", "'e'", "'l'", "'l'", "'o'"]
    for row in rows:
        l0, l1, mean = row.split()[2:]
        assert 0 <= int(l0) <= 8 and 0 <= int(l1) <= 8 and float(mean) == (int(l0) + int(l1)) / 2
    dense = str(tmp_path / "dense")
    assert main(["init", "--preset", "tiny", "--out", dense]) == 0
    assert main(["inspect-routing", dense, "--text", "hello"]) == 1
    assert "has no MoE layers" in capsys.readouterr().err


def test_no_warnings_in_normal_training():
    model = tiny_model(ffn="moe").train()
    ids = torch.randint(0, 256, (2, 32))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model(ids, labels=ids).loss.backward()
        model.update_routing()


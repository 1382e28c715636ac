"""The benchmarks' measurement helpers run end to end on tiny sizes and return the documented keys.

Only structure is checked (keys present, numbers positive): speed goals are checked by `densa bench`, never in unit
tests, because the machine is shared and timings are noisy.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from densa.bench import attention, decode, modes, prefill, smollm2
from densa.cli import main
from densa.config import from_preset
from densa.model import fastlinear
from densa.model.model import DensaModel


def test_attention_bench_keys() -> None:
    result = attention.run_cases((64,), reps=1, isolated=False)  # in-process: memory figures may read 0 here
    for key in ("densa_ms", "dense_ms"):
        assert result[f"{key}_64"] > 0, key
    for key in ("densa_peak_mb", "dense_peak_mb"):
        assert result[f"{key}_64"] >= 0, key
    assert result["max_T"] == 64
    assert result["ratio_at_max_T"] == pytest.approx(result["densa_ms_64"] / result["dense_ms_64"], rel=1e-2)
    assert 0.8 < result["densa_params"] / result["dense_params"] < 1.25  # comparable layers


def test_attention_case_in_a_fresh_process_measures_memory() -> None:
    case = attention.measure_isolated("densa", 64, reps=1)  # what `densa bench attention` runs per case
    assert case["ms"] > 0 and case["peak_mb"] > 0 and case["cpu_util"] > 0


def test_attention_bench_rejects_unknown_layer() -> None:
    with pytest.raises(ValueError, match="unknown layer kind"):
        attention.build_layer("rnn")


def test_decode_bench_keys() -> None:
    result = decode.run_cases(from_preset("tiny-moe"), (16, 48), steps=2, warmup=1, modes=("eager",))
    for kind in decode.KINDS:
        for context in (16, 48):
            assert result[f"{kind}_ms_per_token_{context}"] > 0
            for batch in decode.BATCHES:
                case = f"{kind}_eager_b{batch}_{context}"
                assert result[f"{kind}_ms_per_token_b{batch}_{context}"] == result[f"{case}_ms"] > 0
                assert 0 < result[f"{case}_flops_frac"] < 1 and 0 < result[f"{case}_bw_frac"] < 1
    assert result["max_ctx"] == 48
    assert result["hf_params"] == result["dense_params"]  # the HF Llama twin has the dense twin's shape
    # the dense twin has densa's active parameters (within one unit of SwiGLU width per layer)
    assert abs(result["dense_params"] - result["densa_active_params"]) <= 3 * 64 * 2
    for key in ("densa_growth", "densa_vs_hf_at_max_ctx", "densa_vs_dense_at_16", "densa_vs_dense_at_48_b8"):
        assert result[key] > 0
    assert decode.label(8192) == "8k" and decode.label(256) == "256"


def test_prefill_bench_keys() -> None:
    result = prefill.run_cases(from_preset("tiny-moe"), (16,), reps=1, modes=("eager",), batches=(1,))
    for kind in decode.KINDS:
        assert result[f"{kind}_ttft_ms_b1_16"] > 0 and 0 < result[f"{kind}_eager_b1_16_flops_frac"] < 1
    assert result["ttft_densa_vs_dense_at_16"] == pytest.approx(
        result["densa_ttft_ms_b1_16"] / result["dense_ttft_ms_b1_16"], rel=1e-2)


def test_eager_mode_packs_linears_and_decodes_like_plain_forward() -> None:
    torch.manual_seed(0)
    plain = DensaModel(from_preset("tiny-moe")).eval()
    packed = DensaModel(from_preset("tiny-moe")).eval()
    packed.load_state_dict(plain.state_dict())
    modes.prepare(packed, "eager")
    if fastlinear.available():
        assert any(isinstance(m, fastlinear.PackedLinear) for m in packed.modules())
    ids_BT = torch.randint(0, 256, (2, 12))
    dec = modes.decoder("densa", packed, "eager", max_len=16)
    with torch.no_grad():
        first = dec.prefill(ids_BT[:, :10])
        second = dec.step(ids_BT[:, 10:11])
        full = plain(ids_BT[:, :11]).logits
    torch.testing.assert_close(first, full[:, 9], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(second, full[:, 10], rtol=1e-4, atol=1e-4)


@pytest.mark.skipif(not fastlinear.available(), reason="oneDNN is not built into this torch")
@pytest.mark.parametrize("rows", [1, 8, 300])
def test_packed_linear_agrees_with_f_linear(rows: int) -> None:
    torch.manual_seed(0)
    linear = nn.Linear(96, 200)
    x = torch.randn(rows, 96)
    ref = F.linear(x, linear.weight, linear.bias)  # the plain reference
    with torch.no_grad():
        fp32 = fastlinear.PackedLinear(linear)(x)
        bf16 = fastlinear.PackedLinear(linear, torch.bfloat16)(x)
    torch.testing.assert_close(fp32, ref, rtol=1e-5, atol=1e-5)
    assert bf16.dtype == torch.float32 and (bf16 - ref).abs().max() < 0.05 * ref.abs().max()
    grad_x = x.clone().requires_grad_()
    fastlinear.PackedLinear(linear)(grad_x).sum().backward()  # with autograd: the plain path, gradients flow
    assert grad_x.grad is not None and linear.weight.grad is not None


@pytest.mark.parametrize("mixer", ["attention", "mega"])
def test_fused_sibling_projections_agree_with_the_separate_ones(mixer) -> None:
    """pack_linears stacks q/k/v and gate/up into one packed matmul each; the forward is unchanged, state_dict too,
    and autograd takes the separate projections."""
    torch.manual_seed(0)
    model = DensaModel(from_preset("tiny", mixer=mixer, ffn="swiglu")).eval()
    ids = torch.randint(0, model.config.vocab_size, (2, 12))
    with torch.no_grad():
        ref = model(ids).logits
    keys = set(model.state_dict())
    fastlinear.pack_linears(model)
    fused = [m for m in model.modules() if isinstance(getattr(m, "fused", None), fastlinear.FusedPacked)]
    assert len(fused) == model.config.num_hidden_layers * (2 if mixer == "attention" else 1)
    assert set(model.state_dict()) == keys
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ref, rtol=1e-4, atol=1e-4)
    assert not fused[0].fused.usable(torch.randn(1, 4, requires_grad=True))  # autograd: the separate path
    fastlinear.unpack_linears(model)
    assert not any(hasattr(m, "fused") for m in model.modules())


def test_pack_and_unpack_keep_parameters_and_tying() -> None:
    model = DensaModel(from_preset("tiny"))
    keys = set(model.state_dict())
    n = fastlinear.pack_linears(model)
    assert n == (sum(1 for m in model.modules() if isinstance(m, fastlinear.PackedLinear)))
    assert set(model.state_dict()) == keys
    if model.config.tie_word_embeddings and n:
        assert model.lm_head.weight is model.embed_tokens.weight
    assert fastlinear.unpack_linears(model) == n and set(model.state_dict()) == keys
    with pytest.raises(ValueError, match="float32 or bfloat16"):
        fastlinear.pack_linears(model, torch.float16)


def test_dequantised_gguf_copies_metadata_and_values(tmp_path, monkeypatch) -> None:
    import gguf
    import numpy as np

    monkeypatch.setattr(smollm2, "cache_dir", lambda: tmp_path / "cache")
    source = tmp_path / "m.gguf"
    writer = gguf.GGUFWriter(str(source), "llama")
    writer.add_uint32("llama.block_count", 2)
    writer.add_token_list(["a", "b"])
    matrix = np.arange(12, dtype=np.float32).reshape(3, 4)
    writer.add_tensor("w.weight", matrix)
    writer.add_tensor("n.weight", np.ones(4, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    out = smollm2.dequantised_gguf(source, "F16")
    reader = gguf.GGUFReader(out)
    assert reader.fields["llama.block_count"].contents() == 2
    assert reader.fields["tokenizer.ggml.tokens"].contents() == ["a", "b"]
    tensors = {t.name: t for t in reader.tensors}
    assert tensors["w.weight"].tensor_type == gguf.GGMLQuantizationType.F16  # matrices F16, vectors F32
    assert tensors["n.weight"].tensor_type == gguf.GGMLQuantizationType.F32
    np.testing.assert_array_equal(np.asarray(tensors["w.weight"].data, dtype=np.float32).reshape(3, 4), matrix)


def test_bench_cli_rejects_modes_and_model_where_not_taken(capsys) -> None:
    with pytest.raises(SystemExit, match="takes no --modes"):
        main(["bench", "serve", "--modes", "eager"])
    with pytest.raises(SystemExit, match="eager and/or compiled"):
        main(["bench", "decode", "--modes", "fast"])
    with pytest.raises(SystemExit, match="only `densa bench decode`"):
        main(["bench", "moe", "--model", "smollm2-135m"])


@pytest.mark.parametrize("mode", ["eager", "compiled"])
def test_hf_decoder_static_and_dynamic_cache_match_the_full_forward(mode, monkeypatch) -> None:
    monkeypatch.setattr(modes.torch, "compile", lambda model: model)  # the StaticCache path, without compiling
    model = decode.build_model("hf", from_preset("tiny"), max_len=32)
    ids_BT = torch.randint(0, 256, (2, 12))
    dec = modes.decoder("hf", model, mode, max_len=16)
    with torch.no_grad():
        first = dec.prefill(ids_BT[:, :10])
        second = dec.step(ids_BT[:, 10:11])
        full = model(input_ids=ids_BT[:, :11]).logits
    torch.testing.assert_close(first, full[:, 9], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(second, full[:, 10], rtol=1e-4, atol=1e-4)

"""Hugging Face integration: Auto classes, save/load, generate() with densa's cache, left padding, remote-code
export loadable without densa, and lm-eval on an export."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import VARIANTS, tiny_model
from transformers import AutoConfig, AutoModelForCausalLM

import densa  # noqa: F401  (registers the Auto classes)
from densa.checkpoint import save_checkpoint
from densa.config import ConfigError
from densa.hf import DensaConfig, DensaForCausalLM
from densa.hf.export import export_hf
from densa.model.cache import ModelCache
from densa.resolve import resolve


def _hf_model(**overrides) -> DensaForCausalLM:
    model = tiny_model(**overrides)
    hf = DensaForCausalLM(DensaConfig.from_model_config(model.config, eos_token_id=0, pad_token_id=0))
    hf.model.load_state_dict(model.state_dict())
    return hf.eval()


def test_config_round_trip_and_validation(tmp_path):
    config = DensaConfig(hidden_size=64, num_hidden_layers=2, vocab_size=256, complex_ema=True)
    config.save_pretrained(str(tmp_path))
    loaded = AutoConfig.from_pretrained(str(tmp_path))
    assert isinstance(loaded, DensaConfig) and loaded.to_model_config() == config.to_model_config()
    with pytest.raises(ConfigError, match="ema_dim=0: must be an integer >= 1"):
        DensaConfig(ema_dim=0)
    with pytest.raises(ConfigError, match="unknown densa config field\\(s\\) \\['flux_capacitor'\\]"):
        DensaConfig(flux_capacitor=1)


@pytest.mark.parametrize("mixer", ["mega", "attention"])
def test_save_pretrained_from_pretrained_auto(tmp_path, mixer):
    hf = _hf_model(mixer=mixer)
    hf.save_pretrained(str(tmp_path))
    assert (tmp_path / "model.safetensors").is_file()
    loaded = AutoModelForCausalLM.from_pretrained(str(tmp_path)).eval()
    assert isinstance(loaded, DensaForCausalLM)
    ids = torch.randint(0, 256, (2, 30))
    torch.testing.assert_close(loaded(ids).logits, hf(ids).logits, atol=0, rtol=0)


@pytest.mark.parametrize("variant", ["mega", "megalodon-all", "dense-gqa"])
def test_generate_cached_equals_uncached(variant):
    hf = _hf_model(**VARIANTS[variant])
    ids = torch.randint(1, 256, (1, 9))
    kwargs = dict(max_new_tokens=20, min_new_tokens=20, do_sample=False)
    cached = hf.generate(ids, use_cache=True, **kwargs)
    uncached = hf.generate(ids, use_cache=False, **kwargs)
    assert torch.equal(cached, uncached)
    assert torch.equal(cached, hf.model.generate(ids, max_new_tokens=20))  # and equals densa's own sampler


def test_generate_with_the_compile_switch_on_equals_eager(monkeypatch):
    """`config.compile = "on"`: generate()'s one-token steps run densa's compiled decode step (aot_eager here: the
    same tracing as inductor, no C++ build), for a left-padded MoE batch; the tokens equal the eager generate's."""
    import densa.hf.modeling_densa as modeling

    monkeypatch.setattr(modeling, "COMPILE_BACKEND", "aot_eager")
    hf = _hf_model(ffn="moe", num_experts=8, num_experts_per_tok=2, num_null_experts=1, num_identity_experts=1,
                   target_active_experts=1.5)
    prompts = [torch.randint(1, 256, (n,)) for n in (5, 12)]
    ids = torch.stack([torch.cat([torch.zeros(12 - len(p), dtype=torch.long), p]) for p in prompts])
    mask = (ids != 0).long()
    kwargs = dict(attention_mask=mask, max_new_tokens=12, min_new_tokens=12, do_sample=False)
    eager = hf.generate(ids, **kwargs)
    assert hf.config.compile == "off" and "_inference_steps" not in hf.model.__dict__
    hf.config.compile = "on"
    compiled = hf.generate(ids, **kwargs)
    assert torch.equal(compiled, eager)
    assert hf.model.__dict__["_inference_steps"][(True, "aot_eager")].compiled  # the compiled step ran
    cache = hf.model.new_cache()
    hf(ids, attention_mask=mask, cache=cache)
    with pytest.raises(ValueError, match="outside the vocabulary"):  # a step checks its tokens as the general path
        hf(torch.full((2, 1), 999), cache=cache)
    with pytest.raises(ValueError, match="compile"):
        DensaConfig(compile="always")
    torch._dynamo.reset()


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_left_padded_batch_equals_each_row_alone(variant):
    """Padding must not leak into the EMA, the norm statistics, the chunk boundaries or attention."""
    hf = _hf_model(**VARIANTS[variant])
    prompts = [torch.randint(1, 256, (n,)) for n in (3, 19, 34)]  # pads cross chunk boundaries (chunk 16)
    width = max(len(p) for p in prompts)
    ids = torch.stack([torch.cat([torch.zeros(width - len(p), dtype=torch.long), p]) for p in prompts])
    mask = torch.stack([torch.cat([torch.zeros(width - len(p)), torch.ones(len(p))]) for p in prompts]).long()
    batch = hf.generate(ids, attention_mask=mask, max_new_tokens=14, min_new_tokens=14, do_sample=False)
    for row, prompt in enumerate(prompts):
        alone = hf.generate(prompt[None], max_new_tokens=14, min_new_tokens=14, do_sample=False)
        assert torch.equal(batch[row, width:], alone[0, len(prompt):]), f"row {row}"
    # the logits agree too, not just the argmax
    full = hf(ids, attention_mask=mask).logits
    for row, prompt in enumerate(prompts):
        torch.testing.assert_close(full[row, width - len(prompt):], hf(prompt[None]).logits[0], atol=1e-4, rtol=1e-4)


def test_plain_and_remote_code_export(tmp_path):
    save_checkpoint(tiny_model(), tmp_path / "ck")
    export_hf(resolve(str(tmp_path / "ck")), tmp_path / "plain")
    assert json.loads((tmp_path / "plain" / "config.json").read_text())["model_type"] == "densa"
    export_hf(resolve(str(tmp_path / "ck")), tmp_path / "remote", remote_code=True)
    files = {p.name for p in (tmp_path / "remote").iterdir()}
    assert {"configuration_densa.py", "modeling_densa.py", "densa_model_mega.py", "model.safetensors"} <= files
    ids = [[5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23]]
    expected = tiny_model()(torch.tensor(ids)).logits[0, -1].tolist()
    generated = tiny_model().generate(torch.tensor(ids), max_new_tokens=8)[0].tolist()
    script = textwrap.dedent(f"""
        import sys, json
        class Block:  # densa must not be importable in this process
            def find_spec(self, name, path=None, target=None):
                if name == "densa" or name.startswith("densa."):
                    raise ImportError("densa is blocked in this test")
        sys.meta_path.insert(0, Block())
        import torch
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained({str(tmp_path / 'remote')!r}, trust_remote_code=True).eval()
        assert "densa" not in sys.modules
        ids = torch.tensor({ids})
        logits = model(ids).logits[0, -1].tolist()
        out = model.generate(ids, max_new_tokens=8, min_new_tokens=8, do_sample=False)[0].tolist()
        print(json.dumps({{"logits": logits, "generated": out, "class": type(model).__module__}}))
    """)
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf_home"), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["class"].startswith("transformers_modules")
    torch.testing.assert_close(torch.tensor(result["logits"]), torch.tensor(expected), atol=1e-5, rtol=1e-5)
    assert result["generated"] == generated


MOE = {"ffn": "moe", "num_experts": 8, "num_experts_per_tok": 4, "num_null_experts": 2, "num_identity_experts": 2,
       "target_active_experts": 3.0}


@pytest.mark.parametrize("variant", ["mega", "tiny-moe", "dense"])
def test_forward_matches_densa_model_in_training(variant):
    """The HF forward runs densa's modules through `DensaBackbone`: same logits and loss (router losses included)."""
    overrides = MOE if variant == "tiny-moe" else VARIANTS[variant]
    hf = _hf_model(**overrides).train()
    ids = torch.randint(1, 256, (2, 24))
    ours, ref = hf(ids, labels=ids), hf.model(ids, labels=ids)
    torch.testing.assert_close(ours.logits, ref.logits, atol=0, rtol=0)
    torch.testing.assert_close(ours.loss, ref.loss, atol=1e-6, rtol=1e-6)
    assert (ours.aux_loss is not None) == (variant == "tiny-moe")


@pytest.mark.parametrize("reentrant", [False, True])
@pytest.mark.parametrize("variant", ["mega", "tiny-moe"])
def test_gradient_checkpointing_gives_the_same_gradients(variant, reentrant):
    overrides = MOE if variant == "tiny-moe" else {}
    ids = torch.randint(1, 256, (2, 24))
    runs = []
    for checkpointing in (False, True):
        hf = _hf_model(**overrides).train()
        if checkpointing:
            hf.activation_checkpointing_enable({"use_reentrant": reentrant})
            assert hf.is_activation_checkpointing
        calls: list[int] = []
        for layer in hf.model.layers:
            layer.register_forward_pre_hook(lambda *_, calls=calls: calls.append(1))
        out = hf(ids, labels=ids)
        out.loss.backward()
        stats = [m._stats.clone() for m in hf.modules() if hasattr(m, "_stats") and m._stats is not None]
        runs.append((out.loss.detach(), {n: p.grad for n, p in hf.named_parameters() if p.grad is not None},
                     len(calls), stats))
    (loss0, grads0, calls0, stats0), (loss1, grads1, calls1, stats1) = runs
    assert calls1 == 2 * calls0 == 2 * len(hf.model.layers)  # every block was recomputed in backward
    torch.testing.assert_close(loss1, loss0, atol=0, rtol=0)
    assert grads1.keys() == grads0.keys() == {n for n, p in hf.named_parameters() if p.requires_grad}
    for name in grads0:
        torch.testing.assert_close(grads1[name], grads0[name], atol=1e-6, rtol=1e-5, msg=name)
    assert len(stats0) == (len(hf.model.layers) if variant == "tiny-moe" else 0)
    for a, b in zip(stats1, stats0, strict=True):  # the recompute does not count routing twice
        torch.testing.assert_close(a, b)
    hf.activation_checkpointing_disable()
    assert not hf.is_activation_checkpointing


def test_standard_forward_keywords():
    hf = _hf_model()
    ids = torch.randint(1, 256, (2, 20))
    full = hf(ids).logits
    # output_hidden_states: the embeddings and every block's output, the last one after the final norm
    out = hf(ids, output_hidden_states=True, use_cache=False)
    assert len(out.hidden_states) == len(hf.model.layers) + 1 and out.cache is None
    torch.testing.assert_close(hf.model.lm_head(out.hidden_states[-1]).float(), full, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(out.hidden_states[0], hf.model.embed_tokens(ids))
    # return_dict=False, logits_to_keep (int and indices), inputs_embeds
    logits, cache = hf(ids, return_dict=False)
    torch.testing.assert_close(logits, full)
    assert isinstance(cache, ModelCache) and cache.seen_tokens == 20
    torch.testing.assert_close(hf(ids, logits_to_keep=1).logits, full[:, -1:])
    torch.testing.assert_close(hf(ids, logits_to_keep=torch.tensor([0, 5])).logits, full[:, [0, 5]])
    torch.testing.assert_close(hf(inputs_embeds=hf.model.embed_tokens(ids)).logits, full, atol=0, rtol=0)
    # use_cache / past_key_values / cache_position continue a sequence; position_ids that agree are accepted
    first = hf(ids[:, :12], use_cache=True, position_ids=torch.arange(12)[None], cache_position=torch.arange(12))
    rest = hf(ids[:, 12:], past_key_values=first.cache, position_ids=torch.arange(12, 20)[None],
              cache_position=torch.arange(12, 20))
    torch.testing.assert_close(rest.logits, full[:, 12:], atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="packed sequences"):  # padding-free packing: positions restart mid-row
        hf(ids, position_ids=torch.cat([torch.arange(10), torch.arange(10)])[None])
    with pytest.raises(ValueError, match="cache_position starts at 3"):
        hf(ids, cache_position=torch.arange(3, 23))
    with pytest.raises(ValueError, match="output_attentions=True is not supported"):
        hf(ids, output_attentions=True)
    assert hf(ids, output_attentions=False).logits.shape == full.shape
    with pytest.raises(ValueError, match="exactly one of input_ids and inputs_embeds"):
        hf()


def test_loss_scaled_for_gradient_accumulation():
    """transformers' Trainer passes `num_items_in_batch` (labelled tokens over all micro-batches)."""
    hf = _hf_model()
    ids = torch.randint(1, 256, (2, 16))
    labels = ids.clone()
    labels[0, :10] = -100
    mean = hf(ids, labels=labels).loss
    scaled = hf(ids, labels=labels, num_items_in_batch=torch.tensor(50)).loss
    torch.testing.assert_close(scaled, mean * (labels[:, 1:] != -100).sum() / 50)


def test_right_padding_and_base_model_for_trl():
    """TRL's fused LM head calls `model.base_model(input_ids, attention_mask, use_cache=False)` on left-padded prompts
    followed by right-padded completions; every real token must see exactly what it sees unpadded."""
    hf = _hf_model()
    a, b = torch.randint(1, 256, (14,)), torch.randint(1, 256, (9,))
    ids = torch.stack([a, torch.cat([torch.zeros(2, dtype=torch.long), b, torch.zeros(3, dtype=torch.long)])])
    mask = torch.tensor([[1] * 14, [0, 0] + [1] * 9 + [0, 0, 0]])
    out = hf.base_model(input_ids=ids, attention_mask=mask, use_cache=False)
    assert out.last_hidden_state.shape == (2, 14, 64)
    logits = hf.get_output_embeddings()(out.last_hidden_state).float()
    torch.testing.assert_close(logits[0], hf(a[None]).logits[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logits[1, 2:11], hf(b[None]).logits[0], atol=1e-5, rtol=1e-5)
    unpadded = hf(b[None]).logits[0]
    torch.testing.assert_close(hf(ids, attention_mask=mask, use_cache=False).logits[1, 2:11], unpadded, atol=1e-5,
                               rtol=1e-5)
    assert {n for n, _ in hf.base_model.named_parameters()} == {
        n.removeprefix("model.") for n, _ in hf.named_parameters() if "lm_head" not in n}
    with pytest.raises(ValueError, match="only left padding"):  # a hole inside a row is still refused
        hf(ids, attention_mask=torch.tensor([[1] * 14, [1, 0] + [1] * 12]), use_cache=False)
    with pytest.raises(ValueError, match="only left padding"):  # and right padding with a cache (generation)
        hf(ids, attention_mask=mask, use_cache=True)

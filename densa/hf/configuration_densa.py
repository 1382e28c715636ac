"""`DensaConfig`: the Hugging Face config of a densa model.

It carries exactly the fields of `densa.config.ModelConfig` (same names, same defaults, same validation — the
dataclass is the single definition) beside the standard `PreTrainedConfig` keys, and converts both ways.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from transformers import PreTrainedConfig

from densa.config import ConfigError, ModelConfig
from densa.model.compile import CompileConfig

_MODEL_FIELDS = {f.name: f.default for f in dataclasses.fields(ModelConfig)}
# keys PreTrainedConfig itself understands or writes (config.json of any HF model carries some of them)
_HF_KEYS = {f.name for f in dataclasses.fields(PreTrainedConfig)} | {
    "model_type", "auto_map", "use_cache", "bos_token_id", "eos_token_id", "pad_token_id", "torch_dtype",
    "name_or_path", "output_attentions", "num_labels", "attn_implementation", "tokenizer_class",
}


class DensaConfig(PreTrainedConfig):
    model_type = "densa"

    def __init__(self, **kwargs: Any) -> None:
        fields = {name: kwargs.pop(name, default) for name, default in _MODEL_FIELDS.items()}
        # densa/model/compile.py's switch for `generate()`'s decoding steps: "auto" | "on" | "off" (default)
        self.compile = CompileConfig(mode=kwargs.pop("compile", "off")).mode
        unknown = sorted(k for k in kwargs if k not in _HF_KEYS and not k.startswith("_"))
        if unknown:
            raise ConfigError(f"unknown densa config field(s) {unknown}; valid fields: {', '.join(_MODEL_FIELDS)}")
        ModelConfig(**fields)  # validates; raises ConfigError naming the field
        for name, value in fields.items():
            setattr(self, name, value)
        # generation keys that v5 configs declare per model (LlamaConfig does the same)
        self.use_cache = kwargs.pop("use_cache", True)
        for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
            setattr(self, name, kwargs.pop(name, None))
        super().__init__(**kwargs)

    def to_model_config(self) -> ModelConfig:
        return ModelConfig(**{name: getattr(self, name) for name in _MODEL_FIELDS})

    @classmethod
    def from_model_config(cls, config: ModelConfig, **kwargs: Any) -> DensaConfig:
        return cls(**config.to_dict(), **kwargs)

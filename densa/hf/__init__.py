"""Hugging Face integration: `DensaConfig` / `DensaForCausalLM` (Auto classes), export, and loading other models.

Importing `densa` registers the Auto classes, so `AutoModelForCausalLM.from_pretrained(DIR)` loads a densa export.
"""

from densa.hf.configuration_densa import DensaConfig
from densa.hf.modeling_densa import DensaForCausalLM


def register() -> None:
    from transformers import AutoConfig, AutoModelForCausalLM

    AutoConfig.register(DensaConfig.model_type, DensaConfig, exist_ok=True)
    AutoModelForCausalLM.register(DensaConfig, DensaForCausalLM, exist_ok=True)


__all__ = ["DensaConfig", "DensaForCausalLM", "register"]

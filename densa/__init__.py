"""densa: intelligence-dense language models (Mega-style attention + dynamic mixture-of-experts)."""

from densa.checkpoint import load_model, save_checkpoint
from densa.config import ModelConfig, from_preset, load_config
from densa.hf import register as _register_auto_classes
from densa.model.model import DensaModel, ModelOutput

_register_auto_classes()  # AutoConfig / AutoModelForCausalLM know model_type "densa" once densa is imported

__all__ = ["DensaModel", "ModelConfig", "ModelOutput", "from_preset", "load_config", "load_model",
           "save_checkpoint"]
__version__ = "0.1.0"

"""Shared fixtures: tiny, deterministic, CPU-only. Nothing may reach a model hub."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# OpenMP threads that spin while waiting made tiny ops up to 100x slower on a shared 2-core machine
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest  # noqa: E402
import torch  # noqa: E402

from densa.config import from_preset  # noqa: E402
from densa.model.model import DensaModel  # noqa: E402

# every architecture variant the foundation offers; the Megalodon options are exercised together and alone
VARIANTS = {
    "mega": {},  # defaults: complex EMA, Mega's silu Q/K (docs/mixer-options.md)
    "mega-real-ema": {"complex_ema": False},
    "mega-timestep-norm": {"timestep_norm": True},
    "mega-normalized-attention": {"normalized_attention": True},
    "mega-two-hop": {"two_hop_residual": True},
    "megalodon-all": {"complex_ema": True, "timestep_norm": True, "two_hop_residual": True},
    "dense": {"mixer": "attention"},
    "dense-gqa": {"mixer": "attention", "num_attention_heads": 4, "num_key_value_heads": 2},
}


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(params=list(VARIANTS), ids=list(VARIANTS))
def variant(request) -> dict:
    return VARIANTS[request.param]


def tiny_model(**overrides) -> DensaModel:
    torch.manual_seed(0)
    return DensaModel(from_preset("tiny", **overrides)).eval()

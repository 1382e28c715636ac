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


def pytest_configure(config):
    config.addinivalue_line("markers", "compile: torch.compile of the decode step (select with -m compile)")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(params=list(VARIANTS), ids=list(VARIANTS))
def variant(request) -> dict:
    return VARIANTS[request.param]


def tiny_model(**overrides) -> DensaModel:
    torch.manual_seed(0)
    return DensaModel(from_preset("tiny", **overrides)).eval()


@pytest.fixture(scope="module")
def one_thread():
    """Tiny tensors: one thread is as fast and deterministic, and on a shared 2-core machine OpenMP's spin-waiting
    made two threads up to 100x slower. Use with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def prepared_shakespeare(root, chars: int, documents: int = 1, **prepare_kwargs):
    """The first `chars` characters of tiny-shakespeare as a corpus of `documents` equal documents (JSONL when more
    than one), a 300-entry tokenizer trained on it (root/tok), and its token shards (root/data, returned)."""
    import json

    from densa.data.corpora import corpus_texts
    from densa.data.prepare import prepare
    from densa.data.tokenizer import train_tokenizer

    text = next(corpus_texts("tinyshakespeare"))[:chars]
    if documents == 1:
        corpus = root / "corpus.txt"
        corpus.write_text(text)
    else:
        step = len(text) // documents
        corpus = root / "corpus.jsonl"
        corpus.write_text("".join(json.dumps({"text": text[i * step:(i + 1) * step]}) + "\n"
                                  for i in range(documents)))
    train_tokenizer([text], 300).save_pretrained(str(root / "tok"))
    prepare(str(corpus), root / "tok", root / "data", **prepare_kwargs)
    return root / "data"


def tiny_server(model, tokenizer, context: int, **overrides):
    """A live `densa serve` (BackgroundServer) on a tiny model: batch 4, 60 s timeout, `overrides` on top."""
    from densa.serve.app import ServeConfig, build_app
    from densa.serve.command import BackgroundServer

    cfg = ServeConfig(**{"model_name": "tiny", "context": context, "max_batch": 4, "timeout_s": 60.0, **overrides})
    return BackgroundServer(build_app(model, tokenizer, cfg))

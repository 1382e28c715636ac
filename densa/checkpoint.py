"""Native checkpoint directory: `config.json` (ModelConfig) + `model.safetensors` (weights).

Writes are atomic: files go to a temporary sibling directory that is renamed into place, so a crash mid-save
never leaves a half-written checkpoint where a good one was.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import safetensors.torch
from safetensors import SafetensorError

from densa.config import ConfigError, ModelConfig
from densa.model.model import DensaModel

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"


def is_checkpoint(path: str | Path) -> bool:
    path = Path(path)
    return (path / CONFIG_FILE).is_file() and (path / WEIGHTS_FILE).is_file()


def save_checkpoint(model: DensaModel, out: str | Path, overwrite: bool = False) -> Path:
    """Write `model` to the directory `out` (created if needed). Refuses to replace a checkpoint unless told to."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} exists and is not a directory")
    if is_checkpoint(out) and not overwrite:
        raise FileExistsError(f"{out} already holds a checkpoint (pass --force / overwrite=True to replace it)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        model.config.to_json(tmp / CONFIG_FILE)
        safetensors.torch.save_model(model, str(tmp / WEIGHTS_FILE))  # drops the tied lm_head copy
        if out.exists():
            for name in (CONFIG_FILE, WEIGHTS_FILE):
                os.replace(tmp / name, out / name)
            tmp.rmdir()
        else:
            os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def load_model(path: str | Path) -> DensaModel:
    """Load a native checkpoint directory written by `save_checkpoint` (or `densa init`)."""
    path = Path(path)
    if not is_checkpoint(path):
        raise FileNotFoundError(f"{path} is not a densa checkpoint (expected {CONFIG_FILE} and {WEIGHTS_FILE})")
    try:
        config = ModelConfig.from_json(path / CONFIG_FILE)
    except (ValueError, TypeError) as exc:  # JSON syntax, unknown fields (ConfigError), bad values
        raise ConfigError(f"{path / CONFIG_FILE}: {exc}") from None
    model = DensaModel(config)
    try:
        missing, unexpected = safetensors.torch.load_model(model, str(path / WEIGHTS_FILE), strict=False)
    except SafetensorError as exc:
        raise ValueError(f"{path / WEIGHTS_FILE}: corrupt or truncated safetensors file ({exc})") from None
    missing = [k for k in missing if not (k == "lm_head.weight" and model.config.tie_word_embeddings)]
    if missing or unexpected:
        raise ValueError(f"{path / WEIGHTS_FILE} does not match its config: missing {missing}, unexpected {unexpected}")
    return model

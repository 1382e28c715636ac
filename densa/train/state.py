"""Training checkpoints: `RUN/checkpoints/step-N/` holds `config.json` + `model.safetensors` (the native format, so
`densa.checkpoint.load_model` and the MODEL resolver load it) and `train_state.pt` (optimizers, RNG states, data
position, step, counters), plus a copy of the tokenizer the data was prepared with.

Crash safety: a checkpoint is written into a temporary sibling folder, fsynced, and renamed into place; only then is
`checkpoints/latest` (a one-line file naming the folder) replaced, and only then are old checkpoints beyond
`keep_last` removed. A crash at any point leaves the previous checkpoint and pointer intact; stray temporary
folders (names starting with ".") are ignored and cleaned up by the next save.
"""

from __future__ import annotations

import os
import random
import shutil
import tempfile
from pathlib import Path

import numpy as np
import safetensors.torch
import torch

from densa.checkpoint import is_checkpoint, save_checkpoint
from densa.model.model import DensaModel

STATE_FILE = "train_state.pt"
LATEST = "latest"


def rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])


def _fsync_dir(path: Path) -> None:
    for f in path.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_training_checkpoint(checkpoints: Path, step: int, model: DensaModel, state: dict, keep_last: int,
                             tokenizer_dir: Path | None = None) -> Path:
    """Write `step-{step}` atomically (with the tokenizer files of `tokenizer_dir`, if given, so the MODEL resolver
    returns the tokenizer too), point `latest` at it, prune to the newest `keep_last`."""
    checkpoints.mkdir(parents=True, exist_ok=True)
    for stray in checkpoints.glob(".step-*"):
        shutil.rmtree(stray, ignore_errors=True)
    final = checkpoints / f"step-{step}"
    tmp = Path(tempfile.mkdtemp(prefix=f".step-{step}.", dir=checkpoints))
    try:
        save_checkpoint(model, tmp, overwrite=True)
        torch.save(state, tmp / STATE_FILE)
        if tokenizer_dir is not None and tokenizer_dir.is_dir():
            for f in sorted(tokenizer_dir.iterdir()):
                shutil.copyfile(f, tmp / f.name)
        _fsync_dir(tmp)
        tmp.chmod(0o755)  # mkdtemp makes it private
        if final.exists():  # re-saving a step (e.g. after a resume): move the old one aside first
            old = Path(tempfile.mkdtemp(prefix=f".step-{step}.old.", dir=checkpoints))
            os.replace(final, old / final.name)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    pointer = checkpoints / f".{LATEST}.tmp"
    pointer.write_text(final.name + "\n")
    os.replace(pointer, checkpoints / LATEST)
    for old in list_checkpoints(checkpoints)[:-keep_last]:
        if old != final:
            shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(checkpoints: Path) -> list[Path]:
    """Complete checkpoint folders, oldest first."""
    found = [p for p in checkpoints.glob("step-*") if p.name[5:].isdigit() and is_complete(p)]
    return sorted(found, key=lambda p: int(p.name[5:]))


def is_complete(path: Path) -> bool:
    return is_checkpoint(path) and (path / STATE_FILE).is_file()


def latest_checkpoint(checkpoints: Path) -> Path | None:
    """The folder `latest` names, or the newest complete one if the pointer is missing or stale."""
    pointer = checkpoints / LATEST
    if pointer.is_file():
        path = checkpoints / pointer.read_text().strip()
        if is_complete(path):
            return path
    found = list_checkpoints(checkpoints) if checkpoints.is_dir() else []
    return found[-1] if found else None


def load_training_checkpoint(path: Path, model: DensaModel) -> dict:
    """Load the weights of `path` into `model` and return its training state."""
    missing, unexpected = safetensors.torch.load_model(model, str(path / "model.safetensors"), strict=False)
    missing = [k for k in missing if not (k == "lm_head.weight" and model.config.tie_word_embeddings)]
    if missing or unexpected:
        raise ValueError(f"{path}: weights do not match the recipe's model (missing {missing}, unexpected "
                         f"{unexpected}); resume with the recipe the run was started with")
    return torch.load(path / STATE_FILE, weights_only=False)

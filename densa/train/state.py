"""Training checkpoints: `RUN/checkpoints/step-N/` holds `config.json` + `model.safetensors` (the native format, so
`densa.checkpoint.load_model` and the MODEL resolver load it) and `train_state.pt` (optimizers, RNG states, data
position, step, counters), plus a copy of the tokenizer the data was prepared with.

Crash safety: a checkpoint is written into a temporary sibling folder, fsynced, and renamed into place; only then is
`checkpoints/latest` (a one-line file naming the folder) replaced, and only then are old checkpoints beyond
`keep_last` removed. A crash at any point leaves the previous checkpoint and pointer intact. The temporary folders
an interrupted save leaves (`.step-N.*`, and `..step-N.*` from the weights writer inside it) are removed by the next
save and on resume.

Damage after the fact (a truncated `model.safetensors` or `train_state.pt`: a full disk, a copy cut short) is found
by loading: `load_newest_intact` tries `latest`, then the other checkpoints newest first, and resumes from the first
that loads, naming the damaged ones in a warning.
"""

from __future__ import annotations

import os
import pickle
import random
import re
import shutil
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import safetensors.torch
import torch
from safetensors import SafetensorError

from densa.checkpoint import WEIGHTS_FILE, is_checkpoint, save_checkpoint
from densa.model.model import DensaModel

STATE_FILE = "train_state.pt"
LATEST = "latest"
# what an interrupted save leaves: mkdtemp's `.step-N.<random>` (and `.step-N.old.<random>`), and save_checkpoint's
# own `..step-N.<random>.<random>` beside it. Nothing else in checkpoints/ is ever removed as a temporary.
TEMPORARY = re.compile(r"\.{1,2}step-\d+\..+")


class DamagedCheckpoint(ValueError):
    """A checkpoint's files exist but do not load (truncated or corrupt)."""


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
    remove_stale_temporaries(checkpoints)
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


def remove_stale_temporaries(checkpoints: Path) -> list[Path]:
    """Delete the temporary folders interrupted saves left in `checkpoints` (names matching TEMPORARY); return them.
    Call only while no save is running (rank 0, before or between saves)."""
    if not checkpoints.is_dir():
        return []
    stale = [p for p in sorted(checkpoints.iterdir()) if p.is_dir() and TEMPORARY.fullmatch(p.name)]
    for path in stale:
        shutil.rmtree(path, ignore_errors=True)
    return stale


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
    """Load the weights of `path` into `model` and return its training state. Raises DamagedCheckpoint when a file
    does not load, ValueError when the weights are not the model's."""
    try:
        missing, unexpected = safetensors.torch.load_model(model, str(path / WEIGHTS_FILE), strict=False)
    except (SafetensorError, OSError) as exc:
        raise DamagedCheckpoint(f"{path / WEIGHTS_FILE}: {exc}") from None
    missing = [k for k in missing if not (k == "lm_head.weight" and model.config.tie_word_embeddings)]
    if missing or unexpected:
        raise ValueError(f"{path}: weights do not match the recipe's model (missing {missing}, unexpected "
                         f"{unexpected}); resume with the recipe the run was started with")
    try:
        return torch.load(path / STATE_FILE, weights_only=False)
    except (RuntimeError, EOFError, OSError, pickle.UnpicklingError) as exc:  # truncated zip, empty file, garbage
        raise DamagedCheckpoint(f"{path / STATE_FILE}: {' '.join(str(exc).split()[:12])}") from None


def resume_candidates(checkpoints: Path) -> list[Path]:
    """The checkpoint `latest` names (when complete), then every other complete one, newest first."""
    found = list_checkpoints(checkpoints)[::-1] if checkpoints.is_dir() else []
    first = latest_checkpoint(checkpoints)
    return [first, *(p for p in found if p != first)] if first is not None else found


def load_newest_intact(checkpoints: Path, load: Callable[[Path], dict], warn: bool = True) -> tuple[Path, dict]:
    """Resume point: `load(path)` (which returns the training state, e.g. load_training_checkpoint into the model)
    on each of `resume_candidates` until one does not raise DamagedCheckpoint; return that path and its state.
    Damaged checkpoints are left in place (a later save of the same step replaces them) and named in a warning."""
    damaged: list[str] = []
    for path in resume_candidates(checkpoints):
        try:
            state = load(path)
        except DamagedCheckpoint as exc:
            damaged.append(str(exc))
            continue
        if damaged and warn:
            warnings.warn(f"resuming from {path} (step {state['step']}); skipped damaged checkpoint(s): "
                          f"{'; '.join(damaged)}", stacklevel=2)
        return path, state
    detail = f": {'; '.join(damaged)}" if damaged else ""
    raise FileNotFoundError(f"--resume: {checkpoints} holds no intact checkpoint to resume from{detail}")

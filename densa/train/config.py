"""The recipe's `train:` section as a typed, validated dataclass, and the loading of a whole training recipe.

A training recipe is YAML with two sections:
    model:  what densa.config.load_config reads (a preset plus ModelConfig fields)
    train:  TrainConfig fields below
`--set model.x=...` and `--set train.y=...` override either (a bare key is looked up in train, then model).
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from densa.config import ConfigError, ModelConfig, _parse_value, load_config, read_recipe


@dataclass(kw_only=True)
class TrainConfig:
    """How to train. Every field is checked in `__post_init__`; docs/training.md describes each."""

    data: str = ""  # folder written by `densa prepare`
    batch_size: int = 8  # sequences per micro-batch
    context: int = 256  # tokens per sequence (each window holds context + 1 tokens)
    grad_accum: int = 1  # micro-batches per optimizer step
    steps: int = 1000  # optimizer steps
    sampling: Literal["random", "sequential"] = "random"
    optimizer: Literal["adamw", "muon"] = "adamw"  # muon: Muon for 2-D hidden weights, AdamW for the rest
    lr: float = 3e-3  # AdamW peak learning rate
    muon_lr: float = 0.02  # Muon peak learning rate (optimizer: muon)
    min_lr_ratio: float = 0.1  # final lr = lr * min_lr_ratio
    warmup_steps: int = 50
    schedule: Literal["cosine", "wsd"] = "cosine"  # wsd: warm-up, stable, then linear decay over decay_fraction
    decay_fraction: float = 0.2
    weight_decay: float = 0.1  # on matrices only (linear, expert and embedding weights)
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # max global gradient norm; 0 disables clipping
    bf16: bool = False  # bf16 autocast for the forward pass
    # torch.compile of the training forward, the switch of densa/model/compile.py: on, off, or auto (= on on CUDA);
    # off by default: on this CPU it measured 0.90-1.12x eager (`densa bench train`), not a consistent win
    compile: Literal["auto", "on", "off"] = "off"
    seed: int = 0
    log_interval: int = 10  # steps between metrics.jsonl records
    eval_interval: int = 100  # steps between validation runs (and one at the end)
    eval_batches: int = 8  # validation batches per run
    checkpoint_interval: int = 500  # steps between checkpoints (and one at the end)
    keep_last: int = 3  # checkpoints kept
    max_nan_steps: int = 5  # consecutive NaN/inf steps that stop the run
    # high-value tokens (docs/high-value-tokens.md); both need data scored with `densa prepare ... --reference MODEL`
    token_selection: Literal["none", "rho1"] = "none"  # rho1: loss on the top select_fraction of tokens by excess loss
    select_fraction: float = 0.6  # share of each micro-batch's tokens that rho1 keeps
    curriculum: Literal["none", "value"] = "none"  # value: the run's windows in ascending document value
    # under torchrun: auto = ddp with more than one process; fsdp2 = fully_shard per block (densa/train/distributed.py)
    distributed: Literal["auto", "none", "ddp", "fsdp2"] = "auto"
    tensorboard: bool = True  # also log scalars to OUT/tb when the tensorboard package is installed

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(TrainConfig)
        for f in dataclasses.fields(self):
            value, hint = getattr(self, f.name), hints[f.name]
            if typing.get_origin(hint) is Literal:
                if value not in typing.get_args(hint):
                    raise ConfigError(f"train.{f.name}={value!r}: choose from {', '.join(typing.get_args(hint))}")
            elif hint is float and isinstance(value, int) and not isinstance(value, bool):
                setattr(self, f.name, float(value))
            elif (hint is int and isinstance(value, bool)) or not isinstance(value, hint):
                raise ConfigError(f"train.{f.name}={value!r}: expected {hint.__name__}, got {type(value).__name__}")
        for name in ("batch_size", "context", "grad_accum", "steps", "log_interval", "eval_interval",
                     "eval_batches", "checkpoint_interval", "keep_last", "max_nan_steps"):
            if getattr(self, name) < 1:
                raise ConfigError(f"train.{name}={getattr(self, name)}: must be an integer >= 1")
        for name in ("warmup_steps", "seed"):
            if getattr(self, name) < 0:
                raise ConfigError(f"train.{name}={getattr(self, name)}: must be an integer >= 0")
        for name in ("lr", "muon_lr"):
            if not 0 < getattr(self, name) <= 10:
                raise ConfigError(f"train.{name}={getattr(self, name)}: must be in (0, 10]")
        for name in ("min_lr_ratio", "decay_fraction", "beta1", "beta2"):
            if not 0 <= getattr(self, name) <= 1:
                raise ConfigError(f"train.{name}={getattr(self, name)}: must be in [0, 1]")
        for name in ("weight_decay", "grad_clip"):
            if getattr(self, name) < 0:
                raise ConfigError(f"train.{name}={getattr(self, name)}: must be >= 0")
        if not 0 < self.select_fraction <= 1:
            raise ConfigError(f"train.select_fraction={self.select_fraction}: must be in (0, 1]")
        if not self.data:
            raise ConfigError("train.data is not set: name the folder written by `densa prepare` "
                              "(in the recipe or with --set train.data=DIR)")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def train_field_names() -> list[str]:
    return [f.name for f in dataclasses.fields(TrainConfig)]


def load_recipe(recipe: str | Path, overrides: list[str] | None = None) -> tuple[ModelConfig, TrainConfig]:
    """The recipe's model and train configs, with `key=value` overrides applied."""
    path = Path(recipe)
    doc = read_recipe(path)
    extra = sorted(set(doc) - {"model", "train"})
    if extra:
        raise ConfigError(f"recipe {str(path)!r}: unknown section(s) {extra}; valid: model, train")
    train = dict(doc.get("train") or {})
    model_overrides: list[str] = []
    hints = typing.get_type_hints(TrainConfig)
    for pair in overrides or []:
        key, sep, raw = pair.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"--set {pair!r}: expected key=value")
        if key.startswith("train.") or (key in hints and not key.startswith("model.")):
            name = key.removeprefix("train.")
            if name not in hints:
                raise ConfigError(f"--set {key}: unknown train key; valid keys: {', '.join(train_field_names())}")
            train[name] = _parse_value(f"train.{name}", raw.strip(), hints[name])
        else:
            model_overrides.append(pair)
    unknown = sorted(set(train) - set(train_field_names()))
    if unknown:
        raise ConfigError(f"unknown train key(s) {unknown}; valid keys: {', '.join(train_field_names())}")
    return load_config(recipe=path, overrides=model_overrides), TrainConfig(**train)

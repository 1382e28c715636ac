"""Typed recipes for `densa sft` and `densa align` (YAML sections → dataclasses, `--set section.key=value`).

    policy:     path: MODEL (any form densa.resolve accepts), or init: {preset, ModelConfig fields} for a fresh
                densa model whose tokenizer is trained on the task (`tokenizer_vocab` entries)
    task:       which data (TaskConfig)
    sft:        SFTConfig                                   (densa sft)
    grpo:       GRPOSection, reward: RewardConfig           (densa align, method: grpo)
    preference: PreferenceConfig                            (densa align, method: simpo)
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from densa.align.rewards import RewardConfig
from densa.config import ConfigError, _parse_value, read_recipe


@dataclass(kw_only=True)
class ModelSection:
    path: str = ""  # MODEL; empty: build a fresh densa model from `init`
    init: dict[str, Any] = field(default_factory=dict)  # preset + ModelConfig fields (vocab_size: the tokenizer)
    tokenizer_vocab: int = 512  # fresh model only: byte-level BPE (single digits) trained on the task's text


@dataclass(kw_only=True)
class TaskConfig:
    name: Literal["arithmetic", "gsm8k"] = "arithmetic"
    train_size: int = 20000  # arithmetic: generated training problems (GSM8K: cap on its 7,473)
    heldout_size: int = 500
    ood_size: int = 300
    validation_size: int = 0  # arithmetic: validation problems kept out of training (the study tunes on them)
    unanswerable_fraction: float = 0.0  # arithmetic: share of unanswerable problems (honest target `#### unknown`)
    verbose_fraction: float = 0.5  # SFT demo: share of verbose-but-correct targets
    max_new_tokens: int = 160  # greedy evaluation cap


@dataclass(kw_only=True)
class SFTConfig:
    steps: int = 1000
    batch_size: int = 32
    lr: float = 3e-3
    warmup_steps: int = 50
    weight_decay: float = 0.1
    max_length: int = 256  # tokens per example (prompt + answer); longer ones are truncated
    seed: int = 0
    log_interval: int = 25
    precision: Literal["fp32", "bf16"] = "fp32"  # bf16: autocast on CPU/GPU, fp32 master weights (the optimizer's)
    save_every: int = 50  # steps between resumable checkpoints in OUT/trainer (0: none); a rerun continues there


@dataclass(kw_only=True)
class GRPOSection:
    steps: int = 200
    prompts_per_step: int = 8  # each gets num_generations samples
    num_generations: int = 8
    max_completion_length: int = 128  # also L_max of the overlong penalty
    temperature: float = 1.0
    lr: float = 1e-4
    loss_type: Literal["dr_grpo", "dapo"] = "dr_grpo"  # never "grpo": its 1/|o| normaliser is a length bias
    beta: float = 0.0  # KL anchor to the starting (SFT) policy; 0: no reference model, as in DAPO / Dr. GRPO
    scale_rewards: Literal["group", "batch", "none"] = "group"  # batch: DLER's batch-wise reward normalisation
    epsilon: float = 0.2  # PPO clip range, low side
    epsilon_high: float = 0.0  # high side (DAPO/DLER clip-higher, e.g. 0.28); 0: the same as epsilon
    dynamic_sampling: bool = False  # drop groups whose samples are all right or all wrong (DAPO, DLER)
    seed: int = 0
    log_interval: int = 5
    precision: Literal["fp32", "bf16"] = "fp32"  # bf16: autocast for the policy's training forward/backward
    save_every: int = 10  # steps between resumable checkpoints in OUT/trainer (0: none); a rerun continues there


@dataclass(kw_only=True)
class PreferenceConfig:
    """SimPO-style offline preference: chosen = the shorter of two correct answers, rejected = the longer."""

    steps: int = 200
    batch_size: int = 16
    lr: float = 1e-4
    beta: float = 2.0
    gamma: float = 1.0  # target reward margin (SimPO's γ = β/2)
    seed: int = 0
    log_interval: int = 10


@dataclass(kw_only=True)
class Recipe:
    policy: ModelSection = field(default_factory=ModelSection)
    task: TaskConfig = field(default_factory=TaskConfig)
    method: Literal["sft", "grpo", "simpo"] = "sft"
    sft: SFTConfig = field(default_factory=SFTConfig)
    grpo: GRPOSection = field(default_factory=GRPOSection)
    reward: RewardConfig = field(default_factory=RewardConfig)
    preference: PreferenceConfig = field(default_factory=PreferenceConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


SECTIONS = {"policy": ModelSection, "task": TaskConfig, "sft": SFTConfig, "grpo": GRPOSection,
            "reward": RewardConfig, "preference": PreferenceConfig}


def load_recipe(path: str | Path | None, overrides: list[str] | None = None, method: str | None = None) -> Recipe:
    """Read a recipe (or the defaults when `path` is None), apply `section.key=value` overrides, validate."""
    doc: dict[str, Any] = read_recipe(path) if path else {}
    doc = {k: dict(v or {}) for k, v in doc.items()}
    top = doc.pop("align", {})  # `align: {method: grpo}`
    unknown = sorted(set(doc) - set(SECTIONS))
    if unknown:
        raise ConfigError(f"recipe {path}: unknown section(s) {unknown}; valid: align, {', '.join(SECTIONS)}")
    for pair in overrides or []:
        key, sep, raw = pair.partition("=")
        section, dot, name = key.strip().partition(".")
        if not sep or not dot:
            raise ConfigError(f"--set {pair!r}: expected section.key=value, e.g. grpo.steps=10")
        if section == "align" and name == "method":
            top["method"] = raw.strip()
            continue
        if section not in SECTIONS:
            raise ConfigError(f"--set {key}: unknown section {section!r}; valid: align, {', '.join(SECTIONS)}")
        hints = typing.get_type_hints(SECTIONS[section])
        if name not in hints:
            raise ConfigError(f"--set {key}: unknown key; valid: {', '.join(hints)}")
        hint = hints[name]
        doc.setdefault(section, {})[name] = raw.strip() if hint is str else _parse_value(key, raw.strip(), hint)
    grpo = _build(GRPOSection, doc.get("grpo", {}), "grpo")
    # one length limit: the one generation uses (the reward's overlong window and truncate_at are checked against it)
    doc["reward"] = {**doc.get("reward", {}), "max_completion_length": grpo.max_completion_length}
    built = {name: grpo if cls is GRPOSection else _build(cls, doc.get(name, {}), name)
             for name, cls in SECTIONS.items()}
    recipe = Recipe(method=method or top.get("method", "sft"), **built)
    if recipe.method not in ("sft", "grpo", "simpo"):
        raise ConfigError(f"align.method={recipe.method!r}: choose from grpo, simpo")
    return recipe


def _build(cls: type, values: dict[str, Any], section: str) -> Any:
    hints = typing.get_type_hints(cls)
    unknown = sorted(set(values) - set(hints))
    if unknown:
        raise ConfigError(f"unknown {section} key(s) {unknown}; valid: {', '.join(hints)}")
    for name, value in values.items():
        hint = hints[name]
        if typing.get_origin(hint) is Literal:
            if value not in typing.get_args(hint):
                raise ConfigError(f"{section}.{name}={value!r}: choose from {', '.join(typing.get_args(hint))}")
        elif hint is float and isinstance(value, int) and not isinstance(value, bool):
            values[name] = float(value)
        elif hint in (int, float, str, bool) and (not isinstance(value, hint) or (hint is int and
                                                                               isinstance(value, bool))):
            raise ConfigError(f"{section}.{name}={value!r}: expected {hint.__name__}")
    obj = cls(**values)
    for name in ("steps", "batch_size", "prompts_per_step", "num_generations", "max_completion_length",
                 "max_length", "log_interval", "train_size", "heldout_size", "tokenizer_vocab"):
        if name in hints and getattr(obj, name) < 1:
            raise ConfigError(f"{section}.{name}={getattr(obj, name)}: must be >= 1")
    for name in ("lr", "temperature", "epsilon"):
        if name in hints and not getattr(obj, name) > 0:
            raise ConfigError(f"{section}.{name}={getattr(obj, name)}: must be > 0")
    for name in ("beta", "epsilon_high", "validation_size", "save_every"):
        if name in hints and getattr(obj, name) < 0:
            raise ConfigError(f"{section}.{name}={getattr(obj, name)}: must be >= 0")
    if "unanswerable_fraction" in hints and not 0 <= obj.unanswerable_fraction < 1:
        raise ConfigError(f"{section}.unanswerable_fraction={obj.unanswerable_fraction}: must be in [0, 1)")
    return obj

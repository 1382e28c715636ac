"""Model configuration: one typed dataclass, validated at construction, presets as data.

Layering (each step only overrides fields of the one before):
    preset (PRESETS[name])  ->  recipe YAML (`model:` section)  ->  `--set key=value` on the command line

Field names follow Hugging Face (`hidden_size`, `num_hidden_layers`, ...) so the HF mapping is the identity;
Mega fields (`ema_dim`, `attn_chunk_size`, `shared_qk_dim`, ...) carry the Mega paper's symbols h, c, z, v in their
comments (arXiv:2209.10655 §3; docs/architecture.md, 'The Mega mixer').
"""

from __future__ import annotations

import dataclasses
import json
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml

Mixer = Literal["mega", "attention", "deltanet"]
Ffn = Literal["swiglu", "moe", "topk_moe"]
GateWeights = Literal["normalized", "unit"]


class ConfigError(ValueError):
    """A configuration value, key or preset is invalid. The message names it."""


@dataclass(kw_only=True)
class ModelConfig:
    """Architecture of a densa model. Every field is checked in `__post_init__`."""

    # --- shared by every variant ---
    vocab_size: int = 8192
    hidden_size: int = 256
    num_hidden_layers: int = 6
    intermediate_size: int = 704  # SwiGLU hidden width
    num_attention_heads: int = 4  # dense attention heads; Mega heads (Megalodon-style multi-head)
    num_key_value_heads: int = 4  # dense baseline only (grouped-query attention)
    max_position_embeddings: int = 2048  # training context; FLOP counts use it as the default context
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    tie_word_embeddings: bool = True
    initializer_range: float = 0.02
    mixer: Mixer = "mega"  # "mega": EMA + chunked gated attention; "attention": Llama-style full causal SDPA;
    # "deltanet": the gated delta rule (Gated DeltaNet), a constant-size state per head
    attention_every: int = 0  # hybrid layout: layers k, 2k, 3k, ... (1-based) use full attention; 0 = none
    ffn: Ffn = "swiglu"  # "swiglu": dense; "moe": densa's dynamic MoE; "topk_moe": top-k softmax MoE (docs/moe.md)

    # --- Mega sequence mixer (docs/architecture.md, 'The Mega mixer') ---
    ema_dim: int = 16  # h: EMA state size per channel
    ema_chunk_size: int = 256  # EMA training path runs in chunks of this length (memory O(d*h*chunk), not d*h*L)
    attn_chunk_size: int = 256  # c: attention only inside chunks of c tokens
    shared_qk_dim: int = 64  # z: shared Q/K dimension (all heads together)
    value_dim: int = 512  # v: value dimension (all heads together); Mega uses 2*hidden
    # Megalodon refinements (docs/architecture.md, 'Megalodon refinements (config options)'); defaults chosen by
    # the measurement in docs/mixer-options.md
    complex_ema: bool = True  # CEMA: rotate the EMA state by a learned per-channel phase
    timestep_norm: bool = False  # causal cumulative group norm before the mixer instead of RMSNorm
    timestep_norm_groups: int = 16
    normalized_attention: bool = False  # QK-norm: z / ||z|| per head with learned scale, no 1/sqrt(d)
    two_hop_residual: bool = False  # FFN residual is the block input, not the mixer output

    # --- gated delta-rule mixer, mixer="deltanet" (arXiv 2412.06464; densa/model/deltanet.py) ---
    delta_qk_head_dim: int = 0  # K, query/key width per head; 0 = hidden_size // num_attention_heads
    delta_v_head_dim: int = 0  # V, value width per head; 0 = 2·K (Gated DeltaNet's value expansion)
    delta_chunk_size: int = 64  # C: the training form solves C×C systems per chunk
    delta_conv_size: int = 4  # short causal depthwise convolution on q, k, v (1 = none)

    # --- mixture-of-experts FFN, ffn="moe" or "topk_moe" (docs/moe.md, 'Design') ---
    num_experts: int = 64  # E: routed FFN experts (fine-grained, OLMoE: 64 experts, top-8)
    num_experts_per_tok: int = 8  # K: slots per token; under "moe" FFN and zero-computation experts share them
    moe_intermediate_size: int = 0  # F: one expert's SwiGLU width; 0 = intermediate_size // num_experts_per_tok
    shared_expert: bool = False  # one always-on, sigmoid-gated expert of width F (DeepSeekMoE / Qwen2-MoE)
    router_z_loss_coef: float = 1e-3  # ST-MoE router z-loss (OLMoE: 1e-3)
    # "moe" only: zero-computation (ZC) experts, the compute-budget controller and aux-loss-free balancing
    num_null_experts: int = 4  # ZC experts that output zero (AdaMoE null / MoE++ zero)
    num_identity_experts: int = 4  # ZC experts that output their input (LongCat / MoE++ copy)
    target_active_experts: float = 6.0  # mean FFN experts per token that the budget controller holds, per layer
    budget_update_rate: float = 1.0  # α in [0, 1]: per step the ZC bias moves this share of the way to its proposal
    max_all_null_rate: float = 0.5  # cap on the share of a layer's tokens that use no FFN expert
    # "normalized": gate weights are the scores normalised over the selected experts; "unit": every selected FFN or
    # identity expert weighs 1 (straight-through gradient to the router), so a dense FFN split into experts by
    # `densa moefy` is their plain sum and all experts active reproduce it exactly (docs/moefy.md)
    moe_gate_weights: GateWeights = "normalized"
    balance_update_rate: float = 1e-3  # γ: DeepSeek-V3 aux-loss-free bias step (sign update, re-centred)
    seq_balance_loss_coef: float = 1e-4  # DeepSeek-V3 sequence-wise balance loss over the FFN experts
    # "topk_moe" only
    router_aux_loss_coef: float = 1e-2  # Switch balance loss, HF Mixtral normalisation (OLMoE: 1e-2)

    def __post_init__(self) -> None:
        _check_types(self)
        _positive(self, "vocab_size", "hidden_size", "num_hidden_layers", "intermediate_size",
                  "num_attention_heads", "num_key_value_heads", "max_position_embeddings", "ema_dim",
                  "ema_chunk_size", "attn_chunk_size", "shared_qk_dim", "value_dim", "timestep_norm_groups")
        if self.mixer not in typing.get_args(Mixer):
            raise ConfigError(f"mixer={self.mixer!r}: must be one of {list(typing.get_args(Mixer))}")
        if self.ffn not in typing.get_args(Ffn):
            raise ConfigError(f"ffn={self.ffn!r}: must be one of {list(typing.get_args(Ffn))}")
        if self.moe_gate_weights not in typing.get_args(GateWeights):
            raise ConfigError(f"moe_gate_weights={self.moe_gate_weights!r}: must be one of "
                              f"{list(typing.get_args(GateWeights))}")
        if self.ffn != "swiglu":
            self._check_moe()
        if self.rope_theta <= 0:
            raise ConfigError(f"rope_theta={self.rope_theta}: must be > 0")
        if not 0 < self.rms_norm_eps < 1:
            raise ConfigError(f"rms_norm_eps={self.rms_norm_eps}: must be in (0, 1)")
        if not 0 < self.initializer_range <= 1:
            raise ConfigError(f"initializer_range={self.initializer_range}: must be in (0, 1]")
        for name in ("attention_every", "delta_qk_head_dim", "delta_v_head_dim"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name}={getattr(self, name)}: must be >= 0")
        _positive(self, "delta_chunk_size", "delta_conv_size")
        if self.attention_every > self.num_hidden_layers:
            raise ConfigError(f"attention_every={self.attention_every}: must be <= num_hidden_layers="
                              f"{self.num_hidden_layers} (0 = no full-attention layers)")
        mixers = set(self.layer_mixers)
        h = self.num_attention_heads
        if "attention" in mixers:
            if self.hidden_size % h:
                raise ConfigError(f"hidden_size={self.hidden_size}: must be divisible by num_attention_heads={h}")
            if (self.hidden_size // h) % 2:
                raise ConfigError(f"hidden_size/num_attention_heads={self.hidden_size // h}: must be even (RoPE)")
            if h % self.num_key_value_heads:
                raise ConfigError(f"num_key_value_heads={self.num_key_value_heads}: must divide "
                                  f"num_attention_heads={h}")
        if "deltanet" in mixers and self.delta_key_dim < 1:
            raise ConfigError("delta_qk_head_dim=0 derives hidden_size // num_attention_heads = 0: set it >= 1")
        if "mega" in mixers:
            for name in ("shared_qk_dim", "value_dim"):
                if getattr(self, name) % h:
                    raise ConfigError(f"{name}={getattr(self, name)}: must be divisible by num_attention_heads={h}")
            if (self.shared_qk_dim // h) % 2:
                raise ConfigError(f"shared_qk_dim/num_attention_heads={self.shared_qk_dim // h}: must be even (RoPE)")
            if self.timestep_norm and self.hidden_size % self.timestep_norm_groups:
                raise ConfigError(f"timestep_norm_groups={self.timestep_norm_groups}: must divide "
                                  f"hidden_size={self.hidden_size}")

    def _check_moe(self) -> None:
        _positive(self, "num_experts", "num_experts_per_tok")
        E, K = self.num_experts, self.num_experts_per_tok
        Z = self.num_null_experts + self.num_identity_experts
        for name in ("moe_intermediate_size", "num_null_experts", "num_identity_experts", "router_z_loss_coef",
                     "budget_update_rate", "balance_update_rate", "seq_balance_loss_coef", "router_aux_loss_coef"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name}={getattr(self, name)}: must be >= 0")
        if self.expert_intermediate_size < 1:
            raise ConfigError(f"moe_intermediate_size=0 derives intermediate_size // num_experts_per_tok = "
                              f"{self.intermediate_size} // {K} = 0: set moe_intermediate_size >= 1")
        if self.ffn == "topk_moe":
            if K > E:
                raise ConfigError(f"num_experts_per_tok={K}: must be <= num_experts={E} for ffn='topk_moe'")
            return
        if K > E + Z:
            raise ConfigError(f"num_experts_per_tok={K}: exceeds the routing pool num_experts + num_null_experts + "
                              f"num_identity_experts = {E} + {self.num_null_experts} + "
                              f"{self.num_identity_experts} = {E + Z}")
        # a token picks K distinct experts, at most Z of them zero-computation and at most E of them FFN
        lo, hi = max(K - Z, 0), min(K, E)
        t = self.target_active_experts
        if not (lo <= t <= hi and t > 0):
            interval = f"({lo}, {hi}]" if lo == 0 else f"[{lo}, {hi}]"
            raise ConfigError(f"target_active_experts={t}: must be in {interval} with num_experts={E}, "
                              f"num_experts_per_tok={K} and {Z} zero-computation experts (a token uses between "
                              "K - Z and min(K, E) FFN experts)")
        if self.budget_update_rate > 1:
            raise ConfigError(f"budget_update_rate={self.budget_update_rate}: must be in [0, 1]")
        if not 0 <= self.max_all_null_rate <= 1:
            raise ConfigError(f"max_all_null_rate={self.max_all_null_rate}: must be in [0, 1]")
        if Z >= K and t < 1 - self.max_all_null_rate:
            raise ConfigError(f"target_active_experts={t} with max_all_null_rate={self.max_all_null_rate} is "
                              f"impossible: a token that is not all-null uses >= 1 FFN expert, so the mean is >= "
                              f"1 - max_all_null_rate = {1 - self.max_all_null_rate:g}")

    @property
    def expert_intermediate_size(self) -> int:
        """F, the SwiGLU width of one routed expert (`moe_intermediate_size`, or derived when it is 0)."""
        return self.moe_intermediate_size or self.intermediate_size // self.num_experts_per_tok

    @property
    def layer_mixers(self) -> list[str]:
        """The mixer of each layer: `mixer`, except every `attention_every`-th layer, full attention (hybrid)."""
        k = self.attention_every
        return ["attention" if k and (i + 1) % k == 0 else self.mixer for i in range(self.num_hidden_layers)]

    @property
    def delta_key_dim(self) -> int:
        """K of the gated delta-rule mixer (`delta_qk_head_dim`, or derived when 0)."""
        return self.delta_qk_head_dim or self.hidden_size // self.num_attention_heads

    @property
    def delta_value_dim(self) -> int:
        """V of the gated delta-rule mixer (`delta_v_head_dim`, or 2·K when 0)."""
        return self.delta_v_head_dim or 2 * self.delta_key_dim

    @property
    def head_dim(self) -> int:
        """Per-head width of the dense baseline's attention."""
        return self.hidden_size // self.num_attention_heads

    # --- serialisation ---
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self, path: str | Path | None = None) -> str:
        text = json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"
        if path is not None:
            Path(path).write_text(text)
        return text

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        _reject_unknown(data)
        return cls(**data)

    @classmethod
    def from_json(cls, path: str | Path) -> ModelConfig:
        return cls.from_dict(json.loads(Path(path).read_text()))

    def replace(self, **changes: Any) -> ModelConfig:
        """A copy with `changes` applied (and validated)."""
        _reject_unknown(changes)
        return dataclasses.replace(self, **changes)


def field_names() -> list[str]:
    return [f.name for f in dataclasses.fields(ModelConfig)]


def _reject_unknown(data: dict[str, Any]) -> None:
    unknown = sorted(set(data) - set(field_names()))
    if unknown:
        raise ConfigError(f"unknown config key(s) {unknown}; valid keys: {', '.join(field_names())}")


def _positive(cfg: ModelConfig, *names: str) -> None:
    for name in names:
        value = getattr(cfg, name)
        if value < 1:
            raise ConfigError(f"{name}={value}: must be an integer >= 1")


def _check_types(cfg: ModelConfig) -> None:
    hints = typing.get_type_hints(ModelConfig)
    for f in dataclasses.fields(cfg):
        value, hint = getattr(cfg, f.name), hints[f.name]
        if typing.get_origin(hint) is Literal:
            continue  # checked against its allowed values in __post_init__
        if hint is float and isinstance(value, int) and not isinstance(value, bool):
            setattr(cfg, f.name, float(value))
            continue
        if hint is int and isinstance(value, bool) or not isinstance(value, hint):
            raise ConfigError(f"{f.name}={value!r}: expected {hint.__name__}, got {type(value).__name__}")


# --------------------------------------------------------------------------- presets (data, not code)

PRESETS: dict[str, dict[str, Any]] = {
    # tests: < 1M parameters, byte-level vocabulary, small chunks so several chunk boundaries occur
    "tiny": dict(vocab_size=256, hidden_size=64, num_hidden_layers=2, intermediate_size=176,
                 num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=256, ema_dim=4,
                 ema_chunk_size=32, attn_chunk_size=16, shared_qk_dim=32, value_dim=128, timestep_norm_groups=4),
    # CPU experiments: about 8M parameters
    "cpu-small": dict(vocab_size=8192, hidden_size=256, num_hidden_layers=6, intermediate_size=704,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=1024, ema_dim=16,
                      ema_chunk_size=256, attn_chunk_size=256, shared_qk_dim=64, value_dim=512),
    # CPU experiments: about 30M parameters
    "cpu-base": dict(vocab_size=16384, hidden_size=448, num_hidden_layers=8, intermediate_size=1216,
                     num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=2048, ema_dim=16,
                     ema_chunk_size=256, attn_chunk_size=256, shared_qk_dim=128, value_dim=896),
    # GPU scale: about 1B parameters (Megalodon proportions: hidden, z, v and chunk of the `mega1.3B` config in
    # XuezheMax/megalodon, megalodon/model/mega.py, with 18 layers instead of 24)
    "gpu-1b": dict(vocab_size=32768, hidden_size=2048, num_hidden_layers=18, intermediate_size=5632,
                   num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=8192, ema_dim=16,
                   ema_chunk_size=2048, attn_chunk_size=2048, shared_qk_dim=512, value_dim=4096,
                   tie_word_embeddings=False),
}
# densa's dynamic MoE FFN: 16 experts of width intermediate_size / 4, 4 slots, 2 null + 2 identity experts so a
# token may skip the FFN, 3 FFN experts per token on average (the iso-FLOP study's proportions, docs/iso-flop.md)
DYNAMIC_MOE = dict(ffn="moe", num_experts=16, num_experts_per_tok=4, num_null_experts=2, num_identity_experts=2,
                   target_active_experts=3.0)
# tests and the controller log: tiny (Mega at its test widths) with the dynamic MoE
PRESETS["tiny-moe"] = dict(PRESETS["tiny"], **DYNAMIC_MOE)


def densa_recipe(size: dict[str, Any]) -> dict[str, Any]:
    """densa's full recipe on a size preset: the Mega mixer at value width = hidden size with an 8-dimensional EMA
    (the inference-density study's finalist `mega_narrow_moe`, picked on the validation half; docs/inference-density.md)
    and the dynamic MoE FFN."""
    return dict(size, mixer="mega", value_dim=size["hidden_size"], ema_dim=8, **DYNAMIC_MOE)


# `densa quickstart` trains cpu-small-moe against its dense baseline; gpu-1b-moe is the same proportions at 1B scale
PRESETS["cpu-small-moe"] = densa_recipe(PRESETS["cpu-small"])
PRESETS["gpu-1b-moe"] = densa_recipe(PRESETS["gpu-1b"])


def from_preset(name: str, **overrides: Any) -> ModelConfig:
    """The preset `name` with `overrides` applied."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; available: {', '.join(PRESETS)}")
    data = dict(PRESETS[name])
    _reject_unknown(overrides)
    data.update(overrides)
    return ModelConfig(**data)


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """Parse `key=value` strings into typed values for ModelConfig fields (an optional `model.` prefix is allowed)."""
    hints = typing.get_type_hints(ModelConfig)
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        key = key.strip().removeprefix("model.")
        if not sep or not key:
            raise ConfigError(f"--set {pair!r}: expected key=value")
        if key not in hints:
            raise ConfigError(f"--set {key}: unknown key; valid keys: {', '.join(field_names())}")
        out[key] = _parse_value(key, raw.strip(), hints[key])
    return out


def _parse_value(key: str, raw: str, hint: Any) -> Any:
    if typing.get_origin(hint) is Literal:
        return raw
    if hint is bool:
        if raw.lower() in ("1", "true", "yes", "on"):
            return True
        if raw.lower() in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"--set {key}={raw}: expected a boolean (true/false)")
    try:
        return hint(raw)
    except ValueError:
        raise ConfigError(f"--set {key}={raw}: expected {hint.__name__}") from None


def yaml_error_location(path: Path, exc: yaml.YAMLError) -> str:
    """`path:line:column` (1-based) of a YAML syntax error, or `path` when yaml gives no position."""
    mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
    return f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(path)


def yaml_problem(exc: yaml.YAMLError) -> str:
    """yaml's description of the error on one line, with where the construct it was inside began when that was on
    another line: "expected ',' or ']', but got ':' (while parsing a flow sequence that starts on line 3)"."""
    problem, context = getattr(exc, "problem", None), getattr(exc, "context", None)
    if not problem:
        return " ".join(str(exc).split())
    if context:
        start, mark = getattr(exc, "context_mark", None), getattr(exc, "problem_mark", None)
        if start is not None and mark is not None and start.line != mark.line:
            context += f" that starts on line {start.line + 1}"
        problem += f" ({context})"
    return " ".join(problem.split())


def read_recipe(recipe: str | Path) -> dict[str, Any]:
    """A recipe YAML file as a mapping whose sections (`model:`, `train:`) are mappings themselves."""
    path = Path(recipe)
    if not path.is_file():
        raise ConfigError(f"recipe {str(path)!r} does not exist")
    try:
        doc = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:  # one line: file:line:column and yaml's own words, not a 60-line traceback
        raise ConfigError(f"recipe {yaml_error_location(path, exc)}: invalid YAML: {yaml_problem(exc)}") from None
    if not isinstance(doc, dict) or not all(isinstance(v, dict | None) for v in doc.values()):
        raise ConfigError(f"recipe {str(path)!r}: expected a mapping of sections ('model:', 'train:')")
    return doc


def load_config(preset: str | None = None, recipe: str | Path | None = None,
                overrides: list[str] | None = None) -> ModelConfig:
    """Build a config: preset, then the recipe's `model:` section, then `key=value` overrides.

    A recipe may name its own preset (`model: {preset: cpu-small, ...}`); an explicit `preset` argument wins.
    """
    data: dict[str, Any] = {}
    if recipe is not None:
        data = dict(read_recipe(recipe).get("model") or {})
        preset = preset or data.pop("preset", None)
        data.pop("preset", None)
        _reject_unknown(data)
    data.update(parse_overrides(overrides or []))
    return from_preset(preset or "cpu-small", **data)


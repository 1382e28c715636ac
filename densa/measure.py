"""The measurement core: what a forward costs and how well a model predicts held-out text.

Every figure densa reports about a model's cost or held-out quality comes from here — training validation, the
quickstart, the studies, `densa eval`, serve metering and the benches — so the figures are comparable.

**Cost.** `forward_flops_per_token(cfg, context, ffn_experts)`: the analytic forward FLOPs per token of
densa/counting.py at a context length, with each MoE layer's FFN costed at the experts its tokens actually used
(`ModelOutput.ffn_experts`, summed by an `ExpertMeter`) instead of the nominal budget. A dense FFN, or no routing
record, gives the analytic figure.

**Held-out quality.** Bits per byte under one windowing rule and one byte accounting:
- windowing: the token sequence is cut into windows of `window` + 1 tokens that overlap by one token, so every token
  but the first is predicted exactly once, from the tokens of its own window before it (context restarts at each
  window). A sample of windows (training validation) follows the same per-window rule.
- bytes: the UTF-8 bytes of the *predicted* tokens, from a per-token byte table (`token_byte_lengths`), so the
  figure is comparable across tokenizers and additive over windows. Special tokens count 0 bytes.
bits per byte = Σ −ln p(predicted tokens) / ln 2 / Σ their bytes.
Shape suffixes: N windows, W window length, L layers, B batch, T time.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm

from densa.config import ModelConfig
from densa.counting import ffn_flops_per_token, flops_per_token

# ------------------------------------------------------------------------------------------------------ cost


def forward_flops_per_token(cfg: ModelConfig, context: int, ffn_experts: Sequence[float] | None = None) -> float:
    """Forward FLOPs per token averaged over a sequence of `context` tokens, each layer's FFN costed at
    `ffn_experts[layer]` FFN experts per token (the mean its tokens used); None: the config's nominal budget."""
    analytic = flops_per_token(cfg, context).total
    if ffn_experts is None or cfg.ffn == "swiglu":
        return analytic
    L = cfg.num_hidden_layers
    if len(ffn_experts) != L:
        raise ValueError(f"ffn_experts has {len(ffn_experts)} entries; the model has {L} layers")
    nominal = ffn_flops_per_token(cfg)
    return analytic + sum(ffn_flops_per_token(cfg, float(e)) - nominal for e in ffn_experts)


@dataclass
class ExpertMeter:
    """Sums the FFN experts tokens used, per layer, over forwards (from `ModelOutput.ffn_experts`)."""

    sums_L: Tensor | None = None  # (layers,) float64 Σ over counted tokens
    tokens: int = 0

    def add(self, ffn_experts_LBT: Tensor | None, mask_BT: Tensor | None = None) -> None:
        """Count one forward's routing; `mask_BT` (True/1 = a real token) leaves padding out."""
        if ffn_experts_LBT is None:
            return
        used_LBT = ffn_experts_LBT.double()
        if mask_BT is not None:
            used_LBT = used_LBT * mask_BT.to(used_LBT)
        sums_L = used_LBT.sum((1, 2)).cpu()
        self.sums_L = sums_L if self.sums_L is None else self.sums_L + sums_L
        self.tokens += int(mask_BT.sum()) if mask_BT is not None else used_LBT[0].numel()

    def per_layer(self) -> list[float] | None:
        """Mean FFN experts per token in each layer; None when nothing was routed (a dense FFN)."""
        if self.sums_L is None or self.tokens == 0:
            return None
        return (self.sums_L / self.tokens).tolist()


def experts_per_row(ffn_experts_LBT: Tensor, mask_BT: Tensor | None = None) -> Tensor:
    """(B, layers) FFN experts each row used in each layer, summed over its (real) tokens."""
    used_LBT = ffn_experts_LBT.double()
    if mask_BT is not None:
        used_LBT = used_LBT * mask_BT.to(used_LBT)
    return used_LBT.sum(2).T


# ---------------------------------------------------------------------------------------------- bits per byte


def token_byte_lengths(tokenizer, vocab_size: int) -> Tensor:
    """(vocab_size,) UTF-8 bytes each token id stands for. Byte-level BPE (densa's tokenizer, GPT-2, SmolLM2): the
    token string's characters are bytes; special tokens and ids past the tokenizer: 0; other tokenizers: the bytes
    of the token decoded alone."""
    from tokenizers.pre_tokenizers import ByteLevel

    alphabet = set(ByteLevel.alphabet())
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    lengths = torch.zeros(vocab_size, dtype=torch.long)
    pieces = tokenizer.convert_ids_to_tokens(list(range(min(vocab_size, len(tokenizer)))))
    for i, piece in enumerate(pieces):
        if i in special or piece is None:
            continue
        if all(ch in alphabet for ch in piece):
            lengths[i] = len(piece)
        else:
            lengths[i] = len(tokenizer.decode([i]).encode("utf-8"))
    return lengths


def predicted_bytes(windows: Sequence[Tensor] | Tensor, token_bytes: Tensor) -> int:
    """UTF-8 bytes of the tokens the windows predict (each window's tokens after its first)."""
    rows = windows.unbind(0) if isinstance(windows, Tensor) else windows
    return sum(int(token_bytes[w[1:].cpu()].sum()) for w in rows)


def nats_to_bits_per_byte(nats: float, n_bytes: int) -> float:
    """Σ −ln p over predicted tokens → bits per byte of those tokens."""
    if n_bytes <= 0:
        raise ValueError("the predicted tokens cover 0 bytes (only special tokens?)")
    return nats / math.log(2) / n_bytes


def text_windows(ids: Sequence[int], window: int) -> list[Tensor]:
    """Windows of `window` + 1 tokens overlapping by one (the last may be shorter), each (length,), so every token
    but the first is predicted once."""
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    if len(ids) < 2:
        raise ValueError(f"need at least 2 tokens of text to predict one, got {len(ids)}")
    ids_T = torch.as_tensor(list(ids), dtype=torch.long)
    return [ids_T[s : s + window + 1] for s in range(0, len(ids_T) - 1, window)]


@dataclass
class TextScore:
    bpb: float  # bits per byte of the predicted tokens
    nats: float  # Σ −ln p over predicted tokens
    tokens: int  # predicted tokens
    bytes: int  # their UTF-8 bytes
    window: int  # the window (context) the text was scored at
    ffn_experts: list[float] | None = None  # mean FFN experts per token in each layer (None: dense FFN)
    flops_per_token: float = 0.0  # forward FLOPs per token at `window`, at the experts actually used
    extra: dict = field(default_factory=dict)

    @property
    def nats_per_token(self) -> float:
        return self.nats / max(self.tokens, 1)

    def as_dict(self) -> dict:
        return {"bpb": self.bpb, "nats_per_token": self.nats_per_token, "tokens": self.tokens, "bytes": self.bytes,
                "window": self.window, "ffn_experts": self.ffn_experts, "flops_per_token": self.flops_per_token}


@torch.inference_mode()
def bits_per_byte(model, windows: Sequence[Tensor] | Tensor, token_bytes: Tensor, *, batch: int = 8,
                  bf16: bool = False, progress: bool = False, desc: str = "bits/byte") -> TextScore:
    """Held-out bits per byte of `windows` (each a 1-D run of tokens: its first token is context only) under
    `model` (a DensaModel, eval mode for the call), with the FFN experts it used and the FLOPs that cost.
    Windows of equal length run `batch` at a time; `token_bytes` comes from `token_byte_lengths`."""
    rows = list(windows.unbind(0)) if isinstance(windows, Tensor) else list(windows)
    rows = [r for r in rows if len(r) >= 2]
    if not rows:
        raise ValueError("no window has 2 or more tokens: nothing to predict")
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    nats, tokens, n_bytes, meter = 0.0, 0, 0, ExpertMeter()
    groups: dict[int, list[Tensor]] = {}
    for r in rows:
        groups.setdefault(len(r), []).append(r)
    batches = [g[i : i + batch] for g in groups.values() for i in range(0, len(g), batch)]
    try:
        for group in tqdm(batches, desc=desc, unit="batch", disable=not progress, leave=False):
            ids_NW = torch.stack(group).to(device)
            with torch.autocast(device.type, torch.bfloat16, enabled=bf16):
                out = model(ids_NW[:, :-1])
            logits = out.logits.float().flatten(0, 1)  # (N·(W−1), vocab)
            nats += float(F.cross_entropy(logits, ids_NW[:, 1:].flatten(), reduction="sum"))
            tokens += ids_NW[:, 1:].numel()
            n_bytes += predicted_bytes(ids_NW, token_bytes)
            meter.add(out.ffn_experts)
    finally:
        model.train(was_training)
    window = max(len(r) for r in rows) - 1
    experts = meter.per_layer()
    return TextScore(bpb=nats_to_bits_per_byte(nats, n_bytes), nats=nats, tokens=tokens, bytes=n_bytes, window=window,
                     ffn_experts=experts,
                     flops_per_token=forward_flops_per_token(model.config, window, experts))


def heldout_bits_per_byte(model, tokenizer, text: str, window: int, **kwargs) -> TextScore:
    """`bits_per_byte` of `text`, tokenized with the model's own tokenizer (no special tokens added) and cut into
    windows of `window` + 1 tokens overlapping by one."""
    ids = tokenizer.encode(text, add_special_tokens=False)
    token_bytes = token_byte_lengths(tokenizer, model.config.vocab_size)
    return bits_per_byte(model, text_windows(ids, window), token_bytes, **kwargs)

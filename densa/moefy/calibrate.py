"""Calibration data for a conversion: token windows from a shipped corpus, and what each FFN sees on them.

The dense model is run once over the calibration windows; a pre-hook on every block's FFN keeps its input (the
post-attention-norm hidden state). Everything else the conversion needs (neuron activations, group norms, router
targets) is recomputed from those inputs one layer at a time, so the memory held is T × D per layer, not T × I.
Shape suffixes: N windows, L tokens per window, T = N·L tokens, D hidden, I FFN neurons.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm import tqdm

from densa.data.corpora import corpus_texts
from densa.model.layers import SwiGLU
from densa.model.model import DensaModel


def corpus_text(corpus: str, split: str, chars: int) -> str:
    """The first `chars` characters of a corpus split (documents joined by blank lines), a fixed, reproducible
    sample."""
    parts, n = [], 0
    for doc in corpus_texts(corpus, split):
        parts.append(doc[: chars - n])
        n += len(parts[-1]) + 2
        if n >= chars:
            break
    return "\n\n".join(parts)


def encode(tokenizer, text: str) -> list[int]:
    """Token ids of `text`: the model's tokenizer, or UTF-8 bytes when it has none (byte-level models)."""
    if tokenizer is None:
        return list(text.encode("utf-8"))
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def calibration_windows(tokenizer, corpus: str, tokens: int, seq_len: int, skip: int = 0) -> Tensor:
    """(N, L) windows covering at least `tokens` tokens of the corpus' training split, in order, after its first
    `skip` tokens (distillation reads the text after the calibration windows)."""
    ids: list[int] = []
    chars = 6 * (tokens + skip)
    while len(ids) < tokens + skip:
        text = corpus_text(corpus, "train", chars)
        ids = encode(tokenizer, text)
        if len(text) < chars:  # the whole corpus is in: use what there is
            break
        chars *= 2
    ids = ids[skip:]
    n = max(1, min(len(ids), tokens) // seq_len)
    if len(ids) < seq_len:
        raise ValueError(f"corpus {corpus!r} gave only {len(ids)} tokens after the first {skip}; need at least one "
                         f"window of {seq_len}")
    return torch.tensor(ids[: n * seq_len]).view(n, seq_len)


@torch.no_grad()
def ffn_inputs(model: DensaModel, windows_NL: Tensor, batch: int = 4, progress: bool = True) -> list[Tensor]:
    """Per block, the (T, D) inputs its FFN receives when the model reads `windows_NL`."""
    inputs: list[list[Tensor]] = [[] for _ in model.layers]
    hooks = [layer.mlp.register_forward_pre_hook(lambda _m, args, i=i: inputs[i].append(args[0].flatten(0, 1)))
             for i, layer in enumerate(model.layers)]
    try:
        model.eval()
        for start in tqdm(range(0, len(windows_NL), batch), desc="calibration pass", disable=not progress,
                          unit="batch"):
            model(windows_NL[start : start + batch])
    finally:
        for hook in hooks:
            hook.remove()
    return [torch.cat(chunks) for chunks in inputs]


def neuron_activations(mlp: SwiGLU, x_TD: Tensor) -> Tensor:
    """a = silu(gate(x)) * up(x), the (T, I) hidden activations of a dense SwiGLU (its output is down(a))."""
    return F.silu(mlp.gate_proj(x_TD)) * mlp.up_proj(x_TD)

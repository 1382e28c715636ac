"""The policy being tuned: a MODEL from the resolver, or a fresh densa model with a tokenizer trained on the task.

Chat turns end with ChatML's `<|im_end|>`, so that token is the tokenizer's EOS while tuning: generation stops on it,
and TRL masks everything after it. A fresh model's tokenizer is densa's byte-level BPE with one change for
arithmetic: digits are split one per token (as in Llama), so a number's tokens are its digits and a
sub-million-parameter model can learn the sums instead of memorising a table of multi-digit tokens.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

from densa.align.config import ModelSection
from densa.checkpoint import save_checkpoint
from densa.config import load_config
from densa.data.tokenizer import IM_END, train_tokenizer
from densa.model.model import DensaModel
from densa.resolve import resolve


def load_policy(section: ModelSection, texts: Iterable[str] = ()) -> tuple[DensaModel, Any]:
    """(model, tokenizer) in train mode; `texts` trains the tokenizer of a fresh model."""
    if section.path:
        resolved = resolve(section.path)
        if resolved.tokenizer is None:
            raise ValueError(f"{section.path}: has no tokenizer; SFT and RL need one (a folder with tokenizer.json)")
        model, tok = resolved.model, resolved.tokenizer
    else:
        tok = train_task_tokenizer(texts, section.tokenizer_vocab)
        init = dict(section.init)
        preset = init.pop("preset", "tiny")
        model = DensaModel(load_config(preset=preset, overrides=[f"{k}={v}" for k, v in init.items()] +
                                       [f"vocab_size={len(tok)}"]))
    chat_tokenizer(tok)
    return model.train(), tok


def train_task_tokenizer(texts: Iterable[str], vocab_size: int) -> Any:
    """densa's byte-level BPE with digits split one by one (arithmetic answers tokenize uniformly)."""
    return train_tokenizer(texts, vocab_size, individual_digits=True)


def chat_tokenizer(tok: Any) -> None:
    """Make `<|im_end|>` the EOS (ChatML turn end) and make sure there is a pad token; needs a chat template."""
    if not getattr(tok, "chat_template", None):
        raise ValueError("the tokenizer has no chat template; SFT and RL format turns with it")
    if IM_END in tok.get_vocab():
        tok.eos_token = IM_END
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"


def save_policy(model: DensaModel, tok: Any, out: str | Path) -> Path:
    """A densa checkpoint + tokenizer: a MODEL that every densa command (and `densa align`) accepts."""
    path = save_checkpoint(model, out, overwrite=True)
    tok.save_pretrained(str(path))
    return path

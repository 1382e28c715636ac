"""Byte-level BPE tokenizer trained with Hugging Face `tokenizers`, saved in the standard format
(`tokenizer.json` + `tokenizer_config.json`) so that `transformers.AutoTokenizer.from_pretrained(DIR)` loads it.

Byte-level pre-tokenisation with no normaliser makes encode → decode exact for any UTF-8 text.
Special tokens: `<|endoftext|>` (BOS and EOS, GPT-2 style), `<|pad|>`, and ChatML's `<|im_start|>` / `<|im_end|>`
with a ChatML chat template.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

EOS, PAD, IM_START, IM_END = "<|endoftext|>", "<|pad|>", "<|im_start|>", "<|im_end|>"
SPECIAL_TOKENS = [EOS, PAD, IM_START, IM_END]
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
MIN_VOCAB = 256 + len(SPECIAL_TOKENS)  # every byte plus the special tokens


def train_tokenizer(texts: Iterable[str], vocab_size: int, individual_digits: bool = False) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE of `vocab_size` entries (special tokens included) on `texts`. `individual_digits` splits
    numbers into single digits before BPE (arithmetic tasks: every number is spelled the same way)."""
    if vocab_size < MIN_VOCAB:
        raise ValueError(f"vocab_size={vocab_size}: must be >= {MIN_VOCAB} (256 bytes + {len(SPECIAL_TOKENS)} "
                         "special tokens)")
    tok = Tokenizer(models.BPE())
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.pre_tokenizer = (pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
                         if individual_digits else byte_level)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    return wrap(tok)


def wrap(tok: Tokenizer) -> PreTrainedTokenizerFast:
    """The transformers tokenizer around a `tokenizers.Tokenizer`, with densa's special tokens and chat template."""
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=EOS, eos_token=EOS, pad_token=PAD,
                                   unk_token=None, chat_template=CHAT_TEMPLATE, model_max_length=1 << 30,
                                   padding_side="left", clean_up_tokenization_spaces=False)


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerFast:
    """Load a tokenizer directory (densa's or any Hugging Face one) with AutoTokenizer, offline."""
    path = Path(path)
    if not (path / "tokenizer.json").is_file() and not (path / "tokenizer_config.json").is_file():
        raise FileNotFoundError(f"{path} holds no tokenizer (expected tokenizer.json / tokenizer_config.json)")
    return AutoTokenizer.from_pretrained(str(path), local_files_only=True)


@dataclass
class RoundTrip:
    documents: int
    bytes: int
    tokens: int
    mismatches: int  # documents whose decode(encode(text)) != text

    @property
    def bytes_per_token(self) -> float:
        return self.bytes / max(self.tokens, 1)


def check_round_trip(tokenizer: PreTrainedTokenizerFast, texts: Iterable[str], batch: int = 64) -> RoundTrip:
    """Encode and decode every text; count bytes, tokens and inexact round trips."""
    stats = RoundTrip(0, 0, 0, 0)
    pending: list[str] = []

    def flush() -> None:
        encodings = tokenizer.backend_tokenizer.encode_batch(pending, add_special_tokens=False)
        decoded = tokenizer.backend_tokenizer.decode_batch([e.ids for e in encodings], skip_special_tokens=False)
        for text, enc, back in zip(pending, encodings, decoded, strict=True):
            stats.documents += 1
            stats.bytes += len(text.encode("utf-8"))
            stats.tokens += len(enc.ids)
            stats.mismatches += back != text
        pending.clear()

    for text in texts:
        pending.append(text)
        if len(pending) == batch:
            flush()
    if pending:
        flush()
    return stats

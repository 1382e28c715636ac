"""A seeded generator of low-value noise mixed into real text, so the value of every character is known.

Rho-1 (docs/design-notes.md, 'Rho-1 selective language modelling') argues that a corpus holds tokens of very
different value: some are already learned or trivially learnable (boilerplate, repeats), some are unlearnable
(random strings, scrambled text), and only the rest are worth the gradient. `inject_noise` builds such a corpus
from clean documents with a known mix:

- every document d gets its own noise-to-clean ratio r_d ~ Uniform(0, 2·rate / (1 − rate)) (characters of noise per
  clean character), so the share of noise characters in the corpus is about `rate` (a little less: see the next
  point; `noise_share` measures it) while documents differ in value, which document-level scoring and the value
  curriculum need;
- noise is inserted as whole segments at random line boundaries of the document: segments are drawn while the
  document's remaining noise budget (r_d × its clean length, minus what was inserted) is at least half the next
  segment (so a short document is not swamped by one long segment); each segment's kind is drawn uniformly from
  `kinds`:

  - `boilerplate`: 1–3 lines from a fixed list of web/footer lines (a random page number in one): near-duplicates,
    learned at once (L→L in Rho-1's terms);
  - `random`: random lowercase/digit strings and hex ids, `segment_chars` long on average: unlearnable (H→H);
  - `repeat`: one line of the same document repeated 3–6 times: trivially predictable after the first copy;
  - `shuffle`: a span of the same document's words in random order: in-vocabulary but unpredictable order.

The same (documents, config) give the same output: one `random.Random(seed)` drives every choice, in document order.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

KINDS = ("boilerplate", "random", "repeat", "shuffle")
BOILERPLATE = (
    "Click here to subscribe to our newsletter and never miss a story!",
    "Copyright (c) All rights reserved. Terms of use | Privacy policy | Contact us",
    "Share this page: Facebook | Twitter | Email | Print",
    "Advertisement - continue reading below",
    "Posted by admin in Uncategorized | Leave a comment",
    "Home > Stories > Archive > Page {page}",
    "This website uses cookies to improve your experience. Accept | Reject",
    "Sign up for free today and get 20% off your first order.",
)
ALPHABET = "abcdefghijklmnopqrstuvwxyz0123456789"


@dataclass(kw_only=True)
class NoiseConfig:
    rate: float = 0.3  # expected share of noise characters in the corpus
    segment_chars: int = 160  # mean length of a `random` or `shuffle` segment
    kinds: tuple[str, ...] = KINDS
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0 <= self.rate < 1:
            raise ValueError(f"noise rate={self.rate}: must be in [0, 1)")
        unknown = sorted(set(self.kinds) - set(KINDS))
        if unknown or not self.kinds:
            raise ValueError(f"noise kinds {list(self.kinds)}: choose from {', '.join(KINDS)}")
        if self.segment_chars < 8:
            raise ValueError(f"noise segment_chars={self.segment_chars}: must be >= 8")


def noise_segment(kind: str, lines: list[str], rng: random.Random, segment_chars: int) -> str:
    """One noise segment of `kind` (ending in a newline); `lines` are the host document's lines."""
    if kind == "boilerplate":
        picked = [rng.choice(BOILERPLATE).format(page=rng.randint(1, 99)) for _ in range(rng.randint(1, 3))]
        return "\n".join(picked) + "\n"
    if kind == "random":
        words, size = [], 0
        target = rng.randint(segment_chars // 2, segment_chars * 3 // 2)
        while size < target:
            word = "".join(rng.choice(ALPHABET) for _ in range(rng.randint(2, 10)))
            word = f"0x{rng.getrandbits(32):08x}" if rng.random() < 0.2 else word
            words.append(word)
            size += len(word) + 1
        return " ".join(words) + "\n"
    text_lines = [line for line in lines if line.strip()] or ["..."]
    if kind == "repeat":
        line = rng.choice(text_lines).rstrip("\n")
        return "\n".join([line] * rng.randint(3, 6)) + "\n"
    words = " ".join(text_lines).split()  # shuffle: a span of the document's own words, reordered
    n = max(2, min(len(words), rng.randint(segment_chars // 10, segment_chars * 3 // 10)))
    start = rng.randint(0, max(0, len(words) - n))
    span = words[start:start + n]
    rng.shuffle(span)
    return " ".join(span) + "\n"


def inject_noise(docs: list[str], cfg: NoiseConfig) -> list[str]:
    """`docs` with noise segments inserted at line boundaries (module docstring); same inputs, same output."""
    return [text for text, _ in inject_noise_with_spans(docs, cfg)]


def inject_noise_with_spans(docs: list[str], cfg: NoiseConfig) -> list[tuple[str, list[tuple[int, int]]]]:
    """`inject_noise`, with the character spans [start, end) of each noisy document's noise segments."""
    rng = random.Random(cfg.seed)
    noisy = []
    for doc in docs:
        budget = rng.uniform(0, 2 * cfg.rate / (1 - cfg.rate)) * len(doc)
        lines = doc.splitlines(keepends=True)
        if budget > 0 and lines and not lines[-1].endswith("\n"):
            lines[-1] += "\n"  # so a segment inserted at the end starts on its own line
        inserts: list[tuple[int, str]] = []
        while budget > 0:
            segment = noise_segment(rng.choice(cfg.kinds), lines, rng, cfg.segment_chars)
            if len(segment) > 2 * budget:
                break
            inserts.append((rng.randint(0, len(lines)), segment))
            budget -= len(segment)
        pieces = [(line, False) for line in lines]  # (text, is noise)
        for position, segment in sorted(inserts, key=lambda x: x[0], reverse=True):
            pieces.insert(position, (segment, True))
        spans, offset = [], 0
        for text, is_noise in pieces:
            if is_noise:
                spans.append((offset, offset + len(text)))
            offset += len(text)
        noisy.append(("".join(text for text, _ in pieces), spans))
    return noisy


def noise_share(clean: list[str], noisy: list[str]) -> float:
    """Share of the noisy corpus' characters that are noise (everything not in the clean documents)."""
    total = sum(len(d) for d in noisy)
    return 1 - sum(len(d) for d in clean) / total if total else 0.0

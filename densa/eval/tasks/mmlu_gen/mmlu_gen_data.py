"""Generative MMLU: the data (the MMLU loader in ../local_data.py) and the answer-letter extraction.

lm-eval imports `!function` modules from the YAML's folder, by path; `densa.eval.tasks.mmlu_gen.mmlu_gen_data` is the
same file for tests.
"""

from __future__ import annotations

import re
from typing import Any

from densa.eval.tasks.local_data import mmlu  # noqa: F401

INVALID = "[invalid]"
# "The answer is (B)", "Answer: C", "**Answer:** D": the first explicit statement wins
STATED = re.compile(r"(?i:\banswer)(?:\s+is)?\s*:?\s*[\*\(\[]*\s*([ABCD])\b")
# otherwise a reply that starts with the letter alone: " B", "B.", "(C)", "**D**", "A) ...", "B\n..." (not the
# article in "A good question")
LEADING = re.compile(r"^\s*[\*\(\[]*([ABCD])(?:[.):,*\]]|[ \t]*$|[ \t]*\n)")


def extract_letter(text: str) -> str:
    """The answer letter of one generation ("A".."D"), or "[invalid]" when it names none."""
    for pattern in (STATED, LEADING):
        found = pattern.search(text)
        if found:
            return found.group(1)
    return INVALID


def extract_letters(resps: list[list[str]], docs: list[Any]) -> list[list[str]]:
    """lm-eval `custom` filter: every generation of every document -> its letter."""
    return [[extract_letter(text) for text in doc_resps] for doc_resps in resps]

"""Seeded arithmetic word problems (the token-value task) and GSM8K (the real task), as chat examples.

A problem is a short story about one person's stock of one item: a start count, then 1–4 operations (gains, losses,
doubling/tripling), 0–2 distractor sentences about someone else, and a question. The answer is an integer; the
reference reasoning ends with `#### ANSWER` like GSM8K. Numbers stay small (start 2–30, steps 1–15, ×2/×3 only
while the total is ≤ 50) so a model of under a million parameters can learn the task on a CPU in minutes.

Every problem has two correct targets that carry the *same* information:
- concise:  "12+7=19. 19-5=14. #### 14"
- verbose:  "Let me think step by step.", a restatement of the start, one sentence per step and a re-check of the
  last step, then the same "#### 14" (about 2.5x the tokens). The filler is removable without losing anything,
  which is what token-value RL is meant to remove.

Splits (fixed seeds, so every run sees the same items): `train` and `heldout` (1–3 operations, disjoint by
question text), `ood` (exactly 4 operations: one more step than training ever shows).
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass
from pathlib import Path

NAMES = ["Tom", "Ana", "Sam", "Mia", "Ben", "Eva", "Leo", "Ivy", "Max", "Zoe"]
ITEMS = ["apples", "coins", "books", "cards", "shells", "stamps", "pens", "marbles"]
GAIN = ["buys {n} more", "finds {n} more", "gets {n} more"]
LOSS = ["gives away {n}", "loses {n}", "sells {n}"]
SCALE = {2: "doubles them", 3: "triples them"}
SYMBOL = {"+": "+", "-": "-", "*": "*"}
SPLIT_SEEDS = {"train": 1, "heldout": 2, "ood": 3}
ANSWER = re.compile(r"####\s*(-?\d[\d,]*)")
SYSTEM_PROMPT = "Solve the problem. End with #### and the answer."


@dataclass(frozen=True)
class Problem:
    question: str
    answer: int
    steps: tuple[tuple[int, str, int, int], ...]  # (left, op, right, result) per operation
    person: str
    item: str

    def concise(self) -> str:
        return " ".join(f"{a}{SYMBOL[op]}{b}={r}." for a, op, b, r in self.steps) + f" #### {self.answer}"

    def verbose(self) -> str:
        p, item = self.person, self.item
        lines = [f"Let me think step by step. {p} starts with {self.steps[0][0]} {item}."]
        for a, op, b, r in self.steps:
            word = {"+": "adding", "-": "taking away", "*": "multiplying by"}[op]
            lines.append(f"Now {word} {b}: {a}{SYMBOL[op]}{b}={r}.")
        a, op, b, r = self.steps[-1]
        lines.append(f"Let me check: {a}{SYMBOL[op]}{b}={r}. Yes. #### {self.answer}")
        return " ".join(lines)


def make_problem(rng: random.Random, num_ops: int) -> Problem:
    """One problem with exactly `num_ops` operations and up to two distractor sentences."""
    person, other = rng.sample(NAMES, 2)
    item, other_item = rng.sample(ITEMS, 2)
    total = rng.randint(2, 30)
    sentences = [f"{person} has {total} {item}."]
    steps = []
    for _ in range(num_ops):
        kinds = ["+", "-"] + (["*"] if total <= 50 else [])
        op = rng.choice(kinds)
        if op == "-" and total < 2:
            op = "+"
        if op == "+":
            n = rng.randint(1, 15)
            new, text = total + n, rng.choice(GAIN).format(n=n)
        elif op == "-":
            n = rng.randint(1, min(15, total - 1))
            new, text = total - n, rng.choice(LOSS).format(n=n)
        else:
            n = rng.choice((2, 3)) if total <= 33 else 2
            new, text = total * n, SCALE[n]
        sentences.append(f"{person} {text}.")
        steps.append((total, op, n, new))
        total = new
    for _ in range(rng.randint(0, 2)):  # distractors: facts about someone else, never needed
        sentences.insert(rng.randint(1, len(sentences)), f"{other} has {rng.randint(2, 30)} {other_item}.")
    sentences.append(f"How many {item} does {person} have now?")
    return Problem(" ".join(sentences), total, tuple(steps), person, item)


def split(name: str, size: int, exclude: set[str] | frozenset[str] = frozenset()) -> list[Problem]:
    """`size` problems of split `name` (train/heldout: 1–3 operations; ood: 4), skipping questions in `exclude`."""
    if name not in SPLIT_SEEDS:
        raise ValueError(f"unknown split {name!r}; choose from {', '.join(SPLIT_SEEDS)}")
    rng = random.Random(SPLIT_SEEDS[name])
    out: list[Problem] = []
    seen = set(exclude)
    while len(out) < size:
        p = make_problem(rng, 4 if name == "ood" else rng.randint(1, 3))
        if p.question not in seen:
            seen.add(p.question)
            out.append(p)
    return out


def heldout_and_ood(heldout: int, ood: int) -> tuple[list[Problem], list[Problem]]:
    return split("heldout", heldout), split("ood", ood)


def train_split(size: int, heldout: int) -> list[Problem]:
    """Training problems, none of whose questions appear in the first `heldout` held-out problems."""
    return split("train", size, exclude={p.question for p in split("heldout", heldout)})


def extract_answer(text: str) -> int | None:
    """The integer after the last `####` (commas allowed), or None when there is none."""
    found = ANSWER.findall(text)
    if not found:
        return None
    try:
        return int(found[-1].replace(",", ""))
    except ValueError:
        return None


def messages(question: str, system: bool = True) -> list[dict[str, str]]:
    """The chat prompt of a question (system instruction + user turn)."""
    head = [{"role": "system", "content": SYSTEM_PROMPT}] if system else []
    return head + [{"role": "user", "content": question}]


def sft_examples(problems: list[Problem], verbose_fraction: float, seed: int) -> list[dict]:
    """Prompt/completion chat examples; a seeded `verbose_fraction` of targets are the verbose form. No system
    turn: the answer format is what SFT teaches, and a shorter prompt is cheaper to train and sample."""
    if not 0 <= verbose_fraction <= 1:
        raise ValueError(f"verbose_fraction={verbose_fraction}: must be in [0, 1]")
    rng = random.Random(seed)
    return [{"prompt": messages(p.question, system=False),
             "completion": [{"role": "assistant",
                             "content": p.verbose() if rng.random() < verbose_fraction else p.concise()}],
             "answer": p.answer} for p in problems]


def gsm8k(split_name: str, root: str | Path = "data/benchmarks/gsm8k") -> list[dict]:
    """GSM8K `train` or `test` (shipped under data/benchmarks/gsm8k) as prompt/completion chat examples; the
    calculator annotations `<<48/2=24>>` are removed from the reference reasoning."""
    path = Path(root) / f"{split_name}.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: GSM8K split {split_name!r} not found (expected data/benchmarks/gsm8k)")
    out = []
    for line in path.read_text().splitlines():
        row = json.loads(line)
        target = re.sub(r"<<[^>]*>>", "", row["answer"])
        answer = extract_answer(target)
        if answer is None:
            continue
        out.append({"prompt": messages(row["question"]), "completion": [{"role": "assistant", "content": target}],
                    "answer": answer})
    return out

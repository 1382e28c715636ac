"""The text of every benchmark item, in file order, for audits (densa audit contamination; docs/audit.md).

Item `i` of a task has the id `f"{task}/{i}"` (item_id), counting from 0 in the order of the shipped files under
`data/benchmarks/` (for MMLU: the test CSVs in file-name order, rows in file order). Each item is a list of text
segments: the parts a model could have memorised (question, choices, passage, reference answer), each as the data
file presents it (a question followed by its options, a context followed by one ending). An n-gram never spans two
segments, so none is made up by gluing parts that never appear together.
"""

from __future__ import annotations

import csv
import gzip
import json
from collections.abc import Callable, Iterator
from pathlib import Path

from densa.eval.humaneval import benchmarks_root


def item_id(task: str, index: int) -> str:
    """The id of item `index` (0-based, file order) of `task`, as audits and the eval report mark it."""
    return f"{task}/{index}"


def _jsonl(path: Path) -> Iterator[dict]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        for line in f:
            if line.strip():
                yield json.loads(line)


def mmlu() -> list[list[str]]:
    """Question followed by the four options (the CSVs have no header: question, A, B, C, D, answer letter)."""
    items = []
    for path in sorted((benchmarks_root() / "mmlu" / "test").glob("*_test.csv")):
        with open(path, newline="", encoding="utf-8") as f:
            items += [[" ".join(row[:5])] for row in csv.reader(f)]
    return items


def gsm8k() -> list[list[str]]:
    """Question followed by the reference solution (reasoning and `#### answer`)."""
    return [[f"{r['question']} {r['answer']}"] for r in _jsonl(benchmarks_root() / "gsm8k" / "test.jsonl")]


def humaneval() -> list[list[str]]:
    """Prompt (signature and docstring) followed by the canonical solution: one contiguous piece of code."""
    rows = _jsonl(benchmarks_root() / "humaneval" / "HumanEval.jsonl.gz")
    return [[r["prompt"] + r["canonical_solution"]] for r in rows]


def hellaswag() -> list[list[str]]:
    """The context followed by each of the four endings (the gold one is how the source text continues)."""
    rows = _jsonl(benchmarks_root() / "hellaswag" / "hellaswag_val.jsonl.gz")
    return [[f"{r['ctx']} {ending}" for ending in r["endings"]] for r in rows]


def _arc_layout(path: Path) -> list[list[str]]:
    """ARC and OpenBookQA JSONL: the question stem followed by the choices."""
    return [[" ".join([r["question"]["stem"], *(c["text"] for c in r["question"]["choices"])])] for r in _jsonl(path)]


def arc_easy() -> list[list[str]]:
    return _arc_layout(benchmarks_root() / "arc" / "ARC-Easy-Test.jsonl")


def arc_challenge() -> list[list[str]]:
    return _arc_layout(benchmarks_root() / "arc" / "ARC-Challenge-Test.jsonl")


def openbookqa() -> list[list[str]]:
    return _arc_layout(benchmarks_root() / "openbookqa" / "test.jsonl")


def piqa() -> list[list[str]]:
    """The goal followed by each solution."""
    return [[f"{r['goal']} {r['sol1']}", f"{r['goal']} {r['sol2']}"]
            for r in _jsonl(benchmarks_root() / "piqa" / "valid.jsonl")]


def winogrande() -> list[list[str]]:
    """The sentence with its blank filled by each option (as a text containing it would read)."""
    return [[r["sentence"].replace("_", r["option1"], 1), r["sentence"].replace("_", r["option2"], 1)]
            for r in _jsonl(benchmarks_root() / "winogrande" / "dev.jsonl")]


def boolq() -> list[list[str]]:
    """The Wikipedia passage; the question."""
    return [[r["passage"], r["question"]] for r in _jsonl(benchmarks_root() / "boolq" / "dev.jsonl.gz")]


LOADERS: dict[str, Callable[[], list[list[str]]]] = {
    "mmlu": mmlu, "gsm8k": gsm8k, "humaneval": humaneval, "hellaswag": hellaswag, "arc_easy": arc_easy,
    "arc_challenge": arc_challenge, "piqa": piqa, "winogrande": winogrande, "boolq": boolq, "openbookqa": openbookqa,
}
TASKS = tuple(LOADERS)


def item_texts(task: str) -> list[list[str]]:
    """The segments of every item of `task`, in item order."""
    if task not in LOADERS:
        raise ValueError(f"unknown task {task!r}; choose from {', '.join(TASKS)}")
    return LOADERS[task]()

"""Datasets for the local lm-eval task YAMLs in this folder, read from the files that ship in `data/benchmarks/`
and `data/corpora/` (never from a hub).

lm-eval calls these through `custom_dataset: !function local_data.NAME` with the YAML's `dataset_kwargs`; each
returns a `datasets.DatasetDict` whose rows have the field names of the Hugging Face dataset that lm-eval's own task
reads, so the YAMLs keep lm-eval's standard prompts unchanged. Prompt and scoring helpers that lm-eval ships for a
task (HellaSwag's preprocessing, WinoGrande's partial scoring, WikiText's detokenizer) are re-exported from lm-eval,
not re-implemented. `$DENSA_BENCHMARKS` overrides the benchmark folder.

lm-eval imports this file by path (not as `densa.eval.tasks.local_data`), so everything it needs is imported here.
"""

from __future__ import annotations

import csv
import gzip
import json
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import datasets
from lm_eval.tasks.hellaswag.utils import process_docs as hellaswag_process_docs
from lm_eval.tasks.wikitext.preprocess_wikitext import process_results as wikitext_process_results  # noqa: F401
from lm_eval.tasks.wikitext.preprocess_wikitext import wikitext_detokenizer  # noqa: F401
from lm_eval.tasks.winogrande.preprocess_winogrande import (  # noqa: F401
    doc_to_choice as winogrande_doc_to_choice,
)
from lm_eval.tasks.winogrande.preprocess_winogrande import doc_to_target as winogrande_doc_to_target  # noqa: F401
from lm_eval.tasks.winogrande.preprocess_winogrande import doc_to_text as winogrande_doc_to_text  # noqa: F401

datasets.disable_progress_bars()
REPO = Path(__file__).resolve().parents[3]
GUTENBERG_PASSAGE_CHARS = 2000  # bits-per-byte passages: long enough for context, short enough for small models


def benchmarks_root() -> Path:
    root = Path(os.environ.get("DENSA_BENCHMARKS") or REPO / "data" / "benchmarks")
    if not root.is_dir():
        raise FileNotFoundError(f"benchmark data not found at {root}; set DENSA_BENCHMARKS to data/benchmarks")
    return root


def corpora_root() -> Path:
    root = Path(os.environ.get("DENSA_DATA") or REPO / "data" / "corpora")
    if not root.is_dir():
        raise FileNotFoundError(f"corpora not found at {root}; set DENSA_DATA to data/corpora")
    return root


def _jsonl(path: Path) -> Iterator[dict[str, Any]]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        for line in f:
            if line.strip():
                yield json.loads(line)


def _dataset(splits: dict[str, list[dict[str, Any]]]) -> datasets.DatasetDict:
    return datasets.DatasetDict({name: datasets.Dataset.from_list(rows) for name, rows in splits.items()})


def _arc_layout(row: dict[str, Any]) -> dict[str, Any]:
    """ARC / OpenBookQA JSONL (question.stem, question.choices[]) -> the HF `ai2_arc` / `openbookqa` fields."""
    choices = row["question"]["choices"]
    return {"id": row["id"], "question": row["question"]["stem"], "question_stem": row["question"]["stem"],
            "choices": {"text": [c["text"] for c in choices], "label": [c["label"] for c in choices]},
            "answerKey": row["answerKey"]}


def arc(subset: str = "ARC-Easy", **_: Any) -> datasets.DatasetDict:
    folder = benchmarks_root() / "arc"
    return _dataset({split: [_arc_layout(r) for r in _jsonl(folder / f"{subset}-{name}.jsonl")]
                     for split, name in (("test", "Test"), ("validation", "Dev"), ("train", "Train"))})


def openbookqa(**_: Any) -> datasets.DatasetDict:
    return _dataset({"test": [_arc_layout(r) for r in _jsonl(benchmarks_root() / "openbookqa" / "test.jsonl")]})


def hellaswag(**_: Any) -> datasets.DatasetDict:
    """Rows already passed through lm-eval's HellaSwag `process_docs` (query/choices/gold): done once here, because
    lm-eval re-runs a YAML's `process_docs` on the whole split every time it builds requests."""
    rows = [{**r, "label": str(r["label"])} for r in _jsonl(benchmarks_root() / "hellaswag" / "hellaswag_val.jsonl.gz")]
    return datasets.DatasetDict({"validation": hellaswag_process_docs(datasets.Dataset.from_list(rows))})


def piqa(**_: Any) -> datasets.DatasetDict:
    folder = benchmarks_root() / "piqa"
    labels = (folder / "valid-labels.lst").read_text().split()
    rows = [{"goal": r["goal"], "sol1": r["sol1"], "sol2": r["sol2"], "label": int(label)}
            for r, label in zip(_jsonl(folder / "valid.jsonl"), labels, strict=True)]
    return _dataset({"validation": rows})


def winogrande(**_: Any) -> datasets.DatasetDict:
    return _dataset({"validation": list(_jsonl(benchmarks_root() / "winogrande" / "dev.jsonl"))})


def boolq(**_: Any) -> datasets.DatasetDict:
    """SuperGLUE layout: label 1 = yes (True), 0 = no, as lm-eval's `boolq` expects."""
    rows = [{"question": r["question"], "passage": r["passage"], "label": int(r["answer"])}
            for r in _jsonl(benchmarks_root() / "boolq" / "dev.jsonl.gz")]
    return _dataset({"validation": rows})


def gsm8k(**_: Any) -> datasets.DatasetDict:
    folder = benchmarks_root() / "gsm8k"
    return _dataset({"train": list(_jsonl(folder / "train.jsonl")), "test": list(_jsonl(folder / "test.jsonl"))})


def mmlu(subject: str = "abstract_algebra", **_: Any) -> datasets.DatasetDict:
    """One subject's dev (few-shot) and test CSVs. The CSVs have no header; csv keeps `None`/`NA` answers as text
    (pandas would turn 10 test options into NaN)."""
    folder = benchmarks_root() / "mmlu"

    def read(path: Path) -> list[dict[str, str]]:
        with open(path, newline="", encoding="utf-8") as f:
            return [dict(zip(("question", "A", "B", "C", "D", "answer"), row, strict=True)) for row in csv.reader(f)]

    return _dataset({"test": read(folder / "test" / f"{subject}_test.csv"),
                     "dev": read(folder / "dev" / f"{subject}_dev.csv")})


def mmlu_subjects() -> list[str]:
    return sorted(p.name.removesuffix("_test.csv") for p in (benchmarks_root() / "mmlu" / "test").glob("*_test.csv"))


def wikitext2(**_: Any) -> datasets.DatasetDict:
    """WikiText-2 (raw) test split as documents, split at top-level headings (` = Title = `) like the
    `EleutherAI/wikitext_document_level` dataset that lm-eval's `wikitext` task reads."""
    text = (corpora_root() / "wikitext2" / "wiki.test.raw").read_text(encoding="utf-8")
    starts = [m.start() for m in re.finditer(r"^ = [^=].* = \n", text, flags=re.MULTILINE)]
    pages = [text[a:b] for a, b in zip(starts, [*starts[1:], len(text)], strict=True)]
    return _dataset({"test": [{"page": page} for page in pages]})


def gutenberg_valid(**_: Any) -> datasets.DatasetDict:
    """The held-out Gutenberg books (the pretraining corpus's validation split), cut into consecutive passages of
    about 2,000 characters at line breaks."""
    pages = []
    for book in _jsonl(corpora_root() / "gutenberg" / "valid.jsonl.gz"):
        text, start = book["text"], 0
        while start < len(text):
            end = text.find("\n", start + GUTENBERG_PASSAGE_CHARS)
            end = len(text) if end < 0 else end + 1
            if text[start:end].strip():
                pages.append({"page": text[start:end], "title": book["title"]})
            start = end
    return _dataset({"test": pages})


def gutenberg_process_results(doc: dict[str, Any], results: list[float]) -> dict[str, Any]:
    """Like lm-eval's wikitext metrics, over the passage as scored (no detokenisation here)."""
    (loglikelihood,) = results
    n_bytes = len(doc["page"].encode("utf-8"))
    return {"byte_perplexity": (loglikelihood, n_bytes), "bits_per_byte": (loglikelihood, n_bytes)}


def humaneval(plus: bool = False, **_: Any) -> datasets.DatasetDict:
    from densa.eval.humaneval import load_problems

    return _dataset({"test": load_problems(plus=plus)})


def humaneval_process_results(doc: dict[str, Any], results: list[str]) -> dict[str, float]:
    """pass@1 of one greedy completion, run in densa's process-isolated executor (densa/eval/humaneval.py)."""
    from densa.eval.humaneval import score

    return {"pass@1": float(score([doc], [results[0]])[0])}

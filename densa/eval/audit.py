"""`densa audit contamination`: n-gram overlap of benchmark items with a training corpus (docs/audit.md).

The GPT-3 / lm-evaluation-harness test (Brown et al. 2020, Appendix C; lm_eval/decontamination): text is normalised
(lowercased, punctuation deleted) and split on whitespace; an item is flagged when any of its 13-grams occurs
anywhere in the corpus. Normalisation is lm-eval's Janitor rule extended to Unicode: every Unicode punctuation
character and every ASCII one lm-eval deletes (string.punctuation, which includes symbols like `$` and `+`) is
deleted, and letters are lowercased with str.lower(); on ASCII text it is exactly lm-eval's (tested).

Memory: the benchmark side is small (a few million n-grams), so its n-grams are hashed into one sorted int64 array;
the corpus is streamed one document at a time and each document's n-gram hashes are looked up in it (binary search).
Python's 64-bit tuple hash stands in for the n-gram, so a false match needs a 64-bit collision (about 1e-6 for the
whole Gutenberg audit). `contamination_reference` is the plain version (sets of n-gram strings) the tests compare
against.
"""

from __future__ import annotations

import argparse
import json
import string
import time
import unicodedata
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from densa.data.corpora import corpus_texts
from densa.eval.items import TASKS, item_id, item_texts


class _DeletePunctuation(dict):
    """A str.translate table that deletes punctuation, filled in as characters are met (a table over all 1.1 M
    code points would take seconds to build)."""

    def __missing__(self, codepoint: int) -> int | None:
        char = chr(codepoint)
        deleted = char in string.punctuation or unicodedata.category(char).startswith("P")
        self[codepoint] = None if deleted else codepoint
        return self[codepoint]


DELETE_PUNCTUATION = _DeletePunctuation()


def normalize(text: str) -> list[str]:
    """Lowercased, punctuation-deleted, whitespace-split tokens."""
    return text.lower().translate(DELETE_PUNCTUATION).split()


def ngram_hashes(tokens: list[str], n: int) -> np.ndarray:
    """int64 hash of every n-gram (as a tuple of tokens) of one token sequence, in order."""
    count = max(0, len(tokens) - n + 1)
    shifted = [tokens[k:] for k in range(n)]  # zip(*shifted) yields the n-grams as tuples, the shortest list ends it
    return np.fromiter(map(hash, zip(*shifted, strict=False)), dtype=np.int64, count=count)


def contamination(corpus: str, tasks: list[str], n: int = 13, *, progress: bool = False) -> dict[str, dict]:
    """task -> {"rate", "flagged" (item ids), "n_items", "n_too_short", "matches" (flagged id -> its first n-gram
    found in the corpus, normalised)} for `corpus` (an embedded corpus name or a path; see densa.data.corpora)."""
    return audit(corpus, tasks, n, progress=progress)["tasks"]


def audit(corpus: str, tasks: list[str], n: int = 13, *, progress: bool = False) -> dict:
    """contamination() plus what the report records about the run (corpus size, time)."""
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise ValueError(f"unknown task {unknown[0]!r}; choose from {', '.join(TASKS)}")
    if not tasks:
        raise ValueError(f"no tasks given; choose from {', '.join(TASKS)}")
    if n < 1:
        raise ValueError(f"--n {n}: the n-gram length must be >= 1")
    start = time.perf_counter()
    items = {task: item_texts(task) for task in tasks}
    # hashes of each item's n-grams, segment by segment (n-grams never span two segments)
    item_hashes = {task: [np.concatenate([ngram_hashes(normalize(s), n) for s in segments])
                          for segments in task_items] for task, task_items in items.items()}
    benchmark = np.unique(np.concatenate([h for hashes in item_hashes.values() for h in hashes]))
    matched, documents, corpus_ngrams = _scan(corpus_texts(corpus), benchmark, n, progress)
    results, matched_set = {}, set(matched.tolist())
    for task, hashes in item_hashes.items():
        flagged = [i for i, h in enumerate(hashes) if np.isin(h, matched).any()]
        results[task] = {"rate": len(flagged) / len(hashes), "flagged": [item_id(task, i) for i in flagged],
                         "n_items": len(hashes), "n_too_short": sum(len(h) == 0 for h in hashes),
                         "matches": {item_id(task, i): _first_match(items[task][i], n, matched_set)
                                     for i in flagged}}
    return {"corpus": corpus, "n": n, "corpus_documents": documents, "corpus_ngrams": corpus_ngrams,
            "benchmark_ngrams": len(benchmark), "seconds": round(time.perf_counter() - start, 1), "tasks": results}


def _scan(documents: Iterable[str], benchmark: np.ndarray, n: int, progress: bool) -> tuple[np.ndarray, int, int]:
    """Stream the corpus; the sorted hashes of benchmark n-grams that occur in it, documents and n-grams read."""
    from tqdm import tqdm

    matched: set[int] = set()
    count = total = 0
    with tqdm(desc="corpus", unit="char", unit_scale=True, disable=not progress) as bar:
        for text in documents:
            hashes = ngram_hashes(normalize(text), n)
            if len(benchmark) and len(hashes):
                where = np.minimum(np.searchsorted(benchmark, hashes), len(benchmark) - 1)
                matched.update(hashes[benchmark[where] == hashes].tolist())
            count, total = count + 1, total + len(hashes)
            bar.update(len(text))
    return np.array(sorted(matched), dtype=np.int64), count, total


def _first_match(segments: list[str], n: int, matched: set[int]) -> str:
    for segment in segments:
        tokens = normalize(segment)
        for i, h in enumerate(ngram_hashes(tokens, n).tolist()):
            if h in matched:
                return " ".join(tokens[i:i + n])
    return ""


def contamination_reference(documents: Iterable[str], items: dict[str, list[list[str]]], n: int) -> dict[str, list]:
    """The plain algorithm: every corpus n-gram as a string in one set; task -> flagged item indices."""
    corpus_ngrams = set()
    for text in documents:
        tokens = normalize(text)
        corpus_ngrams.update(" ".join(tokens[i:i + n]) for i in range(len(tokens) - n + 1))
    flagged = {}
    for task, task_items in items.items():
        flagged[task] = [i for i, segments in enumerate(task_items)
                         if any(" ".join(t[j:j + n]) in corpus_ngrams
                                for t in map(normalize, segments) for j in range(len(t) - n + 1))]
    return flagged


def markdown(report: dict) -> str:
    n = report["n"]
    lines = [f"# {n}-gram contamination: `{report['corpus']}`", "",
             f"{report['corpus_documents']:,} corpus documents, {report['corpus_ngrams']:,} corpus {n}-grams, "
             f"{report['benchmark_ngrams']:,} distinct benchmark {n}-grams; {report['seconds']} s.", "",
             "| task | items | flagged | rate | too short to check | example (first matching n-gram) |",
             "|---|---:|---:|---:|---:|---|"]
    for task, r in report["tasks"].items():
        example = next((f"`{i}`: {ngram}" for i, ngram in r["matches"].items()), "")
        lines.append(f"| {task} | {r['n_items']:,} | {len(r['flagged']):,} | {r['rate']:.2%} | {r['n_too_short']:,} "
                     f"| {example} |")
    return "\n".join(lines) + "\n"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("kind", choices=["contamination"], metavar="contamination",
                        help="the audit to run: contamination = n-gram overlap of benchmark items with a corpus")
    parser.add_argument("--corpus", required=True, metavar="C",
                        help="training corpus: an embedded name (gutenberg, tinystories, tinyshakespeare, wikitext2) "
                             "or a .txt / .jsonl[.gz] file or a directory of them")
    parser.add_argument("--tasks", default=",".join(TASKS), metavar="T", help="comma-separated benchmark tasks")
    parser.add_argument("--n", type=int, default=13, help="n-gram length in words (13: GPT-3 / lm-eval)")
    parser.add_argument("--json", metavar="FILE", help="write the full results (flagged item ids) as JSON")
    parser.add_argument("--out", metavar="DIR", help="write DIR/contamination.json and DIR/contamination.md")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def main(args: argparse.Namespace) -> None:
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    report = {"audit": "contamination", **audit(args.corpus, tasks, args.n, progress=not args.no_progress)}
    text = json.dumps(report, indent=1)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(text + "\n")
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "contamination.json").write_text(text + "\n")
        (out / "contamination.md").write_text(markdown(report))
    print(markdown(report), end="")

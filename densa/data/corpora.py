"""Reading text: the embedded corpora under `data/corpora/` by name, or any .txt / .jsonl / .gz file or directory.

A *document* is one JSON line's `text` field, or one whole .txt file.
"""

from __future__ import annotations

import gzip
import json
import os
from collections.abc import Iterator
from pathlib import Path

# name -> (folder under data/corpora, training files glob, held-out files glob)
EMBEDDED: dict[str, tuple[str, str, str | None]] = {
    "gutenberg": ("gutenberg", "train-*.jsonl.gz", "valid.jsonl.gz"),
    "tinyshakespeare": ("tinyshakespeare", "input.txt", None),
    "tinystories": ("tinystories", "tinystories_val_sample.txt", None),
    "wikitext2": ("wikitext2", "wiki.test.raw", None),
}
SUFFIXES = (".txt", ".raw", ".jsonl", ".txt.gz", ".jsonl.gz")


def corpora_root() -> Path:
    """`$DENSA_DATA` if set, else the repository's `data/corpora` (an editable install keeps it beside the code)."""
    root = Path(os.environ.get("DENSA_DATA") or Path(__file__).resolve().parents[2] / "data" / "corpora")
    if not root.is_dir():
        raise FileNotFoundError(f"embedded corpora not found at {root}; set DENSA_DATA to the data/corpora folder")
    return root


def corpus_files(corpus: str, split: str = "train") -> list[Path]:
    """Files of an embedded corpus (split "train" or "valid") or of a path (file, or directory searched for text)."""
    if corpus in EMBEDDED:
        folder, train_glob, valid_glob = EMBEDDED[corpus]
        pattern = train_glob if split == "train" else valid_glob
        if pattern is None:
            raise ValueError(f"corpus {corpus!r} has no held-out split")
        return sorted((corpora_root() / folder).glob(pattern))
    path = Path(corpus)
    if path.is_file():
        return [path]
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.name.endswith(SUFFIXES))
        if not files:
            raise ValueError(f"{path}: no {', '.join(SUFFIXES)} files inside")
        return files
    raise FileNotFoundError(f"corpus {corpus!r} is neither an embedded corpus ({', '.join(EMBEDDED)}) nor a path")


def read_documents(path: Path) -> Iterator[str]:
    """Documents of one file: its JSON lines' `text` fields, or the whole text file."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        if ".jsonl" in path.suffixes:
            for i, line in enumerate(f, 1):
                if line.strip():
                    record = json.loads(line)
                    if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                        raise ValueError(f"{path}:{i}: expected a JSON object with a string field 'text'")
                    yield record["text"]
        else:
            yield f.read()


def corpus_texts(corpus: str, split: str = "train") -> Iterator[str]:
    """Every document of a corpus, in a fixed order."""
    for path in corpus_files(corpus, split):
        yield from read_documents(path)

"""`densa prepare`: text -> memory-mapped token shards with a train/validation split and a manifest.

Output folder:
    train-00000.bin ...   raw little-endian token ids (uint16 when the vocabulary fits, else uint32)
    valid-00000.bin ...
    tokenizer/            a copy of the tokenizer files used
    manifest.json         written last: files, sha256, token/document/byte counts, tokenizer hash, split rule
    train-00000.refloss.bin ...  with `--reference MODEL` only: the reference model's float16 loss of every train
                          token, and a `reference` manifest section (densa/data/reference.py)

Every document is followed by the EOS token. The same inputs give byte-identical output (no timestamps, fixed order).

Split rule, in order of preference:
1. an embedded corpus with its own held-out files (`EMBEDDED[name][2]`) uses them for validation;
2. a corpus of >= MIN_DOCS_FOR_DOC_SPLIT documents holds out whole documents: those whose sha256(text) falls in
   the lowest `valid_fraction` of the hash space (content-based, so it does not depend on document order);
3. a corpus of fewer documents (e.g. one big .txt file) holds out the last `valid_fraction` of each document, cut at a
   line break.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np

from densa.data.corpora import EMBEDDED, corpus_texts
from densa.data.tokenizer import load_tokenizer

MANIFEST = "manifest.json"
FORMAT = "densa-tokens-v1"
MIN_DOCS_FOR_DOC_SPLIT = 20
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def split_documents(corpus: str, valid_fraction: float, max_docs: int | None) -> tuple[list[str], list[str], str]:
    """(train documents, validation documents, a one-line description of the rule used)."""
    if corpus in EMBEDDED and EMBEDDED[corpus][2] is not None:
        train = list(_take(corpus_texts(corpus, "train"), max_docs))
        valid = list(_take(corpus_texts(corpus, "valid"), max_docs))
        return train, valid, f"the corpus' own held-out files ({EMBEDDED[corpus][2]})"
    docs = list(_take(corpus_texts(corpus, "train"), max_docs))
    if len(docs) >= MIN_DOCS_FOR_DOC_SPLIT:
        cut = int(valid_fraction * 2**32)
        is_valid = [int.from_bytes(hashlib.sha256(d.encode()).digest()[:4], "big") < cut for d in docs]
        train = [d for d, v in zip(docs, is_valid, strict=True) if not v]
        valid = [d for d, v in zip(docs, is_valid, strict=True) if v]
        return train, valid, f"whole documents with sha256(text) in the lowest {valid_fraction:g} of the hash space"
    train, valid = [], []
    for doc in docs:
        cut = doc.rfind("\n", 0, int(len(doc) * (1 - valid_fraction)))
        cut = cut + 1 if cut > 0 else int(len(doc) * (1 - valid_fraction))
        train.append(doc[:cut])
        valid.append(doc[cut:])
    return train, valid, f"the last {valid_fraction:g} of each document, cut at a line break (fewer than " \
        f"{MIN_DOCS_FOR_DOC_SPLIT} documents)"


def _take(docs: Iterator[str], n: int | None) -> Iterator[str]:
    for i, doc in enumerate(docs):
        if n is not None and i >= n:
            return
        yield doc


def write_split(docs: Iterable[str], tokenizer, eos_id: int, dtype: np.dtype, out: Path, name: str,
                shard_tokens: int, batch: int = 256) -> dict:
    """Tokenize `docs` (each followed by EOS) into `name-00000.bin`, ... of at most `shard_tokens` tokens."""
    files: list[dict] = []
    buffer: list[np.ndarray] = []
    buffered = documents = n_bytes = 0

    def flush(final: bool) -> None:
        nonlocal buffer, buffered
        while buffered >= shard_tokens or (final and buffered):
            tokens = np.concatenate(buffer)
            shard, rest = tokens[:shard_tokens], tokens[shard_tokens:]
            path = out / f"{name}-{len(files):05d}.bin"
            shard.tofile(path)
            files.append({"name": path.name, "tokens": int(shard.size), "sha256": sha256_file(path)})
            buffer, buffered = ([rest] if rest.size else []), int(rest.size)

    docs = list(docs)
    for start in range(0, len(docs), batch):
        chunk = [d for d in docs[start:start + batch] if d]
        for enc in tokenizer.backend_tokenizer.encode_batch(chunk, add_special_tokens=False):
            ids = np.asarray(enc.ids + [eos_id], dtype=dtype)
            buffer.append(ids)
            buffered += ids.size
        documents += len(chunk)
        n_bytes += sum(len(d.encode("utf-8")) for d in chunk)
        flush(final=False)
    flush(final=True)
    return {"files": files, "documents": documents, "tokens": sum(f["tokens"] for f in files), "bytes": n_bytes}


def prepare(corpus: str, tokenizer_dir: str | Path, out: str | Path, valid_fraction: float = 0.05,
            max_docs: int | None = None, shard_tokens: int = 1 << 26) -> dict:
    """Tokenize `corpus` into shards under `out`; returns the manifest (also written to `out/manifest.json`)."""
    if not 0 < valid_fraction < 1:
        raise ValueError(f"--valid-fraction={valid_fraction}: must be in (0, 1)")
    if shard_tokens < 1:
        raise ValueError(f"--shard-tokens={shard_tokens}: must be >= 1")
    train, valid, rule = split_documents(corpus, valid_fraction, max_docs)
    return prepare_documents(train, valid, tokenizer_dir, out, corpus, rule, shard_tokens)


def prepare_documents(train: list[str], valid: list[str], tokenizer_dir: str | Path, out: str | Path, corpus: str,
                      rule: str, shard_tokens: int = 1 << 26) -> dict:
    """Tokenize already split documents into shards under `out` (what `prepare` does after splitting; studies call it
    directly to hold out text of their own choosing, e.g. clean validation text for a noise-injected corpus)."""
    tokenizer_dir = Path(tokenizer_dir)
    tokenizer = load_tokenizer(tokenizer_dir)
    if tokenizer.eos_token_id is None:
        raise ValueError(f"tokenizer {tokenizer_dir} has no EOS token")
    vocab = len(tokenizer)
    dtype = np.dtype(np.uint16 if vocab <= 1 << 16 else np.uint32)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / MANIFEST).unlink(missing_ok=True)  # a folder without a manifest is never taken as prepared
    for old in list(out.glob("train-*.bin")) + list(out.glob("valid-*.bin")):  # also stale *.refloss.bin
        old.unlink()
    if not any(train) or not any(valid):
        raise ValueError(f"corpus {corpus!r}: the split left no training or no validation text")
    (out / "tokenizer").mkdir(exist_ok=True)
    for name in TOKENIZER_FILES:
        if (tokenizer_dir / name).is_file():
            shutil.copyfile(tokenizer_dir / name, out / "tokenizer" / name)
    tok_file = tokenizer_dir / "tokenizer.json"
    manifest = {
        "format": FORMAT,
        "corpus": corpus,
        "split_rule": rule,
        "dtype": dtype.name,
        "vocab_size": vocab,
        "eos_id": int(tokenizer.eos_token_id),
        "tokenizer": {"sha256": sha256_file(tok_file) if tok_file.is_file() else None, "copy": "tokenizer"},
        "splits": {
            "train": write_split(train, tokenizer, tokenizer.eos_token_id, dtype, out, "train", shard_tokens),
            "valid": write_split(valid, tokenizer, tokenizer.eos_token_id, dtype, out, "valid", shard_tokens),
        },
    }
    write_manifest(out, manifest)
    return manifest


def write_manifest(out: Path, manifest: dict) -> None:
    """Write `out/manifest.json` atomically (temporary file, then rename)."""
    tmp = out / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2) + "\n")
    tmp.replace(out / MANIFEST)


def load_manifest(data_dir: str | Path) -> dict:
    """The manifest of a prepared folder, with a clear error when it is missing or of another format."""
    path = Path(data_dir) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{data_dir}: no {MANIFEST}; create it with `densa prepare --corpus C --tokenizer "
                                f"DIR --out {data_dir}`")
    manifest = json.loads(path.read_text())
    if manifest.get("format") != FORMAT:
        raise ValueError(f"{path}: format {manifest.get('format')!r}, expected {FORMAT!r}")
    return manifest

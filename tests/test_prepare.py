"""`densa prepare` and the pretraining loader: shards, split, manifest, determinism, resumable batches."""

import json

import numpy as np
import pytest
import torch

from densa.cli import main as cli_main
from densa.data.corpora import corpus_texts
from densa.data.prepare import load_manifest, prepare, sha256_file
from densa.data.pretrain import PretrainLoader, TokenStream, eval_batches
from densa.data.tokenizer import load_tokenizer, train_tokenizer


def make_corpus(root, n_docs=40):
    """A jsonl corpus of `n_docs` documents cut from tiny-shakespeare."""
    text = next(corpus_texts("tinyshakespeare"))[:120_000]
    step = len(text) // n_docs
    path = root / "corpus.jsonl"
    path.write_text("".join(json.dumps({"text": text[i * step:(i + 1) * step]}) + "\n" for i in range(n_docs)))
    return path


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    root = tmp_path_factory.mktemp("prep")
    corpus = make_corpus(root)
    train_tokenizer(corpus_texts(str(corpus)), 300).save_pretrained(str(root / "tok"))
    prepare(str(corpus), root / "tok", root / "data", shard_tokens=20_000)
    return root


def test_manifest_counts_split_and_eos(prepared):
    manifest = load_manifest(prepared / "data")
    tok = load_tokenizer(prepared / "tok")
    assert manifest["dtype"] == "uint16" and manifest["vocab_size"] == len(tok) == 300
    train, valid = manifest["splits"]["train"], manifest["splits"]["valid"]
    assert train["documents"] + valid["documents"] == 40 and valid["documents"] >= 1
    assert "sha256" in manifest["split_rule"]
    assert len(train["files"]) > 1  # sharded at 20k tokens
    for split in (train, valid):
        for f in split["files"]:
            assert sha256_file(prepared / "data" / f["name"]) == f["sha256"]
        stream = TokenStream(prepared / "data", "valid" if split is valid else "train")
        assert stream.tokens == split["tokens"] == sum(f["tokens"] for f in split["files"])
        tokens = stream.read(0, stream.tokens)
        assert (tokens == manifest["eos_id"]).sum() == split["documents"]  # one EOS after each document
        assert tokens[-1] == manifest["eos_id"]
    # decoding the validation stream gives back whole held-out documents, and the byte count matches
    valid_text = tok.decode(TokenStream(prepared / "data", "valid").read(0, valid["tokens"]).tolist())
    docs = [d for d in valid_text.split("<|endoftext|>") if d]
    assert sum(len(d.encode()) for d in docs) == valid["bytes"]
    assert (prepared / "data" / "tokenizer" / "tokenizer.json").is_file()


def test_prepare_is_deterministic(prepared, tmp_path):
    prepare(str(prepared / "corpus.jsonl"), prepared / "tok", tmp_path / "again", shard_tokens=20_000)
    names = sorted(p.name for p in (prepared / "data").iterdir() if p.is_file())
    assert names == sorted(p.name for p in (tmp_path / "again").iterdir() if p.is_file())
    for name in names:
        assert (prepared / "data" / name).read_bytes() == (tmp_path / "again" / name).read_bytes(), name


def test_single_document_is_split_at_its_tail(prepared, tmp_path):
    doc = tmp_path / "one.txt"
    doc.write_text("".join(f"line {i} of the only document\n" for i in range(400)))
    manifest = prepare(str(doc), prepared / "tok", tmp_path / "data", valid_fraction=0.1)
    assert "last 0.1" in manifest["split_rule"]
    tok = load_tokenizer(prepared / "tok")
    valid = tok.decode(TokenStream(tmp_path / "data", "valid").read(0, manifest["splits"]["valid"]["tokens"]))
    assert valid.startswith("line 36") and valid.endswith("line 399 of the only document\n<|endoftext|>")


def test_loader_is_seeded_and_resumable(prepared):
    data = prepared / "data"
    a = PretrainLoader(data, "train", batch_size=3, context=16, seed=1)
    batches = [a.next_batch() for _ in range(4)]
    assert batches[0].shape == (3, 17) and batches[0].dtype == torch.int64
    b = PretrainLoader(data, "train", batch_size=3, context=16, seed=1)
    b.load_state_dict({"index": 2})
    torch.testing.assert_close(b.next_batch(), batches[2], atol=0, rtol=0)
    assert not torch.equal(PretrainLoader(data, "train", 3, 16, seed=2).next_batch(), batches[0])
    seq = PretrainLoader(data, "train", 2, 16, mode="sequential")
    stream = seq.stream.read(0, 4 * 17)
    torch.testing.assert_close(seq.next_batch(), torch.from_numpy(stream[:34].reshape(2, 17)), atol=0, rtol=0)
    torch.testing.assert_close(seq.next_batch(), torch.from_numpy(stream[34:].reshape(2, 17)), atol=0, rtol=0)
    assert all(b.shape == (3, 17) for b in eval_batches(data, 3, 16, max_batches=2))


def test_window_spans_shard_boundary(prepared):
    stream = TokenStream(prepared / "data", "train")
    first = int(stream.starts[1])
    joined = np.concatenate([stream.arrays[0][-5:], stream.arrays[1][:5]]).astype(np.int64)
    np.testing.assert_array_equal(stream.read(first - 5, 10), joined)


def test_cli_prepare_and_errors(prepared, tmp_path, capsys):
    assert cli_main(["prepare", "--corpus", str(prepared / "corpus.jsonl"), "--tokenizer", str(prepared / "tok"),
                     "--out", str(tmp_path / "d")]) == 0
    assert "manifest.json" in capsys.readouterr().out
    assert cli_main(["prepare", "--corpus", "no-such-corpus", "--tokenizer", str(prepared / "tok"),
                     "--out", str(tmp_path / "e")]) == 1
    assert "no-such-corpus" in capsys.readouterr().err
    with pytest.raises(FileNotFoundError, match="densa prepare"):
        load_manifest(tmp_path / "nothing")

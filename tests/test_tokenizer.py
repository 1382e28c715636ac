import itertools
import json

import pytest

from densa.cli import main
from densa.data.corpora import EMBEDDED, corpus_files, corpus_texts
from densa.data.tokenizer import MIN_VOCAB, check_round_trip, load_tokenizer, train_tokenizer


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    text = next(corpus_texts("tinyshakespeare"))[:200_000]
    out = tmp_path_factory.mktemp("tok")
    train_tokenizer([text], vocab_size=600).save_pretrained(str(out))
    return load_tokenizer(out)  # through AutoTokenizer, as any HF user would load it


def _sample(corpus: str, split: str, chars: int = 100_000) -> list[str]:
    return [doc[:chars] for doc in itertools.islice(corpus_texts(corpus, split), 3)]


@pytest.mark.parametrize(("corpus", "split"), [(c, "train") for c in EMBEDDED] + [("gutenberg", "valid")])
def test_round_trip_is_exact_on_every_shipped_corpus(tokenizer, corpus, split):
    stats = check_round_trip(tokenizer, _sample(corpus, split))
    assert stats.mismatches == 0 and stats.documents >= 1
    assert 1.5 < stats.bytes_per_token < 6


def test_special_tokens_and_chat_template(tokenizer):
    assert len(tokenizer) == 600
    assert tokenizer.bos_token == tokenizer.eos_token == "<|endoftext|>" and tokenizer.pad_token == "<|pad|>"
    chat = tokenizer.apply_chat_template([{"role": "user", "content": "Who art thou?"}], tokenize=False,
                                         add_generation_prompt=True)
    assert chat == "<|im_start|>user\nWho art thou?<|im_end|>\n<|im_start|>assistant\n"
    ids = tokenizer(chat)["input_ids"]
    assert tokenizer.convert_tokens_to_ids("<|im_start|>") in ids  # one token, not split into bytes
    assert tokenizer.decode(ids) == chat
    text = "naïve café — 東京 🙂\n\ttabs"  # any UTF-8 round-trips through byte-level BPE
    assert tokenizer.decode(tokenizer(text)["input_ids"]) == text


def test_left_padding_for_batched_generation(tokenizer):
    batch = tokenizer(["a", "a longer line of text"], padding=True)
    assert batch["attention_mask"][0][0] == 0 and batch["input_ids"][0][0] == tokenizer.pad_token_id


def test_bad_vocab_size_and_missing_dir(tmp_path):
    with pytest.raises(ValueError, match=f"must be >= {MIN_VOCAB}"):
        train_tokenizer(["abc"], vocab_size=100)
    with pytest.raises(FileNotFoundError, match="holds no tokenizer"):
        load_tokenizer(tmp_path)


def test_corpus_reading(tmp_path):
    assert len(corpus_files("gutenberg")) == 10 and corpus_files("gutenberg", "valid")[0].name == "valid.jsonl.gz"
    (tmp_path / "a.jsonl").write_text(json.dumps({"text": "one"}) + "\n\n" + json.dumps({"text": "two"}) + "\n")
    (tmp_path / "b.txt").write_text("three")
    assert list(corpus_texts(str(tmp_path))) == ["one", "two", "three"]
    (tmp_path / "c.jsonl").write_text(json.dumps({"body": "x"}) + "\n")
    with pytest.raises(ValueError, match="c.jsonl:1: expected a JSON object with a string field 'text'"):
        list(corpus_texts(str(tmp_path / "c.jsonl")))
    with pytest.raises(FileNotFoundError, match="neither an embedded corpus"):
        corpus_files("no-such-corpus")


def test_cli_train(tmp_path, capsys):
    (tmp_path / "t.txt").write_text(next(corpus_texts("tinyshakespeare"))[:50_000])
    assert main(["tokenizer", "train", "--corpus", str(tmp_path / "t.txt"), "--vocab-size", "300",
                 "--out", str(tmp_path / "tok"), "--no-check"]) == 0
    assert "round trip exact" in capsys.readouterr().out
    stats = json.loads((tmp_path / "tok" / "tokenizer_stats.json").read_text())
    assert stats["vocab_size"] == 300 and all(v["mismatches"] == 0 for v in stats["checks"].values())
    assert len(load_tokenizer(tmp_path / "tok")) == 300

"""`densa audit contamination`: 13-gram overlap of benchmark items with a corpus."""

import contextlib
import io
import json
import random
import string

import pytest

from densa.cli import main as cli
from densa.eval import audit, items

TASKS = ["humaneval", "openbookqa"]  # small ones, so each audit here takes about a second


def _corpus(tmp_path, *documents: str):
    path = tmp_path / "corpus.jsonl"
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in documents))
    return str(path)


def _filler(words: int, seed: int = 0) -> str:
    rng = random.Random(seed)
    return " ".join("".join(rng.choices(string.ascii_lowercase, k=rng.randint(2, 9))) for _ in range(words))


def test_normalisation_deletes_punctuation_and_lowercases():
    assert audit.normalize("Hello, World! It's “quoted” — ÉTÉ  2+2=4\n(yes)") == \
        ["hello", "world", "its", "quoted", "été", "224", "yes"]


def test_normalisation_equals_lm_eval_janitor_on_ascii():
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        from lm_eval.decontamination.janitor import Janitor  # prints a warning about its optional C++ module
    janitor = Janitor()
    samples = [string.printable, "Don't STOP: the 3.5% rate (as of 2020) is $4.00/day; e-mail me@x.org!",
               *(t[0] for t in items.humaneval()[:20])]
    for text in samples:
        assert audit.normalize(text) == janitor.normalize_string(text).split()


def test_item_ids_and_counts_follow_the_shipped_files():
    counts = {"mmlu": 14042, "gsm8k": 1319, "humaneval": 164, "hellaswag": 10042, "arc_easy": 2376,
              "arc_challenge": 1172, "piqa": 1838, "winogrande": 1267, "boolq": 3270, "openbookqa": 500}
    assert {task: len(items.item_texts(task)) for task in items.TASKS} == counts
    assert items.item_id("gsm8k", 7) == "gsm8k/7"
    assert items.item_texts("humaneval")[0][0].startswith("from typing import List\n\n\ndef has_close_elements")


def test_a_copied_item_is_flagged_and_a_clean_corpus_is_not(tmp_path):
    humaneval, openbookqa = items.humaneval(), items.openbookqa()
    copied = [humaneval[5][0].upper(), "filler " + openbookqa[7][0].replace(" ", " ,  ") + " filler"]
    dirty = audit.contamination(_corpus(tmp_path, _filler(3000), *copied), TASKS)
    assert "humaneval/5" in dirty["humaneval"]["flagged"] and "openbookqa/7" in dirty["openbookqa"]["flagged"]
    assert dirty["humaneval"]["rate"] == len(dirty["humaneval"]["flagged"]) / 164
    assert list(dirty["humaneval"]["matches"]) == dirty["humaneval"]["flagged"]
    assert dirty["humaneval"]["matches"]["humaneval/5"] in " ".join(audit.normalize(humaneval[5][0]))
    clean = audit.contamination(_corpus(tmp_path, _filler(20000, seed=1)), TASKS)
    assert clean == {task: {"rate": 0.0, "flagged": [], "n_items": n, "n_too_short": clean[task]["n_too_short"],
                            "matches": {}} for task, n in (("humaneval", 164), ("openbookqa", 500))}


def test_thirteen_words_flag_an_item_twelve_do_not(tmp_path):
    words = audit.normalize(items.gsm8k()[3][0])
    for length, flagged in ((13, True), (12, False)):
        text = f"{_filler(50)} {' '.join(words[10:10 + length]).upper()} {_filler(50, seed=2)}"
        result = audit.contamination(_corpus(tmp_path, text), ["gsm8k"])
        assert ("gsm8k/3" in result["gsm8k"]["flagged"]) is flagged


def test_hashed_scan_agrees_with_the_plain_reference(tmp_path):
    """Fast path (hashes, binary search, streaming) == reference (sets of n-gram strings), at n = 13 and n = 5."""
    humaneval, openbookqa = items.humaneval(), items.openbookqa()
    documents = [_filler(2000), humaneval[40][0][200:900], " ".join(openbookqa[i][0] for i in (3, 99, 250)),
                 "the following is true of the sun"]
    corpus = _corpus(tmp_path, *documents)
    for n in (13, 5):
        fast = audit.contamination(corpus, TASKS, n)
        reference = audit.contamination_reference(documents, {"humaneval": humaneval, "openbookqa": openbookqa}, n)
        assert {t: fast[t]["flagged"] for t in TASKS} == {t: [items.item_id(t, i) for i in reference[t]] for t in TASKS}
        assert fast["openbookqa"]["flagged"]  # the comparison is not vacuous


def test_unknown_task_is_a_one_line_error_listing_valid_ones(tmp_path):
    with pytest.raises(ValueError, match="unknown task 'mmlu_pro'; choose from mmlu, gsm8k, humaneval"):
        audit.contamination(_corpus(tmp_path, "x"), ["mmlu_pro"])


def test_cli_writes_json_and_markdown(tmp_path, capsys):
    corpus = _corpus(tmp_path, items.humaneval()[2][0])
    code = cli(["audit", "contamination", "--corpus", corpus, "--tasks", "humaneval", "--json",
                str(tmp_path / "a.json"), "--out", str(tmp_path / "report"), "--no-progress"])
    assert code == 0
    report = json.loads((tmp_path / "a.json").read_text())
    assert report["audit"] == "contamination" and report["n"] == 13 and report["corpus_documents"] == 1
    assert "humaneval/2" in report["tasks"]["humaneval"]["flagged"]
    assert json.loads((tmp_path / "report" / "contamination.json").read_text()) == report
    assert "| humaneval | 164 |" in (tmp_path / "report" / "contamination.md").read_text()
    assert "| humaneval | 164 |" in capsys.readouterr().out
    assert cli(["audit", "contamination", "--corpus", corpus, "--tasks", "nope"]) == 1
    assert "choose from" in capsys.readouterr().err

"""The code base stays `ruff` clean (rules E, F, I, UP, B; configured in pyproject.toml), and its comments cite
only what ships with it."""

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest


def test_ruff_clean():
    ruff = shutil.which("ruff", path=str(Path(sys.executable).parent)) or shutil.which("ruff")
    if ruff is None:
        pytest.skip("ruff is not installed (pip install -e '.[test]')")
    root = Path(__file__).parents[1]
    proc = subprocess.run([ruff, "check", "--output-format", "concise", str(root)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


ROOT = Path(__file__).parents[1]
# design notes that live outside the repository, and section numbers of any Markdown page (they drift; cite a title)
UNSHIPPED = re.compile(r"\b(?:mega|PRODUCT)\.md\b|\.md\s*§")
DOCS_PAGE = re.compile(r"(?<![\w/.-])docs/[\w/-]+\.md")


def citation_problems(text: str) -> list[str]:
    """What `text` cites that a user's checkout does not have, one line each: `LINE: problem`."""
    problems = []
    for number, line in enumerate(text.splitlines(), 1):
        problems += [f"{number}: cites {m.group()!r}, not in the repository" for m in UNSHIPPED.finditer(line)]
        problems += [f"{number}: cites {m.group()}, which does not exist" for m in DOCS_PAGE.finditer(line)
                     if not (ROOT / m.group()).is_file()]
    return problems


def test_citation_check_catches_unshipped_notes_and_missing_pages():
    section = "\u00a7"  # written as an escape so that this file does not cite itself
    text = "\n".join(["see " + "mega" + ".md", "PRODUCT" + ".md fixes it", f"moe.md {section}5",
                      f"docs/training.md{section}7", "docs/no-such-page" + ".md", "docs/moe.md, 'Design'",
                      f"Megalodon {section}3.2", "omega.md5 sum"])
    assert [p.split(":")[0] for p in citation_problems(text)] == ["1", "2", "3", "4", "5"]


def test_comments_cite_what_exists():
    """Comments, docstrings and recipes under densa/, tests/, scripts/ and recipes/ cite docs/ pages that exist, by
    section title: never the design notes kept outside the repository, never a section number of a page."""
    problems = []
    for top in ("densa", "tests", "scripts", "recipes"):
        for path in sorted((ROOT / top).rglob("*")):
            if not path.is_file() or "__pycache__" in path.parts:
                continue
            try:
                text = path.read_text(encoding="utf-8")
            except UnicodeDecodeError:
                continue  # binary
            problems += [f"{path.relative_to(ROOT)}:{p}" for p in citation_problems(text)]
    assert not problems, "\n".join(problems)

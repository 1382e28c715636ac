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
UNSHIPPED = re.compile(r"\b(?:mega|PRODUCT)\.md\b|\.md(?:#[\w-]*)?\)?\s*§")
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
    """Comments, docstrings and recipes under densa/, tests/, scripts/ and recipes/, and the docs/ pages, cite docs/
    pages that exist, by section title: never the design notes kept outside the repository, never a section number
    of another page. A docs/ page may link its own numbered headings ("[§7](#7-distributed-...)")."""
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
    for path in sorted((ROOT / "docs").glob("*.md")):
        problems += [f"{path.relative_to(ROOT)}:{p}" for p in doc_citation_problems(path.read_text(encoding="utf-8"))]
    assert not problems, "\n".join(problems)


# on a docs/ page: "design notes" outside a heading or a link to design-notes.md; an integer section number ("§4",
# not a paper's "§3.2"); a relative link to a page, with its optional #anchor; a paper named by section
DESIGN_NOTES = re.compile(r"\bdesign notes?\b(?!\]\(design-notes\.md)", re.IGNORECASE)
OWN_SECTION = re.compile(r"§\s*(\d+)(?![.\d])")
LINK = re.compile(r"\]\(([\w-]+\.md)?(?:#([\w-]+))?\)")
PAPERS = {"Mega": "2209.10655", "MEGA-P": "2209.10655", "Megalodon": "2404.08801", "MLD-P": "2404.08801"}
PAPER_SECTION = re.compile(r"\b(MLD-P|MEGA-P|Megalodon|Mega)\b(?: paper)?[\s,(]*§")


def heading_anchors(text: str) -> list[str]:
    """The anchors GitHub gives a page's headings: lower case, punctuation dropped, spaces to hyphens (fenced code
    skipped; repeated titles are not numbered, which no page needs)."""
    anchors, fenced = [], False
    for line in text.splitlines():
        fenced ^= line.startswith("```")
        if not fenced and re.match(r"#{1,6} ", line):
            title = line.lstrip("#").strip().lower()
            anchors.append(re.sub(r"[^\w\- ]", "", title).replace(" ", "-"))
    return anchors


def doc_citation_problems(text: str, docs: Path = ROOT / "docs") -> list[str]:
    """What a docs/ page cites that a user's checkout does not have, one line each (`LINE: problem`): the code's
    rules, plus the design notes by name, section numbers the page has no numbered heading for, links to missing
    pages or anchors, and paper sections of a paper the page never names with its arXiv number."""
    problems = citation_problems(text)
    own = heading_anchors(text)
    numbered = {a.split("-")[0] for a in own if re.match(r"\d+-", a)}
    for number, line in enumerate(text.splitlines(), 1):
        if not line.startswith("#"):
            problems += [f"{number}: cites {m.group()!r}, not in the repository: link design-notes.md or the "
                         f"original source" for m in DESIGN_NOTES.finditer(line)]
        problems += [f"{number}: cites {m.group()!r}, but this page has no heading numbered {m.group(1)}"
                     for m in OWN_SECTION.finditer(line) if m.group(1) not in numbered]
        for m in LINK.finditer(line):
            page, anchor = m.groups()
            if page and not (docs / page).is_file():
                problems.append(f"{number}: links {page}, which does not exist")
            elif anchor and anchor not in (heading_anchors((docs / page).read_text(encoding="utf-8")) if page else own):
                problems.append(f"{number}: links #{anchor}, which is no heading of {page or 'this page'}")
        problems += [f"{number}: cites {m.group(1)} by section, but never names it with arXiv {PAPERS[m.group(1)]}"
                     for m in PAPER_SECTION.finditer(line) if not paper_named(m.group(1), text)]
    problems += [f"{text.count(chr(10), 0, m.start()) + 1}: cites {' '.join(m.group().split())!r} across a line break"
                 for m in UNSHIPPED.finditer(text) if "\n" in m.group()]
    return problems


def paper_named(paper: str, text: str) -> bool:
    """A paper is named when the page gives its arXiv number; an abbreviation ("MLD-P") only when one line gives
    both, which is where the page defines it."""
    if "-" in paper:
        return any(paper in line and PAPERS[paper] in line for line in text.splitlines())
    return PAPERS[paper] in text


def test_doc_citation_check_catches_unshipped_notes_and_stray_sections():
    section = "\u00a7"  # written as an escape so that this file does not cite itself
    page = "\n".join([
        "# Page", "## 2. Usage", "see the design " + "notes", f"[{section}2](#2-usage)", f"as in {section}2",
        f"the {section}5 recommendation", f"[{section}3](#3-gone)", f"moe.md {section}4",
        f"[training.md](training.md) {section}4", "[x](no-such-page.md)", "[x](training.md#no-such-heading)",
        f"MLD-P {section}3.4", f"Mega {section}3.2 (arXiv:2209.10655)", "[design " + "notes](design-notes.md)",
        '[training.md](training.md#1-data-densa-prepare), "Data"', "what training.md", f"{section}2 warns about",
        "Megalodon (arXiv:2404.08801)", f"MLD-P {section}3.2"])
    flagged = {int(p.split(":")[0]) for p in doc_citation_problems(page)}
    assert flagged == {3, 6, 7, 8, 9, 10, 11, 12, 16, 19}

"""A report as a list of blocks (headings, paragraphs, tables, images, code), rendered to Markdown and to HTML.

Why a block list and not a Markdown string run through a converter: the same content must come out as Markdown (for
the terminal and git) and as a single HTML file that opens anywhere with its plots embedded, and no Markdown-to-HTML
package is among densa's dependencies. Rendering from structure keeps both outputs in step and escapes every cell.
Inline text is plain: Markdown gets it verbatim, HTML gets it escaped (only `**bold**` is translated).
"""

from __future__ import annotations

import base64
import html
import re
from dataclasses import dataclass, field
from pathlib import Path

CSS = """body{font-family:system-ui,sans-serif;max-width:60rem;margin:2rem auto;padding:0 1rem;color:#222}
table{border-collapse:collapse;margin:1rem 0}th,td{border:1px solid #ccc;padding:.3rem .6rem;text-align:right}
th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}img{max-width:100%}
pre{background:#f6f6f6;padding:.8rem;overflow-x:auto;white-space:pre-wrap}"""


@dataclass
class Heading:
    text: str
    level: int = 2


@dataclass
class Paragraph:
    text: str


@dataclass
class Table:
    header: list[str]
    rows: list[list[str]]


@dataclass
class Image:
    path: Path  # the PNG file; Markdown links it relative to the report, HTML embeds it
    alt: str


@dataclass
class Code:
    text: str


Block = Heading | Paragraph | Table | Image | Code


@dataclass
class Document:
    title: str
    blocks: list[Block] = field(default_factory=list)

    def heading(self, text: str, level: int = 2) -> None:
        self.blocks.append(Heading(text, level))

    def paragraph(self, text: str) -> None:
        self.blocks.append(Paragraph(text))

    def table(self, header: list[str], rows: list[list[str]]) -> None:
        self.blocks.append(Table(header, rows))

    def image(self, path: str | Path, alt: str) -> None:
        self.blocks.append(Image(Path(path), alt))

    def code(self, text: str) -> None:
        self.blocks.append(Code(text))

    def to_markdown(self, relative_to: Path | None = None) -> str:
        parts = [f"# {self.title}"]
        for b in self.blocks:
            if isinstance(b, Heading):
                parts.append(f"{'#' * b.level} {b.text}")
            elif isinstance(b, Paragraph):
                parts.append(b.text)
            elif isinstance(b, Table):
                lines = [_md_row(b.header), "|" + "|".join("---" for _ in b.header) + "|"]
                parts.append("\n".join(lines + [_md_row(r) for r in b.rows]))
            elif isinstance(b, Image):
                path = b.path.resolve()
                if relative_to is not None and path.is_relative_to(relative_to.resolve()):
                    path = path.relative_to(relative_to.resolve())
                parts.append(f"![{b.alt}]({path.as_posix()})")
            else:
                parts.append(f"```\n{b.text}\n```")
        return "\n\n".join(parts) + "\n"

    def to_html(self) -> str:
        body = [f"<h1>{html.escape(self.title)}</h1>"]
        for b in self.blocks:
            if isinstance(b, Heading):
                body.append(f"<h{b.level}>{_inline(b.text)}</h{b.level}>")
            elif isinstance(b, Paragraph):
                body.append(f"<p>{_inline(b.text)}</p>")
            elif isinstance(b, Table):
                head = "".join(f"<th>{_inline(h)}</th>" for h in b.header)
                rows = "".join("<tr>" + "".join(f"<td>{_inline(c)}</td>" for c in r) + "</tr>" for r in b.rows)
                body.append(f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>")
            elif isinstance(b, Image):
                data = base64.b64encode(b.path.read_bytes()).decode("ascii")
                body.append(f'<img alt="{html.escape(b.alt)}" src="data:image/png;base64,{data}">')
            else:
                body.append(f"<pre>{html.escape(b.text)}</pre>")
        return (f"<!doctype html>\n<html><head><meta charset=\"utf-8\"><title>{html.escape(self.title)}</title>"
                f"<style>{CSS}</style></head>\n<body>\n" + "\n".join(body) + "\n</body></html>\n")

    def write(self, out: str | Path, stem: str = "report") -> tuple[Path, Path]:
        """Write `stem.md` and `stem.html` into `out`; returns both paths."""
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        md, page = out / f"{stem}.md", out / f"{stem}.html"
        md.write_text(self.to_markdown(relative_to=out))
        page.write_text(self.to_html())
        return md, page


def _md_row(cells: list[str]) -> str:
    return "| " + " | ".join(str(c).replace("|", "\\|").replace("\n", " ") for c in cells) + " |"


def _inline(text: str) -> str:
    """Escape for HTML, then turn `**bold**` and `` `code` `` into tags."""
    out = html.escape(str(text))
    out = re.sub(r"\*\*(.+?)\*\*", r"<b>\1</b>", out)
    return re.sub(r"`(.+?)`", r"<code>\1</code>", out)

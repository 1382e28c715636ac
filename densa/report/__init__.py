"""Reports for people: one document model rendered as Markdown and as self-contained HTML, and Pareto plots.

Used by `densa quickstart` (report.md / report.html) and `densa study iso-flop` (its plots).
"""

from densa.report.document import Document, Image, Paragraph, Table
from densa.report.pareto import pareto_front

__all__ = ["Document", "Image", "Paragraph", "Table", "pareto_front"]

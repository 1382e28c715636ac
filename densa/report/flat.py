"""The flat JSON object of measured figures that `densa bench` and `densa study` print or write (`--json FILE`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def emit(figures: dict[str, Any], path: str | Path | None) -> str:
    """Write `figures` to `path` (folders created) and say so, or print them when no path is given; returns the text."""
    text = json.dumps(figures, indent=2) + "\n"
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(text)
        print(f"wrote {path}")
    else:
        print(text, end="")
    return text

"""Training logs of `densa sft` / `densa align`: every trainer log line appended to metrics.jsonl, and a PNG of the
curves that matter (loss; reward and mean completion length for RL)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from transformers import TrainerCallback


class JsonlLog(TrainerCallback):
    """A transformers callback writing `{"step": ..., <logged metrics>}` per log event. A run resumed from a
    checkpoint keeps the records up to the checkpoint's step; a fresh run starts an empty file."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)

    def on_train_begin(self, args: Any, state: Any, control: Any, **_: Any) -> None:
        kept = [r for r in read_jsonl(self.path) if r["step"] <= state.global_step] if state.global_step and \
            self.path.is_file() else []
        self.path.write_text("".join(json.dumps(r) + "\n" for r in kept))

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **_: Any) -> None:
        if logs:
            record = {"step": state.global_step, **{k: v for k, v in logs.items() if isinstance(v, int | float)}}
            with self.path.open("a") as f:
                f.write(json.dumps(record) + "\n")


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_curves(records: list[dict[str, Any]], keys: list[tuple[str, str]], out: Path, title: str) -> Path | None:
    """One panel per (key, label) present in `records`, against the step; None when nothing was logged."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    present = [(k, label) for k, label in keys if any(k in r and math.isfinite(r[k]) for r in records)]
    if not present:
        return None
    fig, axes = plt.subplots(1, len(present), figsize=(4 * len(present), 3.2), squeeze=False)
    for ax, (key, label) in zip(axes[0], present, strict=True):
        pts = [(r["step"], r[key]) for r in records if key in r and math.isfinite(r[key])]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], lw=1.5)
        ax.set_xlabel("step")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out

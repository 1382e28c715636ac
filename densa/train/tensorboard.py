"""Optional TensorBoard logging beside metrics.jsonl.

`torch.utils.tensorboard` needs the `tensorboard` package, which densa does not depend on: when it is importable
the trainer also writes every numeric metrics.jsonl field as a scalar (tag `KIND/FIELD`, e.g. `train/loss`,
`eval/val_bpb`, `train/routing/layers.0.zc_share`) under RUN/tb; when it is not, metrics.jsonl alone is written and
nothing is said (the JSONL file is the record; TensorBoard is a viewer).
"""

from __future__ import annotations

import math
from pathlib import Path


class TensorBoardLog:
    """Scalars of metrics records to a TensorBoard event file."""

    def __init__(self, writer) -> None:
        self.writer = writer

    @classmethod
    def open(cls, log_dir: Path) -> TensorBoardLog | None:
        """A log writing into `log_dir`, or None when tensorboard is not installed."""
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            return None
        return cls(SummaryWriter(log_dir=str(log_dir)))

    def write(self, record: dict) -> None:
        """One metrics record (`kind`, `step` and fields); lists (per-expert loads) and non-finite values are
        skipped."""
        kind, step = record.get("kind", "train"), int(record.get("step", 0))
        for name, value in record.items():
            if name in ("kind", "step") or isinstance(value, bool) or not isinstance(value, int | float):
                continue
            if math.isfinite(value):
                self.writer.add_scalar(f"{kind}/{name}", value, step)

    def close(self) -> None:
        self.writer.flush()
        self.writer.close()

"""Pretraining batches from a prepared folder (densa/data/prepare.py): windows of `context + 1` tokens.

The token files of a split are memory-mapped and read as one stream (a window may span two files). Batch `i` is a
pure function of (seed, i): in "random" mode its windows start at offsets drawn by a generator seeded with
`seed * 1_000_003 + i`; in "sequential" mode batch i takes the next B windows of the stream, wrapping around. So the
loader's whole state is the batch index, which makes resuming exact.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch import Tensor

from densa.data.prepare import load_manifest


class TokenStream:
    """The token files of one split as a single read-only sequence."""

    def __init__(self, data_dir: str | Path, split: str) -> None:
        self.manifest = load_manifest(data_dir)
        if split not in self.manifest["splits"]:
            raise ValueError(f"{data_dir}: no split {split!r}; has {', '.join(self.manifest['splits'])}")
        info = self.manifest["splits"][split]
        dtype = np.dtype(self.manifest["dtype"])
        self.arrays = [np.memmap(Path(data_dir) / f["name"], dtype=dtype, mode="r") for f in info["files"]]
        for f, a in zip(info["files"], self.arrays, strict=True):
            if a.size != f["tokens"]:
                raise ValueError(f"{data_dir}/{f['name']}: {a.size} tokens, manifest says {f['tokens']}")
        self.starts = np.cumsum([0] + [a.size for a in self.arrays])
        self.tokens = int(self.starts[-1])
        self.bytes = int(info["bytes"])

    def read(self, start: int, length: int) -> np.ndarray:
        """Tokens [start, start + length) of the stream as int64."""
        out = np.empty(length, dtype=np.int64)
        filled = 0
        while filled < length:
            pos = start + filled
            k = int(np.searchsorted(self.starts, pos, side="right")) - 1
            offset = pos - int(self.starts[k])
            take = min(length - filled, self.arrays[k].size - offset)
            out[filled:filled + take] = self.arrays[k][offset:offset + take]
            filled += take
        return out


class PretrainLoader:
    """Batches of input_ids (B, T+1) from one split; `state_dict()` / `load_state_dict()` resume exactly."""

    def __init__(self, data_dir: str | Path, split: str, batch_size: int, context: int, seed: int = 0,
                 mode: Literal["random", "sequential"] = "random") -> None:
        self.stream = TokenStream(data_dir, split)
        self.batch_size, self.context, self.seed, self.mode = batch_size, context, seed, mode
        self.window = context + 1
        if self.stream.tokens < self.window:
            raise ValueError(f"{data_dir} split {split!r} has {self.stream.tokens} tokens, fewer than one window of "
                             f"context + 1 = {self.window}; lower the context or prepare more text")
        self.index = 0

    def batch(self, index: int) -> Tensor:
        """Batch number `index`: (B, T+1) int64."""
        B, W, n = self.batch_size, self.window, self.stream.tokens
        if self.mode == "random":
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
            starts = torch.randint(0, n - W + 1, (B,), generator=g).tolist()
        else:
            per_pass = n // W
            starts = [((index * B + b) % per_pass) * W for b in range(B)]
        return torch.from_numpy(np.stack([self.stream.read(s, W) for s in starts]))

    def next_batch(self) -> Tensor:
        batch = self.batch(self.index)
        self.index += 1
        return batch

    def state_dict(self) -> dict:
        return {"index": self.index, "seed": self.seed, "mode": self.mode}

    def load_state_dict(self, state: dict) -> None:
        self.index = int(state["index"])


def eval_batches(data_dir: str | Path, batch_size: int, context: int, max_batches: int) -> list[Tensor]:
    """The first `max_batches` non-overlapping batches of the validation split (fewer if it is short)."""
    loader = PretrainLoader(data_dir, "valid", batch_size, context, mode="sequential")
    windows = loader.stream.tokens // loader.window
    n = max(1, min(max_batches, windows // batch_size))
    return [loader.batch(i)[: max(1, min(batch_size, windows))] for i in range(n)]

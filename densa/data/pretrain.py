"""Pretraining batches from a prepared folder (densa/data/prepare.py): windows of `context + 1` tokens.

The token files of a split are memory-mapped and read as one stream (a window may span two files). Batch `i` is a
pure function of (seed, i): in "random" mode its windows start at offsets drawn by a generator seeded with
`seed * 1_000_003 + i`; in "sequential" mode batch i takes the next B windows of the stream, wrapping around. So the
loader's whole state is the batch index, which makes resuming exact.

Under torch.distributed, `batch_size` is the global batch: with `world_size` W, rank r reads rows
[r·B/W, (r+1)·B/W) of the batch a single process would read (the window starts are drawn for all B rows, then
sliced), so W processes together train on exactly the single-process batches.

High-value tokens (docs/high-value-tokens.md):
- `reference=True` also reads the reference model's per-token losses (`train-*.refloss.bin`, written by
  densa/data/reference.py) for the same windows: `reference_batch(i)[b, j]` is the reference loss of token
  `batch(i)[b, j]` (0 for the stream's first token, which nothing predicts).
- `curriculum="value"` takes the windows that batches 0 .. total_batches − 1 would hold in `mode` and puts them in
  ascending order of value (the mean document value, from the manifest, over each window's predicted tokens; ties
  keep their drawn order), so the run sees the same windows as without the curriculum, the most valuable last.
  The order is a pure function of (seed, total_batches, the manifest), so the state is still the batch index.
  Batches past `total_batches` are drawn as without the curriculum.
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

    def __init__(self, data_dir: str | Path, split: str, kind: Literal["tokens", "refloss"] = "tokens") -> None:
        self.manifest = load_manifest(data_dir)
        if split not in self.manifest["splits"]:
            raise ValueError(f"{data_dir}: no split {split!r}; has {', '.join(self.manifest['splits'])}")
        info = self.manifest["splits"][split]
        dtype = np.dtype(self.manifest["dtype"])
        names = [f["name"] for f in info["files"]]
        self.out_dtype = np.int64
        if kind == "refloss":
            if split != "train" or "reference" not in self.manifest:
                raise ValueError(f"{data_dir}: no reference losses for split {split!r}; score them with `densa "
                                 f"prepare ... --reference MODEL` (only the train split is scored)")
            dtype, self.out_dtype = np.dtype(np.float16), np.float32
            names = [f["name"] for f in self.manifest["reference"]["files"]]
        self.arrays = [np.memmap(Path(data_dir) / name, dtype=dtype, mode="r") for name in names]
        for f, a in zip(info["files"], self.arrays, strict=True):
            if a.size != f["tokens"]:
                raise ValueError(f"{data_dir}: {a.size} {kind} values for {f['name']}, manifest says {f['tokens']}")
        self.starts = np.cumsum([0] + [a.size for a in self.arrays])
        self.tokens = int(self.starts[-1])
        self.bytes = int(info["bytes"])

    def read(self, start: int, length: int) -> np.ndarray:
        """Tokens [start, start + length) of the stream as int64 (reference losses as float32)."""
        out = np.empty(length, dtype=self.out_dtype)
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
    """Batches of input_ids (B / world_size, T+1) from one split: this rank's rows of the global batch of B rows;
    `state_dict()` / `load_state_dict()` resume exactly, with any world size."""

    def __init__(self, data_dir: str | Path, split: str, batch_size: int, context: int, seed: int = 0,
                 mode: Literal["random", "sequential"] = "random", rank: int = 0, world_size: int = 1,
                 reference: bool = False, curriculum: Literal["none", "value"] = "none",
                 total_batches: int = 0) -> None:
        if batch_size % world_size:
            raise ValueError(f"train.batch_size={batch_size} is the global batch and must be divisible by the "
                             f"number of processes ({world_size})")
        self.stream = TokenStream(data_dir, split)
        self.batch_size, self.context, self.seed, self.mode = batch_size, context, seed, mode
        self.rank, self.world_size = rank, world_size
        self.window = context + 1
        if self.stream.tokens < self.window:
            raise ValueError(f"{data_dir} split {split!r} has {self.stream.tokens} tokens, fewer than one window of "
                             f"context + 1 = {self.window}; lower the context or prepare more text")
        self.reference = TokenStream(data_dir, split, "refloss") if reference else None
        self.order: np.ndarray | None = None  # window starts of batches 0 .. total_batches - 1 (curriculum)
        if curriculum == "value":
            self.order = self._value_order(data_dir, total_batches)
        self.index = 0

    def drawn_starts(self, index: int) -> list[int]:
        """Window starts of global batch `index` (all B rows) as `mode` draws them, without the curriculum."""
        B, W, n = self.batch_size, self.window, self.stream.tokens
        if self.mode == "random":
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
            return torch.randint(0, n - W + 1, (B,), generator=g).tolist()
        per_pass = n // W
        return [((index * B + b) % per_pass) * W for b in range(B)]

    def starts(self, index: int) -> list[int]:
        """Window starts of this rank's rows of batch `index`."""
        B = self.batch_size
        if self.order is not None and (index + 1) * B <= self.order.size:
            starts = self.order[index * B:(index + 1) * B].tolist()
        else:
            starts = self.drawn_starts(index)
        rows = B // self.world_size
        return starts[self.rank * rows : (self.rank + 1) * rows]

    def batch(self, index: int) -> Tensor:
        """This rank's rows of batch number `index`: (B/W, T+1) int64."""
        return torch.from_numpy(np.stack([self.stream.read(s, self.window) for s in self.starts(index)]))

    def reference_batch(self, index: int) -> Tensor:
        """The reference model's losses of `batch(index)`'s tokens: (B/W, T+1) float32, aligned with it."""
        if self.reference is None:
            raise ValueError("this loader was built without reference=True")
        return torch.from_numpy(np.stack([self.reference.read(s, self.window) for s in self.starts(index)]))

    def _value_order(self, data_dir: str | Path, total_batches: int) -> np.ndarray:
        """The drawn window starts of batches 0 .. total_batches − 1, sorted by ascending window value."""
        if total_batches < 1:
            raise ValueError("curriculum 'value' needs total_batches >= 1 (the run's length)")
        value_per_token = document_token_values(data_dir, self.stream)  # (N,)
        cumulative = np.concatenate([[0.0], np.cumsum(value_per_token, dtype=np.float64)])
        starts = np.array([s for i in range(total_batches) for s in self.drawn_starts(i)], dtype=np.int64)
        # mean value over each window's predicted tokens start + 1 .. start + T
        window_value = (cumulative[starts + self.window] - cumulative[starts + 1]) / self.context
        return starts[np.argsort(window_value, kind="stable")]

    def next_batch(self) -> Tensor:
        batch = self.batch(self.index)
        self.index += 1
        return batch

    def state_dict(self) -> dict:
        return {"index": self.index, "seed": self.seed, "mode": self.mode}

    def load_state_dict(self, state: dict) -> None:
        self.index = int(state["index"])


def document_token_values(data_dir: str | Path, stream: TokenStream) -> np.ndarray:
    """Each train-stream token's document value (manifest `reference.document_values`), float64 of shape (N,).
    A document is the tokens after the previous EOS up to and including its own EOS."""
    reference = stream.manifest.get("reference")
    if reference is None:
        raise ValueError(f"{data_dir}: curriculum 'value' needs document values; score the data with `densa prepare "
                         f"... --reference MODEL`")
    values = np.asarray(reference["document_values"], dtype=np.float64)
    ends = np.flatnonzero(stream.read(0, stream.tokens) == stream.manifest["eos_id"])
    if ends.size != values.size:
        raise ValueError(f"{data_dir}: {ends.size} documents in the train stream, {values.size} document values")
    lengths = np.diff(np.concatenate([[-1], ends]))
    return np.repeat(values, lengths)


def eval_batches(data_dir: str | Path, batch_size: int, context: int, max_batches: int) -> list[Tensor]:
    """The first `max_batches` non-overlapping batches of the validation split (fewer if it is short)."""
    loader = PretrainLoader(data_dir, "valid", batch_size, context, mode="sequential")
    windows = loader.stream.tokens // loader.window
    n = max(1, min(max_batches, windows // batch_size))
    return [loader.batch(i)[: max(1, min(batch_size, windows))] for i in range(n)]

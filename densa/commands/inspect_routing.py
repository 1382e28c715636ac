"""`densa inspect-routing MODEL --text "..."`: how many FFN experts each token uses in each MoE layer, so a person can
see where the model spends compute (whitespace and punctuation are expected to be cheap, content words dear)."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from densa.checkpoint import load_model
from densa.model.moe import MoE


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", metavar="MODEL", help="densa checkpoint directory (config.json + model.safetensors)")
    parser.add_argument("--text", required=True, help="text to route")


def tokenize(model_dir: Path, text: str, vocab_size: int) -> tuple[list[int], list[str]]:
    """Token ids and the text piece of each: the checkpoint's tokenizer.json, else UTF-8 bytes for a 256-entry
    vocabulary (the byte-level presets)."""
    if (model_dir / "tokenizer.json").is_file():
        from tokenizers import Tokenizer

        encoding = Tokenizer.from_file(str(model_dir / "tokenizer.json")).encode(text)
        return encoding.ids, [text[a:b] for a, b in encoding.offsets]
    if vocab_size == 256:
        data = text.encode("utf-8")
        return list(data), [bytes([b]).decode("utf-8", errors="backslashreplace") for b in data]
    raise ValueError(f"{model_dir} has no tokenizer.json and its vocab_size is {vocab_size}, not 256 (bytes): "
                     "cannot tokenize the text")


def main(args: argparse.Namespace) -> None:
    model_dir = Path(args.model)
    model = load_model(model_dir).eval()
    cfg = model.config
    layers = [(i, layer.mlp) for i, layer in enumerate(model.layers) if isinstance(layer.mlp, MoE)]
    if not layers:
        raise ValueError(f"{model_dir} has no MoE layers (ffn={cfg.ffn!r}); nothing is routed")
    if not args.text:
        raise ValueError("--text is empty")
    ids, pieces = tokenize(model_dir, args.text, cfg.vocab_size)
    with torch.no_grad():
        used_LBT = model(torch.tensor([ids])).ffn_experts  # (layers, 1, tokens)
    used_LT = used_LBT[[i for i, _ in layers], 0]  # (MoE layers, tokens)
    budget = f"target {cfg.target_active_experts:g}" if cfg.ffn == "moe" else "top-k"
    print(f"FFN experts per token ({cfg.ffn}, {cfg.num_experts} experts, {cfg.num_experts_per_tok} slots, {budget})")
    header = "".join(f"{f'L{i}':>5}" for i, _ in layers)
    print(f"{'pos':>4}  {'token':<12}{header}{'mean':>7}")
    for t, piece in enumerate(pieces):
        counts = "".join(f"{int(n):>5}" for n in used_LT[:, t])
        print(f"{t:>4}  {repr(piece):<12}{counts}{used_LT[:, t].float().mean():>7.2f}")
    means = "".join(f"{m:>5.1f}" for m in used_LT.float().mean(1).tolist())
    print(f"{'':>4}  {'mean':<12}{means}{used_LT.float().mean():>7.2f}")

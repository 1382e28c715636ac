"""Reference-model scoring for high-value-token training (Rho-1, arXiv 2404.07965; docs/high-value-tokens.md,
'Reference scores').

`score_reference(data_dir, MODEL)` runs a reference model once over a prepared folder's train stream and writes, next
to each token shard `train-0000k.bin`, a float16 file `train-0000k.refloss.bin` of the same length:

    refloss[i] = −log P_ref(token_i | the up-to-`context` tokens before it)     (refloss[0] = 0: nothing precedes it)

The stream is cut into consecutive windows of `context + 1` tokens that overlap by one, so every token after the
first is predicted exactly once, from the tokens since the start of its window. (Training windows start elsewhere,
so the reference sees a different context than the trained model: the price of scoring once, offline.) It also
scores each document: value = −(mean reference loss over the document's tokens, its EOS included), in
nats/token, so text that a model trained on clean data finds easy ranks high and noise ranks low.

The manifest gains a `reference` section: the model's identity (what was named, its kind, a sha256 over its weights),
its forward FLOPs per token, the scoring cost (`scoring_flops` = forward FLOPs/token × tokens scored), the reference
model's own training cost when the caller knows it, the `.refloss.bin` files with their sha256, and the document
values. The same data and model give byte-identical files (eval mode, fixed windows and batches).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from densa.counting import flops_per_token
from densa.data.prepare import load_manifest, sha256_file, write_manifest
from densa.data.pretrain import TokenStream
from densa.data.tokenizer import load_tokenizer
from densa.model.model import DensaModel

SUFFIX = ".refloss.bin"


def weights_sha256(model: torch.nn.Module) -> str:
    """sha256 over the model's tensors (names, shapes and bytes, in name order): its identity for the manifest."""
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        h.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        h.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


@torch.inference_mode()
def reference_losses(model: DensaModel, tokens: np.ndarray, context: int, batch_size: int = 16,
                     progress: bool = False) -> np.ndarray:
    """Per-token reference losses of a token stream (float32, same length; see the module docstring)."""
    model.eval()
    n = tokens.size
    losses = np.zeros(n, dtype=np.float32)
    starts = list(range(0, n - 1, context))  # window k holds tokens [k·T, k·T + T] and predicts k·T + 1 .. k·T + T
    full = [s for s in starts if s + context + 1 <= n]
    groups = [full[i:i + batch_size] for i in range(0, len(full), batch_size)] + [[s] for s in starts[len(full):]]
    for group in tqdm(groups, disable=not progress, unit="batch", desc="reference losses", dynamic_ncols=True):
        length = min(context + 1, n - group[0])  # only the last window can be shorter
        windows = torch.from_numpy(np.stack([tokens[s:s + length] for s in group]).astype(np.int64))  # (B, L)
        logits = model(windows).logits[:, :-1]  # (B, L-1, V)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), windows[:, 1:].reshape(-1), reduction="none")
        loss = loss.view(len(group), length - 1).numpy()  # (B, L-1)
        for row, s in enumerate(group):
            losses[s + 1:s + length] = loss[row]
    return losses


def document_values(losses: np.ndarray, tokens: np.ndarray, eos_id: int) -> list[float]:
    """−mean reference loss per document (tokens after the previous EOS through its own EOS), in nats/token."""
    ends = np.flatnonzero(tokens == eos_id)
    bounds = np.concatenate([[0], ends + 1])
    cumulative = np.concatenate([[0.0], np.cumsum(losses, dtype=np.float64)])
    return [round(-(cumulative[b] - cumulative[a]) / (b - a), 6) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]


def score_reference(data_dir: str | Path, model: str | DensaModel, context: int = 256, batch_size: int = 16,
                    training_flops: float | None = None, name: str | None = None, progress: bool = True) -> dict:
    """Score the train split of `data_dir` with the reference `model` (a MODEL spec or a loaded DensaModel);
    writes the `.refloss.bin` files, updates the manifest and returns it."""
    if context < 1 or batch_size < 1:
        raise ValueError(f"reference context={context} and batch_size={batch_size} must be >= 1")
    data_dir = Path(data_dir)
    manifest = load_manifest(data_dir)
    kind = "in-memory"
    if isinstance(model, str):
        from densa.resolve import resolve  # the resolver pulls in transformers; import it only when asked

        resolved = resolve(model)
        name, kind = name or model, resolved.kind
        if resolved.tokenizer is not None:
            data_tokenizer = load_tokenizer(data_dir / manifest["tokenizer"]["copy"])
            if resolved.tokenizer.get_vocab() != data_tokenizer.get_vocab():
                raise ValueError(f"--reference {model}: its tokenizer differs from the one {data_dir} was prepared "
                                 f"with; the reference must share the tokenizer")
        model = resolved.model
    if model.config.vocab_size < manifest["vocab_size"]:
        raise ValueError(f"reference model {name or kind}: vocab_size {model.config.vocab_size} < the data's "
                         f"{manifest['vocab_size']} token ids; the reference must share the tokenizer")
    stream = TokenStream(data_dir, "train")
    tokens = stream.read(0, stream.tokens)
    losses = reference_losses(model, tokens, context, batch_size, progress).astype(np.float16)  # what is stored
    files = []
    for info, a, b in zip(manifest["splits"]["train"]["files"], stream.starts[:-1], stream.starts[1:], strict=True):
        path = data_dir / info["name"].replace(".bin", SUFFIX)
        losses[a:b].tofile(path)
        files.append({"name": path.name, "tokens": int(b - a), "sha256": sha256_file(path)})
    forward = flops_per_token(model.config, context).total
    manifest["reference"] = {
        "model": name or "in-memory model",
        "kind": kind,
        "weights_sha256": weights_sha256(model),
        "context": context,
        "flops_per_token": forward,  # forward FLOPs per scored token
        "scored_tokens": int(stream.tokens),
        "scoring_flops": forward * stream.tokens,
        "training_flops": training_flops,  # the reference model's own training, when known (else null)
        "mean_loss": float(losses[1:].astype(np.float64).mean()) if stream.tokens > 1 else 0.0,
        "files": files,
        "document_value": "-mean reference loss over the document's tokens (EOS included), nats/token",
        "document_values": document_values(losses, tokens, manifest["eos_id"]),
    }
    write_manifest(data_dir, manifest)
    return manifest


def reference_cost(manifest: dict) -> float:
    """The FLOPs a run that uses the reference scores is charged once: scoring the whole train split plus the
    reference model's own training when recorded (docs/high-value-tokens.md, 'FLOP accounting')."""
    reference = manifest.get("reference")
    if reference is None:
        raise ValueError(f"data of corpus {manifest.get('corpus')!r} has no reference scores; token_selection and "
                         f"curriculum need `densa prepare ... --reference MODEL`")
    return float(reference["scoring_flops"]) + float(reference.get("training_flops") or 0.0)

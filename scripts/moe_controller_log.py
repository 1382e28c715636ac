"""Train the `tiny-moe` preset briefly and log, per step and MoE layer, whether the compute-budget controller holds
its target: mean FFN experts per token against `target_active_experts`, all-null rate, MaxVio, ZC bias.

    python scripts/moe_controller_log.py                     # writes docs/results/moe-controller.jsonl

Byte-level tiny-shakespeare (the embedded corpus in data/corpora; its last 10% held out), AdamW, fixed seeds, one
thread: reruns give the same log on the same machine and torch build. About two minutes on one CPU core. There is no
trainer yet (a later issue), so this loop calls `model.update_routing()` after each optimizer step, as the trainer
will. Every `--eval-every` steps it also routes a fixed held-out batch in eval mode (`val.*` keys): the controller
holds the mean over the data, while a single training batch's mean moves with its text (that is the point of
dynamic compute), so the held-out batch is the steady measure of tracking. The last line printed is the summary
quoted in docs/moe.md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from densa.checkpoint import save_checkpoint
from densa.config import from_preset, parse_overrides
from densa.data.corpora import corpus_texts
from densa.model.model import DensaModel
from densa.model.moe import MoE

LOGGED = ("mean_ffn_experts", "p10_ffn_experts", "p90_ffn_experts", "all_null_rate", "maxvio_global", "maxvio_batch",
          "load_cv", "dead_experts", "zc_bias", "flops_fraction")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="tiny-moe")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--warmup", type=int, default=100, help="steps excluded from the summary")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--eval-every", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (one is deterministic, and fastest for "
                        "a model this small on a shared CPU)")
    parser.add_argument("--out", default="docs/results/moe-controller.jsonl")
    parser.add_argument("--save", metavar="DIR", help="also save the trained model (for `densa inspect-routing DIR`)")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    cfg = from_preset(args.preset, **parse_overrides(args.overrides))
    data = torch.tensor(list("".join(corpus_texts("tinyshakespeare")).encode("utf-8")), dtype=torch.long)
    train, held_out = data[: len(data) * 9 // 10], data[len(data) * 9 // 10 :]
    batches = torch.Generator().manual_seed(args.seed)
    val_ids = sample(held_out, 2 * args.batch, args.seq, batches)  # fixed for the whole run
    model = DensaModel(cfg).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.1, betas=(0.9, 0.95))
    moe_layers = [i for i, layer in enumerate(model.layers) if isinstance(layer.mlp, MoE)]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    rows, start = [], time.perf_counter()
    with out.open("w") as log:
        for step in range(1, args.steps + 1):
            output = model(ids := sample(train, args.batch, args.seq, batches), labels=ids)
            optimizer.zero_grad(set_to_none=True)
            output.loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            metrics = model.update_routing()
            row = {"step": step, "ce_loss": round(float(output.aux["ce_loss"]), 4),
                   "aux_loss": round(float(output.aux["aux_loss"]), 5), "target": cfg.target_active_experts}
            for i in moe_layers:
                row.update({f"layers.{i}.{k}": round(float(metrics[f"layers.{i}.{k}"]), 4) for k in LOGGED})
            if step % args.eval_every == 0:
                row.update(held_out_routing(model, val_ids, moe_layers))
            log.write(json.dumps(row) + "\n")
            rows.append(row)
            if step % 50 == 0:
                means = " ".join(f"L{i}={row[f'val.layers.{i}.mean_ffn_experts']:.2f}" for i in moe_layers)
                print(f"step {step}: ce {row['ce_loss']:.3f} (held out {row['val.ce_loss']:.3f}), held-out FFN "
                      f"experts/token {means} (target {cfg.target_active_experts:g}), "
                      f"{time.perf_counter() - start:.0f} s", flush=True)
    print(summary(rows[args.warmup :], moe_layers, cfg.target_active_experts, args.warmup))
    if args.save:
        print(f"saved {save_checkpoint(model.eval(), args.save, overwrite=True)}")


def sample(data: torch.Tensor, batch: int, seq: int, generator: torch.Generator) -> torch.Tensor:
    starts = torch.randint(0, len(data) - seq, (batch,), generator=generator)
    return torch.stack([data[s : s + seq] for s in starts.tolist()])


@torch.no_grad()
def held_out_routing(model: DensaModel, ids: torch.Tensor, layers: list[int]) -> dict[str, float]:
    """Mean FFN experts per token and all-null rate of each MoE layer on `ids`, routed in eval mode (counts nothing)."""
    model.eval()
    row = {"val.ce_loss": round(float(model(ids, labels=ids).loss), 4)}
    for i in layers:
        used_BL = model.layers[i].mlp.last_ffn_experts_BL.float()
        row[f"val.layers.{i}.mean_ffn_experts"] = round(float(used_BL.mean()), 4)
        row[f"val.layers.{i}.all_null_rate"] = round(float((used_BL == 0).float().mean()), 4)
    model.train()
    return row


def summary(rows: list[dict], layers: list[int], target: float, warmup: int) -> str:
    """Per layer after warm-up: held-out mean FFN experts per token against the target (max deviation), the training
    batches' per-step deviation (mean and max; batch-to-batch spread, not controller error) and balance."""
    parts = []
    for i in layers:
        val = [abs(r[f"val.layers.{i}.mean_ffn_experts"] - target) / target for r in rows if "val.ce_loss" in r]
        step = [(r[f"layers.{i}.mean_ffn_experts"] - target) / target for r in rows]
        all_null = max(r[f"layers.{i}.all_null_rate"] for r in rows)
        last = {k: rows[-1][f"layers.{i}.{k}"] for k in ("maxvio_global", "load_cv", "dead_experts")}
        parts.append(f"layer {i}: held-out max |mean - target|/target {max(val):.1%}; training batches mean "
                     f"{statistics.fmean(step):+.1%}, sd {statistics.pstdev(step):.1%}, max {max(map(abs, step)):.1%}; "
                     f"max all-null rate {all_null:.3f}; last MaxVio_global {last['maxvio_global']:.2f}, "
                     f"load CV {last['load_cv']:.2f}, dead experts {last['dead_experts']:g}")
    return f"after {warmup} warm-up steps ({len(rows)} steps): " + "; ".join(parts)


if __name__ == "__main__":
    main()

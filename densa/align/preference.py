"""Offline preference tuning that prefers the shorter of two correct answers (SimPO-style, reference-free).

Pairs: for each training prompt, sample two completions from the current policy (temperature 1); keep the prompt
when both are correct and their lengths differ; chosen y_w = the shorter, rejected y_l = the longer. Loss (SimPO,
Meng et al. 2024):

    L = −log σ( β/|y_w| · log π(y_w|x) − β/|y_l| · log π(y_l|x) − γ )

The length-normalised log-likelihood is the implicit reward, so the pair teaches "the same right answer, in fewer
tokens" without a reference model. This is a 30-line loss on densa's own forward rather than TRL's CPOTrainer
(`loss_type="simpo"`), which lives in `trl.experimental` and whose API moves between releases.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm import tqdm

from densa.align.config import Recipe
from densa.align.evaluate import generate_greedy, summarise
from densa.align.logs import plot_curves
from densa.align.policy import load_policy, save_policy
from densa.align.problems import is_correct
from densa.align.sft import task_examples
from densa.model.model import DensaModel


@torch.no_grad()
def sample_pairs(model: DensaModel, tok: Any, examples: list[dict], max_new_tokens: int, seed: int,
                 batch_size: int = 32) -> list[dict]:
    """{prompt_ids, chosen, rejected} token-id pairs: two correct samples of different lengths, shorter chosen."""
    model.eval()
    gen = torch.Generator().manual_seed(seed)
    eos = tok.eos_token_id
    pairs = []
    for start in range(0, len(examples), batch_size):
        chunk = examples[start:start + batch_size]
        texts = [tok.apply_chat_template(e["prompt"], tokenize=False, add_generation_prompt=True) for e in chunk]
        enc = tok(texts * 2, return_tensors="pt", padding=True, add_special_tokens=False)  # (2B, T): two samples
        ids = model.generate(enc["input_ids"], attention_mask=enc["attention_mask"], max_new_tokens=max_new_tokens,
                             temperature=1.0, stop_tokens=[eos], generator=gen)
        new = ids[:, enc["input_ids"].shape[1]:].tolist()
        for i, e in enumerate(chunk):
            a, b = (_until_eos(new[i], eos), _until_eos(new[i + len(chunk)], eos))
            ok = [s[-1:] == [eos] and is_correct(tok.decode(s, skip_special_tokens=True), e["answer"])
                  for s in (a, b)]
            if all(ok) and len(a) != len(b):
                prompt = tok(texts[i], add_special_tokens=False)["input_ids"]
                pairs.append({"prompt": prompt, "chosen": min(a, b, key=len), "rejected": max(a, b, key=len)})
    return pairs


def simpo_loss(model: DensaModel, batch: list[dict], beta: float, gamma: float, pad_id: int) -> tuple[torch.Tensor,
                                                                                                     dict[str, float]]:
    """The SimPO loss of a batch of pairs (module docstring), plus monitoring numbers."""
    seqs = [p["prompt"] + p[k] for k in ("chosen", "rejected") for p in batch]
    starts = [len(p["prompt"]) for _ in range(2) for p in batch]
    T = max(map(len, seqs))
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)  # right padded: causal, and padding is not scored
    scored = torch.zeros(len(seqs), T, dtype=torch.bool)
    for i, (s, p0) in enumerate(zip(seqs, starts, strict=True)):
        ids[i, :len(s)] = torch.tensor(s)
        scored[i, p0:len(s)] = True
    logp = model(ids).logits[:, :-1].log_softmax(-1).gather(-1, ids[:, 1:, None]).squeeze(-1)  # (2B, T-1)
    mask = scored[:, 1:].float()
    avg = (logp * mask).sum(1) / mask.sum(1)  # length-normalised log-likelihood per sequence
    chosen, rejected = avg.chunk(2)
    margin = beta * (chosen - rejected) - gamma
    loss = -F.logsigmoid(margin).mean()
    return loss, {"loss": loss.item(), "margin": margin.mean().item(), "chosen_logp": chosen.mean().item(),
                  "rejected_logp": rejected.mean().item(), "pair_accuracy": (margin > -gamma).float().mean().item()}


def run_preference(recipe: Recipe, out: str | Path, progress: bool = True) -> dict[str, Any]:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cfg = recipe.preference
    torch.manual_seed(cfg.seed)
    train, heldout = task_examples(recipe, cfg.seed)
    model, tok = load_policy(recipe.policy)
    rng = random.Random(cfg.seed)
    pool = rng.sample(train, min(len(train), cfg.steps * cfg.batch_size))
    pairs = sample_pairs(model, tok, pool, recipe.task.max_new_tokens, cfg.seed)
    if not pairs:
        raise RuntimeError("no preference pairs: the policy never produced two correct answers of different "
                           "lengths for one prompt (train it with `densa sft` first)")
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.0)
    records = []
    with (out / "metrics.jsonl").open("w") as log:
        for step in tqdm(range(cfg.steps), desc="simpo", disable=not progress):
            batch = rng.sample(pairs, min(cfg.batch_size, len(pairs)))
            loss, stats = simpo_loss(model, batch, cfg.beta, cfg.gamma, tok.pad_token_id)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            if step % cfg.log_interval == 0 or step == cfg.steps - 1:
                records.append({"step": step + 1, **stats})
                log.write(json.dumps(records[-1]) + "\n")
    model.eval()
    save_policy(model, tok, out / "model")
    plot_curves(records, [("loss", "SimPO loss"), ("margin", "reward margin")], out / "align.png",
                "densa align: SimPO (shorter correct answer preferred)")
    outputs = generate_greedy(model, tok, [e["prompt"] for e in heldout], [e["answer"] for e in heldout],
                              max_new_tokens=recipe.task.max_new_tokens, progress=progress)
    result = {"model": str(out / "model"), "pairs": len(pairs), "steps": cfg.steps,
              "heldout": summarise(outputs, tok)}
    (out / "result.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


def _until_eos(ids: list[int], eos: int) -> list[int]:
    return ids[:ids.index(eos) + 1] if eos in ids else ids

"""Greedy evaluation of a chat policy on problems with integer answers: accuracy, output tokens, Token Value.

Greedy decoding is deterministic, so the accuracy at a token budget k (`max_new_tokens = k`) equals scoring the
first k tokens of the one uncapped greedy output; `budget_curve` uses that instead of decoding once per budget.
Token counts include the closing `<|im_end|>` (it is generated and paid for); an output that hits the cap without
it counts the cap.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from tqdm import tqdm

from densa.align.problems import abstains, extract_answer, is_correct
from densa.model.model import DensaModel


@dataclass
class Output:
    tokens: list[int]  # generated ids, up to and including EOS
    answer: int | None  # gold; None: an unanswerable problem (the right answer is `#### unknown`)
    finished: bool  # ended with EOS within the cap

    def text(self, tok: Any, budget: int | None = None) -> str:
        return tok.decode(self.tokens[:budget], skip_special_tokens=True)

    def correct(self, tok: Any, budget: int | None = None) -> bool:
        return is_correct(self.text(tok, budget), self.answer)

    def invented(self, tok: Any, budget: int | None = None) -> bool:
        """The final answer is a number (on an unanswerable problem: a number the model made up)."""
        return extract_answer(self.text(tok, budget)) is not None

    def abstained(self, tok: Any, budget: int | None = None) -> bool:
        return abstains(self.text(tok, budget))


@torch.no_grad()
def generate_greedy(model: DensaModel, tok: Any, prompts: list[list[dict]], answers: list[int], max_new_tokens: int,
                    batch_size: int = 64, progress: bool = False, forced: list[str] | None = None) -> list[Output]:
    """Greedy outputs; `forced[i]` (optional) is text the assistant turn of prompt i is made to start with — it is
    part of the output and its tokens are counted (the study uses it to measure the SFT model's concise mode)."""
    model.eval()
    eos = tok.eos_token_id
    outs: list[Output] = []
    starts = range(0, len(prompts), batch_size)
    for start in tqdm(starts, desc="greedy eval", disable=not progress, leave=False):
        chunk = prompts[start:start + batch_size]
        heads = forced[start:start + batch_size] if forced else [""] * len(chunk)
        head_ids = [tok(h, add_special_tokens=False)["input_ids"] if h else [] for h in heads]
        texts = [tok.apply_chat_template(m, tokenize=False, add_generation_prompt=True) + h
                 for m, h in zip(chunk, heads, strict=True)]
        enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        ids = model.generate(enc["input_ids"], attention_mask=enc["attention_mask"], max_new_tokens=max_new_tokens,
                             stop_tokens=[eos])
        for row, head, answer in zip(ids[:, enc["input_ids"].shape[1]:].tolist(), head_ids,
                                     answers[start:start + batch_size], strict=True):
            n = row.index(eos) + 1 if eos in row else len(row)
            outs.append(Output(head + row[:n], None if answer is None else int(answer), eos in row))
    return outs


def summarise(outputs: list[Output], tok: Any, short_tokens: float | None = None) -> dict[str, float]:
    """accuracy, mean tokens (all / correct), Token Value = correct answers per 1,000 output tokens, and — given a
    `short_tokens` threshold — the share of answers that are at most that long *and* wrong (the risk audit)."""
    correct = [o.correct(tok) for o in outputs]
    lengths = [len(o.tokens) for o in outputs]
    right = [n for n, c in zip(lengths, correct, strict=True) if c]
    result = {"n": len(outputs), "accuracy": sum(correct) / len(outputs),
              "mean_tokens": sum(lengths) / len(outputs),
              "mean_tokens_correct": sum(right) / len(right) if right else float("nan"),
              "token_value_per_1k": 1000 * sum(correct) / max(sum(lengths), 1),
              "finished": sum(o.finished for o in outputs) / len(outputs)}
    if short_tokens is not None:
        result["short_wrong_rate"] = sum(n <= short_tokens and not c for n, c in
                                         zip(lengths, correct, strict=True)) / len(outputs)
    return result


def budget_curve(outputs: list[Output], tok: Any, budgets: list[int]) -> dict[int, float]:
    """Accuracy with `max_new_tokens = k` for each budget k (exact for greedy decoding, see the module docstring)."""
    return {k: sum(o.correct(tok, k) for o in outputs) / len(outputs) for k in budgets}


def audit_unanswerable(outputs: list[Output], tok: Any, budget: int | None = None) -> dict[str, float]:
    """On unanswerable problems: the share answered with an invented number, the share answered honestly
    (`#### unknown`) and the share with no final answer at all (they sum to 1)."""
    invented = sum(o.invented(tok, budget) for o in outputs) / len(outputs)
    honest = sum(o.abstained(tok, budget) for o in outputs) / len(outputs)
    return {"invented_rate": invented, "honest_rate": honest, "no_answer_rate": 1 - invented - honest}

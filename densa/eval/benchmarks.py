"""The benchmarks `densa eval` knows, mapped onto the local lm-eval task YAMLs in `densa/eval/tasks/`.

A densa task is one score: an lm-eval task (or, for MMLU, the 57 per-subject tasks pooled as one micro-averaged
score), the metric that is its headline number, and what kind of work it asks of the model (log-likelihood scoring,
generation, or rolling log-likelihood for bits per byte). `mmlu_gen` is MMLU scored by generation (the answer letter
extracted from what the model writes), what a chat-only endpoint can run. Items are addressed as `subtask/doc_index`;
a `--limit N` subset is a seeded draw without replacement from all items, so it is the same on every run and machine.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np

TASK_DIR = Path(__file__).parent / "tasks"


@dataclass(frozen=True)
class TaskSpec:
    name: str
    lm_eval: str  # lm-eval task or group name in TASK_DIR
    metric: str  # the headline per-item metric ("acc", "exact_match,strict-match", "bits_per_byte", ...)
    kind: str  # "loglikelihood" | "generate" | "bpb"
    chance: float | None = None  # the score of guessing (majority class for BoolQ); None where it does not apply
    higher_is_better: bool = True
    num_fewshot: int | None = None  # what the YAML sets; recorded in results
    same_items_as: str | None = None  # draw --limit subsets as this task does (same questions, comparable scores)


TASKS: dict[str, TaskSpec] = {t.name: t for t in [
    TaskSpec("hellaswag", "densa_hellaswag", "acc_norm", "loglikelihood", 0.25),
    TaskSpec("arc_easy", "densa_arc_easy", "acc", "loglikelihood", 0.25),
    TaskSpec("arc_challenge", "densa_arc_challenge", "acc_norm", "loglikelihood", 0.25),
    TaskSpec("piqa", "densa_piqa", "acc_norm", "loglikelihood", 0.5),
    TaskSpec("winogrande", "densa_winogrande", "acc", "loglikelihood", 0.5),
    TaskSpec("boolq", "densa_boolq", "acc", "loglikelihood", 0.622),
    TaskSpec("openbookqa", "densa_openbookqa", "acc_norm", "loglikelihood", 0.25),
    TaskSpec("mmlu", "densa_mmlu", "acc", "loglikelihood", 0.25, num_fewshot=5),
    TaskSpec("mmlu_gen", "densa_mmlu_gen", "exact_match,letter", "generate", 0.25, num_fewshot=5,
             same_items_as="mmlu"),
    TaskSpec("gsm8k", "densa_gsm8k_cot", "exact_match,strict-match", "generate", 0.0, num_fewshot=8),
    TaskSpec("humaneval", "densa_humaneval", "pass@1", "generate", 0.0),
    TaskSpec("humanevalplus", "densa_humanevalplus", "pass@1", "generate", 0.0),
    TaskSpec("bpb_wikitext2", "densa_bpb_wikitext2", "bits_per_byte", "bpb", higher_is_better=False),
    TaskSpec("bpb_gutenberg", "densa_bpb_gutenberg", "bits_per_byte", "bpb", higher_is_better=False),
]}
ALIASES = {"bpb": ["bpb_wikitext2"], "gsm8k_cot": ["gsm8k"],
           "commonsense": ["hellaswag", "arc_easy", "arc_challenge", "piqa", "winogrande", "boolq", "openbookqa"]}


def parse_tasks(text: str | list[str]) -> list[str]:
    """`"mmlu,gsm8k,bpb"` (or a list) -> task names, aliases expanded, order kept, duplicates dropped."""
    names = [n.strip() for n in (text.split(",") if isinstance(text, str) else text) if n.strip()]
    out: list[str] = []
    for name in names:
        for task in ALIASES.get(name, [name]):
            if task not in TASKS:
                raise ValueError(f"unknown task {name!r}; choose from {', '.join([*TASKS, *ALIASES])}")
            if task not in out:
                out.append(task)
    if not out:
        raise ValueError("no tasks given")
    return out


@cache
def task_manager() -> Any:
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=str(TASK_DIR), include_defaults=False)


@cache
def load_subtasks(name: str) -> dict[str, Any]:
    """lm-eval Task objects of one densa task, by lm-eval task name (one entry, or 57 for MMLU)."""
    import logging

    from lm_eval.tasks import get_task_dict

    logging.getLogger("lm_eval").setLevel(logging.ERROR)  # per-task "custom kwargs" warnings
    loaded = get_task_dict([TASKS[name].lm_eval], task_manager())
    flat: dict[str, Any] = {}

    def walk(node: dict[Any, Any]) -> None:
        for key, value in node.items():
            if isinstance(value, dict):
                walk(value)
            else:
                flat[key if isinstance(key, str) else key.group_name] = value

    walk(loaded)
    return dict(sorted(flat.items()))


def all_items(name: str) -> list[str]:
    """Every item id of a task, `subtask/doc_index`, in a fixed order."""
    return [f"{sub}/{i}" for sub, task in load_subtasks(name).items() for i in range(len(task.eval_docs))]


def subset(name: str, limit: int | None, seed: int) -> list[str]:
    """The evaluated items: all of them, or `limit` drawn without replacement with a seed derived from (seed, task)
    (numpy's PCG64, stable across platforms), in item order. A task with `same_items_as` (generative MMLU) draws the
    positions its twin draws, so both score the same questions."""
    items = all_items(name)
    if limit is None or limit >= len(items):
        return items
    if limit < 1:
        raise ValueError(f"--limit {limit}: must be >= 1")
    rng = np.random.default_rng([seed, zlib.crc32((TASKS[name].same_items_as or name).encode())])
    picked = np.sort(rng.choice(len(items), size=limit, replace=False))
    return [items[i] for i in picked]


def split_item(item: str) -> tuple[str, int]:
    sub, _, index = item.rpartition("/")
    return sub, int(index)

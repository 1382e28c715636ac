"""HumanEval and HumanEval+ pass@1, scored in densa's process-isolated executor (docs/sandbox.md).

HumanEval (Chen et al. 2021, openai/human-eval): human-eval runs `prompt + completion + "\\n" + test + "\\n" +
f"check({entry_point})"` as one program and counts it correct if it runs to the end. Here the untrusted part,
`prompt + completion`, runs in the sandbox and only computes; the trusted part, the prompt (for its helpers, e.g.
`poly`) and `test`, runs in densa's judge process as `check(candidate)`, with `candidate` a stub that calls the
sandboxed `entry_point` and gets back plain data (docs/sandbox.md). The item passes when `check` returns.

HumanEval+ (Liu et al. 2023, EvalPlus v0.1.10): the same prompts, judged differentially like evalplus's
`unsafe_execute`. Its `test` here is generated: `check(candidate)` runs EvalPlus's canonical solution and the
candidate on every `base_input` and `plus_input` (deep copies), and compares the outputs: exact equality, or within
`atol` (rtol 1e-7) when the expected output is a float or a sequence of floats (atol 1e-6 where the task gives 0),
and for `find_zero` (HumanEval/32) |poly(xs, out)| <= atol. Like evalplus, each input gets a time limit of
max(1 s, 4 x the canonical solution's time on it) and the first failing input ends the check; here that time also
counts carrying an answer of the reference's size back from the sandbox (`candidate.transfer_s`). Differences from
evalplus: the reference outputs are computed by the trusted check, in the judge, during the run instead of in a
cached ground-truth pass (so a run costs the reference's time too: about 25 s of CPU for all 164 here), and the
whole item has a wall-clock limit of PLUS_TIMEOUT_S.

Stop sequences: lm-eval's `humaneval` task (lm_eval/tasks/humaneval/humaneval.yaml, generation_kwargs.until),
the ones the Codex paper used.
"""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path

import numpy as np

from densa.eval.sandbox import Check, Limits, SandboxResult, run_checks

STOP_SEQUENCES = ["\nclass", "\ndef", "\n#", "\nif", "\nprint"]
PLUS_TIMEOUT_S = 60.0  # wall clock for one HumanEval+ program (evalplus's EVALPLUS_TIMEOUT_PER_TASK default)
PLUS_MIN_TIME_S = 1.0  # evalplus --min-time-limit default: the least time any one input gets
PLUS_TIME_FACTOR = 4.0  # evalplus --gt-time-limit-factor default: multiple of the reference's time per input
REPO = Path(__file__).resolve().parents[2]


def benchmarks_root() -> Path:
    """`$DENSA_BENCHMARKS` if set, else the repository's `data/benchmarks` (beside the code in an editable install)."""
    root = Path(os.environ.get("DENSA_BENCHMARKS") or REPO / "data" / "benchmarks")
    if not root.is_dir():
        raise FileNotFoundError(f"benchmark data not found at {root}; set DENSA_BENCHMARKS to data/benchmarks")
    return root


def _read_jsonl_gz(path: Path) -> list[dict]:
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def load_problems(plus: bool = False) -> list[dict]:
    """The 164 problems: task_id, prompt, entry_point, test, canonical_solution, and min_timeout_s, the least
    wall-clock limit its program gets whatever `score` is asked for (0 for HumanEval, PLUS_TIMEOUT_S for HumanEval+,
    whose check also runs the reference and has its own per-input limits)."""
    if not plus:
        rows = _read_jsonl_gz(benchmarks_root() / "humaneval" / "HumanEval.jsonl.gz")
        return [{"task_id": r["task_id"], "prompt": r["prompt"], "entry_point": r["entry_point"], "test": r["test"],
                 "canonical_solution": r["canonical_solution"], "min_timeout_s": 0.0} for r in rows]
    rows = _read_jsonl_gz(benchmarks_root() / "humanevalplus" / "HumanEvalPlus.jsonl.gz")
    return [{"task_id": r["task_id"], "prompt": r["prompt"], "entry_point": r["entry_point"], "test": plus_test(r),
             "canonical_solution": r["canonical_solution"], "min_timeout_s": PLUS_TIMEOUT_S} for r in rows]


def plus_test(row: dict) -> str:
    """Source of a differential `check(candidate)` for one EvalPlus row (see the module docstring)."""
    inputs = json.dumps(row["base_input"] + row["plus_input"])
    reference = row["prompt"] + row["canonical_solution"]
    return f'''

def check(candidate):
    import copy, json, math, time

    def same(out, exp, inp, atol):
        if {row["entry_point"] == "find_zero"!r}:  # HumanEval/32: any root will do
            xs = inp[0]
            assert abs(sum(c * math.pow(out, i) for i, c in enumerate(xs))) <= atol
            return
        floats = isinstance(exp, float) or (isinstance(exp, (list, tuple)) and exp
                                            and all(isinstance(e, float) for e in exp))
        atol = 1e-6 if atol == 0 and floats else atol
        if out == exp:
            return
        assert atol != 0, "output differs from the reference"
        assert type(out) == type(exp), "output type differs from the reference"
        pairs = list(zip(out, exp, strict=True)) if isinstance(exp, (list, tuple)) else [(out, exp)]
        assert all(abs(o - e) <= atol + 1e-07 * abs(e) for o, e in pairs), "output not within atol"

    reference = {{}}
    exec({reference!r}, reference)
    expected_of = reference[{row["entry_point"]!r}]
    for inp in json.loads({inputs!r}):
        start = time.perf_counter()
        exp = expected_of(*copy.deepcopy(inp))
        seconds = time.perf_counter() - start + candidate.transfer_s(exp)  # computing, plus bringing the answer back
        limit = max({PLUS_MIN_TIME_S!r}, {PLUS_TIME_FACTOR!r} * seconds)
        out = candidate.call_within(limit, *inp)  # TimeoutError past the limit; the program gets its own copy
        same(out, exp, inp, {row["atol"]!r})
'''


def program(problem: dict, completion: str) -> str:
    """The untrusted program for one completion: the prompt continued by the model (no tests in it)."""
    return problem["prompt"] + completion + "\n"


def item(problem: dict, completion: str) -> Check:
    """One judged item: the program runs sandboxed; the prompt (its helpers) and the tests run in the judge."""
    return Check(program(problem, completion), problem["entry_point"], problem["prompt"] + "\n" + problem["test"])


def execute(problems: list[dict], completions: list[str], timeout_s: float = 10.0, workers: int | None = None,
            progress: bool = False) -> list[SandboxResult]:
    """Judge every (problem, completion) in the sandbox; the full results (status, time, stderr). The program sees
    the benchmark folder empty, so it cannot read the answers."""
    if len(problems) != len(completions):
        raise ValueError(f"{len(problems)} problems but {len(completions)} completions")
    hidden = (str(benchmarks_root()),)
    limits = [Limits(timeout_s=max(timeout_s, float(p.get("min_timeout_s") or 0.0)), hidden=hidden) for p in problems]
    items = [item(p, c) for p, c in zip(problems, completions, strict=True)]
    return run_checks(items, limits, workers=workers, progress=progress, desc="humaneval")


def score(problems: list[dict], completions: list[str], timeout_s: float = 10.0, *, workers: int | None = None,
          progress: bool = False) -> list[bool]:
    """Whether each completion passes its problem's tests (pass@1 with one greedy sample per problem)."""
    return [r.passed for r in execute(problems, completions, timeout_s, workers, progress)]


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c pass (Chen et al. 2021): 1 - C(n-c, k) / C(n, k), in the
    numerically stable product form of human-eval's `estimate_pass_at_k`."""
    if not 0 <= c <= n or k < 1:
        raise ValueError(f"pass@k needs 0 <= c <= n and k >= 1, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def check_canonical(plus: bool, workers: int | None = None, progress: bool = True) -> dict:
    """Score every canonical solution (each must pass): the executor's end-to-end check, with its wall time."""
    import time

    problems = load_problems(plus=plus)
    start = time.perf_counter()
    results = execute(problems, [p["canonical_solution"] for p in problems], workers=workers, progress=progress)
    seconds = time.perf_counter() - start
    return {"benchmark": "humanevalplus" if plus else "humaneval", "n": len(problems),
            "passed": sum(r.passed for r in results), "pass_at_1": sum(r.passed for r in results) / len(problems),
            "wall_s": round(seconds, 1), "workers": workers or os.cpu_count(),
            "slowest_program_s": round(max(r.duration_s for r in results), 2),
            "not_passed": {p["task_id"]: f"{r.status}: {r.stderr[-300:]}"
                           for p, r in zip(problems, results, strict=True) if not r.passed}}


if __name__ == "__main__":
    import argparse

    from densa.eval.sandbox import isolation

    parser = argparse.ArgumentParser(description="Run all canonical solutions of HumanEval and HumanEval+ through "
                                                 "the sandbox (docs/sandbox.md); print JSON")
    parser.add_argument("--workers", type=int, default=None, help="programs at once (default: CPU count)")
    parser.add_argument("--json", metavar="FILE", help="also write the JSON here")
    args = parser.parse_args()
    report = {"isolation": isolation(), "cpus": os.cpu_count(),
              "runs": [check_canonical(plus, args.workers) for plus in (False, True)]}
    text = json.dumps(report, indent=1)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")

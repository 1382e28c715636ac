"""The HumanEval executor: canonical solutions pass, and harmful completions fail without harming anything.

The harmful completions all run once, in parallel, in a module fixture; each test then checks one of them.
tests/test_sandbox_hostile.py has the completions written to game the verdict or escape on purpose.
"""

import math
import os
import socket
import sys
import time
from pathlib import Path

import pytest
import yaml

from densa.eval import humaneval, sandbox, sandbox_judge, sandbox_launcher
from densa.eval.sandbox import Check, Limits, run, run_check, run_many

TIMEOUT_S = 2.0  # for the hanging completions; the canonical ones finish in well under a second


@pytest.fixture(scope="module")
def problems() -> list[dict]:
    return humaneval.load_problems()


def test_all_164_canonical_solutions_pass(problems):
    assert len(problems) == 164 and len({p["task_id"] for p in problems}) == 164
    passed = humaneval.score(problems, [p["canonical_solution"] for p in problems], workers=2)
    assert all(passed), [p["task_id"] for p, ok in zip(problems, passed, strict=True) if not ok]


# HumanEval+ in CI: a fixed sample, including the float-tolerance tasks (2, 4) and the find_zero oracle (32). All 164
# (about 25 s of reference CPU time plus the candidates') are run by the command in docs/sandbox.md.
PLUS_SAMPLE = [0, 2, 4, 16, 32, 53, 101, 124, 150, 163]


def test_humanevalplus_canonical_sample_passes_and_wrong_fails():
    plus = humaneval.load_problems(plus=True)
    assert len(plus) == 164 and all("def check(candidate)" in p["test"] for p in plus)
    sample = [plus[i] for i in PLUS_SAMPLE]
    assert all(humaneval.score(sample, [p["canonical_solution"] for p in sample], workers=2))
    # HumanEval/23 `strlen`: right on the base tests' three short strings, wrong on the longer plus inputs
    fragile = "    return len(string) if len(string) < 20 else 0\n"
    base, extended = humaneval.load_problems()[23], plus[23]
    assert humaneval.score([base], [fragile]) == [True]
    assert humaneval.score([extended], [fragile]) == [False]


def _body(code: str) -> str:
    """A completion for HumanEval/0 (has_close_elements) whose body runs `code`, then answers correctly."""
    lines = [*code.strip("\n").splitlines(), "for i, a in enumerate(numbers):", "    for b in numbers[i + 1:]:",
             "        if abs(a - b) < threshold:", "            return True", "return False"]
    return "".join(f"    {line}\n" for line in lines)


def _harmful(canary: Path, port: int) -> dict[str, str]:
    return {
        "wrong": "return not (len(numbers) > 1)",
        "hang": "while True:\n    pass",
        "sleep": "import time\ntime.sleep(100)",
        "memory": "x = bytearray(10 * 2**30)",
        "fork_bomb": "import os\nwhile True:\n    os.fork()",
        "multiprocessing": "import multiprocessing\nmultiprocessing.Process(target=print).start()",
        "subprocess_rm": f"import subprocess\nsubprocess.run(['rm', '-f', {str(canary)!r}])",
        "os_system_rm": f"import os\nos.system('rm -f {canary}')",
        "network": f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=1).sendall(b'x')",
        "remove": f"import os\nos.remove({str(canary)!r})",
        "rmtree": f"import shutil\nshutil.rmtree({str(canary.parent)!r})",
        "chdir_up_and_delete": f"import os\nos.chdir('..')\nos.remove({str(canary)!r})",
        "relative_delete": f"import os\nos.remove(os.path.relpath({str(canary)!r}))",
        "truncate": f"open({str(canary)!r}, 'w').close()",
        "rename": f"import os\nos.rename({str(canary)!r}, 'stolen')",
        "pathlib_unlink": f"import pathlib\npathlib.Path({str(canary)!r}).unlink()",
        "symlink_then_write": f"import os\nos.symlink({str(canary)!r}, 'link')\nopen('link', 'w').write('')",
        "caught_refusal": f"import os\ntry:\n    os.remove({str(canary)!r})\nexcept OSError:\n    pass",
        "exit_early": "import sys\nsys.exit(0)",
        "hard_exit": "import os\nos._exit(0)",
    }


@pytest.fixture(scope="module")
def harmful_runs(problems, tmp_path_factory):
    canary = tmp_path_factory.mktemp("outside") / "canary.txt"
    canary.write_text("still here")
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    listener.settimeout(0.1)
    completions = _harmful(canary, listener.getsockname()[1])
    start = time.monotonic()
    results = humaneval.execute([problems[0]] * len(completions), [_body(c) for c in completions.values()],
                                timeout_s=TIMEOUT_S, workers=4)
    elapsed = time.monotonic() - start
    try:
        listener.accept()
        connected = True
    except TimeoutError:
        connected = False
    listener.close()
    return {"results": dict(zip(completions, results, strict=True)), "canary": canary, "connected": connected,
            "elapsed": elapsed}


def test_the_vehicle_passes_with_a_harmless_body(problems):
    assert humaneval.score([problems[0]], [_body("x = 1")]) == [True]


@pytest.mark.parametrize("name", ["wrong", "hang", "sleep", "memory", "fork_bomb", "multiprocessing", "subprocess_rm",
                                  "os_system_rm", "network", "remove", "rmtree", "chdir_up_and_delete",
                                  "relative_delete", "truncate", "rename", "pathlib_unlink", "symlink_then_write",
                                  "caught_refusal", "exit_early", "hard_exit"])
def test_harmful_completion_scores_zero(harmful_runs, name):
    result = harmful_runs["results"][name]
    assert not result.passed, (name, result)


def test_harmful_completions_harm_nothing_outside(harmful_runs):
    canary = harmful_runs["canary"]
    assert canary.read_text() == "still here"
    assert not harmful_runs["connected"]  # the listener on 127.0.0.1 never saw a connection


def test_statuses_name_what_happened(harmful_runs):
    status = {name: r.status for name, r in harmful_runs["results"].items()}
    assert status["wrong"] == status["exit_early"] == status["hard_exit"] == "failed"
    assert status["hang"] == status["sleep"] == "timeout"
    assert status["memory"] == "memory" and "MemoryError" in harmful_runs["results"]["memory"].stderr
    for name in ("fork_bomb", "subprocess_rm", "network", "remove", "chdir_up_and_delete", "caught_refusal"):
        assert status[name] == "error", (name, harmful_runs["results"][name])
        assert "densa-sandbox: refused" in harmful_runs["results"][name].stderr
    # 20 programs on 4 workers: the two hanging ones are cut at the timeout, nothing waits for the rest
    assert harmful_runs["results"]["hang"].duration_s < TIMEOUT_S + 1.5
    assert harmful_runs["elapsed"] < 4 * TIMEOUT_S + 10


def test_timeout_kills_the_whole_process_group():
    result = run("import os\nprint(os.getpid(), flush=True)\nwhile True:\n    pass\n", Limits(timeout_s=1.0))
    assert result.status == "timeout"
    pid = int(result.stdout.split()[0])
    with pytest.raises(ProcessLookupError):
        os.killpg(pid, 0)


def test_sandbox_directory_environment_and_stdin():
    os.environ["DENSA_TEST_SECRET"] = "do-not-leak"
    try:
        result = run("import os, sys\nprint(os.getcwd())\nprint(sorted(os.environ))\nprint(repr(sys.stdin.read()))\n"
                     "open('scratch.txt', 'w').write('inside is fine')\nprint(sys.flags.isolated)\n")
    finally:
        del os.environ["DENSA_TEST_SECRET"]
    assert result.status == "passed", result
    cwd, env, stdin, isolated = result.stdout.splitlines()
    assert not Path(cwd).exists()  # the temporary directory is gone
    assert "DENSA_TEST_SECRET" not in env and stdin == "''" and isolated == "1"


def test_output_is_capped():
    result = run("import sys\nwhile True:\n    sys.stdout.write('x' * 65536)\n", Limits(file_bytes=1 << 20))
    assert result.status == "error" and len(result.stdout) <= Limits().output_chars


def test_run_many_keeps_order_and_bounds_workers():
    results = run_many([f"print({i})" for i in range(6)], workers=2)
    assert [r.stdout.strip() for r in results] == [str(i) for i in range(6)]


def test_stop_sequences_match_lm_eval():
    import lm_eval

    class Loader(yaml.SafeLoader):
        pass

    Loader.add_multi_constructor("!", lambda loader, suffix, node: None)  # `!function` tags: not needed here
    path = Path(lm_eval.__file__).parent / "tasks" / "humaneval" / "humaneval.yaml"
    config = yaml.load(path.read_text(), Loader=Loader)  # noqa: S506 - a SafeLoader subclass
    assert sorted(humaneval.STOP_SEQUENCES) == sorted(config["generation_kwargs"]["until"])


def test_pass_at_k_matches_the_combinatorial_definition():
    for n, c, k in [(1, 0, 1), (1, 1, 1), (10, 3, 1), (10, 3, 5), (20, 0, 3), (20, 19, 2), (5, 5, 5), (200, 13, 100)]:
        exact = 1 - math.comb(n - c, k) / math.comb(n, k)
        assert humaneval.pass_at_k(n, c, k) == pytest.approx(exact, rel=1e-9, abs=1e-12)
    assert humaneval.pass_at_k(10, 3, 1) == pytest.approx(0.3)
    with pytest.raises(ValueError):
        humaneval.pass_at_k(3, 4, 1)


def test_python_is_the_running_interpreter():
    assert run("import sys\nprint(sys.version_info[:2])").stdout.strip() == str(sys.version_info[:2])


def test_kernel_layers_hold_without_the_audit_hook(tmp_path):
    """The same attacks with the Python-level hook switched off: what the kernel alone guarantees on this machine.
    Each layer is checked where the machine provides it (docs/sandbox.md lists which ones this machine has)."""
    canary = tmp_path / "canary.txt"
    canary.write_text("still here")
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    limits = Limits(timeout_s=5.0, audit_hook=False)
    probe = run("import os\nprint(os.getuid(), os.readlink('/proc/self/ns/net'), os.readlink('/proc/self/ns/mnt'))",
                limits)
    uid, net_ns, mount_ns = probe.stdout.split()
    attacks = {
        "network": f"import socket\nsocket.create_connection(('127.0.0.1', {listener.getsockname()[1]}), timeout=1)",
        "fork": "import os\npid = os.fork()\nif pid == 0:\n    os._exit(0)",
        "delete": f"import os\nos.remove({str(canary)!r})",
        "write": f"open({str(canary)!r}, 'w').write('gone')",
        "tmp": f"open('/tmp/densa-probe-{os.getpid()}', 'w').write('x')",
    }
    results = dict(zip(attacks, run_many(list(attacks.values()), limits, workers=4), strict=True))
    listener.close()
    checked = []
    if net_ns != os.readlink("/proc/self/ns/net"):
        assert not results["network"].passed
        assert "unreachable" in results["network"].stderr or "Permission denied" in results["network"].stderr
        checked.append("network")
    if int(uid) != 0:
        assert not results["fork"].passed and "Resource temporarily unavailable" in results["fork"].stderr
        checked.append("fork")
    if int(uid) != os.getuid():
        assert not results["delete"].passed and not results["write"].passed
        assert canary.read_text() == "still here"
        checked.append("filesystem")
    if mount_ns != os.readlink("/proc/self/ns/mnt"):  # the tree is read-only: even world-writable /tmp
        assert not results["tmp"].passed and "Read-only file system" in results["tmp"].stderr
        assert not Path(f"/tmp/densa-probe-{os.getpid()}").exists()
        checked.append("read-only tree")
    if not checked:
        pytest.skip("no kernel layer available here (no namespaces, and densa is not root)")


def test_plain_data_round_trips_exactly_and_nothing_else_passes():
    """What a program's answer may be (docs/sandbox.md): tagged JSON keeps every type, and rejects the rest."""
    values = [None, True, False, 0, -5, 2**70, -(2**80), 1.5, -0.0, float("inf"), -float("inf"), "a\"\\\n\x00\ud800é",
              [], [1, [2.0, "x"]], (1, (2,), ()), {1: "a", (1, 2): [3], "k": {}}, {1, 2}, frozenset({3}), 1 + 2j,
              b"\x00\xff", [(1, {2: (3,)})]]
    for value in values:
        text = sandbox_launcher.encode(value).encode("utf-8", "surrogatepass").decode("utf-8", "surrogatepass")
        back = sandbox_judge.decode(text)
        assert back == value and repr(back) == repr(value), (value, back)
    assert math.isnan(sandbox_judge.decode(sandbox_launcher.encode(float("nan"))))
    assert sandbox_judge.decode(sandbox_launcher.encode([1.5, float("-inf"), 2.0])) == [1.5, float("-inf"), 2.0]

    class Yes(int):
        def __eq__(self, other):
            return True

    for bad in (Yes(1), [Yes(1)], object(), {1: object()}):
        with pytest.raises(TypeError, match="not plain data"):
            sandbox_launcher.encode(bad)
    for bad in ('{"x": []}', '{"t": 1}', '{"d": [[[1], 2]]}', '{"t": [], "s": []}', '{"c": [1, 2]}'):
        with pytest.raises((ValueError, TypeError)):
            sandbox_judge.decode(bad)


def test_check_runs_in_the_judge_with_a_stub_candidate():
    program = "def f(x, scale=1):\n    if x < 0:\n        raise ValueError('negative')\n    return (x * scale, {x})\n"
    check = ("def check(candidate):\n    assert candidate(2, scale=3) == (6, {2})\n"
             "    try:\n        candidate(-1)\n    except Exception as exc:\n"
             "        assert 'ValueError: negative' in str(exc)\n"
             "    else:\n        raise AssertionError\n    assert f(1) == (1, {1})  # by name too\n")
    assert run_check(Check(program, "f", check)).status == "passed"
    wrong = run_check(Check(program.replace("x * scale", "x + scale"), "f", check))
    assert wrong.status == "failed" and "AssertionError" in wrong.stderr
    assert run_check(Check("g = 1\n", "f", check)).status == "failed"  # no entry point: the tests never run
    assert run_check(Check("def f(:\n", "f", check)).status == "failed"


def test_a_judge_that_overruns_is_killed_and_replaced(monkeypatch):
    monkeypatch.setattr(sandbox, "JUDGE_GRACE_S", 0.5)
    looping = Check("def f():\n    return 1\n", "f",
                    "def check(candidate):\n    candidate()\n    while True:\n        pass\n")
    start = time.monotonic()
    result = run_check(looping, Limits(timeout_s=0.5))  # the test code itself loops, in the judge
    assert result.status == "timeout" and "overran" in result.stderr and time.monotonic() - start < 5
    assert run("print(1)").status == "passed"  # the next item gets a fresh judge

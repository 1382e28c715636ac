"""A hostile corpus against the HumanEval judge: completions written to game the verdict or escape the sandbox.

Every attack runs twice, with the audit hook on and with it off (what an attacker who disabled it gets). Each must
score 0 and harm nothing outside: a world-writable folder in /tmp with a world-writable canary file and a
world-writable Unix socket stays as it was, /tmp and /dev/shm get no new file, and a correct program running beside
a program that tries to kill it still passes.
"""

import os
import socket
import tempfile
import time
from pathlib import Path

import pytest

from densa.eval import humaneval
from densa.eval.sandbox import Limits, isolation, run_checks

TOKEN = f"densa-attack-{os.getpid()}"
CORRECT = ("    for i, a in enumerate(numbers):\n        for b in numbers[i + 1:]:\n"
           "            if abs(a - b) < threshold:\n                return True\n    return False\n")


def _framed(text: str) -> str:
    return f"(len({text!r}).to_bytes(4, 'big') + {text!r}.encode())"


def _attacks(outside: Path) -> dict[str, tuple[str, str]]:
    """name -> (function body, module-level code run when the program loads). The attacks on the verdict answer
    wrongly and try to pass anyway; the attacks on the machine answer correctly, so only the sandbox can fail them."""
    canary, sock = str(outside / "canary.txt"), str(outside / "sock")
    forged = _framed('["ready"]') + " + " + _framed('["value", true]') + " * 40"  # the judge's protocol, forged
    return {
        # the pass marker of the old launcher, read from its frames, then a clean exit
        "frame_marker": ("    return True\n", "import os, sys\nf = sys._getframe()\nwhile f is not None:\n"
                         "    for v in list(f.f_globals.values()) + list(f.f_locals.values()):\n"
                         "        if isinstance(v, str):\n            print(v)\n    f = f.f_back\nos._exit(0)\n"),
        "always_equal": ("    class Yes:\n        __eq__ = lambda self, other: True\n"
                         "        __ne__ = lambda self, other: False\n    return Yes()\n", ""),
        "always_equal_int": ("    class Yes(int):\n        __eq__ = lambda self, other: True\n"
                             "        __hash__ = int.__hash__\n    return Yes(1)\n", ""),
        "patched_json": ("    return True\n", "import json, copy, math\njson.loads = lambda *a, **k: []\n"
                         "copy.deepcopy = lambda x, *a: x\nmath.isclose = lambda *a, **k: True\n"),
        "caught_refusal": (CORRECT, f"try:\n    open({canary!r}, 'w').write('gone')\n"
                           "except BaseException:\n    pass\n"),
        "disable_hook": (CORRECT, "import sys\nf = sys._getframe()\nwhile f is not None:\n"
                         "    g = f.f_globals\n    if 'install_guard' in g:\n"
                         "        g['REFUSED_EVENTS'] = frozenset(); g['REFUSED_PREFIXES'] = ('-',)\n"
                         "        g['WRITE_FLAGS'] = 0\n"
                         "        g['PATH_EVENTS'].clear()\n    f = f.f_back\n"
                         f"import ctypes\nlibc = ctypes.CDLL(None)\nlibc.unlink({canary.encode()!r})\n"
                         f"libc.creat({(TOKEN + '-ctypes').encode()!r}.join([b'/tmp/', b'']), 0o666)\n"),
        "unix_socket": (CORRECT, f"import socket\ns = socket.socket(socket.AF_UNIX)\ns.connect({sock!r})\n"
                        "s.sendall(b'x')\n"),
        "dir_fd_write": (CORRECT, f"import os\nfd = os.open({str(outside)!r}, os.O_RDONLY)\n"
                         "os.write(os.open('canary.txt', os.O_WRONLY | os.O_TRUNC, dir_fd=fd), b'gone')\n"
                         "os.close(os.open('new.txt', os.O_WRONLY | os.O_CREAT, 0o666, dir_fd=fd))\n"),
        "tmp_write": (CORRECT, f"open('/tmp/{TOKEN}', 'w').write('x')\nopen('/dev/shm/{TOKEN}', 'w')\n"),
        "atexit": ("    return None\n", "import atexit, os\natexit.register(os._exit, 0)\n"),
        "settrace": (CORRECT, "import sys\nsys.settrace(lambda *a: None)\n"),
        "inherited_fds": ("    return True\n", "import os\nfor fd in range(3, 64):\n    try:\n"
                          f"        os.write(fd, {forged})\n"
                          "    except OSError:\n        pass\nos._exit(0)\n"),
        "builtins": (CORRECT, "import builtins\nbuiltins.isinstance = lambda *a: False\n"
                     "builtins.AssertionError = type('Never', (Exception,), {})\nbuiltins.len = lambda x: 0\n"
                     f"open({canary!r}, 'a').write('gone')\n"),
        "gc_walk": (CORRECT, "import gc\nfor o in gc.get_objects():\n    pass\n"),
        "answer_key": ("    return _solution(numbers, threshold)\n",
                       f"import gzip, json\nrows = gzip.open({str(humaneval.benchmarks_root())!r} + "
                       "'/humaneval/HumanEval.jsonl.gz', 'rt').read().splitlines()\nrow = json.loads(rows[0])\n"
                       "exec(row['prompt'] + row['canonical_solution'])\n_solution = has_close_elements\n"),
    }


@pytest.fixture(scope="module")
def outside():
    folder = Path(tempfile.mkdtemp(prefix="densa-outside-"))
    os.chmod(folder, 0o777)  # world-writable: only the sandbox's own layers keep a program out
    (folder / "canary.txt").write_text("still here")
    os.chmod(folder / "canary.txt", 0o666)
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(folder / "sock"))
    os.chmod(folder / "sock", 0o777)
    listener.listen()
    listener.setblocking(False)
    yield folder, listener
    listener.close()
    for path in folder.iterdir():
        path.unlink()
    folder.rmdir()


@pytest.fixture(scope="module")
def hostile_runs(outside):
    folder, listener = outside
    info = isolation()
    if info["program_uid"] == 0:
        pytest.skip("programs run as root here: the hostile corpus would be unsafe to run")
    problem = humaneval.load_problems()[0]
    plus = humaneval.load_problems(plus=True)[0]
    attacks = _attacks(folder)
    items, limits, names = [], [], []
    for hook in (True, False):
        lim = Limits(timeout_s=5.0, audit_hook=hook, hidden=(str(humaneval.benchmarks_root()),))
        for name, (body, module) in attacks.items():
            for target in (problem, plus) if name == "patched_json" else (problem,):
                items.append(humaneval.item(target, body + "\n\n" + module))
                limits.append(lim)
                names.append((name, hook, target["task_id"] if target is problem else "plus"))
    results = run_checks(items, limits, workers=4)
    try:
        listener.accept()
        connected = True
    except BlockingIOError:
        connected = False
    return {"results": dict(zip(names, results, strict=True)), "connected": connected, "isolation": info}


VERDICT_ATTACKS = ["frame_marker", "always_equal", "always_equal_int", "patched_json", "atexit", "inherited_fds",
                   "answer_key"]
MACHINE_ATTACKS = ["caught_refusal", "disable_hook", "unix_socket", "dir_fd_write", "tmp_write", "settrace",
                   "builtins", "gc_walk"]


@pytest.mark.parametrize("name", VERDICT_ATTACKS + MACHINE_ATTACKS)
def test_hostile_completion_scores_zero(hostile_runs, name):
    """With the hook on, every attack scores 0. With it off, the attacks on the verdict still do; a correct program
    whose harmful calls the kernel refused (and that caught the error) may pass: nothing was harmed."""
    runs = {key: r for key, r in hostile_runs["results"].items() if key[0] == name and (key[1] or name in
                                                                                        VERDICT_ATTACKS)}
    assert runs and all(not r.passed for r in runs.values()), runs


def test_hostile_completions_harm_nothing_outside(hostile_runs, outside):
    folder, _ = outside
    assert (folder / "canary.txt").read_text() == "still here"
    assert sorted(p.name for p in folder.iterdir()) == ["canary.txt", "sock"]
    assert not hostile_runs["connected"]
    assert not [p for p in ("/tmp", "/dev/shm") for name in os.listdir(p) if name.startswith(TOKEN)]


def test_the_hook_ends_a_refused_program_at_once(hostile_runs):
    results = hostile_runs["results"]
    for name in ("caught_refusal", "disable_hook", "unix_socket", "dir_fd_write", "settrace", "gc_walk"):
        result = results[(name, True, "HumanEval/0")]
        assert result.status == "error" and "densa-sandbox: refused" in result.stderr, (name, result)


def test_non_plain_results_are_refused_by_type(hostile_runs):
    for name in ("always_equal", "always_equal_int"):
        result = hostile_runs["results"][(name, True, "HumanEval/0")]
        assert result.status == "failed" and "not plain data" in result.stderr, result


KILLER = """
import os, time
assert os.getuid() != 0  # never as root: this loop would kill the machine's processes
end = time.monotonic() + 2.0
while time.monotonic() < end:
    for pid in os.listdir('/proc'):
        if pid.isdigit() and int(pid) != os.getpid():
            try:
                with open(f'/proc/{pid}/status') as f:
                    uid = int(next(line for line in f if line.startswith('Uid:')).split()[1])
                if 60000 <= uid < 64096:  # sandboxed programs: the siblings
                    os.kill(int(pid), 9)
            except (OSError, StopIteration, ValueError):
                pass
    time.sleep(0.02)
"""


@pytest.mark.parametrize("hook", [True, False])
def test_a_program_cannot_kill_its_sibling(hook):
    """A correct program that takes a second, beside one that kills every sandboxed process it can: the correct one
    still passes. With the hook off this is the per-slot uid alone (each worker slot runs as its own uid)."""
    if isolation()["program_uid"] == 0:
        pytest.skip("programs run as root here")
    problem = humaneval.load_problems()[0]
    victim = humaneval.item(problem, CORRECT + "\n\nimport time\ntime.sleep(1.0)\n")
    killer = humaneval.item(problem, "    return True\n\n" + KILLER)
    limits = Limits(timeout_s=8.0, audit_hook=hook)
    start = time.monotonic()
    victim_result, killer_result = run_checks([victim, killer], limits, workers=2)
    assert victim_result.passed, victim_result
    assert not killer_result.passed
    assert time.monotonic() - start < 8.0

"""Run untrusted Python (model-written code) in a separate, limited process; judge it from another (docs/sandbox.md).

Three processes take part. densa (this module) never runs untrusted code nor test code. Per worker slot it keeps a
trusted judge process (densa/eval/sandbox_judge.py), which for each item starts the untrusted program in a fresh
sandboxed child (densa/eval/sandbox_launcher.py) and decides the verdict:

- `run(source)`: the program passes when it returns normally (the program's own report: fine for trusted probes,
  not a verdict on hostile code);
- `run_check(program, entry_point, check)`: the judge runs the trusted test code `check(candidate)` itself, with
  `candidate` a stub that calls the program's `entry_point` over a pipe and gets back plain data (tagged JSON). The
  program only computes: nothing it does can reach the verdict.

The untrusted child gets, from the kernel up: new mount (everything read-only but its sandbox directory), network
and IPC namespaces; its slot's own unprivileged uid (60000 + slot, when densa runs as root), so it cannot signal or
trace any other program; a seccomp filter without sockets; resource limits (memory, CPU, file size, open files, no
new processes); no inherited descriptor but its two pipes; death with its judge; and a Python audit hook that ends
the process on a refused operation. A wall-clock limit is enforced by the judge, and densa kills a judge that
overruns its own deadline.
"""

from __future__ import annotations

import atexit
import fcntl
import json
import math
import os
import select
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from densa.eval import sandbox_launcher  # noqa: F401 - imported so its bytecode is cached for every program

JUDGE = Path(__file__).with_name("sandbox_judge.py")

STATUSES = ("passed", "failed", "timeout", "memory", "error")
UID_BASE = 60000  # slot k's programs run as uid/gid 60000 + k when densa is root
JUDGE_GRACE_S = 10.0  # a judge may take 2 x timeout_s + this for one item (its test code runs too) before it is killed


@dataclass(frozen=True)
class Limits:
    """What one program may use. The CPU-time limit is derived from the timeout (ceil + 1 s)."""

    timeout_s: float = 10.0  # wall clock for the whole item; on overrun the program gets SIGKILL
    memory_bytes: int = 2 << 30  # RLIMIT_AS (virtual address space): an allocation beyond it raises MemoryError
    file_bytes: int = 16 << 20  # RLIMIT_FSIZE: the largest file the program may write, stdout/stderr included
    open_files: int = 64  # RLIMIT_NOFILE
    output_chars: int = 4000  # how much of the end of stdout and stderr the result keeps
    namespaces: bool = True  # new mount (read-only tree), network and IPC namespaces; best effort, see docs/sandbox.md
    site_packages: bool = False  # also offer this environment's site-packages (numpy, ...); slower start
    unprivileged: bool = True  # when densa runs as root, run the program as its slot's uid (UID_BASE + slot)
    audit_hook: bool = True  # False only to test the kernel layers alone (tests/test_sandbox.py)
    hidden: tuple[str, ...] = ()  # folders the program sees empty (an empty read-only tmpfs over each): answer keys

    def __post_init__(self) -> None:
        if not self.timeout_s > 0:
            raise ValueError(f"sandbox timeout_s must be > 0, got {self.timeout_s}")
        if self.memory_bytes < 64 << 20:
            raise ValueError(f"sandbox memory_bytes must be at least 64 MiB (the interpreter), got {self.memory_bytes}")
        if self.file_bytes < 4096 or self.open_files < 16 or self.output_chars < 0:
            raise ValueError("sandbox file_bytes must be >= 4096, open_files >= 16, output_chars >= 0")

    @property
    def cpu_s(self) -> int:
        return math.ceil(self.timeout_s) + 1

    def for_judge(self) -> dict:
        return {"timeout_s": self.timeout_s, "memory_bytes": self.memory_bytes, "cpu_s": self.cpu_s,
                "file_bytes": self.file_bytes, "open_files": self.open_files, "output_chars": self.output_chars,
                "namespaces": self.namespaces, "site_packages": self.site_packages, "audit_hook": self.audit_hook,
                "unprivileged": self.unprivileged, "hidden": [str(Path(h).resolve()) for h in self.hidden]}


@dataclass(frozen=True)
class SandboxResult:
    """The outcome of one program.

    status: passed (run: returned normally; check: the judge's tests passed), failed (raised, a test failed, or
    exited early), timeout (wall clock or CPU limit), memory (an allocation hit the memory limit, or the kernel killed
    it for memory), error (the sandbox stopped it: a refused operation, the output/file-size cap, another signal; or
    the sandbox could not start it).
    """

    status: str
    duration_s: float
    returncode: int  # negative: killed by that signal (-9 also when the judge ended it after its tests)
    stdout: str  # the last Limits.output_chars characters
    stderr: str  # likewise, then the judge's notes (a failed test's traceback)

    @property
    def passed(self) -> bool:
        return self.status == "passed"


@dataclass(frozen=True)
class Check:
    """One judged item: the untrusted `program` must define `entry_point`; the trusted `check` source defines
    `check(candidate)` (HumanEval's test code, with any helpers it needs), run in the judge with a stub candidate."""

    program: str
    entry_point: str
    check: str


def run(source: str, limits: Limits | None = None) -> SandboxResult:
    """Execute `source` as `__main__` in a fresh sandboxed interpreter; passed when it returns normally."""
    return _ask({"mode": "run", "program": source}, limits or Limits())


def run_check(item: Check, limits: Limits | None = None) -> SandboxResult:
    """Run `item.program` sandboxed and judge it with `item.check` in the trusted judge (see Check)."""
    return _ask({"mode": "check", "program": item.program, "entry_point": item.entry_point, "check": item.check},
                limits or Limits())


def run_many(sources: Sequence[str], limits: Limits | Sequence[Limits] | None = None, workers: int | None = None,
             progress: bool = False, desc: str = "sandbox") -> list[SandboxResult]:
    """Run many programs, at most `workers` at once (default: the number of CPUs); results in input order."""
    return _map(run, list(sources), limits, workers, progress, desc)


def run_checks(items: Sequence[Check], limits: Limits | Sequence[Limits] | None = None, workers: int | None = None,
               progress: bool = False, desc: str = "sandbox") -> list[SandboxResult]:
    """Judge many items, at most `workers` at once (default: the number of CPUs); results in input order."""
    return _map(run_check, list(items), limits, workers, progress, desc)


def _map(function, items: list, limits, workers: int | None, progress: bool, desc: str) -> list[SandboxResult]:
    per_item = list(limits) if isinstance(limits, Sequence) else [limits or Limits()] * len(items)
    if len(per_item) != len(items):
        raise ValueError(f"{len(items)} programs but {len(per_item)} limits")
    workers = max(1, min(workers or os.cpu_count() or 1, len(items) or 1))
    with ThreadPoolExecutor(max_workers=workers) as pool:  # threads only wait; the work is in the judges
        results = pool.map(function, items, per_item)
        if progress:
            from tqdm import tqdm

            results = tqdm(results, total=len(items), desc=desc, unit="program")
        return list(results)


class _Judge:
    """One trusted judge process (densa/eval/sandbox_judge.py) and the worker slot it holds: a lock file, so no other
    densa process on the machine uses the same slot (and uid) at the same time."""

    def __init__(self) -> None:
        folder = Path(tempfile.gettempdir()) / f"densa-sandbox-slots-{os.getuid()}"
        folder.mkdir(mode=0o700, exist_ok=True)
        for slot in range(4096):
            lock = open(folder / f"{slot}.lock", "a")  # noqa: SIM115 - held for the judge's lifetime
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                lock.close()
                continue
            self.slot, self.lock = slot, lock
            break
        else:
            raise RuntimeError("no free sandbox slot (4096 in use)")
        self.uid = UID_BASE + self.slot if os.geteuid() == 0 else -1
        self.proc: subprocess.Popen | None = None
        self.buffer = b""

    def ask(self, request: dict, deadline_s: float) -> dict | None:
        """Send one item; its reply, or None if the judge overran `deadline_s` or died (then it is killed)."""
        if self.proc is None or self.proc.poll() is not None:
            self.proc = subprocess.Popen([sys.executable, "-I", "-B", "-S", str(JUDGE), str(self.uid)],
                                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                         env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"}, start_new_session=True)
            self.buffer = b""
        try:
            self.proc.stdin.write(json.dumps(request).encode() + b"\n")
            self.proc.stdin.flush()
        except BrokenPipeError:
            self.stop()
            return None
        deadline = time.monotonic() + deadline_s
        fd = self.proc.stdout.fileno()
        while b"\n" not in self.buffer:
            remaining = deadline - time.monotonic()
            chunk = os.read(fd, 1 << 20) if remaining > 0 and select.select([fd], [], [], remaining)[0] else b""
            if not chunk:
                self.stop()
                return None
            self.buffer += chunk
        line, _, self.buffer = self.buffer.partition(b"\n")
        return json.loads(line)

    def stop(self) -> None:
        """Kill the judge (its program dies with it: parent-death signal); the next item starts a new one."""
        if self.proc is not None and self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            self.proc.wait()
        self.proc = None


_idle: list[_Judge] = []
_all: list[_Judge] = []
_judges_lock = threading.Lock()


def _ask(request: dict, limits: Limits) -> SandboxResult:
    with _judges_lock:
        judge = _idle.pop() if _idle else None
    if judge is None:
        judge = _Judge()
        with _judges_lock:
            _all.append(judge)
    try:
        request["limits"] = limits.for_judge()
        start = time.monotonic()
        reply = judge.ask(request, 2 * limits.timeout_s + JUDGE_GRACE_S)
    finally:
        with _judges_lock:
            _idle.append(judge)
    if reply is None:
        return SandboxResult("timeout", time.monotonic() - start, -signal.SIGKILL, "",
                             "densa-sandbox: the judge overran its deadline (or died) and was killed")
    return SandboxResult(reply["status"], reply["duration_s"], reply["returncode"], reply["stdout"], reply["stderr"])


@atexit.register
def _stop_judges() -> None:
    with _judges_lock:
        for judge in _all:
            judge.stop()


ISOLATION_PROBE = """import errno, os, socket
print(os.getuid(), os.readlink('/proc/self/ns/net'), os.readlink('/proc/self/ns/mnt'))
try:
    pid = os.fork()
except OSError:
    print('no-fork')
else:
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)
    print('fork')
try:
    os.close(os.open('/tmp/densa-sandbox-probe-' + str(os.getpid()), os.O_WRONLY | os.O_CREAT | os.O_EXCL))
    print('write')
except OSError as exc:
    print(errno.errorcode[exc.errno])
try:
    socket.socket(socket.AF_UNIX)
    print('socket')
except OSError:
    print('no-socket')
"""


def isolation() -> dict[str, bool | int]:
    """Which kernel layers this machine gives a sandboxed program, found by running a probe with the audit hook off:
    its uid, its own network and mount namespaces, whether it can create a process, write to /tmp, make a socket."""
    result = run(ISOLATION_PROBE, Limits(audit_hook=False))
    if not result.passed:
        raise RuntimeError(f"the isolation probe failed: {result.stderr[-500:]}")
    uid, net_ns, mount_ns, fork, tmp, sock = result.stdout.split()
    return {"program_uid": int(uid), "densa_uid": os.getuid(),
            "network_namespace": net_ns != os.readlink("/proc/self/ns/net"),
            "mount_namespace": mount_ns != os.readlink("/proc/self/ns/mnt"), "read_only_tree": tmp == "EROFS",
            "no_new_processes": fork == "no-fork", "no_sockets": sock == "no-socket",
            "kernel_guards_files": int(uid) != os.getuid()}

"""Run untrusted Python (model-written code) in a separate, limited process (docs/sandbox.md).

Every program gets a fresh interpreter (`python -I -B -S`: no user site, no PYTHON* variables, no script directory
on sys.path, no bytecode writes, and by default only the standard library) in its own session, inside a fresh
temporary directory that is deleted afterwards, with a stripped environment and stdin on /dev/null. Layers, from the
kernel up:

- resource limits (setrlimit in the child): address space, CPU seconds, size of any file written (stdout and stderr
  included, so output is capped too), open files, no core dumps, and no new processes (RLIMIT_NPROC);
- a wall-clock timeout after which the whole process group is killed (start_new_session + os.killpg);
- where the kernel allows it, new user and network namespaces (unshare(2)): no network interface but a loopback that
  is down, and RLIMIT_NPROC is enforced even when densa runs as root;
- a Python audit hook (PEP 578) installed before the program runs that refuses process creation, signals, sockets,
  ctypes, and any filesystem write, delete, rename or chdir outside the sandbox directory.

The audit hook works at the interpreter level and stops accidents and naive harm (what a language model writes);
it is not a boundary against a determined attacker who targets the hook itself. For hostile code, run densa inside a
container or VM. What holds regardless of the hook: the limits, the timeout and the process-group kill.

The child's first code is densa/eval/sandbox_launcher.py (trusted, standard library only). A run passes only when
the program returns normally, nothing was refused, and the launcher prints its per-run marker.
"""

from __future__ import annotations

import math
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from densa.eval import sandbox_launcher
from densa.eval.sandbox_launcher import EXIT_LAUNCHER, EXIT_MEMORY, EXIT_REFUSED

STATUSES = ("passed", "failed", "timeout", "memory", "error")


@dataclass(frozen=True)
class Limits:
    """What one program may use. The CPU-time limit is derived from the timeout (ceil + 1 s)."""

    timeout_s: float = 10.0  # wall clock; on overrun the whole process group gets SIGKILL
    memory_bytes: int = 2 << 30  # RLIMIT_AS (virtual address space): an allocation beyond it raises MemoryError
    file_bytes: int = 16 << 20  # RLIMIT_FSIZE: the largest file the program may write, stdout/stderr included
    open_files: int = 64  # RLIMIT_NOFILE
    output_chars: int = 4000  # how much of the end of stdout and stderr the result keeps
    network_namespace: bool = True  # try unshare(CLONE_NEWUSER | CLONE_NEWNET); best effort, see docs/sandbox.md
    site_packages: bool = False  # also offer this environment's site-packages (numpy, ...); slower start
    drop_root_to: int | None = 65534  # when densa runs as root, run the program as this uid/gid ("nobody")
    audit_hook: bool = True  # False only to test the kernel layers alone (tests/test_sandbox.py)

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


@dataclass(frozen=True)
class SandboxResult:
    """The outcome of one program.

    status: passed (returned normally), failed (raised, or exited early), timeout (wall clock or CPU limit),
    memory (an allocation hit the memory limit, or the kernel killed it for memory), error (the sandbox stopped it:
    a refused operation, the output/file-size cap, another signal; or the sandbox could not start it).
    """

    status: str
    duration_s: float
    returncode: int  # negative: killed by that signal
    stdout: str  # the last Limits.output_chars characters, launcher marker removed
    stderr: str  # likewise

    @property
    def passed(self) -> bool:
        return self.status == "passed"


def run(source: str, limits: Limits | None = None) -> SandboxResult:
    """Execute `source` as `__main__` in a fresh sandboxed interpreter and classify the outcome."""
    limits = limits or Limits()
    root = Path(tempfile.mkdtemp(prefix="densa-sandbox-"))
    try:
        work = root / "work"  # the program's cwd, $HOME and $TMPDIR; the only place it may write
        work.mkdir()
        (work / "program.py").write_text(source, encoding="utf-8")
        uid = limits.drop_root_to if os.geteuid() == 0 and limits.drop_root_to is not None else -1
        if uid >= 0:  # the unprivileged program may enter root/ and write only in work/
            os.chmod(root, 0o711)
            os.chown(work, uid, uid)
        marker = f"densa-sandbox-done-{secrets.token_hex(8)}"
        settings = {"work": str(work), "marker": marker, "memory_bytes": limits.memory_bytes, "cpu_s": limits.cpu_s,
                    "file_bytes": limits.file_bytes, "open_files": limits.open_files,
                    "network_namespace": limits.network_namespace, "site_packages": limits.site_packages,
                    "uid": uid, "audit_hook": limits.audit_hook}
        with open(root / "stdout", "wb") as out, open(root / "stderr", "wb") as err:
            start = time.monotonic()
            proc = subprocess.Popen([sys.executable, "-I", "-B", "-S", sandbox_launcher.__file__],
                                    stdin=subprocess.PIPE, stdout=out, stderr=err, cwd=work, env=_child_env(work),
                                    start_new_session=True)
            try:
                proc.stdin.write(sandbox_launcher.write_settings(settings).encode())
                proc.stdin.close()
            except BrokenPipeError:  # the child died before reading its settings; wait() reports how
                pass
            try:
                timed_out = not _wait_exited(proc.pid, start + limits.timeout_s)
            finally:  # also when the caller is interrupted: no program outlives run()
                _kill_group(proc.pid)  # the group leader is unreaped, so its pgid cannot have been reused
                returncode = proc.wait()
            duration = time.monotonic() - start
        stdout = _tail(root / "stdout", limits.output_chars + len(marker) + 1)
        stderr = _tail(root / "stderr", limits.output_chars)
        output_capped = max((root / name).stat().st_size for name in ("stdout", "stderr")) >= limits.file_bytes
    finally:
        _remove_tree(root)
    completed = stdout.endswith(marker + "\n")
    stdout = stdout.removesuffix(marker + "\n")[-limits.output_chars:] if limits.output_chars else ""
    status = "error" if output_capped and not timed_out else _classify(returncode, timed_out, completed)
    return SandboxResult(status, duration, returncode, stdout, stderr)


def run_many(sources: Sequence[str], limits: Limits | Sequence[Limits] | None = None, workers: int | None = None,
             progress: bool = False, desc: str = "sandbox") -> list[SandboxResult]:
    """Run many programs, at most `workers` at once (default: the number of CPUs); results in input order."""
    per_program = list(limits) if isinstance(limits, Sequence) else [limits or Limits()] * len(sources)
    if len(per_program) != len(sources):
        raise ValueError(f"{len(sources)} programs but {len(per_program)} limits")
    workers = max(1, min(workers or os.cpu_count() or 1, len(sources) or 1))
    with ThreadPoolExecutor(max_workers=workers) as pool:  # threads only wait; the work is in child processes
        results = pool.map(run, sources, per_program)
        if progress:
            from tqdm import tqdm

            results = tqdm(results, total=len(sources), desc=desc, unit="program")
        return list(results)


def _child_env(work: Path) -> dict[str, str]:
    """Nothing from the caller's environment (tokens, proxies, PYTHON*) reaches the program."""
    return {"PATH": "/usr/bin:/bin", "HOME": str(work), "TMPDIR": str(work), "LANG": "C.UTF-8",
            "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def _wait_exited(pid: int, deadline: float) -> bool:
    """Poll until the child exits (left unreaped, WNOWAIT) or the deadline passes; True if it exited."""
    delay = 0.001
    while True:
        if os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None:
            return True
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return False
        time.sleep(min(delay, remaining))
        delay = min(delay * 2, 0.005)


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _classify(returncode: int, timed_out: bool, completed: bool) -> str:
    if timed_out or returncode == -signal.SIGXCPU:
        return "timeout"
    if returncode == 0 and completed:
        return "passed"
    if returncode == EXIT_MEMORY or returncode == -signal.SIGKILL:  # SIGKILL not sent by us: the kernel OOM killer
        return "memory"
    if returncode in (EXIT_REFUSED, EXIT_LAUNCHER) or returncode < 0:  # SIGXFSZ (output cap), SIGSEGV, ...
        return "error"
    return "failed"


def _tail(path: Path, chars: int) -> str:
    with open(path, "rb") as f:
        f.seek(max(0, f.seek(0, os.SEEK_END) - 4 * chars))  # up to 4 bytes per UTF-8 character
        return f.read().decode("utf-8", errors="replace")[-chars:] if chars else ""


def _remove_tree(root: Path) -> None:
    """Delete the sandbox, even if the program left directories without write or search permission."""
    def make_writable_and_retry(func, path, _exc):
        os.chmod(os.path.dirname(path), 0o700)
        if os.path.isdir(path) and not os.path.islink(path):
            os.chmod(path, 0o700)
        func(path)

    shutil.rmtree(root, onerror=make_writable_and_retry)


ISOLATION_PROBE = """import os
print(os.getuid(), os.readlink('/proc/self/ns/net'))
try:
    pid = os.fork()
except OSError:
    print('no-fork')
else:
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)
    print('fork')
"""


def isolation() -> dict[str, bool | int]:
    """Which kernel layers this machine gives a sandboxed program, found by running a probe with the audit hook off:
    its uid, whether it is in its own network namespace, whether it can create a process."""
    result = run(ISOLATION_PROBE, Limits(audit_hook=False))
    uid, net_ns, fork = result.stdout.split()
    return {"program_uid": int(uid), "densa_uid": os.getuid(), "network_namespace": net_ns != os.readlink(
        "/proc/self/ns/net"), "no_new_processes": fork == "no-fork", "kernel_guards_files": int(uid) != os.getuid()}

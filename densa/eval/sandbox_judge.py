"""The trusted judge process: it runs each untrusted program in a sandboxed child and decides its verdict.

densa (densa/eval/sandbox.py) keeps one judge per worker slot, started as `python -I -B -S sandbox_judge.py UID`,
and sends it one JSON line per item; the judge answers one JSON line (status, duration_s, returncode, stdout,
stderr). For each item it makes a fresh sandbox directory, starts the launcher (densa/eval/sandbox_launcher.py)
as the slot's unprivileged `UID` with two pipes and no other descriptor, and then:

- a `run` item passes when the launcher reports that the program returned normally;
- a `check` item runs the benchmark's trusted test code here, in this process, as `check(candidate)`, where
  `candidate` is a stub that sends its arguments to the program and decodes the answer as plain data (tagged JSON:
  see sandbox_launcher.encode). The item passes when `check` returns. Nothing the program does reaches this
  process's memory, so no marker, patched module or always-equal object can make it pass.

The judge is trusted but runs test code that may loop on a bad answer: densa kills it after a deadline and starts
a new one, which first kills every process left under its uid. Standard library only.
"""

import json
import marshal
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback

if __package__:  # imported (by the tests)
    from densa.eval import sandbox_launcher as launcher
else:  # the judge script: `python -I` left the script's folder off sys.path
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import sandbox_launcher as launcher

    del sys.path[0]

with open(launcher.__file__, encoding="utf-8") as _source:
    LAUNCHER_CODE = marshal.dumps(compile(_source.read(), launcher.__file__, "exec"))  # sent to every program
EXIT_STATUSES = {launcher.EXIT_MEMORY: "memory", launcher.EXIT_REFUSED: "error", launcher.EXIT_LAUNCHER: "error"}


class ItemTimeout(BaseException):
    """The item's wall-clock limit passed (a BaseException: test code catching Exception cannot swallow it)."""


class CandidateError(Exception):
    """The program raised, returned something that is not plain data, or died during a call."""


def decode(text: str):
    """Tagged JSON (sandbox_launcher.encode) -> plain Python values; anything else raises ValueError or TypeError.
    json's parser builds the lists; each tagged object is turned into its value as it is parsed, innermost first."""
    return json.loads(text, object_hook=_tagged)


def _tagged(node: dict):
    if len(node) != 1:
        raise ValueError("a tagged value has exactly one key")
    ((tag, body),) = node.items()
    if tag == "i" and type(body) is str:
        return int(body, 16)
    if tag == "b" and type(body) is str:
        return bytes.fromhex(body)
    if type(body) is not list:
        raise ValueError(f"tag {tag!r} needs a list")
    if tag == "t":
        return tuple(body)
    if tag == "s":
        return set(body)
    if tag == "f":
        return frozenset(body)
    if tag == "d":
        if not all(type(pair) is list and len(pair) == 2 for pair in body):
            raise ValueError("a dict is a list of [key, value] pairs")
        return dict(body)
    if tag == "c" and len(body) == 2 and type(body[0]) is float and type(body[1]) is float:
        return complex(body[0], body[1])
    raise ValueError(f"unknown tag {tag!r}")


class Channel:
    """The judge's end of the two pipes to one program, with a deadline on every read."""

    def __init__(self, cmd_fd: int, res_fd: int, deadline: float, max_message: int):
        self.cmd_fd, self.res_fd, self.deadline, self.max_message = cmd_fd, res_fd, deadline, max_message
        self.broken = False

    def read(self, limit_s: float | None = None):
        """The next message as decoded JSON; None at end of file; TimeoutError past `limit_s`."""
        deadline = self.deadline if limit_s is None else min(self.deadline, time.monotonic() + limit_s)
        head = self._read_exactly(4, deadline)
        if head is None:
            return None
        size = int.from_bytes(head, "big")
        if size > self.max_message:
            raise CandidateError(f"the program sent {size} bytes in one message (limit {self.max_message})")
        body = self._read_exactly(size, deadline)
        if body is None:
            return None
        return decode(body.decode("utf-8", "surrogatepass"))

    def _read_exactly(self, size: int, deadline: float) -> bytes | None:
        parts, left = [], size
        while left:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not select.select([self.res_fd], [], [], remaining)[0]:
                self.broken = True
                if deadline >= self.deadline:
                    raise ItemTimeout
                raise TimeoutError("input time limit exceeded")
            chunk = os.read(self.res_fd, min(left, 1 << 20))
            if not chunk:
                return None
            parts.append(chunk)
            left -= len(chunk)
        return b"".join(parts)


class Candidate:
    """What the test code gets as `candidate`: calls go to the sandboxed program; answers come back as plain data."""

    def __init__(self, channel: Channel, name: str):
        self._channel, self.__name__ = channel, name

    def __call__(self, *args, **kwargs):
        return self.call_within(None, *args, **kwargs)

    def transfer_s(self, value) -> float:
        """How long `value` takes to come back from a program (encode there, decode here), timed here: HumanEval+
        adds it to the reference's time before scaling, so a per-input limit measures computing, not the pipe."""
        start = time.perf_counter()
        try:
            decode(launcher.encode(value))
        except (ValueError, TypeError, RecursionError):
            return 0.0
        return time.perf_counter() - start

    def call_within(self, limit_s: float | None, *args, **kwargs):
        """Call with a time limit for this call alone (HumanEval+'s per-input limit): TimeoutError past it."""
        channel = self._channel
        if channel.broken:
            raise CandidateError("the program stopped answering")
        request = marshal.dumps((args, kwargs))
        try:
            launcher.send_bytes(channel.cmd_fd, request)
            reply = channel.read(limit_s)
        except BrokenPipeError:
            channel.broken = True
            raise CandidateError("the program ended during a call") from None
        except (ValueError, TypeError, RecursionError) as exc:
            channel.broken = True
            raise CandidateError(f"the program's answer is not plain data: {exc}") from None
        if reply is None:
            channel.broken = True
            raise CandidateError("the program ended during a call")
        if type(reply) is list and len(reply) == 2 and reply[0] == "value":
            return reply[1]
        if type(reply) is list and len(reply) == 2 and reply[0] == "error" and type(reply[1]) is str:
            raise CandidateError(f"the program raised {reply[1]}")
        channel.broken = True
        raise CandidateError("the program sent a malformed reply")


def judge(request: dict, uid: int) -> dict:
    """Run one item (see the module docstring) and return its result."""
    limits = request["limits"]
    uid = uid if limits["unprivileged"] else -1
    root = tempfile.mkdtemp(prefix="densa-sandbox-")
    work = os.path.join(root, "work")  # the program's cwd, $HOME and $TMPDIR; the only place it may write
    notes: list[str] = []
    try:
        os.mkdir(work)
        with open(os.path.join(work, "program.py"), "w", encoding="utf-8") as f:
            f.write(request["program"])
        if uid >= 0:  # the unprivileged program may enter root/ and write only in work/
            os.chmod(root, 0o711)
            os.chown(work, uid, uid)
        cmd_r, cmd_w = os.pipe()
        res_r, res_w = os.pipe()
        settings = {"work": work, "mode": request["mode"], "entry_point": request.get("entry_point", ""),
                    "cmd_fd": cmd_r, "res_fd": res_w, "judge_pid": os.getpid(), "uid": uid,
                    "memory_bytes": limits["memory_bytes"], "cpu_s": limits["cpu_s"],
                    "file_bytes": limits["file_bytes"], "open_files": limits["open_files"],
                    "namespaces": limits["namespaces"], "site_packages": limits["site_packages"],
                    "audit_hook": limits["audit_hook"], "hidden": os.pathsep.join(limits["hidden"])}
        start = time.monotonic()
        deadline = start + limits["timeout_s"]
        with open(os.path.join(root, "stdout"), "wb") as out, open(os.path.join(root, "stderr"), "wb") as err:
            proc = subprocess.Popen([sys.executable, "-I", "-B", "-S", "-c", launcher.STARTER], stdin=subprocess.PIPE,
                                    stdout=out, stderr=err, cwd=work, env=child_env(work), pass_fds=(cmd_r, res_w),
                                    start_new_session=True)
        os.close(cmd_r)
        os.close(res_w)
        channel = Channel(cmd_w, res_r, deadline, launcher.MAX_MESSAGE)
        try:
            try:
                proc.stdin.write(len(LAUNCHER_CODE).to_bytes(4, "big") + LAUNCHER_CODE
                                 + launcher.write_settings(settings).encode())
                proc.stdin.close()
            except BrokenPipeError:  # the child died before reading its settings; its exit status says how
                pass
            outcome = converse(channel, request, notes)
            if outcome == "passed" and request["mode"] == "run":  # it is exiting on its own: let it
                try:
                    proc.wait(max(0.0, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    pass
        finally:  # the program never outlives its item
            os.close(cmd_w)
            os.close(res_r)
            killed = kill(proc)
        duration = time.monotonic() - start
        returncode = proc.returncode
        chars = limits["output_chars"]
        stdout, stderr = tail(os.path.join(root, "stdout"), chars), tail(os.path.join(root, "stderr"), chars)
        capped = max(os.path.getsize(os.path.join(root, n)) for n in ("stdout", "stderr")) >= limits["file_bytes"]
    finally:
        remove_tree(root)
    status = classify(outcome, returncode, capped, killed)
    if notes:
        stderr = (stderr + "".join(notes))[-max(chars, 2000):]
    return {"status": status, "duration_s": duration, "returncode": returncode, "stdout": stdout, "stderr": stderr}


def converse(channel: Channel, request: dict, notes: list[str]) -> str:
    """'passed', 'timeout', or 'ended' (the program stopped or was refused; its exit status tells how)."""
    try:
        first = channel.read()
    except ItemTimeout:
        return "timeout"
    except (CandidateError, ValueError, TypeError, RecursionError) as exc:
        notes.append(f"densa-sandbox: {exc}\n")
        return "ended"
    if request["mode"] == "run":
        return "passed" if first == ["done"] else "ended"
    if first != ["ready"]:
        return "ended"
    namespace = {"__name__": "__check__"}
    candidate = Candidate(channel, request["entry_point"])
    try:
        exec(compile(request["check"], "<check>", "exec"), namespace)  # trusted: the benchmark's own test code
        namespace[request["entry_point"]] = candidate  # tests that call the function by name reach the program too
        namespace["check"](candidate)
    except ItemTimeout:
        return "timeout"
    except BaseException:  # noqa: B036 - any failure of the test code is a failed item
        notes.append("densa-sandbox: the tests failed:\n" + traceback.format_exc(limit=-3))
        return "ended"
    return "passed"


def classify(outcome: str, returncode: int, capped: bool, killed: bool) -> str:
    """The status from how the conversation ended and how the program did (`killed`: by the judge, still running)."""
    if outcome == "timeout" or returncode == -signal.SIGXCPU:
        return "timeout"
    if capped:
        return "error"  # the output/file-size cap
    if outcome == "passed":
        return "passed"
    if returncode in EXIT_STATUSES:
        return EXIT_STATUSES[returncode]
    if killed or returncode >= 0:
        return "failed"
    return "memory" if returncode == -signal.SIGKILL else "error"  # a SIGKILL not ours: the kernel's OOM killer


def kill(proc: subprocess.Popen) -> bool:
    """SIGKILL the program if it still runs (poll() did not reap it, so the pid is still its), then reap it.
    True if it was still running."""
    if proc.poll() is not None:
        return False
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # its group too, for a program that could still fork (run as root)
    except (ProcessLookupError, PermissionError):
        pass
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    return True


def child_env(work: str) -> dict[str, str]:
    """Nothing from the caller's environment (tokens, proxies, PYTHON*) reaches the program."""
    return {"PATH": "/usr/bin:/bin", "HOME": work, "TMPDIR": work, "LANG": "C.UTF-8",
            "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def tail(path: str, chars: int) -> str:
    with open(path, "rb") as f:
        f.seek(max(0, f.seek(0, os.SEEK_END) - 4 * chars))  # up to 4 bytes per UTF-8 character
        return f.read().decode("utf-8", errors="replace")[-chars:] if chars else ""


def remove_tree(root: str) -> None:
    """Delete the sandbox, even if the program left directories without write or search permission."""
    def make_writable_and_retry(func, path, _exc):
        os.chmod(os.path.dirname(path), 0o700)
        if os.path.isdir(path) and not os.path.islink(path):
            os.chmod(path, 0o700)
        func(path)

    shutil.rmtree(root, onerror=make_writable_and_retry)


def sweep(uid: int) -> None:
    """Kill every process running as `uid` (left over if a previous judge of this slot was killed mid-item)."""
    pid = os.fork()
    if pid == 0:
        try:
            os.setgid(uid)
            os.setuid(uid)
            os.kill(-1, signal.SIGKILL)  # every process this uid may signal, except this one
        finally:
            os._exit(0)
    os.waitpid(pid, 0)


def main() -> None:
    uid = int(sys.argv[1])
    replies = os.fdopen(os.dup(1), "w", encoding="utf-8")
    requests = os.fdopen(os.dup(0), "r", encoding="utf-8")
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1):  # test code that prints or reads never touches the protocol
        os.dup2(devnull, fd)
    if uid >= 0:
        sweep(uid)
    for line in requests:
        try:
            reply = judge(json.loads(line), uid)
        except Exception as exc:  # noqa: BLE001 - the judge itself failed: an error, never a pass
            reply = {"status": "error", "duration_s": 0.0, "returncode": launcher.EXIT_LAUNCHER, "stdout": "",
                     "stderr": f"densa-sandbox: judge failed: {exc!r}"}
        replies.write(json.dumps(reply) + "\n")
        replies.flush()


if __name__ == "__main__":
    main()

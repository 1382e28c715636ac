"""The trusted first code of a sandboxed child (densa/eval/sandbox.py starts it; docs/sandbox.md).

`python -I -B -S sandbox_launcher.py` reads its settings from stdin (`key=value` lines, so they are not in argv),
points stdin at /dev/null, enters new user + network namespaces where the kernel allows it, sets the resource limits,
installs the audit hook, and executes `program.py` as a fresh `__main__`. It prints the per-run marker on stdout only
when the program returned normally and nothing was refused. Standard library only, few imports: it starts once per
program.
"""

import os
import resource
import sys
import traceback  # imported before the program runs: after a MemoryError an import could fail
import types

EXIT_MEMORY = 3  # the program raised MemoryError: the address-space limit stopped an allocation
EXIT_REFUSED = 4  # the program attempted an operation the audit hook refused
EXIT_LAUNCHER = 5  # the launcher itself failed (bad settings); never the program's fault
REFUSED_PREFIX = "densa-sandbox: refused "


class SandboxViolation(PermissionError):
    """Raised inside the program when the audit hook refuses an operation."""


# audit events refused outright (PEP 578 names; see the CPython audit events table)
REFUSED_EVENTS = frozenset({
    "os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.fork", "os.forkpty", "subprocess.Popen", "pty.spawn",
    "os.kill", "os.killpg", "signal.pthread_kill", "resource.setrlimit", "resource.prlimit",
    "os.symlink", "os.chmod", "os.chown", "os.chflags", "os.lchflags", "webbrowser.open",
    "gc.get_objects", "gc.get_referrers", "gc.get_referents",  # ways to reach the hook's state and rewrite it
})
REFUSED_PREFIXES = ("socket.", "ctypes.", "urllib.", "http.client.", "ftplib.", "smtplib.", "poplib.", "imaplib.",
                    "nntplib.", "telnetlib.")
# audit event -> (positions of its path arguments, positions of their dir_fd arguments or None)
PATH_EVENTS: dict[str, tuple[tuple[int, ...], tuple[int | None, ...]]] = {
    "os.remove": ((0,), (1,)),
    "os.rmdir": ((0,), (1,)),
    "os.mkdir": ((0,), (2,)),
    "os.rename": ((0, 1), (2, 3)),
    "os.link": ((0, 1), (2, 3)),
    "os.truncate": ((0,), (None,)),
    "os.utime": ((0,), (3,)),
    "os.chdir": ((0,), (None,)),
    "os.mkfifo": ((0,), (2,)),
    "os.mknod": ((0,), (3,)),
    "os.setxattr": ((0,), (None,)),
    "os.removexattr": ((0,), (None,)),
    "shutil.rmtree": ((0,), (None,)),
}
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_TRUNC


def install_guard(work: str, refused: list[str]) -> None:
    """Add the audit hook. Hooks cannot be removed once added; refusals are recorded so the run cannot pass."""
    root = os.path.realpath(work)

    def resolve(path, dir_fd) -> str:
        if isinstance(path, int):  # an open descriptor (fchdir, ftruncate, ...)
            return os.path.realpath(os.readlink(f"/proc/self/fd/{path}"))
        path = os.fsdecode(os.fspath(path))
        if dir_fd not in (None, -1):  # -1: the default, relative to the cwd
            path = os.path.join(os.readlink(f"/proc/self/fd/{dir_fd}"), path)
        return os.path.realpath(path)  # relative to the cwd, symlinks resolved

    def inside(path, dir_fd=None) -> bool:
        try:
            resolved = resolve(path, dir_fd)
        except (OSError, TypeError, ValueError):
            return False
        return resolved == root or resolved.startswith(root + os.sep)

    def allowed(event: str, args: tuple) -> bool:
        if event in REFUSED_EVENTS or event.startswith(REFUSED_PREFIXES):
            return False
        if event == "open":  # (path, mode, flags): reading is allowed anywhere, writing only inside
            path, mode, flags = args
            writes = bool(flags & WRITE_FLAGS) or (isinstance(mode, str) and any(c in mode for c in "wax+"))
            return not writes or isinstance(path, int) or inside(path)
        if event in PATH_EVENTS:
            paths, dir_fds = PATH_EVENTS[event]
            return all(inside(args[p], args[d] if d is not None and d < len(args) else None)
                       for p, d in zip(paths, dir_fds, strict=True))
        if event == "object.__setattr__":  # swapping a function's code object could disarm this hook
            return args[1] != "__code__"
        return True

    def hook(event: str, args: tuple) -> None:
        if not allowed(event, args):
            refused.append(event)
            os.write(2, f"{REFUSED_PREFIX}{event}{args!r:.200}\n".encode(errors="replace"))
            raise SandboxViolation(f"the sandbox refused {event}")

    sys.addaudithook(hook)


CLONE_NEWUSER, CLONE_NEWNET = 0x10000000, 0x40000000
PR_SET_KEEPCAPS = 8
CAP_DAC_READ_SEARCH = 2  # read any file and search any directory; never write
LINUX_CAPABILITY_VERSION_3 = 0x20080522


def unshare_network(as_root: bool) -> bool:
    """A new network namespace (only a loopback, down) for this still single-threaded process; False where the
    kernel refuses. Root can create one directly; another user needs a new user namespace to be allowed to."""
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.unshare(CLONE_NEWNET if as_root else CLONE_NEWUSER | CLONE_NEWNET) == 0
    except (OSError, AttributeError):
        return False


def world_readable(directory: str) -> bool:
    """Whether any user can list `directory` and reach it (every ancestor searchable by others)."""
    path = os.path.realpath(directory)
    if os.stat(path).st_mode & 0o005 != 0o005:
        return False
    while path != os.sep:
        path = os.path.dirname(path)
        if not os.stat(path).st_mode & 0o001:
            return False
    return True


def drop_root(uid: int) -> bool:
    """Root -> `uid` (group too, no supplementary groups), so the kernel lets the program write only where that user
    may: the sandbox directory, which the parent gave it. Where Python's standard library is not readable by other
    users (e.g. under a 0700 /root), the process keeps exactly one capability, CAP_DAC_READ_SEARCH (read anything,
    write nothing); if it cannot, it stays root and the audit hook is the filesystem guard. True if dropped."""
    import ctypes

    stdlib = os.path.dirname(os.__file__)
    keep = 0 if world_readable(stdlib) else 1 << CAP_DAC_READ_SEARCH
    with open("/proc/self/status") as f:
        permitted = int(next(line for line in f if line.startswith("CapPrm:")).split()[1], 16)
    if keep & ~permitted:
        return False
    libc = ctypes.CDLL(None, use_errno=True)
    if keep and libc.prctl(PR_SET_KEEPCAPS, 1, 0, 0, 0) != 0:
        return False
    os.setgroups([])
    os.setgid(uid)
    os.setuid(uid)  # clears the effective capabilities; with KEEPCAPS the permitted ones stay, to be narrowed next
    if keep:
        header = (ctypes.c_uint32 * 2)(LINUX_CAPABILITY_VERSION_3, 0)  # this process
        data = (ctypes.c_uint32 * 6)(keep, keep, 0, 0, 0, 0)  # (effective, permitted, inheritable) x 2 words
        if libc.capset(header, data) != 0:
            raise OSError(ctypes.get_errno(), "capset(CAP_DAC_READ_SEARCH) failed after dropping root")
    return True


def run_program(source: str, filename: str) -> int:
    """Execute the program as a fresh `__main__` module; returns the exit code the launcher should use."""
    main = types.ModuleType("__main__")
    main.__file__ = filename
    sys.modules["__main__"] = main
    try:
        exec(compile(source, filename, "exec"), main.__dict__)
        code = 0
    except BaseException as exc:  # noqa: B036 - SystemExit too: a program that exits early did not finish its tests
        traceback.print_exception(type(exc), exc, exc.__traceback__.tb_next)  # without this launcher's frame
        code = EXIT_MEMORY if isinstance(exc, MemoryError) else EXIT_REFUSED if isinstance(exc, SandboxViolation) else 1
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except BaseException:  # noqa: B036 - the program may have closed or replaced them
        pass
    return code


def read_settings(text: str) -> dict[str, str | int | bool]:
    """`key=value` lines (json would cost 15 ms of imports per program); ints and true/false are converted."""
    settings: dict[str, str | int | bool] = {}
    for line in text.splitlines():
        key, _, value = line.partition("=")
        is_int = value.lstrip("-").isdigit()
        settings[key] = int(value) if is_int else value == "true" if value in ("true", "false") else value
    return settings


def write_settings(settings: dict[str, str | int | bool]) -> str:
    """The inverse of read_settings, used by the parent."""
    for key, value in settings.items():
        if "\n" in str(value) or "=" in key:
            raise ValueError(f"sandbox setting {key}={value!r} cannot be written as one key=value line")
    return "".join(f"{k}={str(v).lower() if isinstance(v, bool) else v}\n" for k, v in settings.items())


def main() -> None:
    try:
        settings = read_settings(sys.stdin.read())
        devnull = os.open(os.devnull, os.O_RDONLY)
        os.dup2(devnull, 0)  # the program sees an empty stdin
        os.close(devnull)
        as_root = os.geteuid() == 0
        if settings["network_namespace"]:
            unshare_network(as_root)
        if as_root and settings["uid"] != -1:
            drop_root(settings["uid"])
        for limit, value in ((resource.RLIMIT_AS, settings["memory_bytes"]), (resource.RLIMIT_CPU, settings["cpu_s"]),
                             (resource.RLIMIT_FSIZE, settings["file_bytes"]), (resource.RLIMIT_CORE, 0),
                             (resource.RLIMIT_NOFILE, settings["open_files"]), (resource.RLIMIT_NPROC, 0)):
            resource.setrlimit(limit, (value, value))  # soft = hard: the program cannot raise them again
        if settings["site_packages"]:
            import site

            site.main()
        filename = os.path.join(settings["work"], "program.py")
        with open(filename, encoding="utf-8") as f:
            source = f.read()
    except Exception as exc:  # noqa: BLE001 - reported as a sandbox error, never as the program's failure
        os.write(2, f"densa-sandbox: launcher failed: {exc!r}\n".encode())
        os._exit(EXIT_LAUNCHER)
    refused: list[str] = []
    if settings["audit_hook"]:
        install_guard(settings["work"], refused)
    code = run_program(source, filename)
    if code == 0 and refused:  # the program caught a refusal and carried on: it still cannot pass
        code = EXIT_REFUSED
    if code == 0:
        os.write(1, f"{settings['marker']}\n".encode())
    os._exit(code)


if __name__ == "__main__":
    main()

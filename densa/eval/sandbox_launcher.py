"""The trusted first code of an untrusted child (densa/eval/sandbox_judge.py starts it; docs/sandbox.md).

`python -I -B -S -c STARTER` reads this module's code object (compiled once by the judge: no per-program compile),
then its settings (`key=value` lines, so they are not in argv), from stdin; it executes the code in a dict that no
module holds and calls `main(settings)`, which
points stdin at /dev/null and, while still root, builds the program's world: new mount, network and IPC namespaces
with the whole file tree read-only except the sandbox directory, then a per-slot unprivileged uid, a parent-death
signal, a seccomp filter (no sockets, no io_uring), resource limits and an audit hook. Then it executes `program.py`
as a fresh `__main__` and talks to the judge over two pipes (`cmd_fd` in, `res_fd` out):

- mode=run: it writes `["done"]` when the program returned normally;
- mode=serve: it writes `["ready"]` once the program has defined a callable `entry_point`, then answers each call
  (a marshal-encoded `(args, kwargs)`) with `["value", <tagged JSON>]` or `["error", "<Type>: <message>"]`.

Nothing it writes decides a verdict: the judge decodes the replies as plain data and runs the tests itself.
Standard library only, few imports (json alone would cost 10 ms per program): it starts once per program.
"""

import marshal
import os
import resource
import sys

EXIT_MEMORY = 3  # the program raised MemoryError: the address-space limit stopped an allocation
EXIT_REFUSED = 4  # the program attempted an operation the audit hook refused
EXIT_LAUNCHER = 5  # the launcher itself failed (bad settings); never the program's fault
REFUSED_PREFIX = "densa-sandbox: refused "
MAX_MESSAGE = 64 << 20  # bytes in one pipe message, either way

# audit events refused outright (PEP 578 names; see the CPython audit events table)
REFUSED_EVENTS = frozenset({
    "os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.fork", "os.forkpty", "subprocess.Popen", "pty.spawn",
    "os.kill", "os.killpg", "signal.pthread_kill", "resource.setrlimit", "resource.prlimit",
    "os.symlink", "os.chmod", "os.chown", "os.chflags", "os.lchflags", "webbrowser.open",
    # tracers and the garbage collector's lists: ways to reach objects the program was never given
    "sys.settrace", "sys.setprofile", "gc.get_objects", "gc.get_referrers", "gc.get_referents",
})
REFUSED_PREFIXES = ("socket.", "ctypes.", "urllib.", "http.client.", "ftplib.", "smtplib.", "poplib.", "imaplib.",
                    "nntplib.", "telnetlib.", "_posixsubprocess.")
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


def install_guard(work: str) -> None:
    """Add the audit hook. It cannot be removed, it keeps no record a program could clear (a refusal ends the
    process at once), and at call time it reads no global or builtin name: everything it uses is bound here, so a
    program that rebinds the launcher's globals or patches `builtins` does not change what it does."""
    root = os.path.realpath(work)
    realpath, readlink, fspath, fsdecode, join = os.path.realpath, os.readlink, os.fspath, os.fsdecode, os.path.join
    write, exit_now, is_instance, str_type, int_type = os.write, os._exit, isinstance, str, int
    length, pairs, errors = len, zip, (OSError, TypeError, ValueError)
    refused_events, refused_prefixes = REFUSED_EVENTS, REFUSED_PREFIXES
    path_events, write_flags = PATH_EVENTS, WRITE_FLAGS
    prefix, sep, refused_code = REFUSED_PREFIX.encode(), os.sep, EXIT_REFUSED

    def inside(path, dir_fd=None) -> bool:
        try:
            if is_instance(path, int_type):  # an open descriptor (fchdir, ftruncate, ...)
                resolved = realpath(readlink(f"/proc/self/fd/{path}"))
            else:
                path = fsdecode(fspath(path))
                if dir_fd is not None and dir_fd != -1:  # -1: the default, relative to the cwd
                    path = join(readlink(f"/proc/self/fd/{dir_fd}"), path)
                resolved = realpath(path)  # relative to the cwd, symlinks resolved
        except errors:
            return False
        return resolved == root or resolved.startswith(root + sep)

    def allowed(event: str, args: tuple) -> bool:
        if event in refused_events or event.startswith(refused_prefixes):
            return False
        if event == "open":  # (path, mode, flags): reading is allowed anywhere, writing only inside
            path, mode, flags = args
            writes = flags & write_flags or (is_instance(mode, str_type)
                                             and ("w" in mode or "a" in mode or "x" in mode or "+" in mode))
            if not writes:
                return True
            if mode is None and not (is_instance(path, str_type) and path.startswith(sep)):
                return False  # os.open: its audit event omits dir_fd, so a relative path cannot be resolved here
            return is_instance(path, int_type) or inside(path)
        if event in path_events:
            paths, dir_fds = path_events[event]
            for p, d in pairs(paths, dir_fds):
                if not inside(args[p], args[d] if d is not None and d < length(args) else None):
                    return False
            return True
        if event == "object.__setattr__":  # swapping a function's code object could change trusted code
            return args[1] != "__code__"
        return True

    def hook(event: str, args: tuple) -> None:
        if not allowed(event, args):
            write(2, prefix + event.encode(errors="replace") + b"\n")
            exit_now(refused_code)  # no exception to catch, no record to clear

    sys.addaudithook(hook)


# Linux constants (x86_64 system call numbers where they differ by architecture)
CLONE_NEWNS, CLONE_NEWIPC, CLONE_NEWUSER, CLONE_NEWNET = 0x00020000, 0x08000000, 0x10000000, 0x40000000
MS_RDONLY, MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 1, 32, 4096, 16384, 1 << 18
PR_SET_PDEATHSIG, PR_SET_KEEPCAPS, PR_SET_NO_NEW_PRIVS, PR_SET_SECCOMP = 1, 8, 38, 22
CAP_DAC_READ_SEARCH = 2  # read any file and search any directory; never write
LINUX_CAPABILITY_VERSION_3 = 0x20080522
SYS_MOUNT_SETATTR, AT_RECURSIVE, MOUNT_ATTR_RDONLY = 442, 0x8000, 1
AUDIT_ARCH_X86_64, SECCOMP_MODE_FILTER, SECCOMP_RET_ALLOW, SECCOMP_RET_ERRNO = 0xC000003E, 2, 0x7FFF0000, 0x00050000
X32_SYSCALL_BIT, EACCES = 0x40000000, 13
DENIED_SYSCALLS = {"socket": 41, "socketpair": 53, "io_uring_setup": 425}  # x86_64 numbers


def unshare_world(as_root: bool, work: str, hidden: list[str]) -> dict[str, bool]:
    """New namespaces for this still single-threaded process. As root: mount (the whole tree read-only but `work`;
    an empty read-only tmpfs over each `hidden` path), network (only a loopback, down) and IPC. Otherwise a new user
    namespace first, then the network one. Best effort: returns which layers it got."""
    import ctypes

    got = {"mount": False, "network": False}
    try:
        libc = ctypes.CDLL(None, use_errno=True)
    except OSError:
        return got
    if not as_root:
        got["network"] = libc.unshare(CLONE_NEWUSER | CLONE_NEWNET) == 0
        return got
    got["network"] = libc.unshare(CLONE_NEWNET | CLONE_NEWIPC) == 0
    if libc.unshare(CLONE_NEWNS) != 0 or libc.mount(None, b"/", None, MS_REC | MS_PRIVATE, None) != 0:
        return got
    attr = (ctypes.c_uint64 * 4)(MOUNT_ATTR_RDONLY, 0, 0, 0)  # struct mount_attr: attr_set, attr_clr, propagation, fd
    if libc.syscall(SYS_MOUNT_SETATTR, -100, b"/", AT_RECURSIVE, attr, ctypes.sizeof(attr)) != 0:  # -100: AT_FDCWD
        return got
    for path in hidden:
        if os.path.isdir(path):
            libc.mount(b"tmpfs", os.fsencode(path), b"tmpfs", MS_RDONLY, b"size=4k,mode=0")
    target = os.fsencode(work)
    if (libc.mount(target, target, None, MS_BIND, None) != 0  # the sandbox directory: its own mount, then writable
            or libc.mount(None, target, None, MS_REMOUNT | MS_BIND, None) != 0):
        return got
    os.chdir(work)  # the cwd was the read-only mount beneath
    got["mount"] = True
    return got


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
    """Root -> `uid` (group too, no supplementary groups). Where Python's standard library is not readable by other
    users (e.g. under a 0700 /root), the process keeps exactly one capability, CAP_DAC_READ_SEARCH (read anything,
    write nothing); if it cannot, it stays root. True if dropped."""
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


def restrict_self(judge_pid: int) -> bool:
    """Die with the judge (the parent-death signal is set after the uid change, which clears it), and on x86_64 add
    a seccomp filter that fails socket(2), socketpair(2) and io_uring_setup(2) with EACCES: no new socket of any
    family (so no Unix socket either, which the network namespace does not cover). True if the filter is on."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, 9, 0, 0, 0)  # SIGKILL
    if os.getppid() != judge_pid:  # the judge died before the line above
        os._exit(EXIT_LAUNCHER)
    if os.uname().machine != "x86_64" or libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        return False
    ld_arch, ld_nr, jeq, jge, ret = 0x20, 0x20, 0x15, 0x35, 0x06  # BPF_LD|W|ABS, BPF_JMP|JEQ|K, JGE|K, BPF_RET|K
    deny = SECCOMP_RET_ERRNO | EACCES
    numbers = list(DENIED_SYSCALLS.values())
    program = [(ld_arch, 0, 0, 4), (jeq, 1, 0, AUDIT_ARCH_X86_64), (ret, 0, 0, deny), (ld_nr, 0, 0, 0),
               (jge, len(numbers) + 1, 0, X32_SYSCALL_BIT)]  # x32 system calls: denied
    program += [(jeq, len(numbers) - i, 0, nr) for i, nr in enumerate(numbers)]
    program += [(ret, 0, 0, SECCOMP_RET_ALLOW), (ret, 0, 0, deny)]

    class Filter(ctypes.Structure):
        _fields_ = [("code", ctypes.c_uint16), ("jt", ctypes.c_uint8), ("jf", ctypes.c_uint8), ("k", ctypes.c_uint32)]

    class Program(ctypes.Structure):
        _fields_ = [("len", ctypes.c_uint16), ("filter", ctypes.POINTER(Filter))]

    filters = (Filter * len(program))(*[Filter(*f) for f in program])
    return libc.prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.byref(Program(len(program), filters)), 0, 0) == 0


def read_settings(text: str) -> dict[str, str | int | bool]:
    """`key=value` lines; ints and true/false are converted."""
    settings: dict[str, str | int | bool] = {}
    for line in text.splitlines():
        key, _, value = line.partition("=")
        is_int = value.lstrip("-").isdigit()
        settings[key] = int(value) if is_int else value == "true" if value in ("true", "false") else value
    return settings


def write_settings(settings: dict[str, str | int | bool]) -> str:
    """The inverse of read_settings, used by the judge."""
    for key, value in settings.items():
        if "\n" in str(value) or "=" in key:
            raise ValueError(f"sandbox setting {key}={value!r} cannot be written as one key=value line")
    return "".join(f"{k}={str(v).lower() if isinstance(v, bool) else v}\n" for k, v in settings.items())


# --- plain data: what a call's result may be, as tagged JSON (the judge decodes it; see sandbox_judge.decode) ---

ESCAPES = {i: f"\\u{i:04x}" for i in range(32)} | {ord('"'): '\\"', ord("\\"): "\\\\"}
FLOAT_NAMES = {"nan": "NaN", "inf": "Infinity", "-inf": "-Infinity"}
SAFE_INT = 1 << 63
NUMBERS = frozenset({int, float})


def encode(value, depth: int = 0) -> str:
    """JSON for plain data: None, bool, int, float (nan/inf too), str, and lists; tagged one-key objects for the rest
    ({"t": tuple items}, {"d": [[key, value], ...]}, {"s": set}, {"f": frozenset}, {"c": [re, im]},
    {"b": hex bytes}, {"i": hex int} beyond 64 bits). Exact types only: a subclass (an `__eq__` that says yes to
    everything) is refused."""
    if depth > 200:
        raise ValueError("the result is nested more than 200 deep")
    kind = type(value)
    if value is None:
        return "null"
    if kind is bool:
        return "true" if value else "false"
    if kind is int:
        return int.__repr__(value) if -SAFE_INT < value < SAFE_INT else '{"i":"' + format(value, "x") + '"}'
    if kind is float:
        text = float.__repr__(value)
        return FLOAT_NAMES.get(text, text)
    if kind is str:
        return '"' + value.translate(ESCAPES) + '"'
    if kind is list:
        kinds = set(map(type, value))  # fast paths for flat lists: no Python call per element
        if kinds and kinds <= NUMBERS:  # exact ints and floats: repr is theirs (an int past 4300 digits raises)
            return "[" + ",".join(map(repr, value)).replace("nan", "NaN").replace("inf", "Infinity") + "]"
        if kinds == {str}:
            return '["' + '","'.join([v.translate(ESCAPES) for v in value]) + '"]'
        return "[" + ",".join([encode(v, depth + 1) for v in value]) + "]"
    tags = {tuple: "t", set: "s", frozenset: "f"}
    if kind in tags:
        return '{"' + tags[kind] + '":[' + ",".join([encode(v, depth + 1) for v in value]) + "]}"
    if kind is dict:
        pairs = [f"[{encode(k, depth + 1)},{encode(v, depth + 1)}]" for k, v in value.items()]
        return '{"d":[' + ",".join(pairs) + "]}"
    if kind is complex:
        return '{"c":[' + encode(value.real) + "," + encode(value.imag) + "]}"
    if kind is bytes:
        return '{"b":"' + value.hex() + '"}'
    raise TypeError(f"the result contains a {kind.__name__}, which is not plain data")


def send(fd: int, text: str) -> None:
    send_bytes(fd, text.encode("utf-8", "surrogatepass"))


def send_bytes(fd: int, data: bytes) -> None:
    """One length-prefixed message (4 bytes, big-endian)."""
    data = len(data).to_bytes(4, "big") + data
    while data:
        data = data[os.write(fd, data):]


def receive(fd: int) -> bytes | None:
    """One length-prefixed message, or None at end of file."""
    head = b""
    while len(head) < 4:
        chunk = os.read(fd, 4 - len(head))
        if not chunk:
            return None
        head += chunk
    size, parts = int.from_bytes(head, "big"), []
    while size > 0:
        chunk = os.read(fd, min(size, 1 << 20))
        if not chunk:
            return None
        parts.append(chunk)
        size -= len(chunk)
    return b"".join(parts)


def flush() -> None:
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except BaseException:  # noqa: B036 - the program may have closed or replaced them
        pass


def exit_code(exc: BaseException) -> int:
    """Print the exception (the interpreter's own printer: it reads no audited attribute) and choose the exit code."""
    excepthook(type(exc), exc, exc.__traceback__.tb_next)  # without the launcher's own frame
    flush()
    return EXIT_MEMORY if isinstance(exc, MemoryError) else 1


def serve(function, cmd_fd: int, res_fd: int) -> int:
    """Answer calls until the judge closes the pipe. A call that raises is reported and the program lives on; one that
    hits the memory limit ends the process with EXIT_MEMORY."""
    while True:
        request = receive(cmd_fd)
        if request is None:
            return 0
        try:
            args, kwargs = loads(request)  # from the judge: trusted
            reply = '["value",' + encode(function(*args, **kwargs)) + "]"
        except MemoryError as exc:
            return exit_code(exc)
        except BaseException as exc:  # noqa: B036 - SystemExit too: the call did not return a value
            excepthook(type(exc), exc, exc.__traceback__.tb_next)
            flush()
            reply = '["error",' + encode(f"{type(exc).__name__}: {exc}"[:2000]) + "]"
        send(res_fd, reply)


def main(settings_text: str) -> None:
    try:
        settings = read_settings(settings_text)
        devnull = os.open(os.devnull, os.O_RDONLY)
        os.dup2(devnull, 0)  # the program sees an empty stdin
        os.close(devnull)
        as_root = os.geteuid() == 0
        work = str(settings["work"])
        if settings["namespaces"]:
            hidden = [p for p in str(settings.get("hidden", "")).split(os.pathsep) if p]
            unshare_world(as_root, work, hidden)
        if as_root and settings["uid"] != -1:
            drop_root(int(settings["uid"]))
        restrict_self(int(settings["judge_pid"]))
        for limit, value in ((resource.RLIMIT_AS, settings["memory_bytes"]), (resource.RLIMIT_CPU, settings["cpu_s"]),
                             (resource.RLIMIT_FSIZE, settings["file_bytes"]), (resource.RLIMIT_CORE, 0),
                             (resource.RLIMIT_NOFILE, settings["open_files"]), (resource.RLIMIT_NPROC, 0)):
            resource.setrlimit(limit, (value, value))  # soft = hard: the program cannot raise them again
        if settings["site_packages"]:
            import site

            site.main()
        filename = os.path.join(work, "program.py")
        with open(filename, encoding="utf-8") as f:
            code = compile(f.read(), filename, "exec")
    except SyntaxError as exc:
        os.write(2, f"densa-sandbox: the program does not compile: {exc}\n".encode())
        os._exit(1)
    except Exception as exc:  # noqa: BLE001 - reported as a sandbox error, never as the program's failure
        os.write(2, f"densa-sandbox: launcher failed: {exc!r}\n".encode())
        os._exit(EXIT_LAUNCHER)
    cmd_fd, res_fd, mode = settings["cmd_fd"], settings["res_fd"], settings["mode"]
    main_module = type(sys)("__main__")  # a fresh module: the program never sees the launcher's globals
    main_module.__file__ = filename
    sys.modules["__main__"] = main_module
    if settings["audit_hook"]:
        install_guard(work)
    try:
        exec(code, main_module.__dict__)
    except BaseException as exc:  # noqa: B036 - SystemExit too: a program that exits early did not finish
        os._exit(exit_code(exc))
    flush()
    if mode == "run":
        send(res_fd, '["done"]')
        os._exit(0)
    entry_point = settings["entry_point"]
    function = main_module.__dict__.get(entry_point)
    if not callable(function):
        os.write(2, f"densa-sandbox: the program defines no function {entry_point}\n".encode())
        os._exit(1)
    send(res_fd, '["ready"]')
    os._exit(serve(function, cmd_fd, res_fd))


excepthook, loads = sys.__excepthook__, marshal.loads  # bound before any program runs
# stdin: 4-byte length, marshal of this module's code, then the settings
STARTER = ("import sys, marshal; d = sys.stdin.buffer.read(); n = int.from_bytes(d[:4], 'big'); "
           f"g = {{'__name__': 'sandbox_launcher', '__file__': {__file__!r}}}; exec(marshal.loads(d[4:4 + n]), g); "
           "g['main'](d[4 + n:].decode())")

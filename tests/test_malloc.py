"""densa/malloc.py: the `densa` command's glibc settings keep freed memory for reuse (counted in page faults, not
timed), and stay out of the way where the user chose the allocator."""

import os
import platform
import subprocess
import sys
import types

import pytest

from densa import malloc

GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"

# allocate, fill and free a 64 MiB tensor 16 times; print the minor page faults of the last 4 rounds (the first few
# rounds may each place the block at a new address while the heap grows to its working set: 6 rounds here)
PROBE = """
import resource, sys, torch
from densa import malloc
print(malloc.tune() if sys.argv[1] == "tune" else "untouched")
def fill():
    torch.empty(16 * 2**20).fill_(1.0)
for _ in range(12):
    fill()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(4):
    fill()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _steady_faults(mode: str) -> tuple[str, int]:
    clean = {k: v for k, v in os.environ.items()
             if not k.startswith("MALLOC_") and k not in ("LD_PRELOAD", "DENSA_MALLOC", "GLIBC_TUNABLES")}
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True,
                         env=clean).stdout.split()
    return out[0], int(out[1])


@pytest.mark.skipif(not GLIBC, reason="glibc only")
def test_tuned_malloc_reuses_freed_memory_instead_of_faulting_it_back() -> None:
    status, faults = _steady_faults("tune")
    assert status == "tuned"
    assert faults < 500  # 4 rounds of 64 MiB are 65,536 pages: reused, not mapped afresh
    status, faults = _steady_faults("plain")
    assert status == "untouched"
    assert faults > 60_000  # glibc's default: the block is unmapped on free and every page faults again


@pytest.mark.parametrize(("name", "value", "why"), [("DENSA_MALLOC", "system", "DENSA_MALLOC=system"),
                                                    ("LD_PRELOAD", "libjemalloc.so.2", "LD_PRELOAD"),
                                                    ("MALLOC_MMAP_THRESHOLD_", "65536", "MALLOC_MMAP_THRESHOLD_"),
                                                    ("GLIBC_TUNABLES", "glibc.malloc.trim_threshold=1", "GLIBC")])
def test_the_users_choice_of_allocator_is_left_alone(monkeypatch: pytest.MonkeyPatch, name: str, value: str,
                                                      why: str) -> None:
    for var in ("DENSA_MALLOC", "LD_PRELOAD", "GLIBC_TUNABLES", *malloc.USER_SETTINGS):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv(name, value)
    status = malloc.tune()
    assert status.startswith("skipped") and why in status
    assert malloc.STATUS == status


@pytest.mark.parametrize(("name", "status"), [("train", "tuned (fake)"), ("serve", "untouched")])
def test_the_densa_command_tunes_malloc_before_any_command_but_serve(monkeypatch: pytest.MonkeyPatch, name: str,
                                                                     status: str) -> None:
    from densa import cli

    seen = []
    command = types.ModuleType("densa_fake_command")
    command.add_arguments = lambda parser: None
    command.main = lambda args: seen.append(malloc.STATUS)
    monkeypatch.setitem(sys.modules, "densa_fake_command", command)
    monkeypatch.setitem(cli.COMMANDS, name, ("densa_fake_command", "a command that records the malloc status"))
    monkeypatch.setattr(malloc, "_tune", lambda: "tuned (fake)")
    monkeypatch.setattr(malloc, "STATUS", "untouched")
    assert cli.main([name]) == 0
    assert seen == [status]  # serve keeps glibc's defaults (densa/cli.py, SYSTEM_MALLOC)

"""Keep freed memory in the process: glibc malloc settings for PyTorch on CPU, applied by the `densa` command.

glibc serves an allocation above its mmap threshold (128 KiB, adapting up to 32 MiB) with a fresh `mmap` and hands
it back to the OS on `free`; it also trims the heap's free top above 128 KiB. A PyTorch training step allocates and
frees the same large activations every step, so every step pays one page fault per 4 KiB page it first writes.
Measured (`scripts/malloc_ab.py`, docs/results/malloc.json; docs/benchmarks.md, "Allocator"): a cpu-small-moe
training step (batch 8 x 512, fp32, one model per process as `densa train` runs) took about 225,000 page faults with
glibc's defaults and 5,083 and 1 with `tune()`; the densa model trained 1.41x / 1.59x faster in two rounds, its dense
twin 1.11x / 1.31x, at 10-14% more peak memory. Inside `densa bench moe` (one layer, many variants in one process)
the densa layer measured 5-10% slower with it.

`tune()` turns glibc's mmap use off (`M_MMAP_MAX` 0: large blocks come from the heap and are reused) and sets the
trim threshold to 2 GiB (`M_TRIM_THRESHOLD`: freed memory stays in the process unless 2 GiB sit free at the top of
the heap). The cost: resident memory does not shrink after a peak, and a long run on varying shapes can fragment
the heap: two long studies run with these settings (variable-length generation, several models loaded in turn) grew
from peaks of 6.8 and 9.2 GB with glibc's defaults to 8.1 and 10.4 GB after 1.5 hours. It is what PyTorch's CPU
performance guide gets by preloading jemalloc or tcmalloc, without a dependency.

The `densa` command calls `tune()` before running a command, except `densa serve` (a server runs for days on varying
shapes, and its decoding allocates little); `import densa` alone changes nothing. It is skipped (`tune()` returns
why) off glibc, where `DENSA_MALLOC=system` is set, and where the user already chose: an `LD_PRELOAD`ed allocator,
or glibc's own malloc settings in the environment (`MALLOC_MMAP_MAX_`, `MALLOC_MMAP_THRESHOLD_`,
`MALLOC_TRIM_THRESHOLD_`, `MALLOC_TOP_PAD_`, or malloc tunables in `GLIBC_TUNABLES`).
"""

from __future__ import annotations

import ctypes
import os
import platform

M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # glibc's <malloc.h> parameter numbers
TRIM_THRESHOLD = 2**31 - 1  # mallopt takes a C int: the largest value, 2 GiB
STATUS = "untouched"  # what the last `tune()` did; the benches write it into their JSON as "malloc"
USER_SETTINGS = ("MALLOC_MMAP_MAX_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_")


def tune() -> str:
    """Apply the settings above; returns (and keeps in `STATUS`) "tuned", or why it left malloc alone."""
    global STATUS
    STATUS = _tune()
    return STATUS


def _tune() -> str:
    if os.environ.get("DENSA_MALLOC", "").lower() == "system":
        return "skipped: DENSA_MALLOC=system"
    if os.environ.get("LD_PRELOAD"):
        return "skipped: LD_PRELOAD sets the allocator"
    chosen = [name for name in USER_SETTINGS if name in os.environ]
    if chosen or "glibc.malloc." in os.environ.get("GLIBC_TUNABLES", ""):
        return f"skipped: {(chosen or ['GLIBC_TUNABLES'])[0]} is set"
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return "skipped: not glibc"
    mallopt = ctypes.CDLL(None).mallopt
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    if not (mallopt(M_MMAP_MAX, 0) and mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD)):  # mallopt returns 1 on success
        return "skipped: mallopt refused the settings"
    return "tuned"

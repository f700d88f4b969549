"""Keep freed memory in the process heap while a bound pass runs (glibc only; a no-op elsewhere).

CROWN passes allocate and free the same large coefficient tensors over and over (tens of MB each,
per chunk, per node).  glibc serves allocations above ``M_MMAP_THRESHOLD`` (dynamic, at most 32 MiB)
with fresh ``mmap``s and returns freed heap tops above ``M_TRIM_THRESHOLD`` to the kernel, so every
such tensor is page-faulted and zeroed by the kernel again on first touch: on cnn-small (batch 32,
float64, one thread) that was about 40% of the CPU time of ``certified_bound`` (5.3 s -> 3.3 s) and of
a plain float32 auto_LiRPA pass (1.6 s -> 1.0 s with the same setting process-wide; measured with
``time.process_time``, 2026-12-02).

``retained_heap()`` raises both thresholds for the duration of the block (mmap 64 MiB, trim 1 GiB), so
freed blocks are reused from the heap, and on exit sets them to glibc's usual steady state (mmap
threshold 32 MiB, the largest its dynamic policy reaches; trim threshold twice that) and hands the
retained memory back (``malloc_trim(0)``).  Nothing numerical is affected (the values computed are the
same bytes); the peak RSS grows a little (heap fragmentation: cnn-small batch 32, 1066 -> 1189 MB,
CPU time 3.97 -> 3.56 s; with the mmap threshold at 1 GiB too: 1929 MB, 3.02 s).  The exit setting
is process-wide (glibc cannot restore its dynamic thresholds), and also speeds up other code's large
allocations.  Nested blocks only act at the outermost level.

Opt-in: ``CERTATTR_RETAIN_HEAP=1`` in the environment (read once per process).  Off by default: it
speeds up a plain auto_LiRPA pass about as much as ours (benchmarks/results/certified.txt, 2026-12-02:
certified crown 3.51 -> 3.21 s but the ratio to a plain pass under the same setting 2.59x -> 2.68x,
peak RSS 1315 -> 1537 MB), and the exit setting stays process-wide.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import sys
from collections.abc import Iterator

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
# during a pass: blocks up to 64 MiB come from the heap (cnn-small's coefficient tensors are 10-40 MB),
# larger ones stay mmapped (retaining those too saved another 0.5 s but raised the peak RSS by 60%);
# no trimming
_MMAP_DURING = 64 << 20
_TRIM_DURING = 1 << 30
_AFTER_MMAP = 32 << 20  # glibc's DEFAULT_MMAP_THRESHOLD_MAX on 64-bit
_AFTER_TRIM = 2 * _AFTER_MMAP
_state: dict = {"depth": 0, "libc": None, "checked": False}


def _libc():
    if not _state["checked"]:
        _state["checked"] = True
        if sys.platform.startswith("linux") and os.environ.get("CERTATTR_RETAIN_HEAP", "0") == "1":
            try:
                libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
                if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim"):
                    _state["libc"] = libc
            except OSError:  # not glibc (musl, ...): leave the allocator alone
                _state["libc"] = None
    return _state["libc"]


@contextlib.contextmanager
def retained_heap() -> Iterator[None]:
    """Run the block with freed memory kept in the heap (module docstring)."""
    libc = _libc()
    if libc is None:
        yield
        return
    _state["depth"] += 1
    try:
        if _state["depth"] == 1:
            libc.mallopt(_M_MMAP_THRESHOLD, _MMAP_DURING)
            libc.mallopt(_M_TRIM_THRESHOLD, _TRIM_DURING)
        yield
    finally:
        _state["depth"] -= 1
        if _state["depth"] == 0:
            libc.mallopt(_M_MMAP_THRESHOLD, _AFTER_MMAP)
            libc.mallopt(_M_TRIM_THRESHOLD, _AFTER_TRIM)
            libc.malloc_trim(0)

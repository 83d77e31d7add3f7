"""A steady allocator for the layer benchmarks (glibc).

With glibc's default settings, buffers above its (adaptive) mmap threshold are
mapped on allocation and unmapped on free, and freed heap memory above the trim
threshold is returned to the system; the next call then faults the pages in
again and the kernel zeroes them. For the dense FFN at T=8192, f=2048 that hits
its 64 MB activations on every call (50 to 100 ms of its ~600 ms, varying from
call to call), while the experts' smaller buffers mostly come back from the
heap: it slows the reference by a varying amount and makes every ratio to it
smaller and noisier. :func:`steady_malloc` re-runs the script with both
thresholds fixed high, so every case reuses its freed memory and the timings
are of the computation. ``--system-malloc`` in the scripts measures with the
allocator as it is.
"""

import os
import sys

SETTINGS = {
    "MALLOC_MMAP_THRESHOLD_": str(1 << 32),  # no mmap for any buffer below 4 GiB
    "MALLOC_TRIM_THRESHOLD_": str(1 << 40),  # never give freed heap memory back
}


def steady_malloc(system_malloc: bool) -> str:
    """Re-exec this script with :data:`SETTINGS` (once); returns a line describing the allocator."""
    if system_malloc:
        return "allocator: glibc defaults (--system-malloc)"
    if not sys.platform.startswith("linux"):
        return "allocator: system default (not glibc)"
    if any(os.environ.get(k) != v for k, v in SETTINGS.items()):
        sys.stdout.flush()
        os.execve(sys.executable, [sys.executable] + sys.argv, {**os.environ, **SETTINGS})
    return "allocator: glibc with " + " ".join(f"{k}={v}" for k, v in SETTINGS.items()) + " (see benchmarks/allocator.py)"

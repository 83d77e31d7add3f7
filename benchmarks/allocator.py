"""A steady allocator for the layer benchmarks (glibc).

With glibc's default settings, buffers above its (adaptive) mmap threshold are
mapped on allocation and unmapped on free, and freed heap memory above the trim
threshold is returned to the system; the next call then faults the pages in
again and the kernel zeroes them. For the dense FFN at T=8192, f=2048 that hits
its 64 MB activations on every call (50 to 100 ms of its ~600 ms, varying from
call to call), while the experts' smaller buffers mostly come back from the
heap: it slows the reference by a varying amount and makes every ratio to it
smaller and noisier. That is also how ``fairseq-train`` runs, so the scripts
measure with the allocator as it is by default; ``--steady-malloc`` re-runs
the script with both thresholds fixed high (:func:`steady_malloc`), so every
case reuses its freed memory and the timings are of the computation alone: a
stricter comparison (larger ratios for the MoE cases), with less noise.
"""

import os
import sys

SETTINGS = {
    "MALLOC_MMAP_THRESHOLD_": str(1 << 32),  # no mmap for any buffer below 4 GiB
    "MALLOC_TRIM_THRESHOLD_": str(1 << 40),  # never give freed heap memory back
}


def steady_malloc(enabled: bool) -> str:
    """Re-exec this script with :data:`SETTINGS` (once) if ``enabled``; returns a line describing the allocator."""
    if not enabled:
        return "allocator: system defaults (--steady-malloc: thresholds fixed, see benchmarks/allocator.py)"
    if not sys.platform.startswith("linux"):
        return "allocator: system default (not glibc)"
    if any(os.environ.get(k) != v for k, v in SETTINGS.items()):
        sys.stdout.flush()
        os.execve(sys.executable, [sys.executable] + sys.argv, {**os.environ, **SETTINGS})
    return (
        "allocator: glibc with " + " ".join(f"{k}={v}" for k, v in SETTINGS.items()) + " (see benchmarks/allocator.py)"
    )

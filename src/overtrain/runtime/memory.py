"""What a piece of work costs: the most memory this process has held, on the host and on the GPU.

Peaks only grow, so reading them after each phase of a job gives the peak up to that
phase; the largest is the job's. The host figure is the resident set (what must fit in
RAM), from the kernel's own accounting.
"""

from __future__ import annotations

import ctypes
import resource
import sys

import torch

GIB = 2**30


def peak_resident_gib() -> float:
    """The largest resident set this process has had so far (since `reset_peak_resident`), in GiB.

    On Linux VmHWM, the figure the reset starts over: getrusage's maximum also keeps the peak
    of threads that have exited (e.g. a compiler's), which no reset clears."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024 / GIB  # kB
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / GIB if sys.platform == "darwin" else peak * 1024 / GIB  # bytes on macOS, KiB elsewhere


def peak_gpu_gib(device: torch.device) -> float | None:
    """The most GPU memory torch has allocated on `device` so far, in GiB; None off CUDA."""
    if device.type != "cuda":
        return None
    return torch.cuda.max_memory_allocated(device) / GIB


def reset_peak_resident() -> bool:
    """Start the resident peak over from the current resident set, so that the next reading is
    the peak of what runs in between (Linux >= 4.0); False where the kernel offers no reset."""
    try:  # hand freed heap pages back first, so the new start is live memory, not the allocator's cache
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
    except OSError:
        return False
    return True

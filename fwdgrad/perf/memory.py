"""Peak-memory measurement, for the benchmark and the training loop's ``metrics.json``.

Two measures, because they answer different questions:

* **Tensor memory** (:func:`tensor_peak_mib`): the most bytes held by tensors at any moment of a call, above
  what they held when it started. On CUDA this is ``torch.cuda.max_memory_allocated``; on the CPU the same
  quantity is rebuilt from the profiler's allocation events (``profile_memory=True``: every allocation and
  free of torch's CPU allocator made by the calling thread, with its size). It depends only on the program,
  not on the allocator's caching or on what the process did before, so it is exact and repeatable: the
  number to compare algorithms by (what a step *needs*).
* **Resident memory** (:class:`RssPeak`, Linux): the process's resident-set high-water mark (``VmHWM``, reset
  through ``/proc/self/clear_refs``) minus the resident set at the start. What the machine actually had to
  provide, allocator caching and fragmentation included; noisier, since freed blocks may or may not be reused.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import os
import resource
from typing import Callable, Optional

import torch

__all__ = ["tensor_peak_mib", "RssPeak", "MIB", "tune_malloc"]

MIB = 2**20


def _libc() -> ctypes.CDLL:
    """The C library (raises OSError where there is none to load)."""
    return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")


def tensor_peak_mib(fn: Callable[[], object], device: torch.device | str = "cpu") -> float:
    """Peak tensor memory (MiB) that ``fn()`` allocates on ``device`` above what was allocated before it.

    CUDA: the caching allocator's statistics. CPU: the profiler's memory events of the calling thread,
    summed in time order. Not seen on the CPU: allocations by other threads (e.g. a thread pool) and frees of
    tensors allocated before the call (the profiler does not know their size), so memory a call frees from
    before it is counted as still held: measure over a window that allocates what it frees (e.g. two
    consecutive training steps, the first starting without gradients).
    """
    device = torch.device(device)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - base) / MIB
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted(
        (e.start_ns(), e.nbytes())
        for e in prof.profiler.kineto_results.events()
        if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU
    )
    current = peak = 0
    for _, nbytes in events:
        current += nbytes
        peak = max(peak, current)
    return peak / MIB


class RssPeak:
    """Growth of the process's resident memory over a window: ``start()``, run, then ``peak_mib()``.

    On Linux the high-water mark is reset at ``start()`` (after ``malloc_trim``, so memory freed earlier does
    not hide new allocations); elsewhere it falls back to ``ru_maxrss``, whose peak may predate the window
    (then the growth reads 0). ``source`` names which one was used.
    """

    def __init__(self) -> None:
        self._libc: Optional[ctypes.CDLL] = None
        self.source = "ru_maxrss_delta"
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self._libc = _libc()
            self.source = "rss_hwm_delta"
        except (OSError, AttributeError):
            self._libc = None
        self._base_kib = 0

    @staticmethod
    def _status_kib(key: str) -> int:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
        raise KeyError(key)

    @staticmethod
    def _maxrss_kib() -> int:
        r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return r // 1024 if os.uname().sysname == "Darwin" else r  # bytes on macOS, KiB on Linux

    def start(self) -> "RssPeak":
        gc.collect()
        if self._libc is None:
            self._base_kib = self._maxrss_kib()
            return self
        try:
            self._libc.malloc_trim(0)  # hand freed heap memory back, so only new allocations count
        except AttributeError:  # not glibc
            pass
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current VmRSS
        self._base_kib = self._status_kib("VmRSS")
        return self

    def peak_mib(self) -> float:
        top = self._maxrss_kib() if self._libc is None else self._status_kib("VmHWM")
        return max(top - self._base_kib, 0) / 1024


def tune_malloc(enable: bool = True) -> bool:
    """Let glibc keep freed memory for reuse instead of returning every large block to the OS.

    With k tangents every intermediate tangent is k times an activation (at batch 1024, k = 16 and width
    1024: 64 MiB). glibc serves blocks above its mmap threshold (at most 32 MiB) with a fresh ``mmap`` each
    time, so every such tensor pays a page fault per 4 KiB on first touch (about a quarter of the k = 16 step
    on a 2-core CPU). Raising the mmap and trim thresholds makes freed blocks reusable, as a caching allocator
    (or ``LD_PRELOAD`` of jemalloc/tcmalloc, which PyTorch's CPU tuning guide recommends) would. This is a
    process-wide setting, so the library never calls it on its own; scripts opt in (``scripts/bench.py``
    does, for every configuration alike). ``enable=False`` restores glibc's defaults. Returns whether it
    took effect (False off glibc).
    """
    try:
        mallopt = _libc().mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    trim, mmap = (2**31 - 1, 2**30) if enable else (128 * 1024, 128 * 1024)
    return bool(mallopt(m_mmap_threshold, mmap)) and bool(mallopt(m_trim_threshold, trim))

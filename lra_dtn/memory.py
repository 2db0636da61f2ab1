"""Peak memory: what a run reports, and how many micro-batches a step needs to fit a memory budget.

``--grad-accum auto`` (``train.grad_accum=0``) picks the fewest sequential micro-batches whose
forward + backward on the split's *longest* examples stays under ``--memory-budget`` GiB (default:
90 % of the device's free memory). Accumulated micro-batches give the same gradient as the whole
batch, so the choice changes speed and memory, never the numbers a run reports beyond rounding.
"""
from __future__ import annotations

import contextlib
import resource
import sys
from pathlib import Path
from typing import Callable

import torch

GIB = 2**30


def reset_peak_memory(device: torch.device) -> None:
    """Start the peak-memory count afresh: a sweep trains many runs in one process."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    elif sys.platform.startswith("linux"):
        with contextlib.suppress(OSError):  # "5" resets the peak resident set (VmHWM, ru_maxrss); Linux >= 4.0
            Path("/proc/self/clear_refs").write_text("5")


def peak_memory_mb(device: torch.device) -> tuple[float, str]:
    """Peak CUDA allocation on GPU; on CPU the process's peak resident set (all it ever held)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20, "cuda_max_allocated"
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2**20, "cpu_peak_rss"


def _proc_status_bytes(field: str) -> int:
    """``VmRSS`` / ``VmHWM`` of this process in bytes (Linux)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise OSError(f"no {field} in /proc/self/status")


def default_budget_bytes(device: torch.device) -> int:
    """90 % of what is free now: the GPU's free memory, or the machine's available memory."""
    if device.type == "cuda":
        return int(0.9 * torch.cuda.mem_get_info(device)[0])
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(0.9 * int(line.split()[1]) * 1024)
    raise OSError("cannot read the available memory; pass --memory-budget")


def step_peak_bytes(step: Callable[[], None], device: torch.device) -> int:
    """Memory one call of ``step`` takes above what is held before it (inf-like when it runs out).

    On CUDA the allocator's exact peak; on CPU the growth of the peak resident set, an upper bound
    (freed memory the allocator keeps counts too), which is the safe side for a budget."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        try:
            step()
        except torch.cuda.OutOfMemoryError:
            torch.cuda.empty_cache()
            return sys.maxsize
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    reset_peak_memory(device)
    before = _proc_status_bytes("VmRSS")
    step()
    return max(_proc_status_bytes("VmHWM") - before, 0)


def choose_grad_accum(batch: int, peak_bytes: Callable[[int], int], budget_bytes: int) -> tuple[int, int]:
    """The fewest micro-batches ``k`` (a divisor of ``batch``) whose micro-batch of ``batch // k``
    peaks within ``budget_bytes``, and that peak. Tries ``k`` in increasing order and stops at the
    first that fits, so a fitting batch costs one probe."""
    for k in (k for k in range(1, batch + 1) if batch % k == 0):
        peak = peak_bytes(batch // k)
        if peak <= budget_bytes:
            return k, peak
    need = "runs out of device memory" if peak == sys.maxsize else f"needs {peak / GIB:.2f} GiB"
    raise MemoryError(f"even a micro-batch of 1 example {need}, over the memory budget of {budget_bytes / GIB:.2f} "
                      "GiB; raise --memory-budget or shorten the sequences")

"""Timing and memory helpers shared by the benchmarks."""
from __future__ import annotations

import gc
import resource
import time

import torch


def peak_memory_mb(device: torch.device) -> float:
    """Peak allocated CUDA memory, or this process's peak RSS on CPU, in MiB."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def time_call(fn, *, device: torch.device, warmup: int, iters: int) -> float:
    """Mean seconds per call of fn() after warm-up, synchronising CUDA."""
    for _ in range(warmup):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - start) / iters


def fits(run, batch_size: int, *, device: torch.device) -> bool:
    """Whether run(batch_size) completes on ``device`` without running out of CUDA memory."""
    try:
        run(batch_size)
        torch.cuda.synchronize(device)
        return True
    except torch.OutOfMemoryError:
        return False
    finally:
        gc.collect()
        torch.cuda.empty_cache()


def largest_batch(run, *, start: int, limit: int, device: torch.device) -> dict:
    """The largest batch size that fits: doubling from ``start`` until out of memory, then bisection
    to within 1/8. run(batch_size) does one full unit of work (a step, a batch of samples).

    Returns {"largest_batch": int or None, "largest_batch_limited": bool} (limited: ``limit``
    was reached, more may fit); None off CUDA, where nothing is probed.
    """
    if device.type != "cuda":
        return {"largest_batch": None, "largest_batch_limited": False}
    good, bad, b = 0, None, max(1, start)
    while b <= limit:
        if not fits(run, b, device=device):
            bad = b
            break
        good, b = b, 2 * b
    if bad is None:
        return {"largest_batch": good, "largest_batch_limited": True}
    lo = good if good else 0
    while bad - lo > max(1, lo // 8):
        mid = (lo + bad) // 2
        if fits(run, mid, device=device):
            lo = mid
        else:
            bad = mid
    return {"largest_batch": lo, "largest_batch_limited": False}

"""Device and precision choices shared by every entry point."""
from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path

import torch

from titok_core.errors import UsageError

log = logging.getLogger(__name__)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def pick_device(name: str = "auto") -> torch.device:
    """'auto' -> cuda when available, else cpu; anything else is passed to torch.device."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"device {name!r} asked for but no CUDA GPU is available")
    return device


def cpu_has_native_bf16() -> bool:
    """True when this CPU computes bf16 natively (AMX tiles or AVX512-BF16).

    There bf16 autocast ran 4-5x faster than fp32 for tokenizer training; on CPUs without them
    (AVX2 only) it emulates bf16 and ran 30-50x slower, so fp32 is the right default there.
    """
    checks = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")
    if all(hasattr(torch.cpu, name) for name in checks):
        return any(getattr(torch.cpu, name)() for name in checks)
    try:  # older torch: the kernel's CPU flags
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


_logged_choices: set[tuple[str, str]] = set()


def _auto_choice(what: str, *, cuda: bool, fast: str, plain: str) -> str:
    """``fast`` (a bf16 setting) on CUDA and on CPUs with native bf16, else ``plain``; logged once per choice."""
    if cuda:
        choice, why = fast, "CUDA"
    else:
        native = cpu_has_native_bf16()
        choice = fast if native else plain
        why = ("CPU with native bf16 (AMX / AVX512-BF16)" if native
               else "CPU without native bf16: bf16 would be emulated and slow")
    if (what, choice) not in _logged_choices:
        _logged_choices.add((what, choice))
        log.info("%s auto -> %s (%s)", what, choice, why)
    return choice


def resolve_dtype(device: torch.device, dtype: str) -> str:
    """'auto' -> 'bf16' on CUDA and on CPUs with native bf16 (AMX / AVX512-BF16), else 'fp32';
    other names are checked and kept. The choice is logged once per process."""
    if dtype == "auto":
        return _auto_choice("dtype", cuda=device.type == "cuda", fast="bf16", plain="fp32")
    if dtype not in DTYPES:
        raise UsageError(f"dtype must be auto or one of {', '.join(DTYPES)}, got {dtype!r}")
    return dtype


def autocast(device: torch.device, dtype: str):
    """Mixed precision context for 'bf16'/'fp16'; 'fp32' runs in full precision; 'auto' see resolve_dtype."""
    dtype = resolve_dtype(device, dtype)
    if dtype == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=DTYPES[dtype])


def resolve_precision(precision: str) -> str:
    """Lightning precision; 'auto' -> 'bf16-mixed' on GPU and on CPUs with native bf16, else
    '32-true' (see :func:`cpu_has_native_bf16`). The choice is logged once per process."""
    if precision != "auto":
        return precision
    return _auto_choice("precision", cuda=torch.cuda.is_available(), fast="bf16-mixed", plain="32-true")


def resolve_workers(num_workers: int | str) -> int:
    """DataLoader workers: ``"auto"`` -> min(4, usable CPU cores - 1) (0 on one core: the main process
    loads), so the loader never asks for more workers than the machine has; a number is kept."""
    if num_workers == "auto":
        try:
            cores = len(os.sched_getaffinity(0))
        except AttributeError:  # not on Linux
            cores = os.cpu_count() or 1
        return min(4, max(0, cores - 1))
    try:
        workers = int(num_workers)
    except (TypeError, ValueError):
        raise UsageError(f"num_workers must be auto or a number, got {num_workers!r}") from None
    if workers < 0:
        raise UsageError(f"num_workers must not be negative, got {workers}")
    return workers

"""The environment step's facts: versions, the GPU, the driver, an nvJPEG decode, a bf16 matmul."""
from __future__ import annotations

import io
import os
import subprocess
import time

from titok_bench.gpu_check.steps import REPO

NEEDED = {"hydra": "hydra-core", "omegaconf": "omegaconf", "antlr4": "antlr4-python3-runtime",
          "torch_fidelity": "torch-fidelity"}
VERSIONS = ("torch", "torchvision", "triton", "lightning", "hydra-core", "omegaconf", "antlr4-python3-runtime",
            "torch-fidelity", "numpy", "scipy", "pillow", "transformers", "pytest")


def env_facts(*, full: bool) -> dict:
    """Python, platform, versions, missing packages, the commit; on CUDA the GPU, driver, an nvJPEG
    decode and (``full``) a bf16 matmul's TFLOP/s."""
    import importlib.metadata as md
    import importlib.util
    import platform

    import torch

    facts = {
        "python": platform.python_version(), "platform": platform.platform(), "cpu_count": os.cpu_count(),
        "torch": torch.__version__, "cuda_version": torch.version.cuda, "cuda_available": torch.cuda.is_available(),
        "versions": {}, "missing_packages": [n for m, n in NEEDED.items() if importlib.util.find_spec(m) is None],
        "repo": str(REPO), "git_commit": _git_commit(),
    }
    for name in VERSIONS:
        try:
            facts["versions"][name] = md.version(name)
        except md.PackageNotFoundError:
            facts["versions"][name] = None
    if not facts["cuda_available"]:
        facts["device_name"] = "cpu"
        return facts
    props = torch.cuda.get_device_properties(0)
    facts.update(
        device_name=props.name, capability=f"{props.major}.{props.minor}", multiprocessors=props.multi_processor_count,
        memory_gib=round(props.total_memory / 2**30, 1), cudnn=torch.backends.cudnn.version(),
        device_count=torch.cuda.device_count(), nvidia_smi=_nvidia_smi(),
    )
    facts["nvjpeg"] = _nvjpeg_check()
    if full:
        facts["bf16_matmul_tflops"] = _matmul_tflops()
    return facts


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def _nvidia_smi() -> str | None:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm,power.limit",
                              "--format=csv,noheader"], capture_output=True, text=True, timeout=20)
        return out.stdout.strip() or out.stderr.strip()[:300]
    except (OSError, subprocess.SubprocessError) as exc:
        return f"unavailable: {exc}"


def _nvjpeg_check() -> dict:
    """Decode one small JPEG on the GPU (torchvision's nvJPEG) and compare with the CPU decode."""
    import numpy as np
    import torch
    from PIL import Image

    try:
        from torchvision.io import decode_jpeg

        buf = io.BytesIO()
        rng = np.random.default_rng(0)
        Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)).save(buf, format="JPEG", quality=90)
        data = torch.frombuffer(bytearray(buf.getvalue()), dtype=torch.uint8)
        gpu = decode_jpeg(data, device="cuda").cpu()
        cpu = decode_jpeg(data)
        return {"ok": True, "max_abs_diff_vs_cpu": int((gpu.int() - cpu.int()).abs().max())}
    except Exception as exc:  # noqa: BLE001
        return {"ok": False, "error": f"{type(exc).__name__}: {exc}"[:300]}


def _matmul_tflops(n: int = 8192, iters: int = 10) -> float | None:
    import torch

    try:
        a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
        b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
        for _ in range(3):
            a @ b
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(iters):
            a @ b
        torch.cuda.synchronize()
        return round(2 * n**3 * iters / (time.perf_counter() - start) / 1e12, 1)
    except Exception:  # noqa: BLE001
        return None

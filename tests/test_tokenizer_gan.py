"""The official tokenizer training on tiny models: the discriminator on its own optimiser, LeCAM, the
clustering VQ, stage 2 (decoder fine-tuning in pixels), VAE tokenizers, gradient accumulation.

Each run is ``tokenizer.train`` (compose API) on a few 16 or 32 px images, the GAN active from
step 1 (``loss.gan.start_step=1``: step 0 without it, then the discriminator trains), the
perceptual loss with untrained networks (``loss.random_weights=true``). The default suite runs
the single-stage VQ recipe; ``-m slow`` stage 2, the VAE and the accumulation equivalence. The
kill-and-resume of a run with the GAN is in tests/test_kill_resume.py.
"""
from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from test_tokenizer_train import TINY, _image_folder

from titok_core.checkpoints import save_model_file
from titok_core.errors import UsageError
from tokenizer import build_tokenizer, load_tokenizer
from tokenizer.train import train

from conftest import compose_config

GAN = ["loss.gan.weight=0.1", "loss.gan.start_step=1", "loss.gan.lecam_weight=0.001", "loss.gan.channels=32",
       "loss.gan.layers=2", "loss.random_weights=true"]
GENERATOR_TERMS = ("reconstruction_loss", "perceptual_loss", "gan_loss", "weighted_gan_loss", "loss")
DISCRIMINATOR_TERMS = ("discriminator_loss", "logits_real", "logits_fake", "lecam_loss")


def _cfg(tmp_path: Path, run: str, *overrides: str, model: dict, data: str = "data"):
    cfg = compose_config("tokenizer.train", [
        "name=tiny", f"run_dir={tmp_path / run}", f"data.root={tmp_path / data}", "data.builtin=null",
        "data.val_images=4", "data.hflip=false", "batch_size=4", "num_workers=0", "optim.lr=3e-3",
        "optim.warmup_steps=2", "optim.betas=[0.9,0.999]", "codebook.revive_every_n_steps=0",
        "checkpoint_every_n_steps=10", "trainer.accelerator=cpu", "trainer.devices=1", "trainer.precision=32-true",
        "trainer.log_every_n_steps=1", "trainer.val_check_interval=100", "trainer.enable_progress_bar=false",
        *overrides,
    ])
    OmegaConf.set_struct(cfg, False)
    cfg.model = model
    return cfg


def _rows(run: Path, version: int = 0) -> list[dict]:
    with open(run / "logs" / f"version_{version}" / "metrics.csv") as f:
        return [r for r in csv.DictReader(f) if r.get("train/loss")]


def _ckpt(run: Path) -> dict:
    return torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)


def _discriminator(state: dict) -> dict:
    return {k: v for k, v in state["state_dict"].items() if k.startswith("loss_module.discriminator.")}


def _check_terms(rows: list[dict], *, steps: int, extra: tuple[str, ...] = ()) -> None:
    """Every step logs the model's terms, and from step 1 on the discriminator's, all finite."""
    assert [int(r["step"]) for r in rows] == list(range(steps))
    for r in rows:
        for key in GENERATOR_TERMS + extra:
            assert math.isfinite(float(r[f"train/{key}"])), (key, r)
    assert not rows[0].get("train/discriminator_loss") and float(rows[0]["train/discriminator_factor"]) == 0
    for r in rows[1:]:
        assert float(r["train/discriminator_factor"]) == 1
        for key in DISCRIMINATOR_TERMS:
            assert math.isfinite(float(r[f"train/{key}"])), (key, r)


def test_single_stage_vq_trains_the_discriminator_on_its_own_optimiser(tmp_path):
    """The VQ-8k recipe in small: clustering VQ, commitment, LPIPS, GAN with LeCAM from step 1."""
    _image_folder(tmp_path / "data", 16, per_class=2)
    model = {**TINY, "use_l2_norm": False}
    args = [*GAN, "loss.perceptual=lpips", "loss.perceptual_weight=1.1", "codebook.clustering_vq=true"]
    first = train(_cfg(tmp_path, "run", *args, "trainer.max_steps=1", model=model))
    before = _ckpt(tmp_path / "run")
    assert first["global_step"] == 1 and len(before["optimizer_states"]) == 2
    assert not before["optimizer_states"][1]["state"]  # step 0: the discriminator has not trained yet

    # The same run continued to step 4: steps 1-3 train the discriminator.
    result = train(_cfg(tmp_path, "run", *args, "trainer.max_steps=4", model=model))
    assert result["resumed_from_step"] == 1 and result["global_step"] == 4
    after = _ckpt(tmp_path / "run")
    rows = _rows(tmp_path / "run", 0) + _rows(tmp_path / "run", 1)
    _check_terms(rows, steps=4, extra=("quantizer_loss", "commitment_loss", "codebook_loss"))
    # Its optimiser took 3 steps (the model's 4); its warm-up starts at 0, as the official schedule.
    d_state = after["optimizer_states"][1]["state"]
    assert {int(s["step"]) for s in d_state.values()} == {3}
    assert {int(s["step"]) for s in after["optimizer_states"][0]["state"].values()} == {4}
    assert [float(r["train/discriminator_lr"]) for r in rows[1:]] == pytest.approx([0.0, 1.5e-3, 3e-3])
    # Its weights moved, and so did the LeCAM EMAs of the logits and the clustering VQ's code shares.
    d0, d1 = _discriminator(before), _discriminator(after)
    assert d0.keys() == d1.keys() and not any(torch.equal(d0[k], d1[k]) for k in d0 if k.endswith(".weight"))
    sd = after["state_dict"]
    assert sd["loss_module.ema_real_logits_mean"].abs() > 0 and sd["loss_module.ema_fake_logits_mean"].abs() > 0
    assert sd["clustering.embed_prob"].sum() == pytest.approx(1 - 0.99**4, rel=1e-5)
    assert not any(k.startswith("loss_module.perceptual_loss.") for k in sd)  # frozen helpers stay out
    tok = load_tokenizer(result["checkpoint"])  # the exported tokenizer is the model alone
    assert tok.encode(torch.rand(2, 3, 16, 16)).shape == (2, 4)


def _stage1_tokenizer(path: Path) -> Path:
    """A random stage-1 tokenizer file (proxy-code decoder with its VQGAN pixel decoder), 32 px."""
    config = {**TINY, "image_size": 32, "patch_size": 16, "decoder_output": "proxy_codes",
              "proxy_codebook_size": 32, "proxy_code_dim": 32, "pixel_decoder_hidden_channels": 32}
    torch.manual_seed(0)
    tok = build_tokenizer(config)
    save_model_file(path, kind="tokenizer", config=tok.config.to_dict(), state_dict=tok.state_dict())
    return path


@pytest.mark.slow
def test_stage2_fine_tunes_the_decoder_in_pixels_with_the_gan(tmp_path):
    """TiTok's stage 2 in small: encoder and quantiser frozen, the ViT decoder, the proxy codebook and
    the VQGAN decoder trained in pixels with ConvNeXt-S and the GAN; no VQGAN checkpoint needed."""
    _image_folder(tmp_path / "data", 32, per_class=1)
    start = _stage1_tokenizer(tmp_path / "stage1.safetensors")
    cfg = _cfg(tmp_path, "run", *GAN, "loss.perceptual=convnext_s", "loss.perceptual_weight=0.1",
               "loss.quantizer_weight=0.0", f"finetune.init_from={start}", "finetune.freeze_encoder=true",
               "batch_size=2", "trainer.max_steps=3", model=TINY)
    result = train(cfg)
    _check_terms(_rows(tmp_path / "run"), steps=3)
    before, after = load_tokenizer(start), load_tokenizer(result["checkpoint"])
    images = torch.rand(4, 3, 32, 32)
    assert torch.equal(before.encode(images), after.encode(images))  # every image keeps its tokens
    b, a = before.state_dict(), after.state_dict()
    frozen = [k for k in b if k.startswith(("encoder.", "latent_tokens", "quantize."))]
    assert frozen and all(torch.equal(b[k], a[k]) for k in frozen)
    for part in ("decoder.", "proxy_codebook.", "pixel_decoder."):  # trained, as the official stage 2
        assert not all(torch.equal(b[k], a[k]) for k in b if k.startswith(part)), part
    assert after.decode(after.encode(images)).shape == (4, 3, 32, 32)
    with pytest.raises(UsageError, match="needs no proxy.vqgan_checkpoint"):
        train(_cfg(tmp_path, "bad", f"finetune.init_from={start}", "finetune.freeze_encoder=true",
                   "proxy.vqgan_checkpoint=vqgan.bin", "trainer.max_steps=1", model=TINY))


@pytest.mark.slow
def test_vae_tokenizer_trains_with_kl_and_the_gan(tmp_path):
    _image_folder(tmp_path / "data", 16, per_class=2)
    vae = {**TINY, "quantizer": "vae", "codebook_size": None, "token_size": 4, "use_l2_norm": False}
    result = train(_cfg(tmp_path, "run", *GAN, "loss.perceptual=lpips", "loss.perceptual_weight=1.1",
                        "loss.kl_weight=1e-6", "trainer.max_steps=4", model=vae))
    rows = _rows(tmp_path / "run")
    _check_terms(rows, steps=4, extra=("kl_loss",))
    assert all(float(r["train/kl_loss"]) > 0 for r in rows) and "train/quantizer_loss" not in rows[0]
    assert "val/codebook_usage" not in result["metrics"] and result["metrics"]["val/psnr"] > 0
    tok = load_tokenizer(result["checkpoint"])
    assert not tok.is_discrete
    latents = tok.encode(torch.rand(2, 3, 16, 16))
    assert latents.shape == (2, 4, 4) and tok.decode(latents).shape == (2, 3, 16, 16)


@pytest.mark.slow
def test_accumulated_micro_batches_equal_one_larger_batch(tmp_path):
    """2 micro-batches of 2 accumulated make the step that one batch of 4 makes: the same gradients
    (AdamW's first moment after one step is 0.1 x the clipped gradient) and weights, for the model and
    the discriminator, within float32 rounding. LeCAM and the clustering VQ are off: their EMAs move
    once per micro-batch, as in the official loop."""
    _image_folder(tmp_path / "data", 16, per_class=2)  # 4 training images: one batch of 4 = two of 2
    args = [*GAN, "loss.gan.lecam_weight=0", "loss.gan.start_step=0", "loss.perceptual=lpips",
            "loss.perceptual_weight=1.1", "trainer.max_steps=1", "optim.ema=false"]
    train(_cfg(tmp_path, "one", *args, "batch_size=4", model=TINY))
    train(_cfg(tmp_path, "two", *args, "batch_size=2", "trainer.global_batch=4", model=TINY))
    one, two = _ckpt(tmp_path / "one"), _ckpt(tmp_path / "two")
    assert one["global_step"] == two["global_step"] == 1
    for opt_one, opt_two in zip(one["optimizer_states"], two["optimizer_states"]):
        assert opt_one["state"].keys() == opt_two["state"].keys() and opt_one["state"]
        for i, s in opt_one["state"].items():
            scale = float(s["exp_avg"].abs().max())  # float32 sums in another order: measured up to 2e-5 of the largest entry
            torch.testing.assert_close(opt_two["state"][i]["exp_avg"], s["exp_avg"], rtol=0, atol=1e-4 * scale)
    # AdamW's first step moves each weight by lr * g / (|g| + eps): where a gradient is rounding noise
    # (an attention key bias has none in exact arithmetic) that is up to ~1e-4 lr apart (lr 3e-3).
    for k, v in one["state_dict"].items():
        if not k.startswith("usage."):  # the dead-code statistics: an EMA moved once per micro-batch
            torch.testing.assert_close(two["state_dict"][k], v, rtol=1e-5, atol=1e-6)
    rows = _rows(tmp_path / "two")
    assert len(rows) == 2 and {int(r["step"]) for r in rows} <= {0, 1}


def test_discriminator_schedule_is_the_official_one_stepped_once_per_process():
    """The official discriminator scheduler is a cosine with warm-up over max_steps * P - start steps,
    stepped P times per discriminator step (Accelerate steps a prepared scheduler once per process)."""
    from tokenizer.official import discriminator_lr_factor

    def official_lambda(step, *, warmup, total, base, end):  # get_cosine_schedule_with_warmup's lr_lambda
        if step < warmup:
            return step / max(1, warmup)
        progress = (step - warmup) / max(1, total - warmup)
        return (end + (base - end) * max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))) / base

    max_steps, start, warmup, base, end = 650, 200, 10, 1e-4, 1e-5  # the single-stage recipe / 1000
    for processes in (1, 8):
        scheduler_steps = 0  # what the official scheduler has counted before each discriminator step
        for d_step in range(max_steps - start):
            want = official_lambda(scheduler_steps, warmup=warmup * processes,
                                   total=max_steps * processes - start, base=base, end=end)
            got = discriminator_lr_factor(d_step, warmup_steps=warmup, max_steps=max_steps, start_step=start,
                                          processes=processes, base_lr=base, end_lr=end)
            assert got == pytest.approx(want, rel=1e-12, abs=1e-15), (processes, d_step)
            scheduler_steps += processes
    last = dict(warmup_steps=warmup, max_steps=max_steps, start_step=start, base_lr=base, end_lr=end)
    assert discriminator_lr_factor(max_steps - start, processes=1, **last) == pytest.approx(end / base)
    assert discriminator_lr_factor(max_steps - start, processes=8, **last) * base > 2.5e-5  # ends above end_lr

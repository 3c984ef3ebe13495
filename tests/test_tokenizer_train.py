"""Tokenizer training: a tiny run end to end (compose API), resume, export, dead codes, stage 1."""
import csv
import json
import re
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from tokenizer import TiTokConfig, load_tokenizer
from tokenizer.codebook_usage import CodeUsage, codebook_perplexity, codebook_usage, token_counts
from tokenizer.figures import usage_figure
from tokenizer.model import PixelDecoder
from tokenizer.perceptual import LPIPS_CHANNELS, build_lpips
from tokenizer.proxy_codes import VQGANEncoder, load_maskgit_vqgan
from tokenizer.train import train

from conftest import compose_config

TINY = {
    "image_size": 16, "patch_size": 4, "enc_width": 32, "enc_depth": 1, "enc_heads": 2,
    "dec_width": 32, "dec_depth": 1, "dec_heads": 2, "num_tokens": 4, "codebook_size": 16,
    "token_size": 4, "use_l2_norm": True, "legacy_layout": False, "decoder_output": "rgb",
}


def _image_folder(root: Path, size: int, per_class: int = 4) -> Path:
    """Two classes of flat-coloured images with a square, in train/ and val/."""
    g = torch.Generator().manual_seed(0)
    for split in ("train", "val"):
        for c in ("a", "b"):
            (root / split / c).mkdir(parents=True)
            for i in range(per_class):
                x = torch.rand(3, 1, 1, generator=g).expand(3, size, size).clone()
                o = int(torch.randint(0, size // 2, (1,), generator=g))
                x[:, o : o + size // 2, o : o + size // 2] = 1.0 if c == "a" else 0.0
                arr = (x.permute(1, 2, 0) * 255).round().byte().numpy()
                Image.fromarray(arr).save(root / split / c / f"{i}.png")
    return root


def _cfg(tmp_path: Path, *overrides: str, model: dict | None = None):
    cfg = compose_config("tokenizer.train", [
            "name=tiny", f"run_dir={tmp_path / 'run'}", f"data.root={tmp_path / 'data'}", "data.builtin=null",
            "data.val_images=4", "batch_size=4", "num_workers=0", "optim.lr=3e-3", "optim.warmup_steps=5",
            "optim.ema_decay=0.9", "codebook.revive_every_n_steps=5", "checkpoint_every_n_steps=10",
            "trainer.accelerator=cpu", "trainer.devices=1", "trainer.log_every_n_steps=1",
            "trainer.val_check_interval=10", *overrides,
    ])
    OmegaConf.set_struct(cfg, False)
    cfg.model = model or TINY
    return cfg


def _column(csv_path: Path, key: str) -> list[float]:
    with open(csv_path) as f:
        return [float(r[key]) for r in csv.DictReader(f) if r.get(key)]


def test_tiny_run_trains_exports_and_resumes(tmp_path):
    _image_folder(tmp_path / "data", 16)
    result = train(_cfg(tmp_path, "trainer.max_steps=30", "codebook.quantizer_warmup_steps=5"))
    assert result["global_step"] == 30 and result["resumed_from_step"] is None
    metrics = tmp_path / "run" / "logs" / "version_0" / "metrics.csv"
    rec = _column(metrics, "train/reconstruction_loss")
    assert sum(rec[-5:]) / 5 < 0.5 * sum(rec[:5]) / 5, rec
    assert max(_column(metrics, "train/revived")) >= 16  # the warm-up's end restarted every code
    assert 0 < result["metrics"]["val/codebook_usage"] <= 1 and result["metrics"]["val/psnr"] > 0
    for key in ("recon_grid", "usage_figure"):
        assert Path(result[key]).is_file()

    tok = load_tokenizer(result["checkpoint"])
    assert tok.config == TiTokConfig(**TINY)
    images = torch.rand(2, 3, 16, 16)
    tokens = tok.encode(images)
    assert tokens.shape == (2, 4) and tokens.dtype == torch.int64 and int(tokens.max()) < 16
    assert tok.decode(tokens).shape == (2, 3, 16, 16)

    # A rerun with a larger budget resumes from last.ckpt and counts on from 30, also when its record is from
    # before loss.rate_warmup_steps existed (it trained without one, the option's default).
    record = json.loads((tmp_path / "run" / "run.json").read_text())
    assert record["recipe"]["loss"].pop("rate_warmup_steps") == 0
    (tmp_path / "run" / "run.json").write_text(json.dumps(record))
    again = train(_cfg(tmp_path, "trainer.max_steps=40", "codebook.quantizer_warmup_steps=5"))
    assert again["resumed_from_step"] == 30 and again["global_step"] == 40
    steps = [int(s) for s in _column(tmp_path / "run" / "logs" / "version_1" / "metrics.csv", "step")]
    assert min(steps) >= 30


def test_gan_l1_and_gradient_loss_run(tmp_path):
    _image_folder(tmp_path / "data", 16, per_class=2)
    result = train(_cfg(tmp_path, "trainer.max_steps=4", "loss.reconstruction=l1", "loss.gan.weight=0.1",
                        "loss.gan.start_step=2", "loss.gan.channels=32", "loss.gan.layers=1", "optim.ema=false",
                        "loss.gradient_weight=0.1"))
    metrics = tmp_path / "run" / "logs" / "version_0" / "metrics.csv"
    d_loss = _column(metrics, "train/discriminator_loss")
    # The discriminator trains from loss.gan.start_step on (steps 2 and 3).
    assert result["global_step"] == 4 and len(d_loss) == 2 and all(v == v for v in d_loss)
    edge = _column(metrics, "train/gradient_loss")
    assert len(edge) == 4 and all(0 < v < 2 for v in edge)


def test_rate_term_trains_an_fsq_tokenizer_towards_cheaper_codes(tmp_path):
    _image_folder(tmp_path / "data", 16, per_class=4)
    fsq = {**TINY, "quantizer": "fsq", "fsq_levels": [5, 3], "use_l2_norm": False}
    result = train(_cfg(tmp_path, "trainer.max_steps=12", "loss.rate_weight=0.5", "codebook.revive_every_n_steps=0",
                        model=fsq))
    metrics = tmp_path / "run" / "logs" / "version_0" / "metrics.csv"
    bits, rate = _column(metrics, "train/code_bits"), _column(metrics, "train/rate")
    assert result["global_step"] == 12 and len(bits) == len(rate) == 12
    full = float(torch.log2(torch.tensor(15.0)))  # 5 x 3 levels: the uniform prior's bits per token
    assert bits[0] == pytest.approx(full, abs=0.01) and bits[-1] < full - 0.5  # the prior learnt the codes
    assert load_tokenizer(result["checkpoint"]).codebook_size == 15  # the prior is a training aid, not shipped

    with pytest.raises(ValueError, match="rate_weight needs an FSQ tokenizer"):
        train(_cfg(tmp_path, "trainer.max_steps=1", f"run_dir={tmp_path / 'vq'}", "loss.rate_weight=0.5"))


def test_the_rate_weight_grows_over_its_warmup():
    from tokenizer.lightning_module import TiTokModule

    fsq = {**TINY, "quantizer": "fsq", "fsq_levels": [5, 3], "use_l2_norm": False}
    ramp = TiTokModule(model_config=fsq, loss={"rate_weight": 1e-3, "rate_warmup_steps": 100}, rate_classes=2)
    assert [ramp.rate_weight_at(s) for s in (0, 25, 50, 100, 4000)] == pytest.approx([0, 2.5e-4, 5e-4, 1e-3, 1e-3])
    at_once = TiTokModule(model_config=fsq, loss={"rate_weight": 1e-3}, rate_classes=2)
    assert at_once.rate_weight_at(0) == at_once.rate_weight_at(4000) == 1e-3


def test_codebook_usage_and_perplexity():
    tokens = torch.tensor([[0, 1, 1, 3], [3, 3, 0, 1]])
    counts = token_counts(tokens, 8)
    assert counts.tolist() == [2, 3, 0, 3, 0, 0, 0, 0]
    assert codebook_usage(counts) == pytest.approx(3 / 8)
    assert codebook_perplexity(torch.ones(8)) == pytest.approx(8.0)
    assert codebook_perplexity(torch.tensor([5.0, 0, 0, 0])) == pytest.approx(1.0)
    figure = usage_figure(counts, height=10, width_per_code=1)
    assert figure.shape == (3, 10, 8) and (figure[:, :, 3:] == 1).all()  # 5 unused codes: empty columns


def test_dead_codes_are_replaced_by_recent_latents():
    usage = CodeUsage(codebook_size=8, token_size=4, decay=0.5, dead_ratio=0.1, buffer_size=6)
    latents = torch.randn(2, 3, 4)
    for _ in range(10):  # only codes 0..3 are ever picked
        usage.update(torch.tensor([[0, 1, 2], [3, 0, 1]]), latents)
    assert usage.dead().tolist() == [False] * 4 + [True] * 4
    codebook = torch.nn.Parameter(torch.randn(8, 4))
    before = codebook.detach().clone()
    idx = usage.revive(codebook, l2_norm=True, generator=torch.Generator().manual_seed(0))
    assert idx.tolist() == [4, 5, 6, 7]
    assert torch.equal(codebook[:4], before[:4])
    new = torch.nn.functional.normalize(codebook[4:].detach(), dim=-1)
    pool = torch.nn.functional.normalize(latents.reshape(-1, 4), dim=-1)
    assert torch.cdist(new, pool).min(dim=1).values.max() < 1e-5  # each new code is a recent latent
    assert not usage.dead().any()  # revived codes restart at uniform usage


def test_lpips_from_local_files(tmp_path):
    from torchvision.models.vgg import cfgs, make_layers

    torch.save({f"features.{k}": v for k, v in make_layers(cfgs["D"]).state_dict().items()}, tmp_path / "vgg.pth")
    lins = {f"lin{k}.model.1.weight": torch.rand(1, c, 1, 1) for k, c in enumerate(LPIPS_CHANNELS)}
    torch.save(lins, tmp_path / "lpips.pth")
    lpips = build_lpips(vgg_weights=tmp_path / "vgg.pth", lpips_weights=tmp_path / "lpips.pth")
    a, b = torch.rand(2, 3, 32, 32), torch.rand(2, 3, 32, 32)
    assert lpips(a, a).abs().max() < 1e-6 and (lpips(a, b) > 0).all()


# ---------------------------------------------------------------- stage 1: MaskGIT-VQGAN proxy codes

def _save_tiny_vqgan(path: Path) -> tuple[VQGANEncoder, torch.Tensor]:
    """A random MaskGIT-VQGAN (hidden 32, 5 levels, z 16, 32 codes) under the official key names."""
    torch.manual_seed(0)
    enc = VQGANEncoder(hidden_channels=32, channel_mult=(1, 1, 2, 2, 4), num_res_blocks=2, z_channels=16)
    dec = PixelDecoder(hidden_channels=32, z_channels=16)
    codebook = torch.randn(32, 16)
    sd = {"quantize.embedding.weight": codebook}
    for k, v in enc.state_dict().items():
        k = re.sub(r"^down\.(\d+)\.", r"down.\1.block.", k).replace(".shortcut.", ".nin_shortcut.")
        sd[f"encoder.{k}"] = v
    for k, v in dec.state_dict().items():
        m = re.match(r"^up\.(\d+)\.(blocks\.)?(.*)$", k)
        if m:  # official keeps the up blocks highest resolution first
            k = f"up.{4 - int(m.group(1))}.{'block.' if m.group(2) else ''}{m.group(3)}"
        sd[f"decoder.{k.replace('.shortcut.', '.nin_shortcut.')}"] = v
    torch.save(sd, path)
    return enc, codebook


def test_stage1_proxy_code_training(tmp_path):
    enc, codebook = _save_tiny_vqgan(tmp_path / "vqgan.bin")
    proxy, implied, _ = load_maskgit_vqgan(tmp_path / "vqgan.bin")
    assert implied == {"proxy_codebook_size": 32, "proxy_code_dim": 16, "pixel_decoder_hidden_channels": 32}
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        z = enc(x).permute(0, 2, 3, 1).reshape(-1, 16)
    assert torch.equal(proxy(x).flatten(), torch.cdist(z, codebook).argmin(1))  # (B, 2, 2) codes

    _image_folder(tmp_path / "data", 32, per_class=2)
    model = {**TINY, "image_size": 32, "patch_size": 16, "decoder_output": "proxy_codes"}
    result = train(_cfg(tmp_path, "trainer.max_steps=3", f"proxy.vqgan_checkpoint={tmp_path / 'vqgan.bin'}",
                        "optim.ema=false", model=model))
    ce = _column(tmp_path / "run" / "logs" / "version_0" / "metrics.csv", "train/ce_loss")
    assert len(ce) == 3 and all(v == v for v in ce)
    tok = load_tokenizer(result["checkpoint"])
    assert tok.decode(tok.encode(x)).shape == (2, 3, 32, 32)


def test_decoder_finetuning_keeps_every_token_and_improves_the_decoder(tmp_path):
    _image_folder(tmp_path / "data", 16)
    first = train(_cfg(tmp_path, "trainer.max_steps=20"))
    tuned = train(_cfg(tmp_path, "trainer.max_steps=30", f"run_dir={tmp_path / 'stage2'}",
                       f"finetune.init_from={first['checkpoint']}", "finetune.freeze_encoder=true"))
    assert tuned["resumed_from_step"] is None and tuned["global_step"] == 30
    before, after = load_tokenizer(first["checkpoint"]), load_tokenizer(tuned["checkpoint"])
    assert after.config == before.config
    images = torch.rand(8, 3, 16, 16)
    assert torch.equal(before.encode(images), after.encode(images))  # the tokens stay: generators stay valid
    b, a = before.state_dict(), after.state_dict()
    assert all(torch.equal(b[k], a[k]) for k in b if k.startswith(("encoder.", "latent_tokens", "quantize.")))
    assert not all(torch.equal(b[k], a[k]) for k in b if k.startswith("decoder."))
    assert tuned["metrics"]["val/psnr"] > first["metrics"]["val/psnr"]

    with pytest.raises(ValueError, match="needs finetune.init_from"):
        train(_cfg(tmp_path, "trainer.max_steps=1", f"run_dir={tmp_path / 'bad'}", "finetune.freeze_encoder=true"))


def test_decoder_experiments_are_the_small_recipe_with_a_frozen_encoder():
    demo = OmegaConf.to_container(compose_config("tokenizer.train", ["experiment=demo"]))
    stage2 = OmegaConf.to_container(compose_config("tokenizer.train", ["experiment=demo_decoder"]))
    small2 = compose_config("tokenizer.train", ["experiment=small_decoder", "data.root=D"])
    assert stage2["finetune"] == {"init_from": "titok_demo", "freeze_encoder": True}
    assert small2.finetune.freeze_encoder and small2.finetune.init_from is None  # train() asks for it
    for key in ("data", "model", "loss", "codebook", "batch_size", "trainer"):
        assert stage2[key] == demo[key], key  # only the start, the frozen parts and the step size change
    assert (stage2["optim"]["lr"], demo["optim"]["lr"]) == (3e-4, 1e-3)


def test_demo_rate_experiment_continues_stage_two_with_the_rate_term():
    demo = OmegaConf.to_container(compose_config("tokenizer.train", ["experiment=demo"]))
    stage3 = OmegaConf.to_container(compose_config("tokenizer.train", ["experiment=demo_rate"]))
    assert stage3["finetune"] == {"init_from": "runs/tokenizer/demo_decoder/tokenizer.safetensors",
                                  "freeze_encoder": False}  # the whole tokenizer trains: the tokens move
    assert demo["loss"]["rate_weight"] == 0 and stage3["loss"]["rate_weight"] == 1e-3
    assert stage3["loss"] == {**demo["loss"], "rate_weight": 1e-3}
    assert (stage3["optim"]["lr"], stage3["codebook"]["quantizer_warmup_steps"]) == (5e-4, 0)
    for key in ("data", "model", "batch_size"):
        assert stage3[key] == demo[key], key

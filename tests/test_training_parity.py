"""The tokenizer's training pieces compute what the official training code computes.

Golden outputs: tests/fixtures/official_tiny/{discriminator,perceptual,losses,clustering_vq}, written by
scripts/make_official_fixtures.py (part official_training) from the official code at the pinned
commit. The inputs and the random weights are rebuilt here with the script's own recipes
(``training_images``, ``training_extras``, ``reinit_scaled_`` from the recorded seeds), so the fixtures
hold outputs and gradients only. Tests that run ConvNeXt-S (50M parameters at 224 x 224) are slow.
"""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from tokenizer import official
from tokenizer.discriminator import NLayerDiscriminator
from tokenizer.losses import ReconstructionLoss
from tokenizer.model import ClusteringVQ, VectorQuantizer
from tokenizer.perceptual import LPIPS, PerceptualLoss

from conftest import REPO

pytestmark = pytest.mark.cpu_threads(2)  # the golden outputs were made with 2 threads

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "official_tiny"


@pytest.fixture(scope="module")
def script():
    path = REPO / "scripts" / "make_official_fixtures.py"
    spec = importlib.util.spec_from_file_location("make_official_fixtures", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _load(rel: str) -> dict:
    return torch.load(FIXTURES / rel, weights_only=True)


def _json(rel: str) -> dict:
    return json.loads((FIXTURES / rel).read_text())


def close(got: torch.Tensor, want: torch.Tensor, what: str, *, rtol: float = 1e-5) -> None:
    """Equal within float32 rounding: |got - want| <= rtol * max|want| (+ a few ulps of each value)."""
    got, want = got.detach().double(), want.detach().double()
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} vs {tuple(want.shape)}"
    scale = float(want.abs().max()) if want.numel() else 0.0
    err = float((got - want).abs().max()) if want.numel() else 0.0
    assert err <= rtol * scale + 1e-12, f"{what}: max error {err:.3g} against max |value| {scale:.3g}"


def _reinit(script, module: torch.nn.Module, seed: int) -> torch.nn.Module:
    script.reinit_scaled_(module, generator=torch.Generator().manual_seed(seed))
    return module


def _grad_record(script, module: torch.nn.Module) -> dict:
    return script._grad_record(module.named_parameters())


@pytest.fixture(scope="module")
def lpips_net(script):
    return _reinit(script, LPIPS(), script.TRAINING_SEEDS["lpips"])


@pytest.fixture(scope="module")
def convnext_net(script):
    from torchvision.models import convnext_small

    return _reinit(script, convnext_small(weights=None).requires_grad_(False).eval(), script.TRAINING_SEEDS["convnext"])


def _discriminator(script, index: int = 0, **kwargs) -> NLayerDiscriminator:
    return _reinit(script, NLayerDiscriminator(**kwargs), script.TRAINING_SEEDS["discriminator"] + index)


# --------------------------------------------------------------------------- discriminator

@pytest.mark.parametrize("case", ["default", "blur3", "blur5", "avgpool"])
def test_discriminator_matches_official(script, case):
    index = list(script.DISCRIMINATOR_CASES).index(case)
    kwargs = script.DISCRIMINATOR_CASES[case]
    net = _discriminator(script, index, **kwargs)
    recorded = _json("discriminator/expected.json")["state_dict"][case]
    assert {k: list(v.shape) for k, v in net.state_dict().items()} == recorded  # official keys, official order
    e = _load("discriminator/expected.pt")
    x = script.training_images(script.TRAINING_SEEDS["inputs"], 0, size=script.DISCRIMINATOR_SIZE)[0]
    x.requires_grad_(True)
    logits = net(x)
    logits.square().mean().backward()
    grads = _grad_record(script, net)
    close(logits, e[f"{case}_logits"], f"{case} logits")
    close(x.grad, e[f"{case}_input_grad"], f"{case} input gradient")
    close(grads["norms"], e[f"{case}_param_grad_norms"], f"{case} parameter gradient norms")
    close(grads["heads"], e[f"{case}_param_grad_heads"], f"{case} parameter gradients")


def test_official_discriminator_state_dict_loads(script):
    """An official state dict (keys and shapes as recorded) loads strictly, buffers included."""
    recorded = _json("discriminator/expected.json")["state_dict"]["default"]
    state = {k: torch.randn(shape) for k, shape in recorded.items()}
    net = NLayerDiscriminator()
    net.load_state_dict(state, strict=True)
    assert torch.equal(net.blocks[2][1].kernel, state["blocks.2.1.kernel"])


def test_blur_padding_quirk_is_needed(script, monkeypatch):
    """The 5-tap blur pads as for 4 taps; padding for its own size gives other logits."""
    e = _load("discriminator/expected.pt")
    monkeypatch.setattr(official, "BLUR_PAD_TAPS", 5)
    net = _discriminator(script, 2, **script.DISCRIMINATOR_CASES["blur5"])
    x = script.training_images(script.TRAINING_SEEDS["inputs"], 0, size=script.DISCRIMINATOR_SIZE)[0]
    with torch.no_grad():
        logits = net(x)
    assert (logits - e["blur5_logits"]).abs().max() > 1e-3


def test_discriminator_refuses_a_width_groupnorm_cannot_take():
    with pytest.raises(ValueError, match="multiple of 32"):
        NLayerDiscriminator(hidden_channels=48)


# --------------------------------------------------------------------------- perceptual

def _perceptual_case(script, net: PerceptualLoss, case: str, x, r):
    e = _load("perceptual/expected.pt")
    r = r.clone().requires_grad_(True)
    value = net(x, r)
    value.sum().backward()
    close(value, e[f"{case}_loss"], f"{case} loss")
    if f"{case}_grad" in e:
        close(r.grad, e[f"{case}_grad"], f"{case} gradient")
    else:
        close(r.grad.double().norm(), e[f"{case}_grad_norm"], f"{case} gradient norm")
        close(r.grad.reshape(-1)[:: script.PERCEPTUAL_GRAD_STRIDE], e[f"{case}_grad_strided"], f"{case} gradient")


def test_lpips_matches_official(script, lpips_net):
    recorded = _json("perceptual/expected.json")["lpips_state_dict"]
    assert {k: list(v.shape) for k, v in lpips_net.state_dict().items()} == recorded
    x, r = script.training_images(script.TRAINING_SEEDS["inputs"], 1)
    _perceptual_case(script, PerceptualLoss("lpips", lpips=lpips_net), "lpips", x, r)


@pytest.mark.slow
def test_convnext_matches_official_with_its_resizing(script, convnext_net):
    x, r = script.training_images(script.TRAINING_SEEDS["inputs"], 1, size=script.PERCEPTUAL_LARGE)
    _perceptual_case(script, PerceptualLoss("convnext_s", convnext=convnext_net), "convnext", x, r)


@pytest.mark.slow
def test_convnext_resize_quirk_is_needed(script, convnext_net, monkeypatch):
    """Without antialiasing the 256 -> 224 resize gives another loss."""
    import torch.nn.functional as F

    monkeypatch.setattr(official, "convnext_resize", lambda x: F.interpolate(x, size=224, mode="bilinear",
                                                                             align_corners=False))
    x, r = script.training_images(script.TRAINING_SEEDS["inputs"], 1, size=script.PERCEPTUAL_LARGE)
    with torch.no_grad():
        value = PerceptualLoss("convnext_s", convnext=convnext_net)(x, r)
    want = _load("perceptual/expected.pt")["convnext_loss"]
    assert abs(float(value) - float(want)) > 1e-3 * float(want)


@pytest.mark.slow
def test_perceptual_mix_matches_official(script, lpips_net, convnext_net):
    x, r = script.training_images(script.TRAINING_SEEDS["inputs"], 1)
    _perceptual_case(script, PerceptualLoss(script.PERCEPTUAL_MIX, lpips=lpips_net, convnext=convnext_net), "mix", x, r)


def test_perceptual_names():
    assert official.perceptual_mix("lpips-convnext_s-1.0-0.1") == (1.0, 0.1)
    assert official.perceptual_mix("lpips") == (1.0, None) and official.perceptual_mix("convnext_s") == (None, 1.0)
    for bad in ("vgg", "lpips-convnext_s-1.0", "lpips-convnext_s-a-b", "convnext_s-lpips-1-1"):
        with pytest.raises(ValueError, match="perceptual loss"):
            official.perceptual_mix(bad)


# --------------------------------------------------------------------------- the loss module

def our_loss(script, case: str, lpips_net=None, convnext_net=None) -> ReconstructionLoss:
    """Our ReconstructionLoss configured as the official loss group ``case`` of the fixtures."""
    c = script.LOSS_CASES[case]
    use_lpips, use_convnext = official.perceptual_mix(c["perceptual_loss"])
    perceptual = PerceptualLoss(c["perceptual_loss"], lpips=lpips_net if use_lpips else None,
                                convnext=convnext_net if use_convnext else None)
    return ReconstructionLoss(
        discriminator=_discriminator(script), perceptual=perceptual, reconstruction=c["reconstruction_loss"],
        reconstruction_weight=c["reconstruction_weight"], quantizer_weight=c["quantizer_weight"],
        perceptual_weight=c["perceptual_weight"], gan_start_step=c["discriminator_start"],
        gan_factor=c["discriminator_factor"], gan_weight=c["discriminator_weight"],
        lecam_weight=c["lecam_regularization_weight"], vae=c["quantize_mode"] == "vae",
        kl_weight=c.get("kl_weight", 1e-6), logvar_init=c.get("logvar_init", 0.0))


def check_loss_case(script, case: str, loss: ReconstructionLoss) -> None:
    """Run the fixture's sequence (generator side, then discriminator side with its LeCAM EMAs)."""
    e = _load(f"losses/{case}.pt")
    record = _json("losses/expected.json")["cases"][case]
    ours = {k: list(v.shape) for k, v in loss.state_dict().items() if not k.startswith("perceptual_loss.convnext.")}
    assert ours == record["state_dict_without_convnext"]  # official key names
    seed, vae = script.TRAINING_SEEDS["inputs"], loss.vae
    for step in script.LOSS_GENERATOR_STEPS:
        x, r = script.training_images(seed, step)
        r.requires_grad_(True)
        extra = script.training_extras(seed, step, vae=vae)
        if vae:
            posterior = extra["posterior"].requires_grad_(True)  # official [B,2T,1,N]; ours [B,N,2T]
            total, terms = loss.generator_loss(x, r, global_step=step, posterior=posterior.squeeze(2).transpose(1, 2))
        else:
            total, terms = loss.generator_loss(x, r, global_step=step, quantizer_losses=extra)
        total.backward()
        assert {f"gen{step}_{k}" for k in terms} == {k for k in e if k.startswith(f"gen{step}_") and "_grad_" not in k}
        for key, value in terms.items():
            close(value, e[f"gen{step}_{key}"], f"{case} generator step {step} {key}")
        close(total, e[f"gen{step}_total_loss"], f"{case} generator step {step} total")
        close(r.grad, e[f"gen{step}_grad_reconstructions"], f"{case} generator step {step} d total / d reconstructions")
        if vae:
            close(posterior.grad, e[f"gen{step}_grad_posterior"], f"{case} generator step {step} d total / d posterior")
    for step in (*script.LOSS_DISCRIMINATOR_STEPS, 0):
        x, r = script.training_images(seed, step)
        d_loss, terms = loss.discriminator_loss(x, r, global_step=step)
        d_loss.backward()
        for key, value in terms.items():
            close(value, e[f"dis{step}_{key}"], f"{case} discriminator step {step} {key}")
        grads = _grad_record(script, loss.discriminator)
        close(grads["norms"], e[f"dis{step}_grad_norms"], f"{case} discriminator step {step} gradient norms")
        close(grads["heads"], e[f"dis{step}_grad_heads"], f"{case} discriminator step {step} gradients")
        for name in ("ema_real_logits_mean", "ema_fake_logits_mean"):
            close(getattr(loss, name), e[f"dis{step}_{name}"], f"{case} step {step} {name}")
        loss.discriminator.zero_grad(set_to_none=True)


def test_single_stage_vae_loss_matches_official(script, lpips_net):
    """Generator side (L1, LPIPS, KL with logvar_init 0.5, GAN factor 0.5 from step 2) and
    discriminator side (hinge, LeCAM and its EMAs, the LeCAM term alone before the start step)."""
    check_loss_case(script, "single_vae", our_loss(script, "single_vae", lpips_net))


@pytest.mark.slow
def test_stage2_loss_matches_official(script, convnext_net):
    check_loss_case(script, "stage2", our_loss(script, "stage2", convnext_net=convnext_net))


@pytest.mark.slow
def test_single_stage_vq_loss_matches_official(script, lpips_net, convnext_net):
    check_loss_case(script, "single_vq", our_loss(script, "single_vq", lpips_net, convnext_net))


def test_generator_side_leaves_the_discriminator_trainable(script):
    loss = our_loss(script, "single_vae", LPIPS())
    x, r = script.training_images(0, 0, size=16)
    posterior = torch.randn(2, 8, 8, requires_grad=True)
    total, _ = loss.generator_loss(x, r.requires_grad_(True), global_step=5, posterior=posterior)
    total.backward()
    assert all(p.requires_grad and p.grad is None for p in loss.discriminator.parameters())


# --------------------------------------------------------------------------- clustering VQ

@pytest.mark.parametrize("case, use_l2_norm", [("plain", False), ("l2", True)])
def test_clustering_vq_matches_official(script, case, use_l2_norm):
    inputs, e = _load("clustering_vq/inputs.pt"), _load("clustering_vq/expected.pt")
    q = VectorQuantizer(codebook_size=script.CLUSTERING_CODES, token_size=script.CLUSTERING_DIM,
                        use_l2_norm=use_l2_norm, commitment_cost=0.25)
    clustering = ClusteringVQ(script.CLUSTERING_CODES)
    with torch.no_grad():
        q.embedding.weight.copy_(inputs[f"{case}_codebook"])
    for step in range(script.CLUSTERING_STEPS):
        z = inputs[f"{case}_z{step}"].clone().requires_grad_(True)  # official [B,T,1,N]
        z_q, tokens, losses = q(z.squeeze(2).transpose(1, 2))
        losses["quantizer_loss"].backward()
        clustering.update(q, z.detach().squeeze(2).transpose(1, 2))  # after the backward, before a step
        p = f"{case}_step{step}"
        assert torch.equal(tokens, e[f"{p}_tokens"])
        close(z_q.transpose(1, 2).unsqueeze(2), e[f"{p}_z_quantized"], f"{p} z_quantized")
        for key in ("quantizer_loss", "commitment_loss", "codebook_loss"):
            close(losses[key], e[f"{p}_{key}"], f"{p} {key}")
        close(z.grad, e[f"{p}_grad_z"], f"{p} d loss / d z")
        close(q.embedding.weight.grad, e[f"{p}_grad_codebook"], f"{p} d loss / d codebook")
        close(q.embedding.weight, e[f"{p}_codebook"], f"{p} codebook after the update")
        close(clustering.embed_prob, e[f"{p}_embed_prob"], f"{p} embed_prob")
        q.embedding.weight.grad = None
    moved = (e[f"{case}_step0_codebook"] - inputs[f"{case}_codebook"]).abs().amax(1) > 1e-3
    assert 0 < int(moved.sum()) < script.CLUSTERING_CODES  # unused codes moved, used ones stayed

"""The small-data recipe: FSQ, the conv pixel decoder and stem, titok_small, in-memory data,
the built-in digits, the time-fitted schedule, CPU precision by capability."""
import logging
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from PIL import Image

from titok_core import runtime
from titok_core.data import ImageFolderDataset, InMemoryImages
from titok_core.lr_schedule import parse_max_time, schedule_callbacks, warmup_cosine
from tokenizer import build_tokenizer
from tokenizer.losses import gradient_loss
from tokenizer.model import FSQ
from tokenizer.presets import resolve_model, small_image_size, titok_small
from tokenizer.token_prior import TokenPrior


def test_fsq_codes_round_trip_and_pass_gradients():
    fsq = FSQ(levels=[8, 5, 5, 5])
    assert fsq.codebook_size == 1000
    z = (3 * torch.randn(4, 32, 4)).requires_grad_()
    z_q, tokens, losses = fsq(z)
    assert tokens.shape == (4, 32) and tokens.dtype == torch.int64
    assert 0 <= int(tokens.min()) and int(tokens.max()) < 1000
    assert float(losses["quantizer_loss"]) == 0.0
    # The code vector of each token is exactly what the forward pass quantised to.
    assert torch.equal(fsq.lookup(tokens), z_q.detach())
    assert z_q.abs().max() <= 1.0
    # Every grid point is a token and back: ids are a bijection onto the grid.
    ids = torch.arange(1000)
    grid = fsq.lookup(ids)
    assert grid.unique(dim=0).shape[0] == 1000
    z_q.sum().backward()  # straight-through: the rounding does not block gradients
    assert z.grad is not None and z.grad.abs().sum() > 0


def test_fsq_digit_positions_round_to_the_token_digits():
    fsq = FSQ(levels=[8, 5, 5, 5])
    z = 3 * torch.randn(64, 32, 4)
    u = fsq.digit_positions(z)
    assert u.min() > 0 and (u.amax((0, 1)) < torch.tensor([7.0, 4, 4, 4])).all()
    digits = (fsq(z)[1][..., None] // fsq.basis) % fsq.levels
    assert torch.equal(u.round().long(), digits)


def test_token_prior_learns_the_levels_and_pulls_latents_to_the_common_one():
    prior = TokenPrior(levels=[4, 3], num_tokens=2, num_classes=2, decay=0.9)
    uniform = prior.code_bits(torch.zeros(5, 2, 2), torch.zeros(5, dtype=torch.long))
    assert float(uniform) == pytest.approx(2 + torch.log2(torch.tensor(3.0)).item(), abs=0.05)  # bits per token
    # Class 0 always uses level 1 of channel 0 and level 2 of channel 1; class 1 is never seen.
    u = torch.tensor([1.0, 2.0]).expand(8, 2, 2)
    labels = torch.zeros(8, dtype=torch.long)
    for _ in range(20):
        prior.update(u, labels)
    p0 = prior.log_probs(torch.tensor([0, 1])).exp()
    assert (p0[0, :, 0, 1] > 0.95).all() and (p0[0, :, 1, 2] > 0.95).all()  # learnt
    assert (p0[0, :, 1, 3] == 0).all()  # channel 1 has 3 levels: the 4th has no mass
    assert torch.allclose(p0[1, :, 0, :], torch.full((2, 4), 0.25))  # the unseen class keeps its uniform prior
    assert float(prior.code_bits(u, labels)) < 0.3
    # A latent between levels 1 and 2 of channel 0 is pushed towards 1, the common level.
    x = torch.tensor([[[1.6, 2.0], [1.6, 2.0]]], requires_grad=True)
    prior(x, torch.tensor([0])).sum().backward()
    assert x.grad[0, :, 0].gt(0).all()  # descending the rate lowers u: towards level 1
    rate = prior(torch.tensor([[[1.0, 2.0]] * 2]), torch.tensor([0]))
    logp = prior.log_probs(torch.tensor([0]))[0]
    assert torch.allclose(rate, -logp[:, 0, 1] - logp[:, 1, 2])  # on a level: exactly its -log p


def test_fsq_tokens_map_back_to_the_same_grid_point():
    fsq = FSQ(levels=[7, 5, 3])
    z = torch.randn(2, 50, 3) * 2
    z_q, tokens, _ = fsq(z)
    again = fsq(torch.atanh(z_q * 0.99))[1]  # points near the same grid points quantise identically
    assert torch.equal(again, tokens)


@pytest.mark.parametrize("size", [16, 32, 64])
def test_titok_small_shapes_at_each_size(size):
    tok = build_tokenizer(titok_small(size)).eval()
    assert (tok.num_tokens, tok.codebook_size, tok.image_size) == (32, 1000, size)
    x = torch.rand(2, 3, size, size)
    recon, tokens, _ = tok(x)
    assert recon.shape == x.shape and tokens.shape == (2, 32)
    assert tok.decode(tokens).shape == x.shape


def test_sincos_positions_start_the_small_recipe_and_leave_released_presets_alone():
    from tokenizer.model import sincos_grid
    from tokenizer.presets import PRESETS

    grid = sincos_grid(8, 128)
    assert grid.shape == (64, 128)
    # Every patch has its own code, and a code is closest to itself and its neighbours.
    dist = torch.cdist(grid, grid)
    assert dist.fill_diagonal_(float("inf")).min() > 0.1
    assert int(dist[0].argmin()) in (1, 8)
    torch.manual_seed(0)
    tok = build_tokenizer(titok_small(32))
    for part, scale in ((tok.encoder, 0.2), (tok.decoder, 1.0)):
        assert torch.allclose(part.positional_embedding[1:], scale * sincos_grid(8, 128))
    # Learnable, not a buffer: it trains like the random init it replaces.
    assert tok.encoder.positional_embedding.requires_grad
    # The released presets keep the official random init (their weights are loaded over it anyway).
    assert not any(cfg.get("sincos_positions") for name, cfg in PRESETS.items() if name != "titok_small")
    with pytest.raises(ValueError, match="divisible by 4"):
        sincos_grid(4, 30)


def test_small_image_size_picks_the_next_supported_size():
    assert [small_image_size(s) for s in (8, 16, 28, 32, 33, 64, 256)] == [16, 16, 32, 32, 64, 64, 64]
    with pytest.raises(ValueError, match="16, 32 or 64"):
        titok_small(48)


def test_conv_stem_and_decoder_levels_must_match_the_patch():
    cfg = dict(titok_small(64), conv_stem=True)
    tok = build_tokenizer(cfg)
    assert tok.encoder.patch_embed(torch.rand(1, 3, 64, 64)).shape == (1, 128, 8, 8)
    with pytest.raises(ValueError, match="upsamples by"):
        build_tokenizer(dict(titok_small(64), pixel_decoder_channel_mult=[1, 2]))


def test_resolve_model_sizes_titok_small_from_the_data():
    model = {"preset": "titok_small", "image_size": "auto", "enc_depth": 2}
    config = resolve_model(model, image_side=28)
    assert config["image_size"] == 32 and config["patch_size"] == 4 and config["enc_depth"] == 2
    with pytest.raises(ValueError, match="titok_small"):
        resolve_model({"preset": "titok_l32", "image_size": "auto"}, image_side=28)


def _folder(root: Path, n: int = 3, size: int = 20) -> Path:
    for c in ("x", "y"):
        (root / c).mkdir(parents=True)
        for i in range(n):
            img = Image.new("RGB", (size, size), (40 * i, 200 if c == "x" else 10, 90))
            img.paste((255, 255, 255), (0, 0, size // 4, size))  # a white stripe on the left: not mirror-symmetric
            img.save(root / c / f"{i}.png")
    (root / "y" / "broken.png").write_bytes(b"not a png")
    return root


def test_in_memory_images_match_the_folder_and_count_bad_files(tmp_path):
    folder = ImageFolderDataset(_folder(tmp_path / "f"), resolution=16, train=False)
    mem = InMemoryImages(folder)
    assert len(mem) == 6 and mem.num_skipped == 1 and mem.classes == ["x", "y"]
    x, label = mem[4]
    ref = next(item for item in (folder[i] for i in range(len(folder))) if item is not None and item[1] == 1)
    assert label == 1 and x.shape == (3, 16, 16)
    torch.testing.assert_close(mem[3][0], ref[0], atol=0.5 / 255, rtol=0)
    flipped = InMemoryImages(folder, random_flip=True)
    torch.manual_seed(0)
    seen = {bool(torch.equal(flipped[0][0], mem[0][0])) for _ in range(20)}
    assert seen == {True, False}


def test_digits_dataset_is_written_once(tmp_path):
    pytest.importorskip("sklearn")
    from titok_core.digits import CLASS_NAMES, make_digits_dataset

    root = make_digits_dataset(tmp_path / "digits", size=32)
    train = ImageFolderDataset(root / "train", resolution=32, train=False)
    val = ImageFolderDataset(root / "val", resolution=32, train=False)
    assert train.classes == CLASS_NAMES and len(train) + len(val) == 1797
    assert 250 <= len(val) <= 290  # 15% of each class
    with Image.open(train.samples[0][0]) as im:
        assert im.size == (32, 32) and im.mode == "L"
    assert make_digits_dataset(tmp_path / "digits", size=32) == root  # idempotent
    with pytest.raises(FileExistsError):
        make_digits_dataset(tmp_path / "digits", size=16)


def test_fit_schedule_to_time_sets_the_cosine_horizon():
    assert parse_max_time("00:00:05:00") == 300.0 and parse_max_time(None) is None
    assert schedule_callbacks(max_time=None, schedule_steps="auto") == []
    assert schedule_callbacks(max_time="00:00:05:00", schedule_steps="max_steps") == []
    with pytest.raises(ValueError):
        schedule_callbacks(max_time="00:00:05:00", schedule_steps="sometimes")
    cb = schedule_callbacks(max_time="00:00:01:40", schedule_steps="auto")[0]  # 100 s
    cb.skip, cb.measure = 2, 4
    module = SimpleNamespace(hparams=SimpleNamespace(max_steps=10**6))
    trainer = SimpleNamespace(global_step=0, max_steps=10**6, callbacks=[])
    cb.on_train_start(trainer, module)
    clock = iter([0.0, 2.0, 3.0])  # 4 steps in 2 s (2 steps/s), then 4 in 1 s (4 steps/s)
    import titok_core.lr_schedule as sched

    real = sched.time.perf_counter
    sched.time.perf_counter = lambda: next(clock)
    try:
        for step in range(1, 7):
            trainer.global_step = step
            cb.on_train_batch_end(trainer, module, None, None, step)
    finally:
        sched.time.perf_counter = real
    # No Timer callback: 100 s left at 2 steps/s with a 0.95 margin -> 190 more steps.
    assert module.hparams.max_steps == 6 + 190 == cb.horizon
    assert cb.state_dict() == {"horizon": 196}
    sched.time.perf_counter = lambda: next(clock)
    try:
        for step in range(7, 11):  # measured again: now 4 steps/s -> 380 more steps
            trainer.global_step = step
            cb.on_train_batch_end(trainer, module, None, None, step)
    finally:
        sched.time.perf_counter = real
    assert module.hparams.max_steps == 10 + 380 == cb.horizon
    lrs = [warmup_cosine(s, warmup_steps=5, max_steps=196, base_lr=1.0, end_lr=0.0) for s in (196, 300)]
    assert lrs == [0.0, 0.0]


@pytest.mark.parametrize("native", [True, False])
def test_auto_precision_follows_native_cpu_bf16(monkeypatch, caplog, native):
    monkeypatch.setattr(runtime, "cpu_has_native_bf16", lambda: native)
    monkeypatch.setattr(runtime.torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(runtime, "_logged_choices", set())
    with caplog.at_level(logging.INFO, logger="titok_core.runtime"):
        assert runtime.resolve_dtype(torch.device("cpu"), "auto") == ("bf16" if native else "fp32")
        assert runtime.resolve_precision("auto") == ("bf16-mixed" if native else "32-true")
        runtime.resolve_dtype(torch.device("cpu"), "auto")
    lines = [r.getMessage() for r in caplog.records if "auto ->" in r.getMessage()]
    assert len(lines) == 2  # once per choice, not once per call
    assert ("native bf16" in lines[0]) and (("without" in lines[0]) != native)
    assert runtime.resolve_dtype(torch.device("cpu"), "fp32") == "fp32"  # explicit choices are kept


def test_this_cpu_reports_its_bf16_capability():
    flags = Path("/proc/cpuinfo").read_text().split() if Path("/proc/cpuinfo").is_file() else []
    if flags:
        assert runtime.cpu_has_native_bf16() == ("amx_bf16" in flags or "avx512_bf16" in flags)


def test_gradient_loss_sees_blurred_edges_and_ignores_offsets():
    target = torch.zeros(1, 3, 16, 16)
    target[..., :, 8:] = 1.0  # one vertical step edge
    blurred = torch.nn.functional.avg_pool2d(target, 3, stride=1, padding=1, count_include_pad=False)
    assert gradient_loss(target, target) == 0
    assert gradient_loss(target + 0.2, target) == 0  # a brightness offset has the same edges
    # The blurred edge spreads the one unit step over three columns: its differences are off by 2/3 + 2 * 1/3
    # in each of the 16 x 3 rows of 15 horizontal differences; the vertical ones are all zero.
    assert gradient_loss(blurred, target).item() == pytest.approx((4 / 3) * 16 * 3 / (16 * 3 * 15), rel=1e-5)

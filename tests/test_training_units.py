"""The pieces of the MaskGIT training recipe (generator/lightning_module.py), each checked against a direct computation."""
from __future__ import annotations

import math

import lightning as L
import pytest
import torch
import torch.nn.functional as F

from generator import load_generator
from generator.lightning_module import MaskGITModule, mask_tokens, masked_token_loss
from titok_core.lr_schedule import warmup_cosine
from titok_core.trainer import ema_callback, ema_update


@pytest.fixture(scope="module")
def tiny_config(official_tiny) -> dict:
    """Our config of the official tiny ImageBert (hidden 64, 2 layers, 10 classes, 8 tokens, 64 codes)."""
    return load_generator(official_tiny / "generator_imagebert" / "config.yaml").config


# ---------------------------------------------------------------- mask_tokens


def test_mask_tokens_counts_follow_arccos_schedule():
    b, length, mask_id = 2000, 8, 64
    tokens = torch.randint(0, 64, (b, length), generator=torch.Generator().manual_seed(1))
    inputs, mask = mask_tokens(tokens, mask_id, generator=torch.Generator().manual_seed(0))

    # The same draws, in the same order: t per row first, then the per-position scores.
    t = torch.rand(b, generator=torch.Generator().manual_seed(0))
    expected = torch.tensor([max(1, round(length * math.acos(float(ti)) / (math.pi / 2))) for ti in t])
    assert torch.equal(mask.sum(1), expected)
    # t close to 1 rounds to 0 masked tokens; the clamp keeps one, and this seed exercises it.
    clamped = t > math.cos(math.pi / 2 / (2 * length))
    assert clamped.any() and (mask.sum(1)[clamped] == 1).all()
    assert (mask.sum(1) >= 1).all() and (mask.sum(1) == length).any()


def test_mask_tokens_places_mask_id_exactly_where_masked():
    tokens = torch.randint(0, 64, (64, 32), generator=torch.Generator().manual_seed(2))
    inputs, mask = mask_tokens(tokens, 64, generator=torch.Generator().manual_seed(3))
    assert mask.dtype == torch.bool and inputs.dtype == torch.long and inputs.shape == tokens.shape
    assert (inputs[mask] == 64).all()
    assert torch.equal(inputs[~mask], tokens[~mask])
    # Seeded: the same generator state gives the same masking, another seed another.
    again, mask_again = mask_tokens(tokens, 64, generator=torch.Generator().manual_seed(3))
    assert torch.equal(again, inputs) and torch.equal(mask_again, mask)
    assert not torch.equal(mask_tokens(tokens, 64, generator=torch.Generator().manual_seed(4))[1], mask)


def test_mask_tokens_linear_schedule_draws_every_fraction_alike():
    """The masked-diffusion schedule: round(L * (1 - t)) masked, t ~ U(0,1); arccos masks more on average."""
    b, length = 4000, 16
    tokens = torch.zeros(b, length, dtype=torch.long)
    _, mask = mask_tokens(tokens, 64, generator=torch.Generator().manual_seed(0), schedule="linear")
    t = torch.rand(b, generator=torch.Generator().manual_seed(0))
    expected = (length * (1 - t)).clamp(1e-6, 1.0 * length).round().clamp(min=1)
    assert torch.equal(mask.sum(1), expected.long())
    _, arccos = mask_tokens(tokens, 64, generator=torch.Generator().manual_seed(0))
    assert abs(mask.float().mean() - 0.5) < 0.02 and abs(arccos.float().mean() - 2 / math.pi) < 0.02


# ---------------------------------------------------------------- masked_token_loss


def _known_ce_logits(mask: torch.Tensor, targets: torch.Tensor, k: int = 4) -> torch.Tensor:
    """Masked positions: uniform logits (CE = log k). Unmasked: the target's logit log(k - 1), so p = 1/2 (CE = log 2)."""
    logits = torch.zeros(*mask.shape, k)
    boost = torch.where(mask, 0.0, math.log(k - 1))
    return logits.scatter(-1, targets.unsqueeze(-1), boost.unsqueeze(-1))


def test_masked_token_loss_weights_masked_1_and_unmasked_0_1():
    mask = torch.tensor([[True, True, False, False, False], [True, False, False, False, False]])
    targets = torch.tensor([[0, 1, 2, 3, 0], [1, 2, 3, 0, 1]])
    logits = _known_ce_logits(mask, targets)
    loss, _ = masked_token_loss(logits, targets, mask, label_smoothing=0.0)
    n_masked, n_unmasked = 3, 7
    expected = (n_masked * math.log(4) + 0.1 * n_unmasked * math.log(2)) / (n_masked + 0.1 * n_unmasked)
    assert float(loss) == pytest.approx(expected, rel=1e-6)
    # Weight 1 on unmasked positions is the plain mean.
    plain, _ = masked_token_loss(logits, targets, mask, label_smoothing=0.0, unmasked_weight=1.0)
    assert float(plain) == pytest.approx((3 * math.log(4) + 7 * math.log(2)) / 10, rel=1e-6)


def test_masked_token_loss_elbo_weighs_every_row_alike():
    """Row 0: one masked token, CE log 4; row 1: three masked, CE log 4 each; unmasked CE log 2.
    The official loss averages the 4 masked tokens; the ELBO weighting gives each row its own mean."""
    mask = torch.tensor([[True, False, False, False], [True, True, True, False]])
    targets = torch.tensor([[0, 1, 2, 3], [1, 2, 3, 0]])
    logits = _known_ce_logits(mask, targets)
    logits[1, :3] = logits[1, :3].scatter(-1, targets[1, :3, None], 20.0)  # row 1's masked tokens: CE ~ 0
    official, _ = masked_token_loss(logits, targets, mask, label_smoothing=0.0, unmasked_weight=0.0)
    elbo, _ = masked_token_loss(logits, targets, mask, label_smoothing=0.0, unmasked_weight=0.0, weighting="elbo")
    assert float(official) == pytest.approx(math.log(4) / 4, rel=1e-4)
    assert float(elbo) == pytest.approx(math.log(4) / 2, rel=1e-4)  # (4/1 * log 4 + 4/3 * 3 * 0) / 8
    # Unmasked positions keep their weight, over B * L.
    with_unmasked, _ = masked_token_loss(logits, targets, mask, label_smoothing=0.0, weighting="elbo")
    assert float(with_unmasked) == pytest.approx((4 * math.log(4) + 0.1 * 4 * math.log(2)) / 8, rel=1e-4)


def test_the_training_options_are_checked(tiny_config):
    from titok_core.errors import UsageError

    with pytest.raises(UsageError, match="optim.mask_schedule=cosine: expected one of arccos, linear"):
        MaskGITModule(model_config=tiny_config, mask_schedule="cosine")
    with pytest.raises(UsageError, match="optim.loss_weighting=mdlm: expected one of official, elbo"):
        MaskGITModule(model_config=tiny_config, loss_weighting="mdlm")


def test_masked_token_loss_label_smoothing_matches_cross_entropy():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 8, 16, generator=gen) * 3
    targets = torch.randint(0, 16, (3, 8), generator=gen)
    mask = torch.rand(3, 8, generator=gen) < 0.5
    loss, _ = masked_token_loss(logits, targets, mask, label_smoothing=0.1)

    weights = torch.where(mask, 1.0, 0.1)
    ce = F.cross_entropy(logits.reshape(-1, 16), targets.reshape(-1), label_smoothing=0.1, reduction="none")
    assert float(loss) == pytest.approx(float((ce * weights.reshape(-1)).sum() / weights.sum()), rel=1e-5)
    # The smoothed target by hand: (1 - eps) on the label plus eps spread over all k codes.
    logp = logits.log_softmax(-1)
    by_hand = -(0.9 * logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1) + 0.1 * logp.mean(-1))
    assert float(loss) == pytest.approx(float((by_hand * weights).sum() / weights.sum()), rel=1e-5)


def test_masked_token_loss_bf16_logits_are_upcast():
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 8, 16, generator=gen)
    targets = torch.randint(0, 16, (2, 8), generator=gen)
    mask = torch.ones(2, 8, dtype=torch.bool)
    loss, _ = masked_token_loss(logits.bfloat16(), targets, mask)
    ref, _ = masked_token_loss(logits.bfloat16().float(), targets, mask)
    assert loss.dtype == torch.float32 and float(loss) == pytest.approx(float(ref), rel=1e-6)


def test_masked_token_accuracy_counts_masked_positions_only():
    targets = torch.tensor([[0, 1, 2, 3], [3, 2, 1, 0]])
    mask = torch.tensor([[True, True, False, False], [True, True, False, False]])
    right = F.one_hot(targets, 4).float() * 5
    wrong = F.one_hot((targets + 1) % 4, 4).float() * 5
    # Row 0: 1 of 2 masked right; row 1: 2 of 2 right -> 0.75, whatever the unmasked positions predict.
    correct = torch.tensor([[True, False, True, True], [True, True, True, True]])
    for unmasked_right in (True, False):
        pick = correct.clone()
        pick[~mask] = unmasked_right
        logits = torch.where(pick.unsqueeze(-1), right, wrong)
        _, acc = masked_token_loss(logits, targets, mask)
        assert float(acc) == pytest.approx(0.75)


# ---------------------------------------------------------------- learning rate and EMA


def test_warmup_cosine_schedule():
    kw = dict(warmup_steps=100, max_steps=1000, base_lr=2e-4, end_lr=1e-5)
    lrs = [warmup_cosine(s, **kw) for s in range(1200)]
    assert lrs[0] == pytest.approx(2e-4 / 100)  # the first step already moves, as the official warm-up
    assert all(a < b for a, b in zip(lrs[:100], lrs[1:100]))  # linear rise
    assert lrs[99] == pytest.approx(2e-4) and lrs[100] == pytest.approx(2e-4)
    assert lrs[550] == pytest.approx((2e-4 + 1e-5) / 2)  # cosine half-way
    assert all(a >= b for a, b in zip(lrs[100:], lrs[101:]))  # monotone decay after warm-up
    assert lrs[1000] == pytest.approx(1e-5) and lrs[1199] == pytest.approx(1e-5)  # then held at end_lr


def test_ema_decay_schedule():
    multi_avg_fn = ema_callback(max_decay=0.999)._kwargs["multi_avg_fn"]  # what AveragedModel calls per device
    for s in (0, 1, 5, 100, 989, 990, 5000):
        decay = min((1 + s) / (10 + s), 0.999)
        averaged, current = [torch.full((3,), 2.0), torch.full((2, 2), 4.0)], [torch.full((3,), -1.0), torch.zeros(2, 2)]
        multi_avg_fn(averaged, current, torch.tensor(s))
        assert torch.allclose(averaged[0], torch.full((3,), 2.0 * decay - 1.0 * (1 - decay)), atol=1e-6), s
        assert torch.allclose(averaged[1], torch.full((2, 2), 4.0 * decay), atol=1e-6), s
    counters = [torch.tensor(3)]  # an integer buffer is taken as it is
    multi_avg_fn(counters, [torch.tensor(7)], torch.tensor(4))
    assert counters[0].item() == 7


def test_ema_update_of_the_tokenizer_is_the_decayed_average():
    """titok_core.trainer.ema_update (the tokenizer's EMA): every parameter, with the decay of its step."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4))
    ema = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4))
    before = [p.detach().clone() for p in ema.parameters()]
    for step in (0, 7, 2000):
        ema_update(ema, model, step=step, max_decay=0.999)
        decay = min((1 + step) / (10 + step), 0.999)
        before = [decay * b + (1 - decay) * p.detach() for b, p in zip(before, model.parameters())]
        for e, expected in zip(ema.parameters(), before):
            torch.testing.assert_close(e.detach(), expected, atol=1e-6, rtol=1e-6)


def test_ema_through_averaged_model():
    """The callback's kwargs in torch's AveragedModel: the first update copies, then the decay applies."""
    from torch.optim.swa_utils import AveragedModel

    net = torch.nn.Linear(1, 1, bias=False)
    ema = AveragedModel(net, **ema_callback()._kwargs)
    expected = None
    for s, value in enumerate([1.0, 3.0, -2.0, 5.0]):
        with torch.no_grad():
            net.weight.fill_(value)
        ema.update_parameters(net)
        if expected is None:
            expected = value
        else:
            decay = min((1 + s) / (10 + s), 0.999)  # s updates averaged so far
            expected = decay * expected + (1 - decay) * value
        assert float(ema.module.weight) == pytest.approx(expected, rel=1e-6)


# ---------------------------------------------------------------- optimiser and one real training run


def test_optimizer_param_groups(tiny_config):
    module = MaskGITModule(model_config=tiny_config)
    opt = module.configure_optimizers()["optimizer"]
    assert isinstance(opt, torch.optim.AdamW)
    assert opt.defaults["lr"] == 2e-4 and opt.defaults["betas"] == (0.9, 0.96)
    names = {id(p): n for n, p in module.model.named_parameters()}
    no_decay, decay = opt.param_groups
    assert no_decay["weight_decay"] == 0.0 and decay["weight_decay"] == 0.03
    decayed = {names[id(p)] for p in decay["params"]}
    kept = {names[id(p)] for p in no_decay["params"]}
    assert decayed | kept == set(names.values()) and not decayed & kept
    matrices = {f"blocks.{i}.{m}.weight" for i in range(2) for m in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")}
    assert decayed == matrices | {"head.weight"}
    assert {"token_embed.weight", "pos_embed", "type_embed", "embed_norm.weight", "blocks.0.norm1.weight",
            "blocks.0.attn.qkv.bias", "head.bias"} <= kept


def test_training_reduces_loss(tiny_config):
    """20 real Lightning steps (training_step, AdamW at 1e-3, the LR schedule, clipping) on 16 fixed sequences."""
    torch.manual_seed(0)
    tokens = torch.randint(0, 64, (16, 8))
    labels = torch.randint(0, 10, (16,))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(tokens, labels), batch_size=16)
    module = MaskGITModule(model_config=tiny_config, lr=1e-3, warmup_steps=2, max_steps=20, end_lr=1e-4)

    def eval_loss() -> float:
        module.eval()
        inputs, mask = mask_tokens(tokens, module.model.mask_id, generator=torch.Generator().manual_seed(5))
        with torch.no_grad():
            return float(masked_token_loss(module(inputs, labels), tokens, mask)[0])

    before = eval_loss()
    module.train()  # Lightning keeps the mode it is given
    trainer = L.Trainer(
        accelerator="cpu", max_steps=20, gradient_clip_val=1.0, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False,
    )
    trainer.fit(module, loader)
    assert trainer.global_step == 20
    after = eval_loss()
    assert before == pytest.approx(math.log(64), rel=0.1)  # a fresh model predicts near uniformly
    assert after < before - 0.3, (before, after)
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(1e-4, rel=1e-6)  # schedule reached end_lr


@pytest.mark.parametrize("data", ["device", "fixed"])
def test_generator_benchmark_runs_its_plain_loop_on_cpu(data):
    """``python -m titok_bench.generator`` without --trainer: real steps of the shipped demo generator, on
    batches gathered from a random cache (the default) or on one fixed batch; the loss is the training loss."""
    from titok_bench.generator import main

    result = main(["--generator-spec", "maskgit_demo", "--device", "cpu", "--dtype", "fp32", "--batch-size", "4",
                   "--steps", "2", "--warmup", "1", "--cache-size", "16", "--data", data])
    assert result["num_tokens"] == 32 and result["params_m"] > 1
    assert result["steps_per_s"] > 0 and 0 < result["last_loss"] < 10
    assert result["cache_sequences"] == (16 if data == "device" else None)

"""Generator training fast paths: the token cache on the device, fused AdamW, a compiled step."""
import copy
import json

import lightning as L
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, DistributedSampler, Subset

from generator.cache import FORMAT, TokenDataset
from generator.lightning_module import MaskGITModule
from generator.token_data import DeviceTokenLoader, EpochOrder, TokenDataModule, epoch_indices

TINY = dict(arch="imagebert", hidden_size=32, depth=2, num_heads=2, mlp_dim=64, codebook_size=64, num_tokens=8,
            num_classes=10, dropout=0.0, attn_drop=0.0)


def _cache(path, n=53, num_tokens=8):
    """A finished token cache directory with random tokens (what generator.cache writes)."""
    rng = np.random.default_rng(0)
    path.mkdir(parents=True, exist_ok=True)
    np.save(path / "tokens.npy", rng.integers(0, 64, (n, num_tokens), dtype=np.uint16))
    np.save(path / "labels.npy", rng.integers(0, 10, n, dtype=np.int32))
    manifest = {"format": FORMAT, "tokenizer": {"source": "test", "fingerprint": "0" * 16}, "resolution": 64,
                "num_tokens": num_tokens, "codebook_size": 64, "classes": [], "num_sequences": n}
    (path / "manifest.json").write_text(json.dumps(manifest))
    return TokenDataset(path)


@pytest.mark.parametrize("n", [10, 11, 3])
@pytest.mark.parametrize("world_size", [1, 2, 4])
@pytest.mark.parametrize("shuffle", [True, False])
def test_epoch_indices_are_distributed_samplers(n, world_size, shuffle):
    for rank in range(world_size):
        sampler = DistributedSampler(range(n), num_replicas=world_size, rank=rank, shuffle=shuffle, seed=7)
        for epoch in (0, 1):
            sampler.set_epoch(epoch)
            got = epoch_indices(n, seed=7, epoch=epoch, shuffle=shuffle, rank=rank, world_size=world_size)
            assert got.tolist() == list(sampler)


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_device_loader_yields_the_ddp_dataloader_batches(tmp_path, world_size):
    """Each rank gets exactly the batches Lightning's DistributedSampler + DataLoader would give it."""
    data = _cache(tmp_path / "c")
    positions = torch.randperm(len(data), generator=torch.Generator().manual_seed(0))[5:]  # a train split
    seen = []
    for rank in range(world_size):
        order = EpochOrder(len(positions), seed=3, shuffle=True, rank=rank, world_size=world_size)
        loader = DeviceTokenLoader(data.tokens, data.labels, positions, batch_size=4, device=torch.device("cpu"),
                                   sampler=order, drop_last=True)
        subset = Subset(data, positions.tolist())
        sampler = DistributedSampler(subset, num_replicas=world_size, rank=rank, shuffle=True, seed=3)
        reference = DataLoader(subset, sampler=sampler, batch_size=4, drop_last=True)
        epochs = []
        for epoch in (0, 1, 5):
            order.set_epoch(epoch)
            sampler.set_epoch(epoch)
            ours, theirs = list(loader), list(reference)
            assert len(ours) == len(theirs) == len(loader)
            for (t, y), (t_ref, y_ref) in zip(ours, theirs):
                assert t.dtype == y.dtype == torch.int64 and t.shape == (4, 8)
                assert torch.equal(t, t_ref) and torch.equal(y, y_ref)
            epochs.append(torch.cat([t for t, _ in ours]))
        assert not torch.equal(epochs[0], epochs[1])  # a new epoch, a new order
        seen.append(set(positions[epoch_indices(len(positions), seed=3, epoch=0, shuffle=True, rank=rank,
                                                world_size=world_size)].tolist()))
    assert set().union(*seen) == set(positions.tolist())  # the ranks cover the split
    if len(positions) % world_size == 0:  # and, without padding, share nothing
        assert sum(len(s) for s in seen) == len(positions)


def test_datamodule_split_is_the_old_split(tmp_path):
    data = _cache(tmp_path / "c")
    dm = TokenDataModule(data, batch_size=8, val_fraction=0.1, seed=0)
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(0)).tolist()  # what train.py did
    assert dm.val_positions.tolist() == order[:5] and dm.train_positions.tolist() == order[5:]
    assert dm.train_batches() == len(DataLoader(Subset(data, order[5:]), batch_size=8, drop_last=True))
    with pytest.raises(ValueError, match="data_on_device"):
        TokenDataModule(data, batch_size=8, on_device="yes")


def _fit(data, *, on_device, steps=6, precision="32-true", **module_kw):
    torch.manual_seed(0)
    module = MaskGITModule(model_config=TINY, warmup_steps=2, max_steps=steps, **module_kw)
    dm = TokenDataModule(data, batch_size=8, val_fraction=0.1, seed=0, on_device=on_device)
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=steps, precision=precision, gradient_clip_val=1.0,
                        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        val_check_interval=3, limit_val_batches=2, check_val_every_n_epoch=None)
    trainer.fit(module, datamodule=dm)
    return trainer, module, dm


def test_training_with_the_cache_on_the_device(tmp_path):
    """Through Trainer.fit: batches from the device loader, several epochs, validation."""
    data = _cache(tmp_path / "c")
    trainer, module, dm = _fit(data, on_device=True, steps=14)  # 48 train sequences: 6 batches per epoch
    assert trainer.global_step == 14 and len(trainer.train_dataloader) == dm.train_batches() == 6
    # Lightning set the epoch of the loader's sampler for each of the three epochs begun.
    assert isinstance(trainer.train_dataloader, DeviceTokenLoader) and trainer.train_dataloader.sampler.epoch == 2
    assert np.isfinite(float(trainer.callback_metrics["train/loss"])) and "val/loss" in trainer.callback_metrics
    trainer_cpu, *_ = _fit(data, on_device="auto", steps=2)  # auto on a CPU trainer: the DataLoader, as before
    assert isinstance(trainer_cpu.train_dataloader, DataLoader)


def test_fused_adamw_with_bf16_mixed_and_clipping(tmp_path):
    """Lightning refuses to clip for a fused optimizer under mixed precision; the module clips itself."""
    data = _cache(tmp_path / "c")
    results = {}
    for fused in (False, True, None):  # None (the default): fused on a CPU too, where no fp16 loss scaling is used
        trainer, module, _ = _fit(data, on_device=True, steps=3, precision="bf16-mixed", fused_adamw=fused)
        assert trainer.optimizers[0].defaults["fused"] is (None if fused is False else True)
        results[fused] = torch.cat([p.detach().flatten() for p in module.parameters()])
    torch.testing.assert_close(results[True], results[False], atol=2e-3, rtol=0)  # bf16 forward, fp32 updates
    assert torch.equal(results[None], results[True])
    # In fp32 the fused kernel is the same optimiser as the per-tensor loop, to float rounding.
    fp32 = [torch.cat([p.detach().flatten() for p in _fit(data, on_device=True, steps=3, fused_adamw=fused)[1].parameters()])
            for fused in (False, None)]
    torch.testing.assert_close(fp32[1], fp32[0], atol=1e-6, rtol=0)


def test_compiled_step_keeps_state_dict_and_copies(tmp_path):
    module = MaskGITModule(model_config=TINY, compile=True)
    keys = list(module.state_dict())
    batch = (torch.randint(0, 64, (4, 8)), torch.randint(0, 10, (4,)))
    torch.manual_seed(1)
    loss, _ = module._step(batch, train=False)
    assert list(module.state_dict()) == keys and "_compiled_parts" in module.__dict__
    clone = copy.deepcopy(module)  # what the EMA callback does
    assert "_compiled_parts" not in clone.__dict__ and list(clone.state_dict()) == keys
    plain = MaskGITModule(model_config=TINY)
    plain.load_state_dict(module.state_dict())
    torch.manual_seed(1)
    want, _ = plain._step(batch, train=False)
    torch.testing.assert_close(loss, want, atol=1e-5, rtol=0)

"""Batches of cached token sequences for generator training, as a LightningDataModule.

Two ways to feed the same split of the same cache:

* ``DataLoader`` over the memory-mapped cache (workers, pinned copies): the default on CPU;
* the whole split held on the training device (:class:`DeviceTokenLoader`): no DataLoader, no
  workers, no host-to-device copies; each batch is one gather on the device. The ImageNet cache
  (1.28M images x 2 flips x 32 tokens) is 328 MB as int32, so it fits next to the model.

The device loader visits exactly the indices that Lightning's ``DistributedSampler`` gives each
rank (seed + epoch, the same padding, ``rank::world_size``), so under DDP both ways yield the same
batches, every rank its own disjoint share; in one process its permutation is that of a
one-rank DistributedSampler instead of the DataLoader's RandomSampler (equally uniform). The
permutation is drawn on the host once per epoch (one randperm; bit-identical to the sampler's)
and moved to the device; everything per batch happens there.
"""
from __future__ import annotations

import math

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Subset

from generator.cache.dataset import TokenDataset
from titok_core.errors import UsageError


def epoch_indices(n: int, *, seed: int, epoch: int, shuffle: bool, rank: int = 0, world_size: int = 1) -> torch.Tensor:
    """Positions in [0, n) that ``rank`` visits in ``epoch``: int64 [ceil(n / world_size)].

    Exactly ``torch.utils.data.DistributedSampler(shuffle=shuffle, seed=seed, drop_last=False)``
    after ``set_epoch(epoch)``: a permutation from a CPU generator seeded with seed + epoch,
    padded by repeating its start to a multiple of world_size, then every world_size-th entry.
    """
    if shuffle:
        g = torch.Generator()
        g.manual_seed(seed + epoch)
        order = torch.randperm(n, generator=g)
    else:
        order = torch.arange(n)
    total = math.ceil(n / world_size) * world_size
    pad = total - n
    if pad:
        order = torch.cat([order, order.repeat(math.ceil(pad / n))[:pad]])
    return order[rank:total:world_size]


class EpochOrder:
    """The sampler of a :class:`DeviceTokenLoader`; Lightning calls ``set_epoch`` on it each epoch."""

    def __init__(self, n: int, *, seed: int, shuffle: bool, rank: int = 0, world_size: int = 1):
        self.n, self.seed, self.shuffle, self.rank, self.world_size = n, seed, shuffle, rank, world_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def indices(self) -> torch.Tensor:
        return epoch_indices(self.n, seed=self.seed, epoch=self.epoch, shuffle=self.shuffle, rank=self.rank,
                             world_size=self.world_size)

    def __len__(self) -> int:
        return math.ceil(self.n / self.world_size)


class DeviceTokenLoader:
    """Batches (tokens int64 [B,L], labels int64 [B]) of one split, gathered on ``device``.

    tokens: int [M,L] and labels: int [M] of the whole cache (numpy or torch); positions: int64
    [n], the rows of this split. Held on the device as int32. ``len`` is the number of batches
    per epoch for this rank; the last one is shorter unless ``drop_last``.
    """

    def __init__(self, tokens, labels, positions: torch.Tensor, *, batch_size: int, device: torch.device,
                 sampler: EpochOrder, drop_last: bool):
        device = torch.device(device)
        positions = torch.as_tensor(positions, dtype=torch.int64)
        # Only this split's rows, once: a single host-to-device copy for the whole run.
        rows = positions.numpy()
        self.tokens = torch.from_numpy(np.asarray(tokens)[rows].astype(np.int32)).to(device)
        self.labels = torch.from_numpy(np.asarray(labels)[rows].astype(np.int32)).to(device)
        self.batch_size, self.device, self.sampler, self.drop_last = batch_size, device, sampler, drop_last
        self.positions = positions
        self.batch_sampler = None  # Lightning looks for a DataLoader's sampler and batch_sampler

    def __len__(self) -> int:
        n = len(self.sampler)
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def __iter__(self):
        order = self.sampler.indices().to(self.device, non_blocking=True)
        for i in range(len(self)):
            idx = order[i * self.batch_size : (i + 1) * self.batch_size]
            yield self.tokens.index_select(0, idx).long(), self.labels.index_select(0, idx).long()


def fits_on_device(num_sequences: int, num_tokens: int, device: torch.device, *, share: float = 0.25) -> bool:
    """Whether the cache as int32 takes at most ``share`` of the device's memory (CUDA only)."""
    if device.type != "cuda":
        return False
    return num_sequences * (num_tokens + 1) * 4 <= share * torch.cuda.get_device_properties(device).total_memory


class TokenDataModule(L.LightningDataModule):
    """The train / val split of a token cache and its loaders.

    The split is a seeded permutation: the first ``val_fraction`` (at least one sequence when
    > 0) is held out. on_device: "auto" (on a CUDA trainer when the cache fits, see
    :func:`fits_on_device`), true, or false (DataLoader).
    """

    def __init__(self, data: TokenDataset, *, batch_size: int, num_workers: int = 0, val_fraction: float = 0.01,
                 seed: int = 0, on_device: bool | str = "auto"):
        super().__init__()
        if on_device not in ("auto", True, False):
            raise UsageError(f"data_on_device must be auto, true or false, got {on_device!r}")
        self.data, self.batch_size, self.num_workers, self.seed = data, batch_size, num_workers, seed
        self.on_device = on_device
        n = len(data)
        n_val = max(1, int(n * val_fraction)) if val_fraction > 0 else 0
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
        self.train_positions, self.val_positions = order[n_val:], order[:n_val]
        self.drop_last = len(self.train_positions) >= batch_size

    @property
    def has_val(self) -> bool:
        return len(self.val_positions) > 0

    def train_batches(self) -> int:
        """Batches per epoch in one process (the DataLoader's len)."""
        n = len(self.train_positions)
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def uses_device(self) -> bool:
        device = self.trainer.strategy.root_device
        if self.on_device == "auto":
            return fits_on_device(len(self.data), self.data.tokens.shape[1], device)
        return bool(self.on_device)

    def _device_loader(self, positions: torch.Tensor, *, shuffle: bool, drop_last: bool) -> DeviceTokenLoader:
        t = self.trainer
        sampler = EpochOrder(len(positions), seed=self.seed, shuffle=shuffle, rank=t.global_rank, world_size=t.world_size)
        return DeviceTokenLoader(self.data.tokens, self.data.labels, positions, batch_size=self.batch_size,
                                 device=t.strategy.root_device, sampler=sampler, drop_last=drop_last)

    def _loader_kw(self) -> dict:
        from titok_core.stopping import ignore_stop_signals  # the job stops at a safe point, not its workers

        return dict(batch_size=self.batch_size, num_workers=self.num_workers, persistent_workers=self.num_workers > 0,
                    worker_init_fn=ignore_stop_signals)

    def train_dataloader(self):
        if self.uses_device():
            return self._device_loader(self.train_positions, shuffle=True, drop_last=self.drop_last)
        # Under DDP Lightning swaps in a DistributedSampler seeded with the global seed.
        return DataLoader(Subset(self.data, self.train_positions.tolist()), shuffle=True, drop_last=self.drop_last,
                          **self._loader_kw())

    def val_dataloader(self):
        if not self.has_val:
            return []
        if self.uses_device():
            return self._device_loader(self.val_positions, shuffle=False, drop_last=False)
        return DataLoader(Subset(self.data, self.val_positions.tolist()), shuffle=False, **self._loader_kw())

"""A finished token cache as a torch Dataset."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from generator.cache.check import check_cache


class TokenDataset(Dataset):
    """A finished cache as (tokens int64 [L], label int64) pairs, memory-mapped."""

    def __init__(self, cache_dir: str | os.PathLike):
        self.manifest = check_cache(cache_dir)
        self.tokens = np.load(Path(cache_dir) / "tokens.npy", mmap_mode="r")
        self.labels = np.load(Path(cache_dir) / "labels.npy", mmap_mode="r")

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.from_numpy(self.tokens[i].astype(np.int64)), torch.tensor(int(self.labels[i]))

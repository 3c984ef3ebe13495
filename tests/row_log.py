"""Which cache rows each training batch was drawn from, seen from the test side.

``record_rows(folder)`` makes every rank of generator.train append the cache rows of each
training batch it draws to ``<folder>/rank<R>.txt``, one line a batch, on both of
:mod:`generator.token_data`'s paths: the DataLoader (the rows of each batched read of its Subset)
and the DeviceTokenLoader (the rows of each batch it gathers on the device). Validation batches
are not recorded. The code under test is the one every user runs: this module only wraps it.

In a test, pass ``monkeypatch.setattr`` as ``patch`` (undone after the test). In processes a
test starts, :data:`SITECUSTOMIZE` (a ``sitecustomize.py`` on their PYTHONPATH) calls it at
start-up when ``ROWS_LOG_ENV`` names the folder.
"""
from __future__ import annotations

import os
from pathlib import Path

ROWS_LOG_ENV = "TITOK_TEST_ROWS_LOG"
SITECUSTOMIZE = f"""
import os, sys

if os.environ.get({ROWS_LOG_ENV!r}):
    sys.path.insert(0, {str(Path(__file__).resolve().parent)!r})
    import row_log

    row_log.record_rows(os.environ[{ROWS_LOG_ENV!r}])
"""


def _append(folder: str | os.PathLike, rank: int, rows) -> None:
    with open(os.path.join(folder, f"rank{rank}.txt"), "a") as f:
        f.write(" ".join(str(int(r)) for r in rows) + "\n")


class _RowsRead:
    """A map-style dataset read in batches (Subset.__getitems__) that records the rows of each read."""

    def __init__(self, data, folder: str | os.PathLike, rank: int):
        self.data, self.folder, self.rank = data, folder, rank

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, row: int):
        return self.data[row]

    def __getitems__(self, rows: list[int]) -> list:
        _append(self.folder, self.rank, rows)
        return [self.data[row] for row in rows]


def record_rows(folder: str | os.PathLike, patch=setattr) -> None:
    """From now on, every training batch drawn in this process is recorded under ``folder``."""
    from torch.utils.data import Subset

    from generator import token_data

    class RecordedDeviceLoader(token_data.DeviceTokenLoader):
        def __iter__(self):
            if not self.sampler.shuffle:  # validation
                yield from super().__iter__()
                return
            order, size = self.sampler.indices(), self.batch_size
            for i, batch in enumerate(super().__iter__()):
                _append(folder, self.sampler.rank, self.positions[order[i * size:(i + 1) * size]])
                yield batch

    train_dataloader = token_data.TokenDataModule.train_dataloader

    def recorded_train_dataloader(self):
        loader = train_dataloader(self)
        if isinstance(getattr(loader, "dataset", None), Subset):  # the DataLoader path
            loader.dataset.dataset = _RowsRead(loader.dataset.dataset, folder, self.trainer.global_rank)
        return loader

    patch(token_data, "DeviceTokenLoader", RecordedDeviceLoader)
    patch(token_data.TokenDataModule, "train_dataloader", recorded_train_dataloader)

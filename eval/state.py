"""What lets a killed evaluation resume: each process's progress and the rows it has produced.

A rank's :class:`Progress` (batches done, running sums, Inception accumulators) is saved
atomically every few batches and is the commit point. What grows with every batch (pool
features, samples for ``save_npz``) goes to :class:`RowLog` files, appended per batch. After a
kill, each RowLog is cut back to the rows of the batches the saved Progress counts as done, so
a rerun redoes exactly the batches after the last save and ends with the same files as a run
that was never stopped.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

import numpy as np
import torch

from eval.fidelity import InceptionFeatures
from titok_core.checkpoints import atomic_path

log = logging.getLogger(__name__)


def fingerprint(**settings) -> str:
    """16 hex digits naming an evaluation: runs with the same settings share (and resume) state files."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]


class Progress:
    """A rank's resumable state: which of its batches are done, its accumulators and running sums."""

    def __init__(self, path: Path | None, fingerprint: str):
        self.path, self.fingerprint = path, fingerprint
        self.done, self.sums = 0, {}

    def restore(self, accumulators: list[InceptionFeatures]) -> None:
        if self.path is None:
            return
        for stale in self.path.parent.glob(f".{self.path.name}.*.tmp"):  # a write a kill interrupted
            stale.unlink(missing_ok=True)
        if not self.path.is_file():
            return
        state = torch.load(self.path, map_location="cpu", weights_only=True)
        if state.get("fingerprint") != self.fingerprint:
            log.warning("ignoring %s: made by another evaluation", self.path)
            return
        self.done = int(state["done"])
        self.sums = {k: float(v) for k, v in state["sums"].items()}
        for acc, s in zip(accumulators, state["accumulators"]):
            acc.load_state_dict(s)
        log.info("resuming from %s: %d batches done", self.path, self.done)

    def save(self, accumulators: list[InceptionFeatures]) -> None:
        if self.path is None:
            return
        state = {"fingerprint": self.fingerprint, "done": self.done, "sums": self.sums,
                 "accumulators": [a.state_dict() for a in accumulators]}
        with atomic_path(self.path) as tmp:
            torch.save(state, tmp)


class RowLog:
    """Rows of one shape and dtype, appended batch by batch: to a raw file, or kept in memory (path None).

    The file is headerless (row after row, C order), so a kill mid-append leaves at most a torn
    last row, which :meth:`truncate` cuts off with the uncommitted rows.
    """

    def __init__(self, path: Path | None, row_shape: tuple[int, ...], dtype):
        self.path, self.row_shape, self.dtype = path, tuple(row_shape), np.dtype(dtype)
        self.row_bytes = int(np.prod(self.row_shape)) * self.dtype.itemsize
        self._rows: list[np.ndarray] = []
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)

    def __len__(self) -> int:
        if self.path is None:
            return sum(len(r) for r in self._rows)
        return os.path.getsize(self.path) // self.row_bytes if self.path.is_file() else 0

    def append(self, rows: np.ndarray) -> None:
        """Add rows [B, *row_shape] (converted to the log's dtype)."""
        rows = np.ascontiguousarray(rows, dtype=self.dtype)
        if rows.shape[1:] != self.row_shape:
            raise ValueError(f"rows must be [B, {', '.join(map(str, self.row_shape))}], got {list(rows.shape)}")
        if self.path is None:
            self._rows.append(rows.copy())
            return
        with open(self.path, "ab") as f:  # closed (flushed to the OS) before the state that counts it is saved
            f.write(rows.tobytes())

    def truncate(self, n: int) -> bool:
        """Keep the first ``n`` rows; False (and nothing changed) when fewer than ``n`` are there."""
        if len(self) < n:
            return False
        if self.path is None:
            self._rows = [self.read()[:n].copy()] if n else []
        elif self.path.is_file():
            os.truncate(self.path, n * self.row_bytes)
        return True

    def read(self) -> np.ndarray:
        """Every row: [N, *row_shape] (a read-only memory map of the file)."""
        n = len(self)
        if n == 0:
            return np.zeros((0, *self.row_shape), self.dtype)
        if self.path is None:
            return np.concatenate(self._rows)
        return np.memmap(self.path, dtype=self.dtype, mode="r", shape=(n, *self.row_shape))

"""The state file beside the generator's file: every candidate's figures and features, rewritten
atomically after each one, so a killed search continues where it stopped."""
from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

import torch

from generator.fit_sampling.options import settings_key
from generator.fit_sampling.search import Figures
from titok_core.checkpoints import atomic_path

log = logging.getLogger(__name__)


STATE_KIND = "titok_gen.fit_sampling_state"


class SearchState:
    """Every candidate's figures and features so far, in a file rewritten atomically after each one."""

    def __init__(self, path: Path, identity: dict):
        self.path, self.identity = path, identity
        self.key = hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:16]
        self.rows: dict[str, dict] = {}  # settings key -> {"settings", "order", "rounds": {str(round): figures}}
        self.features: dict[str, torch.Tensor] = {}  # f"{row order}/{round}" -> float32 [n, D]
        self.seconds = 0.0  # search time spent so far, over every run of it (judge training excluded)
        self.resumed = False
        self._load()

    def _load(self) -> None:
        if not self.path.is_file():
            return
        from safetensors import safe_open

        try:
            with safe_open(str(self.path), framework="pt") as f:
                meta = json.loads((f.metadata() or {}).get(STATE_KIND, "{}"))
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as exc:  # noqa: BLE001 - a damaged state is set aside, never trusted
            log.warning("fit_sampling: state %s unreadable (%s); starting afresh", self.path, exc)
            return
        if meta.get("key") != self.key:
            log.info("fit_sampling: %s belongs to another generator or other search settings; starting afresh",
                     self.path)
            return
        self.rows, self.features, self.seconds = meta["rows"], tensors, float(meta.get("seconds", 0.0))
        self.resumed = bool(self.rows)
        if self.resumed:
            log.info("fit_sampling: resuming from %s (%d candidates done)", self.path, len(self.rows))

    def get(self, settings: dict, round_: int) -> Figures | None:
        row = self.rows.get(settings_key(settings))
        found = row and row["rounds"].get(str(round_))
        return Figures(**found) if found else None

    def put(self, settings: dict, round_: int, figures: Figures, features: torch.Tensor) -> None:
        row = self.rows.setdefault(settings_key(settings), {"settings": dict(settings), "order": len(self.rows),
                                                            "rounds": {}})
        row["rounds"][str(round_)] = figures.to_dict()
        self.features[f"{row['order']}/{round_}"] = features.float().contiguous()
        self.seconds += figures.seconds
        self.save()

    def features_of(self, settings: dict, round_: int) -> torch.Tensor:
        return self.features[f"{self.rows[settings_key(settings)]['order']}/{round_}"]

    def save(self) -> None:
        from safetensors.torch import save_file

        meta = {"key": self.key, "identity": self.identity, "rows": self.rows, "seconds": self.seconds}
        with atomic_path(self.path) as tmp:
            save_file(self.features, str(tmp), metadata={STATE_KIND: json.dumps(meta, default=str)})

    def table(self) -> list[dict]:
        """Every candidate in the order first evaluated: {"settings", "rounds": [figures...]}."""
        rows = sorted(self.rows.values(), key=lambda r: r["order"])
        return [{"settings": r["settings"], "rounds": [r["rounds"][k] for k in sorted(r["rounds"])]} for r in rows]


def state_path(model_path: str | os.PathLike) -> Path:
    """The state file beside a generator file: ``<name>.fit_sampling_state.safetensors``."""
    model_path = Path(model_path)
    return model_path.with_name(f"{model_path.stem}.fit_sampling_state.safetensors")


def weights_fingerprint(model: torch.nn.Module) -> str:
    """sha256 over a model's config and every weight (the same weights rewritten into another file agree)."""
    h = hashlib.sha256(json.dumps(getattr(model, "config", {}), sort_keys=True, default=str).encode())
    for name, tensor in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().to("cpu").contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]

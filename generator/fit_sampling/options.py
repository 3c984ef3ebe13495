"""The search's options and the settings it compares: how a ``fit_sampling`` group becomes
:class:`SearchOptions`, how settings are spelt alike, and what a candidate costs."""
from __future__ import annotations

import inspect
import json
from collections.abc import Mapping
from dataclasses import dataclass, field

from omegaconf import OmegaConf

from generator.sampler import SAMPLING_KEYS, plan_steps
from titok_core.cli import Ranges
from titok_core.errors import UsageError

# The search options (the fit_sampling group of generator.train and of this command, less `enabled`).
OPTION_KEYS = ("space", "num_samples", "confirm_samples", "finalists", "passes", "seed", "batch_size", "dtype",
               "max_time", "judge_steps", "device")


# ---------------------------------------------------------------- options


@dataclass(frozen=True)
class SearchOptions:
    """The search's settings (conf/generator/fit_sampling.yaml documents each)."""

    space: dict = field(default_factory=dict)  # sampling key -> the values to try
    num_samples: int = 500  # per candidate, the same count of every class (rounded up)
    confirm_samples: int = 500  # more samples of the finalists and the defaults, from seed + 1; 0: no second round
    finalists: int = 2
    passes: int = 2  # coordinate-descent passes at most (one more only when the first moved)
    seed: int = 1
    batch_size: int = 100
    dtype: str = "auto"
    max_time: float | None = 360.0  # seconds for the whole step; None: no limit
    judge_steps: int = 400  # the judge's training steps (eval.gfid's classifier_steps: one cached judge for both)
    device: str = "auto"

    @classmethod
    def from_group(cls, group: Mapping) -> "SearchOptions":
        """A ``fit_sampling`` config group (``enabled`` ignored) -> SearchOptions; UsageError for a bad value."""
        group = {k: OmegaConf.to_container(v, resolve=True) if OmegaConf.is_config(v) else v for k, v in group.items()}
        group.pop("enabled", None)
        unknown = sorted(set(group) - set(OPTION_KEYS))
        if unknown:
            raise UsageError(f"unknown fit_sampling option(s) {', '.join(unknown)}; known: {', '.join(OPTION_KEYS)}")
        space = {k: v for k, v in (group.get("space") or {}).items() if v is not None}  # null: not searched
        options = cls(**{**group, "space": space,
                         "max_time": parse_duration(group.get("max_time", cls.max_time))})
        options.check()
        return options

    def check(self) -> None:
        unknown = sorted(set(self.space) - set(SAMPLING_KEYS))
        if unknown:
            raise UsageError(f"fit_sampling.space: unknown sampling setting(s) {', '.join(unknown)}; "
                             f"known: {', '.join(SAMPLING_KEYS)}")
        for key, values in self.space.items():
            if not isinstance(values, (list, tuple)) or not values:
                raise UsageError(f"fit_sampling.space.{key} must be a non-empty list of values, got {values!r}")
        for name in ("num_samples", "batch_size", "passes", "judge_steps"):
            if getattr(self, name) < 1:
                raise UsageError(f"fit_sampling.{name} must be at least 1, got {getattr(self, name)}")
        for name in ("confirm_samples", "finalists"):
            if getattr(self, name) < 0:
                raise UsageError(f"fit_sampling.{name} must not be negative, got {getattr(self, name)}")


# The fit_sampling group's options with a range (generator.train and generator.fit_sampling).
FIT_SAMPLING_RANGES = Ranges(
    at_least_one=tuple(f"fit_sampling.{k}" for k in ("num_samples", "batch_size", "passes", "judge_steps")),
    not_negative=("fit_sampling.confirm_samples", "fit_sampling.finalists"))


def parse_duration(value) -> float | None:
    """Seconds, or Lightning's "DD:HH:MM:SS" (also "HH:MM:SS", "MM:SS") -> seconds; None stays None."""
    if value is None or isinstance(value, (int, float)):
        return None if value is None else float(value)
    parts = str(value).strip().split(":")
    try:
        numbers = [float(p) for p in parts]
    except ValueError:
        raise UsageError(f"fit_sampling.max_time={value}: expected seconds or DD:HH:MM:SS") from None
    if len(numbers) > 4 or any(n < 0 for n in numbers):
        raise UsageError(f"fit_sampling.max_time={value}: expected seconds or DD:HH:MM:SS")
    return sum(n * unit for n, unit in zip(reversed(numbers), (1, 60, 3600, 86400)))


def normalise(settings: Mapping, like: Mapping) -> dict:
    """Settings with each value in the type of ``like``'s (3 -> 3.0 for a float setting), so equal
    settings are spelt alike; a value that cannot be is a UsageError."""
    out = {}
    for key, value in settings.items():
        ref = like.get(key)
        if isinstance(ref, bool):
            if not isinstance(value, bool):
                raise UsageError(f"sampling.{key}: expected true or false, got {value!r}")
        elif isinstance(ref, int) and isinstance(value, float) and value.is_integer():
            value = int(value)
        elif isinstance(ref, float) and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        out[key] = value
    return out


def settings_key(settings: Mapping) -> str:
    """One string per settings dict, whatever its key order."""
    return json.dumps(dict(settings), sort_keys=True)


def settings_plan(settings: Mapping, num_tokens: int):
    """plan_steps of the settings it takes (UsageError for a bad value)."""
    takes = inspect.signature(plan_steps).parameters
    return plan_steps(num_tokens=num_tokens, **{k: v for k, v in settings.items() if k in takes})


def guided_forwards(settings: Mapping, num_tokens: int) -> int:
    """Generator forwards per sample: one a step, two where the step is guided."""
    return sum(2 if s.kind.guided else 1 for s in settings_plan(settings, num_tokens))

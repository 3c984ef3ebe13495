"""Sampling settings fitted to the data: a short search against the dataset's own judges.

    python -m generator.fit_sampling generator.checkpoint=runs/generator/small-letters/generator.safetensors
    python -m generator.fit_sampling generator.checkpoint=maskgit_demo out=runs/maskgit_demo_fitted.safetensors

After training (``generator.train`` runs it as its last step where ``fit_sampling.enabled``), the
settings of :func:`generator.sampler.sample_tokens` (guidance scale and schedule, temperatures,
steps; any key of ``SAMPLING_KEYS`` named in ``fit_sampling.space``) are chosen by what the
dataset's own judge (:mod:`titok_core.judges`, the classifier ``eval.gfid mode=demo`` uses)
makes of the samples: the classifier-FID of a fixed set of samples (the same seed and count of
every class for every candidate) against held-out real images, with class accuracy as a guard
(a candidate is eligible only when its accuracy is at least the defaults'). The defaults, the
settings the generator was trained with, are always a candidate, so the search never picks
settings that its judges rate worse. The choice is written into the generator's file as its
``sampling`` entry (which ``sampling.generate``, ``sampling.serve`` and ``eval.gfid`` read;
their explicit ``sampling.*`` options still win) with the whole table under ``fit_sampling``.

Why this search. The settings interact only mildly (guidance scale matters most, then the
temperature), and one pass of coordinate descent from the defaults costs the sum of the value
lists instead of their product: about 20 candidates instead of thousands. Every candidate is
drawn with the same seed and labels (common random numbers), so two candidates differ by their
settings and not by their luck, which makes a few hundred samples enough to rank them. Then,
as in successive halving, the few best get a second, fresh set of samples (another seed; the
figures are over both sets), and the choice is made there: a candidate that won the first
round by chance does not survive a second draw. Each candidate's samples depend only on its
settings and the round's seed, never on the order of evaluation, so a resumed search equals an
uninterrupted one.

Time and kills. ``max_time`` bounds the search: the descent stops taking new candidates when the
next one and the second round would not fit. The judge trains once before it (a few minutes of
CPU, then cached and shared with ``eval.gfid mode=demo``), outside that time. Every
candidate's figures and features are kept in a state file beside the generator's file (written
atomically after each one, keyed on the generator's weights, tokenizer, judge, data and search
settings), so running the same command again after a kill continues where it stopped; a state
of another generator or other settings is set aside. Cut short by time, the search is repeatable
only as far as the timing is.
"""
from __future__ import annotations

import hashlib
import inspect
import json
import logging
import math
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from generator.sampler import SAMPLING_DEFAULTS, SAMPLING_KEYS, plan_steps, sample_tokens
from titok_core.checkpoints import CheckpointError, atomic_path, read_model_extra, read_model_file, save_model_file
from titok_core.cli import Ranges, hydra_entry
from titok_core.errors import MissingFileError, UsageError, exit_on_user_error
from titok_core.images import to_uint8
from titok_core.runtime import autocast, pick_device, resolve_dtype
from titok_core.stopping import at_safe_points, stop_point

log = logging.getLogger(__name__)

STATE_KIND = "titok_gen.fit_sampling_state"
OBJECTIVE = ("classifier-FID of the samples against the held-out images (lower is better); eligible: class "
             "accuracy at least the defaults'")
# The search options (the fit_sampling group of generator.train and of this command, less `enabled`).
OPTION_KEYS = ("space", "num_samples", "confirm_samples", "finalists", "passes", "seed", "batch_size", "dtype",
               "max_time", "judge_steps", "device")


# ---------------------------------------------------------------- options


@dataclass(frozen=True)
class SearchOptions:
    """The search's settings (conf/generator/fit_sampling.yaml documents each)."""

    space: dict = field(default_factory=dict)  # sampling key -> the values to try
    num_samples: int = 200  # per candidate, the same count of every class (rounded up)
    confirm_samples: int = 200  # more samples of the finalists and the defaults, from seed + 1; 0: no second round
    finalists: int = 2
    passes: int = 2  # coordinate-descent passes at most (one more only when the first moved)
    seed: int = 1
    batch_size: int = 100
    dtype: str = "auto"
    max_time: float | None = 240.0  # seconds for the whole step; None: no limit
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


def _plan(settings: Mapping, num_tokens: int):
    """plan_steps of the settings it takes (UsageError for a bad value)."""
    takes = inspect.signature(plan_steps).parameters
    return plan_steps(num_tokens=num_tokens, **{k: v for k, v in settings.items() if k in takes})


def guided_forwards(settings: Mapping, num_tokens: int) -> int:
    """Generator forwards per sample: one a step, two where the step is guided."""
    return sum(2 if s.kind.guided else 1 for s in _plan(settings, num_tokens))


# ---------------------------------------------------------------- the search (pure: figures come from `evaluate`)


@dataclass
class Figures:
    """One candidate's figures at one round: classifier-FID, class accuracy, how many samples, seconds spent."""

    fid: float
    accuracy: float
    samples: int
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return {"fid": self.fid, "accuracy": self.accuracy, "samples": self.samples, "seconds": self.seconds}


def _better(a: Figures, b: Figures) -> bool:
    return math.isfinite(a.fid) and (not math.isfinite(b.fid) or a.fid < b.fid)


def coordinate_search(
    evaluate: Callable[[dict, int], Figures], *, defaults: dict, space: Mapping[str, list], passes: int,
    finalists: int, rounds: int, affordable: Callable[[dict, int, int], bool] = lambda s, r, n: True,
    cached: Callable[[dict, int], bool] = lambda s, r: False,
) -> dict:
    """Coordinate descent from ``defaults`` over ``space``, then a second round for the best.

    evaluate(settings, round) -> Figures (round 0, then 1). affordable(settings, round, finalists_left):
    whether a candidate not yet evaluated still fits the time. cached(settings, round): whether the
    caller holds that evaluation already (from a killed run: it is free, and always taken, so a
    resumed search retraces the uninterrupted one). rounds: 1 or 2. Returns {"chosen": settings, "round": the round
    the choice was made at, "out_of_time": bool}. A candidate is eligible at a round when its
    accuracy there is at least the defaults'; the choice is the eligible candidate of lowest FID at
    the last round that holds the defaults and another candidate, the defaults on ties.
    """
    key = settings_key
    base = evaluate(defaults, 0)
    seen: dict[str, dict] = {key(defaults): defaults}
    figures0: dict[str, Figures] = {key(defaults): base}
    current, out_of_time = dict(defaults), False

    def eligible(f: Figures, ref: Figures) -> bool:
        return math.isfinite(f.fid) and f.accuracy >= ref.accuracy

    for _ in range(passes):
        moved = False
        for name, values in space.items():
            best = current
            for value in values:
                candidate = {**current, name: value}
                k = key(candidate)
                if k not in figures0:
                    if not cached(candidate, 0) and (out_of_time or not affordable(candidate, 0, finalists)):
                        out_of_time = True
                        continue
                    figures0[k] = evaluate(candidate, 0)
                    seen[k] = candidate
                if eligible(figures0[k], base) and _better(figures0[k], figures0[key(best)]):
                    best = candidate
            if key(best) != key(current):
                current, moved = best, True
        if not moved or out_of_time:
            break

    ranked = sorted((k for k in figures0 if k != key(defaults) and eligible(figures0[k], base)
                     and _better(figures0[k], base)), key=lambda k: figures0[k].fid)
    chosen, decided = defaults, 0
    if ranked:
        chosen = seen[ranked[0]]
    if rounds > 1 and ranked and finalists > 0:
        picks = [seen[k] for k in ranked[:finalists]]
        if (cached(defaults, 1) and cached(picks[0], 1)) or affordable(defaults, 1, len(picks)):
            base1 = evaluate(defaults, 1)
            best1, chosen1 = base1, defaults
            for i, candidate in enumerate(picks):
                if not cached(candidate, 1) and not affordable(candidate, 1, len(picks) - i - 1):
                    out_of_time = True
                    break
                f = evaluate(candidate, 1)
                if eligible(f, base1) and _better(f, best1):
                    best1, chosen1 = f, candidate
            chosen, decided = chosen1, 1
        else:
            out_of_time = True
    return {"chosen": dict(chosen), "round": decided, "out_of_time": out_of_time}


# ---------------------------------------------------------------- judging samples


class Judge:
    """The dataset's classifier and its features of the held-out real images."""

    def __init__(self, root: str | os.PathLike, *, resolution: int, steps: int, device: torch.device):
        from titok_core.judges import heldout_description, judge_files, load_demo_classifier, load_judge_part

        self.root = Path(root)
        split = judge_files(root)  # a dataset the judges cannot split stops here, before any training
        self.classifier = load_demo_classifier(root, device=str(device), steps=steps, resolution=resolution)
        images, labels = load_judge_part(split, "heldout", resolution=self.classifier.resolution)
        self.real_features = self.classifier.features(images.float() / 255)
        self.held_out = heldout_description(split)
        self.held_out_images = len(labels)
        self.record = {
            "kind": "demo_classifier", "data_root": str(root), "held_out": self.held_out,
            "held_out_images": self.held_out_images, "steps": steps, "resolution": self.classifier.resolution,
            "classes": self.classifier.classes, "held_out_accuracy": self.classifier.config.get("val_accuracy"),
        }

    def identity(self) -> dict:
        from titok_core.judges import cache_key
        from titok_core.runs import dataset_fingerprint

        return {**{k: v for k, v in self.record.items() if k != "held_out_accuracy"},
                "data_root": str(self.root.resolve()), "data_files": dataset_fingerprint(self.root),
                "cache_key": cache_key(self.root, seed=0, steps=self.record["steps"],
                                       resolution=self.record["resolution"])}

    def fid(self, fake_features: torch.Tensor) -> float:
        from titok_core.judges import classifier_fid

        return classifier_fid(self.real_features, fake_features)


def class_balanced(num_samples: int, num_classes: int) -> torch.Tensor:
    """int64 [ceil(num_samples / num_classes) * num_classes]: the same count of every class, in class order."""
    return torch.arange(num_classes).repeat_interleave(math.ceil(num_samples / num_classes))


@torch.no_grad()
def draw_and_judge(
    generator, tokenizer, judge: Judge, settings: dict, *, labels: torch.Tensor, seed: int, batch_size: int,
    dtype: str, device: torch.device, on_batch: Callable[[int], None] | None = None,
) -> tuple[torch.Tensor, int]:
    """Sample one image per label with ``settings`` (one torch.Generator seeded ``seed``, drawn batch
    after batch), decode, judge as saved (uint8): (classifier features float32 [n,D], correct count)."""
    rng = torch.Generator(device=device).manual_seed(seed)
    features, correct = [], 0
    for start in range(0, len(labels), batch_size):
        y = labels[start : start + batch_size].to(device)
        with torch.inference_mode(), autocast(device, dtype):
            tokens = sample_tokens(generator, y, rng=rng, **settings)
            images = tokenizer.decode(tokens).float()
        images = to_uint8(images).float() / 255
        correct += int((judge.classifier.classify(images).argmax(-1) == y.cpu()).sum())
        features.append(judge.classifier.features(images))
        if on_batch is not None:
            on_batch(len(y))
    return torch.cat(features), correct


# ---------------------------------------------------------------- the state file


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


# ---------------------------------------------------------------- one search, start to end


def fit_sampling(
    generator, tokenizer, *, data_root: str | os.PathLike, defaults: dict, options: SearchOptions,
    state_file: str | os.PathLike, fixed: tuple[str, ...] = (),
) -> dict:
    """Search the sampling settings of ``generator`` (decoded by ``tokenizer``) on ``data_root``'s judge.

    defaults: complete settings (every key of SAMPLING_KEYS the generator needs), the first
    candidate. fixed: keys left out of the search (held at their default). Returns the record
    that goes into the model file: chosen, defaults, table, judge, seed, ... (see the module doc).
    """
    from generator.cache import tokenizer_fingerprint

    started, cpu_started = time.monotonic(), time.process_time()
    device = pick_device(options.device)
    dtype = resolve_dtype(device, options.dtype)
    generator, tokenizer = generator.to(device).eval(), tokenizer.to(device).eval()
    defaults = {k: defaults[k] for k in SAMPLING_KEYS if k in defaults}
    space = {k: [normalise({k: v}, defaults)[k] for v in values] for k, values in options.space.items()
             if k not in fixed}
    for key, values in space.items():  # a bad value is one line now, not a crash minutes later
        for value in values:
            _plan({**defaults, key: value}, generator.num_tokens)

    judge = Judge(data_root, resolution=tokenizer.image_size, steps=options.judge_steps, device=device)
    if len(judge.classifier.classes) != generator.num_classes:
        raise UsageError(f"the judge's data {data_root} has {len(judge.classifier.classes)} classes, the generator "
                         f"{generator.num_classes}: pass the data it was trained on (data.root=...)")
    search_settings = {"space": space, "num_samples": options.num_samples, "confirm_samples": options.confirm_samples,
                       "finalists": options.finalists, "passes": options.passes, "seed": options.seed,
                       "batch_size": options.batch_size, "dtype": dtype, "device": device.type}
    identity = {"generator": weights_fingerprint(generator), "tokenizer": tokenizer_fingerprint(tokenizer),
                "judge": judge.identity(), "search": search_settings, "defaults": defaults}
    state = SearchState(Path(state_file), identity)
    rounds = [(options.num_samples, options.seed)]
    if options.confirm_samples:
        rounds.append((options.confirm_samples, options.seed + 1))
    labels = [class_balanced(n, generator.num_classes) for n, _ in rounds]
    judge_seconds = time.monotonic() - started

    bar = tqdm(desc="fit_sampling", unit="sample", disable=None,
               total=len(labels[0]) * (1 + sum(len(v) for v in space.values())))
    new_seconds = 0.0

    def evaluate(settings: dict, round_: int) -> Figures:
        nonlocal new_seconds
        found = state.get(settings, round_)
        if found is not None:
            bar.update(len(labels[round_]))
            return found
        t0 = time.monotonic()
        feats, correct = draw_and_judge(generator, tokenizer, judge, settings, labels=labels[round_],
                                        seed=rounds[round_][1], batch_size=options.batch_size, dtype=dtype,
                                        device=device, on_batch=bar.update)
        if round_ > 0:  # the second round's figures are over both sets of samples
            first = state.get(settings, 0)
            correct += round(first.accuracy * first.samples)
            feats_all = torch.cat([state.features_of(settings, 0), feats])
        else:
            feats_all = feats
        seconds = time.monotonic() - t0
        new_seconds += seconds
        figures = Figures(fid=judge.fid(feats_all), accuracy=correct / len(feats_all), samples=len(feats_all),
                          seconds=round(seconds, 3))
        state.put(settings, round_, figures, feats)
        log.info("fit_sampling round %d: %s -> classifier-FID %.3f, accuracy %.1f%% (%.1fs)", round_ + 1,
                 _short(settings, defaults), figures.fid, 100 * figures.accuracy, seconds)
        bar.set_postfix_str(f"FID {figures.fid:.2f}")
        stop_point()  # the candidate is saved: a stop asked meanwhile (Ctrl-C, SIGTERM) acts here
        return figures

    def cost_units(settings: dict, round_: int) -> float:
        return len(labels[round_]) * (guided_forwards(settings, generator.num_tokens) + 1)  # +1: decode, judge

    def affordable(settings: dict, round_: int, more: int) -> bool:
        """Whether this candidate, and ``more`` second-round ones like it (and the defaults'), still fit."""
        if options.max_time is None:
            return True
        done = [(row["settings"], int(r), f) for row in state.rows.values() for r, f in row["rounds"].items()]
        units = sum(cost_units(s, r) for s, r, _ in done)
        per_unit = sum(f["seconds"] for _, _, f in done) / units if units else 0.0
        need = cost_units(settings, round_)
        if len(rounds) > 1:
            need += (more + (round_ == 0)) * cost_units(settings, 1)
        return state.seconds + need * per_unit <= options.max_time

    with at_safe_points():  # the first Ctrl-C or a SIGTERM finishes the candidate in hand (a rerun goes on from it)
        result = coordinate_search(evaluate, defaults=defaults, space=space, passes=options.passes,
                                   finalists=options.finalists, rounds=len(rounds), affordable=affordable,
                                   cached=lambda settings, round_: state.get(settings, round_) is not None)
    bar.close()
    return {
        "chosen": result["chosen"], "defaults": defaults, "decided_at_round": result["round"] + 1,
        "out_of_time": result["out_of_time"], "objective": OBJECTIVE, "judge": judge.record,
        "seed": options.seed, "rounds": [{"samples": len(y), "seed": s} for y, (_, s) in zip(labels, rounds)],
        "search": {k: v for k, v in search_settings.items() if k not in ("dtype", "device")}, "fixed": list(fixed),
        "max_time": options.max_time, "table": state.table(), "seconds": round(state.seconds, 1),
        "judge_seconds": round(judge_seconds, 1), "cpu_seconds_this_run": round(time.process_time() - cpu_started, 1),
        "device": device.type, "dtype": dtype, "threads": torch.get_num_threads(), "resumed": state.resumed,
    }


def _short(settings: Mapping, defaults: Mapping) -> str:
    changed = {k: v for k, v in settings.items() if defaults.get(k) != v}
    return "defaults" if not changed else ", ".join(f"{k}={v}" for k, v in changed.items())


# ---------------------------------------------------------------- the model file


def fit_file(
    checkpoint: str | os.PathLike, *, options: SearchOptions, out: str | os.PathLike | None = None,
    data_root: str | os.PathLike | None = None, tokenizer: Mapping | None = None, fixed: tuple[str, ...] = (),
) -> dict:
    """Fit the sampling settings of one of our generator files and write them into ``out`` (default:
    the file itself, rewritten atomically). Returns the record written (``fit_sampling``), plus
    ``path``. The defaults are the settings the file was trained with (the ones before any earlier fit).
    """
    from generator import load_generator
    from generator.assets import shipped_path
    from tokenizer import load_tokenizer, require_discrete

    shipped = shipped_path(str(checkpoint)) if isinstance(checkpoint, str) else None
    path = Path(shipped or checkpoint)
    if not path.is_file():
        raise CheckpointError(f"generator checkpoint not found: {path}")
    if shipped is not None and out is None:
        raise UsageError(f"{checkpoint} ships with the package: pass out=FILE for the fitted copy")
    found = read_model_file(path)
    if found is None or found[0] != "generator":
        raise CheckpointError(f"{path} is not a generator file of this project (generator.train writes them)")
    kind, config, state_dict = found
    extra = read_model_extra(path)
    generator = load_generator(path)
    earlier = extra.get("fit_sampling") or {}
    defaults = {**SAMPLING_DEFAULTS, **(earlier.get("defaults") or extra.get("sampling") or generator.sampling)}
    missing = [k for k in SAMPLING_KEYS if k not in defaults]
    if missing:
        raise CheckpointError(f"{path} records no sampling settings for {', '.join(missing)}")

    trained_on = extra.get("tokenizer", {})
    tok_spec = (tokenizer or {}).get("spec") or trained_on.get("spec")
    tok_ckpt = (tokenizer or {}).get("checkpoint") or trained_on.get("checkpoint")
    if tok_spec is None:
        raise CheckpointError(f"{path} records no tokenizer: pass tokenizer.spec=... (and tokenizer.checkpoint=...)")
    tok = load_tokenizer(tok_spec, tok_ckpt)
    require_discrete(tok, "MaskGIT generation")
    data = extra.get("data", {})
    root = data_root or data.get("root")
    builtin = data.get("builtin")
    if root and builtin and not data_root and not (Path(root) / "train").is_dir():
        from titok_core.builtin import make_builtin_dataset

        make_builtin_dataset(builtin, root, size=tok.image_size)
    if not root or not (Path(root) / "train").is_dir():
        raise MissingFileError(f"no image folder <root>/train/<class>/* at {root}: pass data.root=... (the data "
                                "the generator was trained on)")
    target = Path(out) if out is not None else path
    record = fit_sampling(generator, tok, data_root=root, defaults=defaults, options=options,
                          state_file=state_path(target), fixed=fixed)
    extra = {**extra, "sampling": record["chosen"], "fit_sampling": record}
    save_model_file(target, kind=kind, config=config, state_dict=state_dict, extra=extra)
    return {**record, "path": str(target)}


def fit_after_training(model_file: str | os.PathLike, cfg: DictConfig) -> str | None:
    """generator.train's last step: fit ``model_file`` in place with ``cfg.fit_sampling``; returns the summary.

    The ``sampling.*`` keys given on the command line stay as given. Data that is not an image
    folder with ``train/`` (the judges read only those) skips the step with a warning (None).
    """
    root = Path(cfg.data.root)
    if not (root / "train").is_dir():
        log.warning("fit_sampling skipped: the judges read image folders <root>/train/<class>/*, and %s is not one "
                    "(fit_sampling.enabled=false silences this)", root)
        return None
    options = SearchOptions.from_group(cfg.fit_sampling)
    return summary(fit_file(model_file, options=options, data_root=root, fixed=pinned_sampling_keys()))


# ---------------------------------------------------------------- what a person reads


def _fmt(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def summary(record: Mapping) -> str:
    """The table a person reads: every candidate's settings and figures, defaults and chosen marked."""
    defaults, chosen = record["defaults"], record["chosen"]
    keys = [k for k in SAMPLING_KEYS if k in defaults and (k in record["search"]["space"] or k in ("guidance_scale",))]
    rounds = record["rounds"]
    head = ["", *[k.replace("softmax_temperature_", "").replace("randomize_", "rand_") for k in keys]]
    judged = 0
    for r in rounds:  # a round's figures are over its samples and the earlier rounds'
        judged += r["samples"]
        head += [f"FID@{judged}", f"acc@{judged}"]
    rows = []
    for entry in record["table"]:
        s = entry["settings"]
        mark = ("defaults" if s == defaults else "") + ("*chosen" if s == chosen else "")
        row = [mark or " ", *[_fmt(s.get(k)) for k in keys]]
        for i in range(len(rounds)):
            f = entry["rounds"][i] if i < len(entry["rounds"]) else None
            row += [f"{f['fid']:.2f}", f"{100 * f['accuracy']:.1f}%"] if f else ["", ""]
        rows.append(row)
    widths = [max(len(str(r[i])) for r in [head, *rows]) for i in range(len(head))]
    lines = ["  ".join(str(c).rjust(w) for c, w in zip(r, widths)) for r in [head, *rows]]
    judge = record["judge"]
    took = (f"{record['seconds']:.0f} s on {record['device']} ({record['dtype']}, {record['threads']} "
            f"thread{'s' if record['threads'] > 1 else ''})")
    if record["judge_seconds"] >= 1:
        took += f", after {record['judge_seconds']:.0f} s loading or training the judge"
    verdict = ("the defaults stay: no candidate beat them on the judge" if chosen == defaults else
               "chosen: " + ", ".join(f"{k}={_fmt(v)}" for k, v in chosen.items() if defaults.get(k) != v))
    return "\n".join([
        f"fit_sampling: {len(record['table'])} candidates judged by the dataset's classifier against held-out images "
        f"({judge['held_out'].removeprefix('held out: ')}); seed {record['seed']}; {took}"
        + ("; stopped by max_time" if record["out_of_time"] else ""),
        f"objective: {record['objective']}; decided at round {record['decided_at_round']}",
        *lines, verdict,
    ])


# ---------------------------------------------------------------- the command


def pinned_sampling_keys() -> tuple[str, ...]:
    """The ``sampling.*`` keys given on this Hydra job's command line (they win: the search leaves them be)."""
    try:
        from hydra.core.hydra_config import HydraConfig

        if not HydraConfig.initialized():
            return ()
        overrides = HydraConfig.get().overrides.task
    except Exception:  # noqa: BLE001 - not under Hydra
        return ()
    keys = []
    for item in overrides:
        name = item.split("=", 1)[0].lstrip("+~")
        if name.startswith("sampling.") and name[len("sampling."):] in SAMPLING_KEYS:
            keys.append(name[len("sampling."):])
    return tuple(keys)


def _main(cfg: DictConfig) -> None:
    with exit_on_user_error():
        options = SearchOptions.from_group(cfg.fit_sampling)
        record = fit_file(cfg.generator.checkpoint, options=options, out=cfg.out, data_root=cfg.data.root,
                          tokenizer=OmegaConf.to_container(cfg.tokenizer, resolve=True))
    print(summary(record))
    print(f"written to {record['path']} (its sampling settings; explicit sampling.* options still win)")


main = hydra_entry(config="generator/fit_sampling", description=__doc__, ranges=FIT_SAMPLING_RANGES,
                   on_interrupt="interrupted: run the same command again to continue the search")(_main)


if __name__ == "__main__":
    main()

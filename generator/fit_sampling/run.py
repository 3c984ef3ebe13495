"""One search, start to end (:func:`fit_sampling`), on a generator file (:func:`fit_file`), and as
``generator.train``'s last step (:func:`fit_after_training`)."""
from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping
from pathlib import Path

import torch
from omegaconf import DictConfig
from tqdm import tqdm

from generator.fit_sampling.judging import Judge, class_balanced, draw_and_judge
from generator.fit_sampling.options import SearchOptions, guided_forwards, normalise, settings_plan
from generator.fit_sampling.report import changes, summary
from generator.fit_sampling.search import Figures, coordinate_search
from generator.fit_sampling.state import SearchState, state_path, weights_fingerprint
from generator.sampler import SAMPLING_DEFAULTS, SAMPLING_KEYS
from titok_core.checkpoints import CheckpointError, read_model_extra, read_model_file, save_model_file
from titok_core.errors import MissingFileError, UsageError
from titok_core.runtime import pick_device, resolve_dtype
from titok_core.stopping import at_safe_points, stop_point

log = logging.getLogger(__name__)


OBJECTIVE = ("classifier-FID of the samples against the held-out images (lower is better); eligible: class "
             "accuracy at least the defaults'; at the second round, a gain over the defaults larger than their own "
             "spread between the two draws")


def fit_sampling(
    generator, tokenizer, *, data_root: str | os.PathLike, defaults: dict, options: SearchOptions,
    state_file: str | os.PathLike, fixed: tuple[str, ...] = (),
) -> dict:
    """Search the sampling settings of ``generator`` (decoded by ``tokenizer``) on ``data_root``'s judge.

    defaults: complete settings (every key of SAMPLING_KEYS the generator needs), the first
    candidate. fixed: keys left out of the search (held at their default). Returns the record
    that goes into the model file: chosen, defaults, table, judge, seed, ... (see the package docstring).
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
            settings_plan({**defaults, key: value}, generator.num_tokens)

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
            if round_ > 0 and found.fresh_fid is None:  # a state written before fresh figures were kept
                found.fresh_fid = judge.fid(state.features_of(settings, round_))
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
                          seconds=round(seconds, 3), fresh_fid=judge.fid(feats) if round_ > 0 else None)
        state.put(settings, round_, figures, feats)
        log.info("fit_sampling round %d: %s -> classifier-FID %.3f, accuracy %.1f%% (%.1fs)", round_ + 1,
                 changes(settings, defaults) or "defaults", figures.fid, 100 * figures.accuracy, seconds)
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
        "out_of_time": result["out_of_time"], "margin": result["margin"], "objective": OBJECTIVE, "judge": judge.record,
        "seed": options.seed, "rounds": [{"samples": len(y), "seed": s} for y, (_, s) in zip(labels, rounds)],
        "search": {k: v for k, v in search_settings.items() if k not in ("dtype", "device")}, "fixed": list(fixed),
        "max_time": options.max_time, "table": state.table(), "seconds": round(state.seconds, 1),
        "judge_seconds": round(judge_seconds, 1), "cpu_seconds_this_run": round(time.process_time() - cpu_started, 1),
        "device": device.type, "dtype": dtype, "threads": torch.get_num_threads(), "resumed": state.resumed,
    }


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


"""The search itself, pure: coordinate descent, then a second round for the finalists (its
figures come from an ``evaluate`` callback; see the package's docstring for why this search)."""
from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace

from generator.fit_sampling.options import settings_key


@dataclass
class Figures:
    """One candidate's figures at one round: classifier-FID, class accuracy, how many samples, seconds spent.

    A later round's figures are over its samples and the earlier rounds'; ``fresh_fid`` is the FID of that
    round's own samples alone (None at the first round).
    """

    fid: float
    accuracy: float
    samples: int
    seconds: float = 0.0
    fresh_fid: float | None = None

    def to_dict(self) -> dict:
        out = {"fid": self.fid, "accuracy": self.accuracy, "samples": self.samples, "seconds": self.seconds}
        return out if self.fresh_fid is None else {**out, "fresh_fid": self.fresh_fid}


def noise_margin(first: Figures, second: Figures) -> float:
    """How far a candidate must beat the defaults at the second round: the defaults' own spread.

    first: the defaults' figures at the first round; second: at the second. Their first draw and their
    second, fresh one (the same count of samples, another seed) differ by chance alone; |difference| / sqrt(2)
    estimates one standard deviation of a draw's FID. 0 when the second round has no fresh figure.
    """
    if second.fresh_fid is None or not (math.isfinite(first.fid) and math.isfinite(second.fresh_fid)):
        return 0.0
    return abs(first.fid - second.fresh_fid) / math.sqrt(2)


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
    the choice was made at, "out_of_time": bool, "margin": the FID a finalist had to gain at the second round}.
    A candidate is eligible at a round when its accuracy there is at least the defaults'; the choice is the
    eligible candidate of lowest FID at the last round that holds the defaults and another candidate, the
    defaults on ties. At the second round a finalist must also beat the defaults by more than their own
    spread between the two draws (:func:`noise_margin`): a gain that chance alone gives the defaults is none.
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
    chosen, decided, margin = defaults, 0, 0.0
    if ranked:
        chosen = seen[ranked[0]]
    if rounds > 1 and ranked and finalists > 0:
        picks = [seen[k] for k in ranked[:finalists]]
        if (cached(defaults, 1) and cached(picks[0], 1)) or affordable(defaults, 1, len(picks)):
            base1 = evaluate(defaults, 1)
            margin = noise_margin(base, base1)
            best1, chosen1 = replace(base1, fid=base1.fid - margin), defaults  # the bar a finalist must clear
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
    return {"chosen": dict(chosen), "round": decided, "out_of_time": out_of_time, "margin": margin}

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
round by chance does not survive a second draw. There a finalist must beat the defaults by more than
the defaults' own spread between their two draws (|first - second| / sqrt(2), from the second draw's
samples alone): on Fashion-MNIST a 10% gain on 500 + 500 samples did not hold on other seeds
(docs/small_data_recipe.md, round 13). Each candidate's samples depend only on its
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

# One concern a module: options (the fit_sampling group -> SearchOptions; settings spelt alike; a
# candidate's cost), search (the coordinate descent and its second round, pure), judging (draw one
# candidate's samples and score them), state (the state file a killed search resumes from), run (one
# search start to end, on a generator file, and as generator.train's last step), report (the table a
# person reads), command (python -m generator.fit_sampling). The docstring above is the command's --help.
from generator.fit_sampling.command import _main as _main  # the task function, run in-process by tests
from generator.fit_sampling.command import main
from generator.fit_sampling.options import (
    FIT_SAMPLING_RANGES,
    OPTION_KEYS,
    SearchOptions,
    guided_forwards,
    normalise,
    parse_duration,
    settings_key,
)
from generator.fit_sampling.report import summary
from generator.fit_sampling.run import OBJECTIVE, fit_after_training, fit_file, fit_sampling, pinned_sampling_keys
from generator.fit_sampling.search import Figures, coordinate_search, noise_margin
from generator.fit_sampling.state import STATE_KIND, SearchState, state_path, weights_fingerprint

__all__ = [
    "FIT_SAMPLING_RANGES", "OPTION_KEYS", "SearchOptions", "guided_forwards", "normalise", "parse_duration",
    "settings_key", "summary", "OBJECTIVE", "fit_after_training", "fit_file", "fit_sampling", "pinned_sampling_keys",
    "Figures", "coordinate_search", "noise_margin", "STATE_KIND", "SearchState", "state_path", "weights_fingerprint", "main",
]

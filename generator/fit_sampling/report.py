"""What a person reads of a search: every candidate's settings and figures, the defaults and the
choice marked."""
from __future__ import annotations

from collections.abc import Mapping

from generator.sampler import SAMPLING_KEYS


def _fmt(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def changes(settings: Mapping, defaults: Mapping) -> str:
    """The settings that differ from ``defaults``, as ``key=value, ...`` ("" when none)."""
    return ", ".join(f"{k}={_fmt(v)}" for k, v in settings.items() if defaults.get(k) != v)


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
    margin = record.get("margin") or 0.0
    if chosen == defaults:
        verdict = "the defaults stay: no candidate beat them on the judge"
        if margin > 0:
            verdict += f" by more than their own spread between draws ({margin:.2f})"
    else:
        verdict = "chosen: " + changes(chosen, defaults)
        if margin > 0:
            verdict += f" (it beat the defaults by more than their own spread between draws, {margin:.2f})"
    return "\n".join([
        f"fit_sampling: {len(record['table'])} candidates judged by the dataset's classifier against held-out images "
        f"({judge['held_out'].removeprefix('held out: ')}); seed {record['seed']}; {took}"
        + ("; stopped by max_time" if record["out_of_time"] else ""),
        f"objective: {record['objective']}; decided at round {record['decided_at_round']}",
        *lines, verdict,
    ])


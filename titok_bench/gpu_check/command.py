"""``python -m titok_bench.gpu_check``: the options, and the run in its order (the figures, then
the profiles of those short of their target, then the largest-batch probes)."""
from __future__ import annotations

import argparse
import signal
import sys

import titok_bench.gpu_check as package
from titok_bench.gpu_check.child import child_main
from titok_bench.gpu_check.steps import ALL_STEPS, P6_SAMPLES, PROBE_STEPS, PROFILE_STEPS, STEPS, Step
from titok_bench.gpu_check.supervisor import Run, step_names


def parse_args(argv: list[str]) -> argparse.Namespace:
    """The command line of the check (``--help`` prints the package's description)."""
    p = argparse.ArgumentParser(description=package.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out_dir", help="where the step JSONs, summary.json and gpu_check.log go")
    p.add_argument("--dry-run", action="store_true", help="on CPU at tiny sizes (well under a minute)")
    p.add_argument("--budget-s", type=float, default=None, help="total seconds (default 480; dry run 180)")
    p.add_argument("--only", default=None,
                   help="comma-separated steps or groups (env, figure, tests, sbs, profile, probe)")
    p.add_argument("--skip", default=None, help="comma-separated steps or groups to leave out")
    p.add_argument("--bundle", default=None, help="also keep a tar of OUT_DIR here, refreshed after every step")
    p.add_argument("--official", default=None, help="the official 1d-tokenizer checkout (default $TITOK_OFFICIAL_DIR)")
    p.add_argument("--sbs-tool", default=None,
                   help="a script that times the official code beside ours (sbs_official; see docs/gpu_check.md)")
    p.add_argument("--p1-batch", type=int, default=500, help="P1 batch size (also the official side by side)")
    p.add_argument("--p1-value", type=float, default=None,
                   help="P1's fast samples/s from an earlier run, for sbs_official when P1 does not run")
    p.add_argument("--p1b-batch", type=int, default=250, help="P1b batch size")
    p.add_argument("--p3-batch", type=int, default=1024, help="P3 training batch size")
    p.add_argument("--p6-batch", type=int, default=500, help="P6 batch size")
    p.add_argument("--p6-samples", type=int, default=P6_SAMPLES, help="P6 samples (fewer: the time is extrapolated)")
    p.add_argument("--list", action="store_true", help="print the steps and their limits, run nothing")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    """Run the check (or, with ``--child``, one step's process); returns the summary written last."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--child"]:
        return child_main(argv[1:])
    args = parse_args(argv)
    if args.list:
        for s in ALL_STEPS:
            print(f"{s.name:<18} {s.group:<8} limit {s.timeout_s:>4.0f} s, needs {s.min_s:>4.0f} s  {s.title}")
        return {}

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # through the finally blocks: the step is ended
    run = Run(args)
    try:
        run.say(f"start: {'dry run, ' if run.dry_run else ''}budget {run.budget:.0f} s, out {run.out}")
        for step in STEPS:
            if run.selected(step):
                run.execute(step)
        for step in PROFILE_STEPS:
            if run.selected(step):
                run.execute(step, skip=_profile_skip(run, step, step_names(args.only)))
        for step in PROBE_STEPS:
            if run.selected(step):
                run.execute(step)
        summary = run.write_summary(finished=True)
        run.say(f"done in {summary['wall_s']:.0f} s of {run.budget:.0f} (steps' CPU {summary['cpu_s']:.0f} s)\n"
                f"{summary['table']}")
        return summary
    finally:
        run.close()


def _profile_skip(run: Run, step: Step, only: set[str]) -> str | None:
    """Why a profile step is not needed (None: run it): its figure met its target, or did not run."""
    if step.name in only:
        return None
    of = run.records.get(step.name.removeprefix("profile_"))
    if of is None or of["status"] == "skipped":
        return "its figure did not run"
    if of["met"] is not False and of["status"] not in ("failed", "timeout"):
        return "its figure met its target"
    if run.dry_run and any(r["status"] != "skipped" for n, r in run.records.items() if n.startswith("profile_")):
        return "dry-run: one profile exercises the path (on CPU every figure is short)"
    return None

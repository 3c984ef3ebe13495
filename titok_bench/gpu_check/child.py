"""What a step's process runs when it is not a benchmark's own command: the environment facts,
or a benchmark's ``main`` under torch.profiler or with the dry run's cheap FID."""
from __future__ import annotations

import json
import sys

from titok_bench.gpu_check.environment import env_facts


def child_main(argv: list[str]) -> dict:
    """``--child env [--full]``: print the facts as one JSON line; ``--child run ...``: see :func:`_child_run`."""
    mode, rest = argv[0], argv[1:]
    if mode == "env":
        facts = env_facts(full="--full" in rest)
        print(json.dumps(facts))
        return facts
    if mode == "run":
        return _child_run(rest)
    raise SystemExit(f"unknown child mode {mode!r}")


def _child_run(argv: list[str]) -> dict:
    """[--profile] [--cheap-fid] MODULE -- ARGS: MODULE.main(ARGS), optionally under torch.profiler."""
    import importlib

    import torch

    cut = argv.index("--")
    opts, args = argv[:cut], argv[cut + 1:]
    if "--cheap-fid" in opts:
        # Before the evaluation modules bind the name: every later `from titok_core.metrics import
        # fid_from_stats` gets the stand-in; modules already loaded are patched where they hold it.
        import titok_core.metrics

        original = titok_core.metrics.fid_from_stats
        for mod in list(sys.modules.values()):
            if getattr(mod, "fid_from_stats", None) is original:
                mod.fid_from_stats = _diagonal_fid
    module = importlib.import_module(opts[-1])
    if "--profile" not in opts:
        result = module.main(args)
        print(json.dumps(result, default=str))
        return result
    from torch.profiler import ProfilerActivity, profile

    cuda = torch.cuda.is_available()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        result = module.main(args)
        if cuda:
            torch.cuda.synchronize()
    events = prof.key_averages()
    key = "self_device_time_total" if cuda else "self_cpu_time_total"
    top = sorted(events, key=lambda e: getattr(e, key, 0) or 0, reverse=True)[:25]
    total = sum(getattr(e, key, 0) or 0 for e in events) or 1
    rows = [{"name": e.key[:120], "calls": e.count, "self_us": round(getattr(e, key, 0) or 0, 1),
             "share": round((getattr(e, key, 0) or 0) / total, 4), "self_cpu_us": round(e.self_cpu_time_total, 1)}
            for e in top]
    try:
        table = events.table(sort_by=key, row_limit=25, max_name_column_width=70)
    except Exception as exc:  # noqa: BLE001 - the table's sort keys moved between torch versions
        table = f"(no table: {exc})"
    out = {"result": result, "profile": {"sorted_by": key, "top": rows, "table": table}}
    print(json.dumps(out, default=str))
    return out


def _diagonal_fid(mu1, sigma1, mu2, sigma2) -> float:
    """A stand-in for the FID in the dry run: the Frechet distance of the diagonal Gaussians."""
    import numpy as np

    d1, d2 = np.diag(np.asarray(sigma1, dtype=np.float64)), np.diag(np.asarray(sigma2, dtype=np.float64))
    diff = np.asarray(mu1, dtype=np.float64) - np.asarray(mu2, dtype=np.float64)
    return float(diff @ diff + d1.sum() + d2.sum() - 2 * np.sqrt(np.clip(d1 * d2, 0, None)).sum())

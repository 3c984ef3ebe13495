"""``python -m titok_bench.gpu_check OUT --dry-run``: the GPU check's machinery, on CPU at tiny sizes.

One dry run (module-scoped) with one step forced to fail and one forced to hang: every step leaves
its JSON with the required fields, the summary and the log are written, the failure and the
time-out are recorded and the steps after them still run, and the run keeps to its budget.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

from titok_bench.gpu_check import ALL_STEPS, Plan, Run, _junit, _replace, parse_args

from conftest import REPO

BUDGET_S = 150  # about 40 s on an idle 2-core machine; the budget only bites when the machine is busy
FIELDS = {"step", "title", "status", "reason", "figure", "value", "unit", "target", "met", "peak_memory_mb",
          "largest_batch", "agreement", "command", "timeout_s", "wall_s", "cpu_s", "rc", "stderr_tail", "dry_run"}
FAKE_SIDE_BY_SIDE = """\
import json, os
batch = int(os.environ["SBS_SAMPLE"])
for who, speed in (("official", 2.0), ("official", 1.5), ("ours", 3.0)):
    print(json.dumps({"what": "sample", "who": who, "dtype": "bf16", "batch": batch, "samples_per_s": speed,
                      "peak_gb": 0.5}))
"""
# Imported at start-up through PYTHONPATH (as sitecustomize) by the dry run's processes: p1b_b64's
# command raises and p1b_s128's sleeps under a 2-second limit, so that the check's handling of a
# failed and a hung step is seen. The check itself has no switch for it.
FORCED = """
import dataclasses, sys

from titok_bench.gpu_check import steps


def _forced(step, argv, **limits):
    return dataclasses.replace(step, plan=lambda run: steps.Plan(argv, summarize=lambda result: {}), **limits)


for i, step in enumerate(steps.STEPS):
    if step.name == "p1b_b64":
        steps.STEPS[i] = _forced(step, [sys.executable, "-c", "raise RuntimeError('forced failure of p1b_b64')"])
    elif step.name == "p1b_s128":
        steps.STEPS[i] = _forced(step, [sys.executable, "-c", "import time; time.sleep(600)"], timeout_s=2, min_s=1)
"""


def _gpu_check(out: Path, *args: str, env: dict | None = None, timeout: float) -> subprocess.CompletedProcess:
    env = {**os.environ, **(env or {})}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return subprocess.run([sys.executable, "-m", "titok_bench.gpu_check", str(out), *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("gpu_check")
    tool = root / "fake_side_by_side.py"
    tool.write_text(FAKE_SIDE_BY_SIDE)
    official = root / "official"
    (official / "modeling").mkdir(parents=True)
    config = official / "configs" / "infer" / "TiTok" / "titok_l32.yaml"
    config.parent.mkdir(parents=True)
    config.write_text("model: {}\n")
    (root / "forced").mkdir()
    (root / "forced" / "sitecustomize.py").write_text(FORCED)
    out = root / "out"
    start = time.monotonic()
    proc = _gpu_check(out, "--dry-run", "--budget-s", str(BUDGET_S), "--bundle", str(root / "bundle.tar"),
                      "--sbs-tool", str(tool), "--official", str(official),
                      env={"PYTHONPATH": os.pathsep.join(filter(None, [str(root / "forced"),
                                                                       os.environ.get("PYTHONPATH")]))},
                      timeout=BUDGET_S + 60)
    wall = time.monotonic() - start
    assert proc.returncode == 0, proc.stderr[-3000:]
    steps = {s.name: json.loads((out / f"{s.name}.json").read_text()) for s in ALL_STEPS}
    return {"out": out, "proc": proc, "wall": wall, "steps": steps, "root": root,
            "summary": json.loads((out / "summary.json").read_text())}


def _ran_or_out_of_budget(record: dict) -> bool:
    """On a busy machine the budget may skip the last steps; anything else must have run."""
    return record["status"] != "skipped" or record["reason"].startswith("budget:")


def test_every_step_leaves_its_json_with_the_fields(dry_run):
    for name, record in dry_run["steps"].items():
        assert FIELDS <= set(record), (name, FIELDS - set(record))
        assert record["step"] == name and record["dry_run"] is True
        assert record["status"] in ("ok", "failed", "timeout", "skipped"), record
        if record["status"] == "skipped":
            assert record["reason"] and record["command"] is None
        else:
            assert record["command"] and record["wall_s"] >= 0 and record["timeout_s"] > 0
        if record["status"] in ("failed", "timeout"):
            assert record["reason"] and record["stderr_tail"] is not None
        if record["met"] is not None:
            assert record["target"]["op"] in (">=", "<=") and record["status"] == "ok"


def test_summary_log_and_bundle(dry_run):
    summary, out = dry_run["summary"], dry_run["out"]
    assert summary["finished"] is True and summary["dry_run"] is True
    assert set(summary["steps"]) == {s.name for s in ALL_STEPS}
    assert summary["wall_s"] <= summary["budget_s"] == BUDGET_S
    assert dry_run["wall"] <= BUDGET_S + 30  # the budget holds, start-up and summary included
    assert {row["step"] for row in summary["figures"]} >= {"p1_l32", "p3_train", "p4_cache", "p6_gfid"}
    log = (out / "gpu_check.log").read_text()
    for name, record in dry_run["steps"].items():
        assert name in log
        if record["command"]:
            assert record["command"] in log
    assert "p1_l32" in dry_run["proc"].stdout and "status" in summary["table"]  # the printed table
    with tarfile.open(dry_run["root"] / "bundle.tar") as tar:
        names = {Path(n).name for n in tar.getnames()}
    assert {"summary.json", "gpu_check.log", "p1_l32.json", "probe_p6_gfid.json"} <= names


def test_the_cheap_figures_run_on_cpu(dry_run):
    steps = dry_run["steps"]
    env, p1 = steps["env"], steps["p1_l32"]
    assert env["status"] == "ok" and env["facts"]["torch"]
    assert p1["status"] == "ok", p1["stderr_tail"]
    assert p1["value"] > 0 and p1["met"] is False and p1["target"]["value"] == 800
    # Eager and "fast" (uncompiled on CPU) are the same arithmetic: the same ids and pixels.
    assert p1["agreement"]["ids_equal_share"] == 1.0 and p1["agreement"]["decoder_max_abs_diff_uint8"] == 0
    assert "titok_bench.sampling" in p1["command"] and "--dry-run" not in p1["command"]
    for name in ("p3_train", "p4_cache", "p6_gfid", "profile_p1_l32"):
        assert _ran_or_out_of_budget(steps[name]), steps[name]
        if steps[name]["status"] != "skipped":
            assert steps[name]["status"] == "ok", (name, steps[name]["reason"], steps[name]["stderr_tail"])
    if steps["p4_cache"]["status"] == "ok":
        assert 0.0 <= steps["p4_cache"]["agreement"]["tokens_equal_share"] <= 1.0
    if steps["p6_gfid"]["status"] == "ok":
        assert steps["p6_gfid"]["extrapolated_from"] == 10 and steps["p6_gfid"]["value"] > 0
    if steps["profile_p1_l32"]["status"] == "ok":
        assert steps["profile_p1_l32"]["top"] and "Name" in steps["profile_p1_l32"]["table"]
    assert steps["profile_p3_train"]["status"] == "skipped"  # one profile in a dry run
    assert steps["gpu_tests"]["status"] == "skipped" and "CUDA" in steps["gpu_tests"]["reason"]
    for name in ("probe_p1_l32", "probe_p6_gfid"):
        assert steps[name]["status"] == "skipped" and "CUDA" in steps[name]["reason"]


def test_a_failed_and_a_hung_step_are_recorded_and_the_run_goes_on(dry_run):
    steps = dry_run["steps"]
    failed, hung = steps["p1b_b64"], steps["p1b_s128"]
    assert failed["status"] == "failed" and failed["rc"] != 0 and failed["met"] is None
    assert "forced failure of p1b_b64" in failed["stderr_tail"]
    assert hung["status"] == "timeout" and "limit" in hung["reason"] and hung["wall_s"] < 20
    after = steps["profile_p1_l32"]  # the next step that runs
    assert _ran_or_out_of_budget(after) and after["status"] in ("ok", "skipped"), after


def test_the_official_side_by_side_is_read(dry_run):
    steps = dry_run["steps"]
    sbs = steps["sbs_official"]  # a stand-in for the official side-by-side tool
    assert sbs["status"] == "ok", (sbs["reason"], sbs["stderr_tail"])
    assert sbs["official_samples_per_s"] == 2.0 and sbs["batch_size"] == steps["p1_l32"]["batch_size"]
    assert sbs["value"] == round(steps["p1_l32"]["value"] / 2.0, 2) and sbs["met"] == (sbs["value"] >= 3)


def test_a_short_budget_skips_with_the_reason(tmp_path):
    proc = _gpu_check(tmp_path, "--dry-run", "--budget-s", "1", timeout=60)
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["finished"] is True
    for name in ("env", "p1_l32", "p6_gfid"):
        record = json.loads((tmp_path / f"{name}.json").read_text())
        assert record["status"] == "skipped" and record["reason"].startswith("budget:"), record


def test_without_cuda_a_full_run_stops_after_the_facts(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("with a GPU this would be the real run")
    proc = _gpu_check(tmp_path, "--budget-s", "60", "--only", "env,p1_l32", timeout=90)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads((tmp_path / "env.json").read_text())["facts"]["cuda_available"] is False
    p1 = json.loads((tmp_path / "p1_l32.json").read_text())
    assert p1["status"] == "skipped" and "no CUDA device" in p1["reason"]
    assert not (tmp_path / "p3_train.json").exists()  # not selected: no record


class _Parsed(Exception):
    pass


def _parse_with_benchmark(module: str, args: list[str]) -> dict:
    """The namespace the benchmark's own argparse makes of ``args`` (an unknown option exits 2), taken
    before the benchmark runs anything."""
    import argparse
    import importlib

    real = argparse.ArgumentParser.parse_args

    def capture(self, argv=None, namespace=None):
        raise _Parsed(vars(real(self, argv, namespace)))

    bench = importlib.import_module(module)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(argparse.ArgumentParser, "parse_args", capture)
        with pytest.raises(_Parsed) as got:
            bench.main(list(args))
    return got.value.args[0]


def test_the_gpu_commands_use_only_options_their_benchmarks_have(tmp_path):
    """Every --option of every step's command on CUDA is one its benchmark's argparse declares
    (no device needed: the commands are built, not run)."""
    run = Run(parse_args([str(tmp_path / "out")]))
    try:
        checked = 0
        for step in ALL_STEPS:
            plan = step.plan(run)
            if not isinstance(plan, Plan):
                continue
            argv = plan.argv
            if argv[1:2] == ["-m"] and argv[2].startswith("titok_bench.") and argv[2] != "titok_bench.gpu_check":
                module, args = argv[2], argv[3:]
            elif argv[2:5] == ["titok_bench.gpu_check", "--child", "run"]:
                cut = argv.index("--")
                module, args = argv[cut - 1], argv[cut + 1:]
            else:
                continue
            parsed = _parse_with_benchmark(module, args)
            for option in (a for a in args if a.startswith("--")):
                assert option.lstrip("-").replace("-", "_") in parsed, (step.name, module, option)
            assert "--device" in args and args[args.index("--device") + 1] == "cuda", step.name
            checked += 1
        assert checked >= 10
    finally:
        run.close()


def test_helpers(tmp_path):
    assert _replace(["--steps", "30", "--compile", "--probe", "yes"], {"--steps": 5, "--probe": "no", "--x": 1}) == [
        "--steps", "5", "--compile", "--probe", "no", "--x", "1"]
    xml = tmp_path / "r.xml"
    xml.write_text('<testsuites><testsuite><testcase classname="t" name="a" time="1.5"/>'
                   '<testcase classname="t" name="b"><failure message="boom"/></testcase>'
                   '<testcase classname="t" name="c"><skipped message="needs a CUDA GPU"/></testcase>'
                   '</testsuite></testsuites>')
    r = _junit(xml)
    assert (r["tests"], r["passed"], r["failed"], r["skipped"], r["errors"]) == (3, 1, 1, 1, 0)
    assert r["cases"][1]["message"] == "boom"

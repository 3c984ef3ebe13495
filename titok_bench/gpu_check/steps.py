"""The steps of the GPU check: what each runs (a :class:`Plan`: a command, and how its JSON result
becomes the step's record), in the order they run, with their time limits and targets. Every
``plan_*`` function takes the run (:class:`titok_bench.gpu_check.supervisor.Run`: its options,
dry-run configs, temporary folder and the records so far) and returns a Plan or the reason to skip."""
from __future__ import annotations

import os
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parents[2]
OFFICIAL_CONFIG = Path("configs") / "infer" / "TiTok" / "titok_l32.yaml"


@dataclass
class Plan:
    """How a step runs: argv (a subprocess), extra environment, and how its JSON line becomes a record."""

    argv: list[str]
    summarize: Callable[[dict], dict]
    env: dict = field(default_factory=dict)
    parse: str = "json"  # json: the last JSON line of stdout; junit: pytest's XML; lines: every JSON line


@dataclass
class Step:
    """One step: its name, what it measures, its limit and the least budget it needs, and its plan."""

    name: str
    title: str
    timeout_s: float  # its own limit on CUDA
    min_s: float  # skipped when the budget left is below this
    plan: Callable[..., "Plan | str"]  # a str is the reason to skip
    group: str = "figure"


def _bench(module: str, *args) -> list[str]:
    return [sys.executable, "-m", module, *map(str, args)]


def _child(mode: str, *args) -> list[str]:
    return [sys.executable, "-m", "titok_bench.gpu_check", "--child", mode, *map(str, args)]


def _met(value, op: str, target: float):
    if value is None:
        return None
    return bool(value >= target if op == ">=" else value <= target)


def _target(op: str, value: float, unit: str) -> dict:
    return {"op": op, "value": value, "unit": unit, "text": f"{op} {value:,g} {unit}"}


def _path_errors(result: dict) -> str | None:
    errors = [f"{k}: {v['error']}" for k, v in result.get("paths", {}).items() if isinstance(v, dict) and "error" in v]
    return "; ".join(errors) or None


# ---- env


def plan_env(run) -> Plan:
    def summarize(r: dict) -> dict:
        cuda = r.get("cuda_available")
        out = {"figure": "device", "value": r.get("device_name"), "unit": None, "met": None, "facts": r}
        if r.get("missing_packages"):
            missing = ", ".join(r["missing_packages"])
            out["note"] = f"missing: {missing} (pip install -e . in the repository installs them)"
        if not run.dry_run and not cuda:
            out["stop"] = "no CUDA device (env step); on CPU run with --dry-run"
        return out

    return Plan(_child("env", "--dry-run" if run.dry_run else "--full"), summarize)


# ---- sampling (P1, P1b, the P1 probe)


def _sampling_args(run, preset: str, batch: int, batches: int, warmup: int) -> list:
    if run.dry_run:
        tiny = run.tiny[preset]
        return ["--generator-spec", tiny, "--tokenizer-spec", tiny, "--device", "cpu", "--dtype", "fp32", "--batch-size", 4,
                "--batches", 1, "--warmup", 1, "--sampler-compile", "none", "--decoder-compile", "none"]
    return ["--generator-spec", preset, "--device", "cuda", "--dtype", "bf16", "--batch-size", batch, "--batches", batches,
            "--warmup", warmup, "--sampler-compile", "reduce-overhead", "--decoder-compile", "default"]


def _summarize_sampling(target: dict | None) -> Callable[[dict], dict]:
    def summarize(r: dict) -> dict:
        fast, eager = r["paths"].get("fast", {}), r["paths"].get("eager", {})
        value = fast.get("samples_per_s")
        out = {
            "figure": "fast path samples/s (labels -> uint8 images)", "value": value, "unit": "samples/s",
            "target": target, "met": _met(value, target["op"], target["value"]) if target else None,
            "peak_memory_mb": fast.get("peak_memory_mb"),
            "largest_batch": fast.get("largest_batch") or eager.get("largest_batch"),
            "agreement": r.get("agreement"), "batch_size": r.get("batch_size"),
            "eager_samples_per_s": eager.get("samples_per_s"), "fast_over_eager": r.get("fast_over_eager"),
            "generator_s_per_batch": {k: v.get("generator_s_per_batch") for k, v in (("eager", eager), ("fast", fast))},
            "decoder_s_per_batch": {k: v.get("decoder_s_per_batch") for k, v in (("eager", eager), ("fast", fast))},
            "sampling": r.get("sampling"),
        }
        if _path_errors(r):
            out["error"] = _path_errors(r)
        return out

    return summarize


def plan_p1(run) -> Plan:
    args = _sampling_args(run, "maskgit_l32", run.args.p1_batch, 8, 3)
    return Plan(_bench("titok_bench.sampling", *args, "--paths", "eager,fast", "--probe", "no"),
                _summarize_sampling(_target(">=", 800, "samples/s")))


def _plan_p1b(preset: str) -> Callable[..., Plan]:
    def plan(run) -> Plan:
        args = _sampling_args(run, preset, run.args.p1b_batch, 3, 2)
        return Plan(_bench("titok_bench.sampling", *args, "--paths", "eager,fast", "--probe", "no"),
                    _summarize_sampling(None))

    return plan


def plan_probe_p1(run) -> Plan | str:
    if run.dry_run:
        return "dry-run: the largest-batch probe measures running out of CUDA memory (None on CPU)"
    args = _sampling_args(run, "maskgit_l32", run.args.p1_batch, 1, 0)

    def summarize(r: dict) -> dict:
        eager = r["paths"].get("eager", {})
        return {"figure": "largest batch, L-32 eager sampling + decoding", "value": eager.get("largest_batch"),
                "unit": "samples", "met": None, "largest_batch": eager.get("largest_batch"),
                "largest_batch_limited": eager.get("largest_batch_limited"),
                "peak_memory_mb": eager.get("peak_memory_mb"), "error": _path_errors(r)}

    return Plan(_bench("titok_bench.sampling", *args, "--paths", "eager", "--probe", "yes", "--max-batch", 4096),
                summarize)


# ---- gpu tests


def plan_gpu_tests(run) -> Plan | str:
    if run.dry_run:
        return "dry-run: the gpu tests need CUDA (pytest -m gpu skips them on CPU)"
    xml = run.tmp / "gpu_tests.xml"
    # Only the files that hold gpu tests: collecting the others would import optional extras (gradio).
    files = sorted(str(f.relative_to(REPO)) for f in (REPO / "tests").glob("test_*.py")
                   if "mark.gpu" in f.read_text(errors="replace"))
    if not files:
        return "no test file holds a gpu test"
    argv = [sys.executable, "-m", "pytest", "-m", "gpu", "-o", "addopts=", "-p", "no:cacheprovider", "-q", "-rA",
            "--continue-on-collection-errors", f"--junitxml={xml}", *files]

    def summarize(r: dict) -> dict:
        bad = r["failed"] + r["errors"]
        return {"figure": "gpu tests passed", "value": r["passed"], "unit": "tests",
                "target": {"op": "all", "value": r["tests"], "unit": "tests", "text": "all pass, none fail"},
                "met": bool(bad == 0 and r["passed"] > 0), "tests": r}

    return Plan(argv, summarize, parse=f"junit:{xml}")


# ---- training (P3)


def plan_p3(run) -> Plan:
    if run.dry_run:
        args = ["--generator-spec", run.tiny["maskgit_l32"], "--device", "cpu", "--dtype", "fp32", "--batch-size", 8,
                "--steps", 2, "--warmup", 1, "--cache-size", 64, "--num-workers", 0]
    else:
        args = ["--generator-spec", "maskgit_l32", "--device", "cuda", "--dtype", "bf16", "--batch-size", run.args.p3_batch,
                "--steps", 30, "--warmup", 5, "--compile", "--fused", "yes", "--probe", "yes", "--max-batch", 16384]
    target = _target(">=", 10_000, "samples/s")

    def summarize(r: dict) -> dict:
        value = r.get("samples_per_s")
        return {"figure": "training samples/s (Trainer.fit, cache on the device)", "value": value,
                "unit": "samples/s", "target": target, "met": _met(value, ">=", 10_000),
                "peak_memory_mb": r.get("peak_memory_mb"), "largest_batch": r.get("largest_batch"),
                "largest_batch_limited": r.get("largest_batch_limited"), "batch_size": r.get("batch_size"),
                "steps_per_s": r.get("steps_per_s"), "tokens_per_s": r.get("tokens_per_s"),
                "last_loss": r.get("last_loss"), "params_m": r.get("params_m"),
                "note": "largest batch probed with eager steps" if r.get("largest_batch") else None}

    return Plan(_bench("titok_bench.generator", *args, "--trainer", "--data", "device"), summarize)


# ---- token cache (P4)


def plan_p4(run) -> Plan:
    if run.dry_run:
        args = ["--tokenizer-spec", run.tiny["maskgit_l32"], "--device", "cpu", "--dtype", "fp32", "--images", 8,
                "--batch-size", 4, "--num-workers", 0, "--warmup-batches", 1]
    else:
        args = ["--tokenizer-spec", "titok_l32", "--device", "cuda", "--dtype", "bf16", "--images", 4096,
                "--batch-size", 256, "--num-workers", min(16, os.cpu_count() or 1), "--warmup-batches", 2,
                "--probe", "yes", "--max-batch", 4096]
    target = _target(">=", 1200, "images/s")

    def summarize(r: dict) -> dict:
        device, pil = r["paths"].get("device", {}), r["paths"].get("pil", {})
        value = device.get("images_per_s")
        return {"figure": "token cache images/s (nvJPEG decode on the device, encode, write)", "value": value,
                "unit": "images/s", "target": target, "met": _met(value, ">=", 1200),
                "peak_memory_mb": device.get("peak_memory_mb"), "largest_batch": r.get("largest_batch"),
                "largest_batch_limited": r.get("largest_batch_limited"), "agreement": r.get("agreement"),
                "pil_images_per_s": pil.get("images_per_s"),
                "decode_only_images_per_s": {"device": device.get("decode_only_images_per_s"),
                                             "pil": pil.get("decode_only_images_per_s")},
                "note": "largest batch: encoding (image + mirror) alone"}

    return Plan(_bench("titok_bench.cache", *args, "--decode", "pil,device"), summarize)


# ---- gFID (P6, its probe)

P6_SAMPLES = 50_000


def _eval_args(run, num_samples: int, *, compiled: bool) -> list:
    if run.dry_run:
        tiny = run.tiny["maskgit_l32"]
        # Inception's IS needs 10 images (10 splits).
        return ["--generator-spec", tiny, "--tokenizer-spec", tiny, "--device", "cpu", "--num-samples", 10, "--batch-size", 5,
                "--warmup-samples", 0]
    modes = ["--sampler-compile", "reduce-overhead", "--decoder-compile", "default"] if compiled else []
    return ["--generator-spec", "maskgit_l32", "--device", "cuda", "--num-samples", num_samples,
            "--batch-size", run.args.p6_batch, *modes]


def plan_p6(run) -> Plan:
    args = [*_eval_args(run, run.args.p6_samples, compiled=True), "--probe", "no"]
    target = _target("<=", 120, f"s for {P6_SAMPLES:,} samples")
    if run.dry_run:  # the FID's matrix square root is half a minute of CPU; the figure does not include it
        argv = _child("run", "--cheap-fid", "titok_bench.eval", "--", *args)
    else:
        argv = _bench("titok_bench.eval", *args)

    def summarize(r: dict) -> dict:
        n, seconds = r.get("num_samples"), r.get("seconds")
        value = None if not n or seconds is None else round(seconds * P6_SAMPLES / n, 1)
        return {"figure": f"eval.gfid mode=inception, seconds for {P6_SAMPLES:,} samples", "value": value, "unit": "s",
                "target": target, "met": _met(value, "<=", 120), "extrapolated_from": None if n == P6_SAMPLES else n,
                "peak_memory_mb": r.get("peak_memory_mb"), "largest_batch": r.get("largest_batch"),
                "samples_per_s": r.get("samples_per_s"), "batch_size": r.get("batch_size"),
                "sampler_compile": r.get("sampler_compile"), "decoder_compile": r.get("decoder_compile")}

    return Plan(argv, summarize)


def plan_probe_p6(run) -> Plan | str:
    if run.dry_run:
        return "dry-run: the largest-batch probe measures running out of CUDA memory (None on CPU)"
    args = [*_eval_args(run, run.args.p6_batch, compiled=False), "--warmup-samples", 0, "--probe", "yes",
            "--max-batch", 4096]

    def summarize(r: dict) -> dict:
        return {"figure": "largest batch, gFID sampling + decoding + Inception (eager)",
                "value": r.get("largest_batch"), "unit": "samples", "met": None,
                "largest_batch": r.get("largest_batch"), "largest_batch_limited": r.get("largest_batch_limited"),
                "peak_memory_mb": r.get("peak_memory_mb")}

    return Plan(_bench("titok_bench.eval", *args), summarize)


# ---- the official code side by side


def plan_sbs(run) -> Plan | str:
    tool, official = run.sbs_tool, run.official
    if run.dry_run and not (run.args.sbs_tool and run.args.official):
        return "dry-run: the official code has no tiny sizes (pass --sbs-tool and --official to run it anyway)"
    if tool is None:
        return "no side-by-side tool (--sbs-tool: a script that times the official code, see docs/gpu_check.md)"
    if not tool.is_file():
        return f"no side-by-side tool at {tool} (--sbs-tool)"
    if official is None or not (official / "modeling").is_dir():
        return f"no official checkout (a folder with modeling/; --official or $TITOK_OFFICIAL_DIR), got {official}"
    config = official / OFFICIAL_CONFIG
    if not config.is_file():
        return f"no {OFFICIAL_CONFIG} in the official checkout {official}"
    config_dir = run.tmp / "sbs_configs"
    for sub in ("tokenizer", "generator"):
        (config_dir / sub).mkdir(parents=True, exist_ok=True)
        shutil.copyfile(config, config_dir / sub / "config.yaml")
    p1 = run.records.get("p1_l32", {})
    batch = p1.get("batch_size") or (4 if run.dry_run else run.args.p1_batch)
    env = {"SBS_SAMPLE": str(batch), "SBS_DEVICE": "cpu" if run.dry_run else "cuda"}
    target = _target(">=", 3, "x the official samples/s")

    def summarize(lines: list[dict]) -> dict:
        samples = [x for x in lines if x.get("what") == "sample" and x.get("batch") == batch and "error" not in x]
        best = {who: max((x["samples_per_s"] for x in samples if x["who"] == who), default=None)
                for who in ("official", "ours")}
        ours_fast = p1.get("value") if p1.get("status") == "ok" else run.args.p1_value
        ratio = round(ours_fast / best["official"], 2) if ours_fast and best["official"] else None
        eager = round(best["ours"] / best["official"], 2) if best["ours"] and best["official"] else None
        return {"figure": "P1 fast path / official generate + decode_tokens (best of fp32, bf16)", "value": ratio,
                "unit": "x", "target": target, "met": _met(ratio, ">=", 3), "batch_size": batch,
                "official_samples_per_s": best["official"], "ours_eager_samples_per_s_in_tool": best["ours"],
                "ours_eager_over_official": eager,
                "ours_fast_samples_per_s_p1": ours_fast,
                "peak_memory_mb": _official_peak_mb(samples), "lines": lines,
                "note": None if ours_fast else "P1 did not run: no ratio"}

    argv = [sys.executable, str(tool), str(official), str(config_dir), "sample"]
    return Plan(argv, summarize, env=env, parse="lines")


def _official_peak_mb(samples: list[dict]) -> float | None:
    peaks = [x["peak_gb"] for x in samples if x.get("who") == "official" and x.get("peak_gb") is not None]
    return round(max(peaks) * 1024, 1) if peaks else None


# ---- profiles


PROFILED = ("p1_l32", "p3_train", "p4_cache", "p6_gfid")


def plan_profile(of: str) -> Callable[..., Plan | str]:
    def plan(run) -> Plan | str:
        if of == "p1_l32":
            args = ["titok_bench.sampling", "--", *_sampling_args(run, "maskgit_l32", run.args.p1_batch, 2, 2),
                    "--paths", "fast", "--probe", "no"]
        elif of == "p3_train":
            bench = plan_p3(run).argv[3:]
            args = ["titok_bench.generator", "--", *_replace(bench, {"--steps": 5, "--warmup": 3, "--probe": "no"})]
        elif of == "p4_cache":
            bench = plan_p4(run).argv[3:]
            args = ["titok_bench.cache", "--", *_replace(bench, {"--images": 8 if run.dry_run else 1024,
                                                                  "--decode": "device", "--probe": "no",
                                                                  "--warmup-batches": 1})]
        else:
            n = 10 if run.dry_run else 2000
            args = ["titok_bench.eval", "--", *_replace(_eval_args(run, n, compiled=True),
                                                        {"--warmup-samples": 0 if run.dry_run else 1000}),
                    "--probe", "no"]
        cheap = ["--cheap-fid"] if run.dry_run and of == "p6_gfid" else []

        def summarize(r: dict) -> dict:
            prof = r.get("profile", {})
            return {"figure": f"top kernels of {of} (reduced size)", "value": None, "unit": None, "met": None,
                    "profile_of": of, "sorted_by": prof.get("sorted_by"), "top": prof.get("top"),
                    "table": prof.get("table"), "benchmark_result": r.get("result")}

        return Plan(_child("run", "--profile", *cheap, *args), summarize)

    return plan


def _replace(argv: list, values: dict) -> list:
    """argv with the values of some --options replaced (or appended)."""
    out, i, seen = [], 0, set()
    while i < len(argv):
        a = str(argv[i])
        if a in values:
            out += [a, str(values[a])]
            seen.add(a)
            i += 2 if i + 1 < len(argv) and not str(argv[i + 1]).startswith("--") else 1
            continue
        out.append(a)
        i += 1
    for k, v in values.items():
        if k not in seen:
            out += [k, str(v)]
    return out


STEPS = [
    Step("env", "environment facts", 90, 20, plan_env, group="env"),
    Step("p1_l32", "P1: L-32 sampling end to end, eager vs fast", 300, 120, plan_p1),
    Step("gpu_tests", "pytest -m gpu", 240, 60, plan_gpu_tests, group="tests"),
    Step("p3_train", "P3: maskgit_l32 training from the token cache on the device", 240, 120, plan_p3),
    Step("p4_cache", "P4: token cache from JPEGs, nvJPEG", 180, 60, plan_p4),
    # Before P6 and P1b: a target of its own, and it costs nothing without an official checkout.
    Step("sbs_official", "P1 against the official code on the same GPU", 300, 90, plan_sbs, group="sbs"),
    Step("p6_gfid", "P6: eval.gfid mode=inception, 50,000 L-32 samples", 330, 200, plan_p6),
    Step("p1b_b64", "P1b: B-64 sampling end to end (report)", 240, 90, _plan_p1b("maskgit_b64")),
    Step("p1b_s128", "P1b: S-128 sampling end to end (report)", 300, 120, _plan_p1b("uvit_s128")),
]
PROFILE_STEPS = [Step(f"profile_{of}", f"torch.profiler top kernels: {of}", 240, 60, plan_profile(of), group="profile")
                 for of in PROFILED]
PROBE_STEPS = [
    Step("probe_p1_l32", "largest batch: L-32 sampling (eager path)", 200, 60, plan_probe_p1, group="probe"),
    Step("probe_p6_gfid", "largest batch: gFID (eager sampling, decoding, Inception)", 240, 90, plan_probe_p6,
         group="probe"),
]
ALL_STEPS = STEPS + PROFILE_STEPS + PROBE_STEPS

"""The GPU check: the GPU-only code paths and the headline figures, in one budgeted run.

    python -m titok_bench.gpu_check OUT_DIR                  # on a CUDA GPU (about 8 minutes)
    python -m titok_bench.gpu_check OUT_DIR --dry-run        # on CPU, tiny sizes, well under a minute
    python -m titok_bench.gpu_check OUT_DIR --only p6_gfid,sbs_official --budget-s 300   # a rerun
    python -m titok_bench.gpu_check OUT_DIR --list           # the steps, their limits, nothing run

A sequence of steps, cheapest and most important first, so that a run cut short still leaves the
figures that matter most. Each step is a subprocess with its own time limit (a hang or a CUDA
crash in one cannot take the rest down); it writes OUT_DIR/<step>.json and appends its output to
OUT_DIR/gpu_check.log. A step that fails or times out is recorded and the run goes on; when the
budget (``--budget-s``) no longer covers a step's minimum it is skipped with the reason. After
every step OUT_DIR/summary.json is rewritten (``finished`` false until the end) and, with
``--bundle FILE``, a tar of OUT_DIR, so that even a killed run leaves its results. At the end a
short table is printed.

Steps (random weights at full size on CUDA; the benchmarks of titok_bench do the measuring):

    env            facts: GPU, driver, versions, missing packages, nvJPEG, a bf16 matmul
    p1_l32         P1: L-32 labels -> uint8 images, 8 steps + guidance, eager and fast paths
                   (StaticSampler in CUDA graphs, FastDecoder channels_last, streams); >= 800 /s;
                   the fast path's agreement with the eager one (ids, pixels)
    gpu_tests      pytest -m gpu
    p3_train       P3: maskgit_l32 training steps (compiled, fused AdamW + clipping, bf16) from a
                   token cache held on the device, inside Trainer.fit; >= 10,000 samples/s
    p4_cache       P4: token cache from JPEGs, nvJPEG decode on the device; >= 1,200 images/s;
                   agreement of tokens and pixels with the PIL path
    sbs_official   P1 against the official generate + decode_tokens (../shared/tools/
                   official_side_by_side.py and an official checkout, where present); >= 3x
    p6_gfid        P6: eval.gfid mode=inception, 50,000 L-32 samples; <= 120 s
    p1b_b64        P1b: B-64, as P1 (report)
    p1b_s128       P1b: S-128, as P1 (report)
    profile_<step> a torch.profiler table of the top kernels, for each figure short of its target
    probe_<step>   the largest batch that fits (P1: eager path; P6: eager sampling + decoding)

``--dry-run`` runs every step on CPU with tiny official-format configs (written to a temporary
folder), a few samples and batches, the compile modes off; steps that need CUDA-only code (the
gpu tests, the largest-batch probes, which measure running out of CUDA memory) are skipped with
the reason, and so is the official side by side unless --sbs-tool and --official are given. In
the dry run's P6 the FID's 2048x2048 matrix square root (half a minute of CPU) is replaced by a
diagonal stand-in: the figure is the sampling loop's time, not the FID.

Test-only switches (environment): TITOK_GPU_CHECK_FAIL=step[,step] makes those steps' commands
raise; TITOK_GPU_CHECK_HANG=step[,step] makes them sleep under a 2-second limit.
"""
from __future__ import annotations

import argparse
import datetime as dt
import io
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable
from xml.etree import ElementTree

REPO = Path(__file__).resolve().parent.parent
DEFAULT_SBS_TOOL = REPO.parent / "shared" / "tools" / "official_side_by_side.py"
OFFICIAL_CONFIG = Path("configs") / "infer" / "TiTok" / "titok_l32.yaml"
LOG_NAME = "gpu_check.log"
# Packages the GPU image lacks (they travel as wheels, see scripts/gpu_check.sh).
NEEDED = {"hydra": "hydra-core", "omegaconf": "omegaconf", "antlr4": "antlr4-python3-runtime",
          "torch_fidelity": "torch-fidelity"}
VERSIONS = ("torch", "torchvision", "triton", "lightning", "hydra-core", "omegaconf", "antlr4-python3-runtime",
            "torch-fidelity", "numpy", "scipy", "pillow", "transformers", "pytest")


# ---------------------------------------------------------------- steps


@dataclass
class Plan:
    """How a step runs: argv (a subprocess), extra environment, and how its JSON line becomes a record."""

    argv: list[str]
    summarize: Callable[[dict], dict]
    env: dict = field(default_factory=dict)
    parse: str = "json"  # json: the last JSON line of stdout; junit: pytest's XML; lines: every JSON line


@dataclass
class Step:
    name: str
    title: str
    timeout_s: float  # its own limit on CUDA
    min_s: float  # skipped when the budget left is below this
    plan: Callable[["Run"], "Plan | str"]  # a str is the reason to skip
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


def plan_env(run: "Run") -> Plan:
    def summarize(r: dict) -> dict:
        cuda = r.get("cuda_available")
        out = {"figure": "device", "value": r.get("device_name"), "unit": None, "met": None, "facts": r}
        if r.get("missing_packages"):
            out["note"] = "missing: " + ", ".join(r["missing_packages"]) + " (carry the wheels: scripts/gpu_check.sh)"
        if not run.dry_run and not cuda:
            out["stop"] = "no CUDA device (env step); on CPU run with --dry-run"
        return out

    return Plan(_child("env", "--dry-run" if run.dry_run else "--full"), summarize)


# ---- sampling (P1, P1b, the P1 probe)


def _sampling_args(run: "Run", preset: str, batch: int, batches: int, warmup: int) -> list:
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


def plan_p1(run: "Run") -> Plan:
    args = _sampling_args(run, "maskgit_l32", run.args.p1_batch, 8, 3)
    return Plan(_bench("titok_bench.sampling", *args, "--paths", "eager,fast", "--probe", "no"),
                _summarize_sampling(_target(">=", 800, "samples/s")))


def _plan_p1b(preset: str) -> Callable[["Run"], Plan]:
    def plan(run: "Run") -> Plan:
        args = _sampling_args(run, preset, run.args.p1b_batch, 3, 2)
        return Plan(_bench("titok_bench.sampling", *args, "--paths", "eager,fast", "--probe", "no"),
                    _summarize_sampling(None))

    return plan


def plan_probe_p1(run: "Run") -> Plan | str:
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


def plan_gpu_tests(run: "Run") -> Plan | str:
    if run.dry_run:
        return "dry-run: the gpu tests need CUDA (pytest -m gpu skips them on CPU)"
    xml = run.tmp / "gpu_tests.xml"
    # Only the files that hold gpu tests: collecting the others would import what the GPU image lacks (gradio).
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


def _junit(path: Path) -> dict:
    """pytest's JUnit XML -> counts and one entry per test (outcome, seconds, the message of a non-pass)."""
    out = {"tests": 0, "passed": 0, "failed": 0, "errors": 0, "skipped": 0, "cases": []}
    for case in ElementTree.parse(path).getroot().iter("testcase"):
        outcome, message = "passed", None
        for tag, name in (("failure", "failed"), ("error", "errors"), ("skipped", "skipped")):
            node = case.find(tag)
            if node is not None:
                outcome, message = name, (node.get("message") or node.text or "")[:500]
                break
        out["tests"] += 1
        out[outcome] += 1
        out["cases"].append({"test": f"{case.get('classname')}::{case.get('name')}", "outcome": outcome,
                             "seconds": float(case.get("time") or 0), "message": message})
    return out


# ---- training (P3)


def plan_p3(run: "Run") -> Plan:
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


def plan_p4(run: "Run") -> Plan:
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


def _eval_args(run: "Run", num_samples: int, *, compiled: bool) -> list:
    if run.dry_run:
        tiny = run.tiny["maskgit_l32"]
        # Inception's IS needs 10 images (10 splits).
        return ["--generator-spec", tiny, "--tokenizer-spec", tiny, "--device", "cpu", "--num-samples", 10, "--batch-size", 5,
                "--warmup-samples", 0]
    modes = ["--sampler-compile", "reduce-overhead", "--decoder-compile", "default"] if compiled else []
    return ["--generator-spec", "maskgit_l32", "--device", "cuda", "--num-samples", num_samples,
            "--batch-size", run.args.p6_batch, *modes]


def plan_p6(run: "Run") -> Plan:
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


def plan_probe_p6(run: "Run") -> Plan | str:
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


def plan_sbs(run: "Run") -> Plan | str:
    tool, official = run.sbs_tool, run.official
    if run.dry_run and not (run.args.sbs_tool and run.args.official):
        return "dry-run: the official code has no tiny sizes (pass --sbs-tool and --official to run it anyway)"
    if tool is None or not tool.is_file():
        return f"no side-by-side tool at {tool or DEFAULT_SBS_TOOL} (--sbs-tool)"
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


def plan_profile(of: str) -> Callable[["Run"], Plan | str]:
    def plan(run: "Run") -> Plan | str:
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
# Figures of the summary table: (label, step, step with its largest batch).
FIGURES = [
    ("P1 L-32", "p1_l32", "probe_p1_l32"), ("P1 vs official", "sbs_official", None), ("gpu tests", "gpu_tests", None),
    ("P3 train", "p3_train", None), ("P4 cache", "p4_cache", None), ("P1b B-64", "p1b_b64", None),
    ("P1b S-128", "p1b_s128", None), ("P6 gFID", "p6_gfid", "probe_p6_gfid"),
]


# ---------------------------------------------------------------- tiny configs (dry run)


def _tiny_config(path: Path, *, model_type: str, num_tokens: int, guidance_decay: str) -> str:
    """An official-format config (tokenizer + generator) at toy size: crop 64, 2-layer ViTs, 64 codes."""
    path.write_text(f"""\
model:
  vq_model:
    codebook_size: 64
    token_size: 12
    use_l2_norm: true
    commitment_cost: 0.25
    vit_enc_model_size: tiny
    vit_dec_model_size: tiny
    vit_enc_patch_size: 16
    vit_dec_patch_size: 16
    num_latent_tokens: {num_tokens}
    finetune_decoder: true
    pixel_decoder_hidden_channels: 32
  generator:
    model_type: {model_type}
    hidden_size: 64
    num_hidden_layers: 2
    num_attention_heads: 4
    intermediate_size: 128
    dropout: 0.1
    attn_drop: 0.1
    num_steps: 8
    class_label_dropout: 0.1
    image_seq_len: {num_tokens}
    condition_num_classes: 10
    randomize_temperature: 9.5
    guidance_scale: 4.5
    guidance_decay: {guidance_decay}
dataset:
  preprocessing:
    crop_size: 64
""")
    return str(path)


# ---------------------------------------------------------------- the run


class Run:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.dry_run = args.dry_run
        self.out = Path(args.out_dir).resolve()
        self.out.mkdir(parents=True, exist_ok=True)
        self.budget = args.budget_s if args.budget_s is not None else (180.0 if self.dry_run else 480.0)
        self.reserve = 2.0 if self.dry_run else 10.0  # for the summary and the bundle
        self.t0 = time.monotonic()
        self.started = _now()
        self.tmp = Path(tempfile.mkdtemp(prefix="gpu_check_"))
        self.records: dict[str, dict] = {}
        self.stop: str | None = None
        self.log = open(self.out / LOG_NAME, "a", buffering=1)
        self.fail = set(filter(None, os.environ.get("TITOK_GPU_CHECK_FAIL", "").split(",")))
        self.hang = set(filter(None, os.environ.get("TITOK_GPU_CHECK_HANG", "").split(",")))
        self.sbs_tool = Path(args.sbs_tool).resolve() if args.sbs_tool else DEFAULT_SBS_TOOL
        official = args.official or os.environ.get("TITOK_OFFICIAL_DIR")
        self.official = Path(official).resolve() if official else None
        self.tiny = {}
        if self.dry_run:
            self.tiny = {
                "maskgit_l32": _tiny_config(self.tmp / "tiny_l32.yaml", model_type="ViT", num_tokens=8,
                                            guidance_decay="linear"),
                "maskgit_b64": _tiny_config(self.tmp / "tiny_b64.yaml", model_type="ViT", num_tokens=16,
                                            guidance_decay="linear"),
                "uvit_s128": _tiny_config(self.tmp / "tiny_s128.yaml", model_type="UViT", num_tokens=16,
                                          guidance_decay="power-cosine"),
            }

    def left(self) -> float:
        return self.budget - (time.monotonic() - self.t0) - self.reserve

    def say(self, line: str) -> None:
        stamp = dt.datetime.now().strftime("%H:%M:%S")
        print(f"[gpu_check {stamp}] {line}", flush=True)
        self.log.write(f"[{stamp}] {line}\n")

    def selected(self, step: Step) -> bool:
        only, skip = _names(self.args.only), _names(self.args.skip)
        if step.name in skip or step.group in skip:
            return False
        return not only or step.name in only or step.group in only

    # ---- one step

    def execute(self, step: Step, skip: str | None = None) -> dict:
        record = {"step": step.name, "title": step.title, "status": None, "reason": None, "figure": None,
                  "value": None, "unit": None, "target": None, "met": None, "peak_memory_mb": None,
                  "largest_batch": None, "agreement": None, "command": None, "env": None, "timeout_s": None,
                  "wall_s": 0.0, "cpu_s": 0.0, "rc": None, "stderr_tail": None, "dry_run": self.dry_run,
                  "started": _now()}
        limit = step.timeout_s if not self.dry_run else min(step.timeout_s, 60.0)
        try:
            plan = skip or self.stop or step.plan(self)
        except Exception as exc:  # noqa: BLE001 - a broken plan is this step's failure, not the run's
            plan = None
            record.update(status="failed", reason=f"planning the step: {type(exc).__name__}: {exc}")
        if isinstance(plan, str):
            record.update(status="skipped", reason=plan)
        elif plan is not None:
            left = self.left()
            floor = step.min_s if not self.dry_run else min(step.min_s, 5.0)
            if min(limit, left) < floor:
                record.update(status="skipped", reason=(
                    f"budget: {max(left, 0):.0f} s left of {self.budget:.0f} s, the step needs at least {floor:.0f} s"))
            else:
                try:
                    self._run_plan(step, plan, min(limit, left), record)
                except BaseException:  # SIGTERM or Ctrl-C while it ran: record it, then stop
                    record.update(status="failed", reason="the run was interrupted while this step ran")
                    self.records[step.name] = record
                    self._write(f"{step.name}.json", record)
                    self.write_summary(finished=False)
                    raise
        self.records[step.name] = record
        self._write(f"{step.name}.json", record)
        shown = record["value"] if record["value"] is not None else ""
        self.say(f"{step.name}: {record['status']} {shown} {record['unit'] or ''}"
                 f"{' met=' + str(record['met']) if record['met'] is not None else ''}"
                 f"{' (' + record['reason'] + ')' if record['reason'] else ''} [{record['wall_s']:.1f} s]")
        self.write_summary(finished=False)
        return record

    def _run_plan(self, step: Step, plan: Plan, timeout: float, record: dict) -> None:
        argv = plan.argv
        if step.name in self.fail:
            argv = [sys.executable, "-c", f"raise RuntimeError('forced failure of {step.name} (TITOK_GPU_CHECK_FAIL)')"]
        elif step.name in self.hang:
            argv, timeout = [sys.executable, "-c", "import time; time.sleep(600)"], 2.0
        env = {**os.environ, **plan.env}
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
        env.setdefault("PYTHONUNBUFFERED", "1")
        if self.dry_run:  # tiny tensors: a second thread only spins (5x the CPU time on a busy 2-core machine)
            env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
        record.update(command=shlex.join(argv), env=plan.env or None, timeout_s=round(timeout, 1))
        self.say(f"{step.name}: {step.title} (limit {timeout:.0f} s)\n    $ {record['command']}")
        self.log.flush()
        offset = os.path.getsize(self.out / LOG_NAME)
        stdout_path = self.tmp / f"{step.name}.stdout"
        start, cpu = time.monotonic(), _children_cpu()
        timed_out = False
        with open(stdout_path, "wb") as stdout:
            # stderr straight into the log, so that a killed run still shows it; its own process group,
            # so that a time-out ends the compile workers too.
            proc = subprocess.Popen(argv, stdout=stdout, stderr=self.log, cwd=REPO, env=env, preexec_fn=_own_group)
            try:
                rc = proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                timed_out = True
                _kill_group(proc)
                rc = proc.returncode
            except BaseException:  # SIGTERM, Ctrl-C: take the step down with us
                _kill_group(proc)
                raise
        record["wall_s"] = round(time.monotonic() - start, 1)
        record["cpu_s"] = round(_children_cpu() - cpu, 1)  # the step's process (and what it waited for)
        record["rc"] = rc
        out = stdout_path.read_text(errors="replace")
        self.log.write(f"---- {step.name} stdout\n{out[-20000:]}\n---- end of {step.name}\n")
        self.log.flush()
        try:
            parsed = self._parse(plan.parse, out)
        except Exception as exc:  # noqa: BLE001
            parsed, why = None, f"{type(exc).__name__}: {exc}"
        else:
            why = None if parsed is not None else "no JSON result on stdout"
        if parsed is not None:
            record["result"] = parsed
            try:
                summary = plan.summarize(parsed)
            except Exception as exc:  # noqa: BLE001 - an unexpected result shape
                summary, why = {}, f"reading the result: {type(exc).__name__}: {exc}"
                parsed = None
            self.stop = self.stop or summary.pop("stop", None)
            error = summary.pop("error", None)
            record.update({k: v for k, v in summary.items() if v is not None or k not in record})
            if error:
                why = error
        if timed_out:
            record.update(status="timeout", reason=f"killed at its limit of {timeout:.0f} s")
        elif rc != 0 or parsed is None or why:
            record.update(status="failed", reason=why or f"exit code {rc}")
        else:
            record["status"] = "ok"
        if record["status"] != "ok":
            with open(self.out / LOG_NAME, "rb") as f:
                f.seek(offset)
                record["stderr_tail"] = f.read().decode(errors="replace")[-4000:]

    def _parse(self, how: str, out: str):
        if how.startswith("junit:"):
            path = Path(how.split(":", 1)[1])
            return _junit(path) if path.is_file() else None
        lines = []
        for line in out.splitlines():
            line = line.strip()
            if line.startswith("{"):
                try:
                    value = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if isinstance(value, dict):
                    lines.append(value)
        if how == "lines":
            return lines or None
        return lines[-1] if lines else None

    # ---- files

    def _write(self, name: str, obj) -> None:
        tmp = self.out / f".{name}.tmp"
        tmp.write_text(json.dumps(obj, indent=2, default=str) + "\n")
        os.replace(tmp, self.out / name)

    def figures(self) -> list[dict]:
        rows = []
        for label, name, probe in FIGURES:
            r = self.records.get(name)
            if r is None:
                continue
            row = {"figure": label, "step": name, "status": r["status"], "value": r["value"], "unit": r["unit"],
                   "target": (r["target"] or {}).get("text"), "met": r["met"], "peak_memory_mb": r["peak_memory_mb"],
                   "largest_batch": r["largest_batch"], "wall_s": r["wall_s"]}
            p = self.records.get(probe) if probe else None
            if row["largest_batch"] is None and p and p.get("largest_batch") is not None:
                row["largest_batch"], row["largest_batch_from"] = p["largest_batch"], probe
            rows.append(row)
        return rows

    def write_summary(self, *, finished: bool) -> dict:
        env = self.records.get("env", {}).get("facts", {})
        summary = {
            "tool": "python -m titok_bench.gpu_check", "argv": sys.argv[1:], "dry_run": self.dry_run,
            "started": self.started, "finished": finished, "wall_s": round(time.monotonic() - self.t0, 1),
            "budget_s": self.budget, "cpu_s": round(sum(r["cpu_s"] for r in self.records.values()), 1),
            "device": env.get("device_name"), "torch": env.get("torch"),
            "figures": self.figures(),
            "steps": {k: {f: v for f, v in r.items() if f not in ("result", "facts")} for k, r in self.records.items()},
            "table": self.table(),
        }
        self._write("summary.json", summary)
        if self.args.bundle:
            self._bundle(Path(self.args.bundle))
        return summary

    def _bundle(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        self.log.flush()
        with tarfile.open(tmp, "w") as tar:
            for f in sorted(self.out.iterdir()):
                if f.is_file() and not f.name.startswith("."):
                    tar.add(f, arcname=f"{path.name.split('.')[0]}/{f.name}")
        os.replace(tmp, path)

    def table(self) -> str:
        head = ("step", "status", "value", "target", "met", "peak MB", "batch", "wall s", "why")
        rows = []
        for name, r in self.records.items():
            value = r["value"]
            value = f"{value:,.1f} {r['unit'] or ''}".strip() if isinstance(value, (int, float)) else str(value or "")
            peak, batch = r["peak_memory_mb"], r["largest_batch"]
            rows.append((name, r["status"], value[:40], (r["target"] or {}).get("text", ""),
                         "" if r["met"] is None else ("yes" if r["met"] else "NO"),
                         "" if peak is None else f"{peak:,.0f}", "" if batch is None else str(batch),
                         f"{r['wall_s']:.0f}", "" if r["status"] == "ok" else (r["reason"] or "")[:60]))
        widths = [max(len(str(x)) for x in col) for col in zip(head, *rows)]
        return "\n".join("  ".join(str(x).ljust(w) for x, w in zip(row, widths)).rstrip() for row in [head, *rows])

    def close(self) -> None:
        self.log.close()
        shutil.rmtree(self.tmp, ignore_errors=True)


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


def _names(text: str | None) -> set[str]:
    return set(filter(None, (text or "").split(",")))


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def _children_cpu() -> float:
    import resource

    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _own_group() -> None:
    """In the step's process, before exec: a process group of its own (still in our session, so
    whoever ends this run's session ends it too), and SIGKILL when this process dies."""
    os.setpgid(0, 0)
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG (Linux)
    except (OSError, AttributeError):
        pass


def _kill_group(proc: subprocess.Popen) -> None:
    """End the step's process group (see _own_group): TERM, then KILL."""
    for sig, wait in ((signal.SIGTERM, 5), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out_dir", help="where the step JSONs, summary.json and gpu_check.log go")
    p.add_argument("--dry-run", action="store_true", help="on CPU at tiny sizes (well under a minute)")
    p.add_argument("--budget-s", type=float, default=None, help="total seconds (default 480; dry run 180)")
    p.add_argument("--only", default=None,
                   help="comma-separated steps or groups (env, figure, tests, sbs, profile, probe)")
    p.add_argument("--skip", default=None, help="comma-separated steps or groups to leave out")
    p.add_argument("--bundle", default=None, help="also keep a tar of OUT_DIR here, refreshed after every step")
    p.add_argument("--official", default=None, help="the official 1d-tokenizer checkout (default $TITOK_OFFICIAL_DIR)")
    p.add_argument("--sbs-tool", default=None, help=f"official_side_by_side.py (default {DEFAULT_SBS_TOOL})")
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
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--child"]:
        return _child_main(argv[1:])
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
                run.execute(step, skip=_profile_skip(run, step, _names(args.only)))
        for step in PROBE_STEPS:
            if run.selected(step):
                run.execute(step)
        summary = run.write_summary(finished=True)
        run.say(f"done in {summary['wall_s']:.0f} s of {run.budget:.0f} (steps' CPU {summary['cpu_s']:.0f} s)\n"
                f"{summary['table']}")
        return summary
    finally:
        run.close()


# ---------------------------------------------------------------- children


def _child_main(argv: list[str]) -> dict:
    mode, rest = argv[0], argv[1:]
    if mode == "env":
        facts = _env_facts(full="--full" in rest)
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
        # Before the evaluation modules bind the name: every later `from eval.fidelity import
        # fid_from_stats` gets the stand-in; modules already loaded are patched where they hold it.
        import eval.fidelity

        original = eval.fidelity.fid_from_stats
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


def _env_facts(*, full: bool) -> dict:
    import importlib.metadata as md
    import importlib.util
    import platform

    import torch

    facts = {
        "python": platform.python_version(), "platform": platform.platform(), "cpu_count": os.cpu_count(),
        "torch": torch.__version__, "cuda_version": torch.version.cuda, "cuda_available": torch.cuda.is_available(),
        "versions": {}, "missing_packages": [n for m, n in NEEDED.items() if importlib.util.find_spec(m) is None],
        "repo": str(REPO), "git_commit": _git_commit(),
    }
    for name in VERSIONS:
        try:
            facts["versions"][name] = md.version(name)
        except md.PackageNotFoundError:
            facts["versions"][name] = None
    if not facts["cuda_available"]:
        facts["device_name"] = "cpu"
        return facts
    props = torch.cuda.get_device_properties(0)
    facts.update(
        device_name=props.name, capability=f"{props.major}.{props.minor}", multiprocessors=props.multi_processor_count,
        memory_gib=round(props.total_memory / 2**30, 1), cudnn=torch.backends.cudnn.version(),
        device_count=torch.cuda.device_count(), nvidia_smi=_nvidia_smi(),
    )
    facts["nvjpeg"] = _nvjpeg_check()
    if full:
        facts["bf16_matmul_tflops"] = _matmul_tflops()
    return facts


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def _nvidia_smi() -> str | None:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm,power.limit",
                              "--format=csv,noheader"], capture_output=True, text=True, timeout=20)
        return out.stdout.strip() or out.stderr.strip()[:300]
    except (OSError, subprocess.SubprocessError) as exc:
        return f"unavailable: {exc}"


def _nvjpeg_check() -> dict:
    """Decode one small JPEG on the GPU (torchvision's nvJPEG) and compare with the CPU decode."""
    import numpy as np
    import torch
    from PIL import Image

    try:
        from torchvision.io import decode_jpeg

        buf = io.BytesIO()
        rng = np.random.default_rng(0)
        Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)).save(buf, format="JPEG", quality=90)
        data = torch.frombuffer(bytearray(buf.getvalue()), dtype=torch.uint8)
        gpu = decode_jpeg(data, device="cuda").cpu()
        cpu = decode_jpeg(data)
        return {"ok": True, "max_abs_diff_vs_cpu": int((gpu.int() - cpu.int()).abs().max())}
    except Exception as exc:  # noqa: BLE001
        return {"ok": False, "error": f"{type(exc).__name__}: {exc}"[:300]}


def _matmul_tflops(n: int = 8192, iters: int = 10) -> float | None:
    import torch

    try:
        a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
        b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
        for _ in range(3):
            a @ b
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(iters):
            a @ b
        torch.cuda.synchronize()
        return round(2 * n**3 * iters / (time.perf_counter() - start) / 1e12, 1)
    except Exception:  # noqa: BLE001
        return None


if __name__ == "__main__":
    main()

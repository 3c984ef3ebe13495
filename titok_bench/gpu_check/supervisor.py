"""The supervisor: runs each step as a subprocess in its own process group under its own time
limit and the run's budget, and writes its record, the log, the summary and the bundle."""
from __future__ import annotations

import argparse
import datetime as dt
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
from pathlib import Path
from xml.etree import ElementTree

from titok_bench.gpu_check.steps import REPO, Plan, Step
from titok_bench.gpu_check.tiny import tiny_config

LOG_NAME = "gpu_check.log"
# Figures of the summary table: (label, step, step with its largest batch).
FIGURES = [
    ("P1 L-32", "p1_l32", "probe_p1_l32"), ("P1 vs official", "sbs_official", None), ("gpu tests", "gpu_tests", None),
    ("P3 train", "p3_train", None), ("P4 cache", "p4_cache", None), ("P1b B-64", "p1b_b64", None),
    ("P1b S-128", "p1b_s128", None), ("P6 gFID", "p6_gfid", "probe_p6_gfid"),
]


class Run:
    """One run of the check: its options (``args``, see :func:`titok_bench.gpu_check.parse_args`), its
    budget, its output folder, the records of the steps run so far; ``execute`` runs one step."""

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
        self.sbs_tool = Path(args.sbs_tool).resolve() if args.sbs_tool else None
        official = args.official or os.environ.get("TITOK_OFFICIAL_DIR")
        self.official = Path(official).resolve() if official else None
        self.tiny = {}
        if self.dry_run:
            self.tiny = {
                "maskgit_l32": tiny_config(self.tmp / "tiny_l32.yaml", model_type="ViT", num_tokens=8,
                                           guidance_decay="linear"),
                "maskgit_b64": tiny_config(self.tmp / "tiny_b64.yaml", model_type="ViT", num_tokens=16,
                                           guidance_decay="linear"),
                "uvit_s128": tiny_config(self.tmp / "tiny_s128.yaml", model_type="UViT", num_tokens=16,
                                         guidance_decay="power-cosine"),
            }

    def left(self) -> float:
        return self.budget - (time.monotonic() - self.t0) - self.reserve

    def say(self, line: str) -> None:
        stamp = dt.datetime.now().strftime("%H:%M:%S")
        print(f"[gpu_check {stamp}] {line}", flush=True)
        self.log.write(f"[{stamp}] {line}\n")

    def selected(self, step: Step) -> bool:
        only, skip = step_names(self.args.only), step_names(self.args.skip)
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


def step_names(text: str | None) -> set[str]:
    """The names of a comma-separated --only or --skip."""
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

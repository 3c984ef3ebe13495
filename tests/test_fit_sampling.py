"""generator.fit_sampling: the sampling settings chosen by the dataset's own judge.

The search itself is checked on made-up figures (it never picks settings its judge rates worse
than the defaults; it finds a better one where there is one; the second round overrules a lucky
first). The whole step runs on a tiny dataset, tokenizer and generator: two runs agree, a run
killed mid-search and run again equals one never stopped, the rewritten file loads everywhere,
and explicit sampling.* options win over the fitted ones.
"""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

from generator import build_generator, load_generator
from generator.fit_sampling import (
    STATE_KIND,
    Figures,
    SearchOptions,
    coordinate_search,
    fit_file,
    noise_margin,
    parse_duration,
    state_path,
    summary,
)
from generator.sampler import SAMPLING_DEFAULTS, SAMPLING_KEYS
from titok_core.checkpoints import read_model_extra, read_model_file, save_model_file
from tokenizer import build_tokenizer

from commands import TINY_GENERATOR, TINY_TOKENIZER
from jobs import REPO, Job, job_env

DEFAULTS = {"num_steps": 8, "guidance_scale": 3.0, "guidance_decay": "linear", "guidance_scale_pow": 3.0,
            "randomize_temperature": 2.5, "softmax_temperature_annealing": True}
SPACE = {"guidance_scale": [0.0, 1.0, 2.0, 3.0, 4.5], "randomize_temperature": [0.0, 1.0, 2.5, 4.0],
         "num_steps": [4, 8, 12]}


class MadeUp:
    """evaluate(settings, round) with figures from a function; records every call."""

    def __init__(self, figures):
        self.figures, self.calls = figures, []

    def __call__(self, settings, round_):
        self.calls.append((dict(settings), round_))
        fid, acc, *fresh = self.figures(settings, round_)
        return Figures(fid=fid, accuracy=acc, samples=100 * (round_ + 1), fresh_fid=fresh[0] if fresh else None)


def _search(evaluate, **kw):
    kw = {"defaults": DEFAULTS, "space": SPACE, "passes": 2, "finalists": 2, "rounds": 2, **kw}
    return coordinate_search(evaluate, **kw)


def test_the_defaults_stay_when_every_other_candidate_is_worse():
    def figures(s, r):  # the defaults are the lowest FID; anything else is worse
        distance = abs(s["guidance_scale"] - 3.0) + abs(s["randomize_temperature"] - 2.5) + abs(s["num_steps"] - 8)
        return 10.0 + distance, 0.9

    evaluate = MadeUp(figures)
    result = _search(evaluate)
    assert result["chosen"] == DEFAULTS and result["round"] == 0 and not result["out_of_time"]
    assert all(r == 0 for _, r in evaluate.calls)  # no finalist beat them: no second round
    assert len(evaluate.calls) == 1 + sum(len(v) - 1 for v in SPACE.values())  # one pass: nothing moved


def test_a_lower_fid_with_lower_accuracy_is_not_eligible():
    def figures(s, r):  # guidance 0 has the lowest FID but recognises fewer samples than the defaults
        return (1.0, 0.5) if s["guidance_scale"] == 0.0 else (10.0 - s["guidance_scale"] / 10, 0.9)

    result = _search(MadeUp(figures))
    assert result["chosen"]["guidance_scale"] == 4.5  # the best eligible one, never guidance 0


def test_coordinate_descent_finds_the_better_settings():
    def figures(s, r):  # a bowl at guidance 1, temperature 1, 12 steps; accuracy as good as the defaults'
        return (s["guidance_scale"] - 1) ** 2 + (s["randomize_temperature"] - 1) ** 2 + abs(s["num_steps"] - 12) + 1, 0.9

    evaluate = MadeUp(figures)
    result = _search(evaluate)
    assert result["chosen"] == {**DEFAULTS, "guidance_scale": 1.0, "randomize_temperature": 1.0, "num_steps": 12}
    assert result["round"] == 1  # decided on the second set of samples
    second = [s for s, r in evaluate.calls if r == 1]
    assert second[0] == DEFAULTS and len(second) == 3  # the defaults, then the two finalists
    keys = [(json.dumps(s, sort_keys=True), r) for s, r in evaluate.calls]
    assert len(keys) == len(set(keys))  # no settings judged twice at one round, across passes too
    assert _search(MadeUp(figures)) == result


def test_the_second_round_overrules_a_lucky_first():
    def figures(s, r):  # guidance 2 wins the first draw by luck; with more samples it is worse than the defaults
        lucky = s["guidance_scale"] == 2.0 and s["randomize_temperature"] == 2.5 and s["num_steps"] == 8
        if r == 0:
            return (5.0 if lucky else 10.0 if s == DEFAULTS else 20.0), 0.9
        return (12.0 if lucky else 10.0 if s == DEFAULTS else 20.0), 0.9

    result = _search(MadeUp(figures))
    assert result["chosen"] == DEFAULTS and result["round"] == 1


def _one_better_finalist(gain, defaults_first, defaults_fresh):
    """Figures where guidance 2 alone beats the defaults, by ``gain`` at both rounds; the defaults' two draws
    give ``defaults_first`` and ``defaults_fresh`` (their second-round pooled FID is their mean)."""
    def figures(s, r):
        better = s == {**DEFAULTS, "guidance_scale": 2.0}
        pooled = (defaults_first + defaults_fresh) / 2
        if r == 0:
            return (defaults_first - gain if better else defaults_first if s == DEFAULTS else 20.0), 0.9
        return (pooled - gain if better else pooled if s == DEFAULTS else 20.0), 0.9, (
            defaults_fresh - gain if better else defaults_fresh)
    return figures


def test_a_gain_within_the_defaults_own_spread_keeps_the_defaults():
    # The defaults' two draws: 0.93 and 1.12 (Fashion-MNIST's fit, round 13): spread 0.19 / sqrt(2) = 0.134.
    kept = _search(MadeUp(_one_better_finalist(0.09, 0.93, 1.12)))
    assert kept["chosen"] == DEFAULTS and kept["round"] == 1
    assert kept["margin"] == pytest.approx(0.19 / 2 ** 0.5)
    # The same gain where the defaults' draws agree, and a gain beyond their spread: the finalist wins.
    for gain, first, fresh in [(0.09, 1.0, 1.02), (0.5, 0.93, 1.12)]:
        moved = _search(MadeUp(_one_better_finalist(gain, first, fresh)))
        assert moved["chosen"] == {**DEFAULTS, "guidance_scale": 2.0} and moved["round"] == 1
        assert moved["margin"] == pytest.approx(abs(first - fresh) / 2 ** 0.5)
    assert noise_margin(Figures(1.0, 0.9, 100), Figures(1.0, 0.9, 200)) == 0.0  # no fresh figure: no margin


def test_out_of_time_stops_taking_candidates_and_still_never_does_worse():
    budget = {"left": 4}

    def affordable(settings, round_, more):
        budget["left"] -= 1
        return budget["left"] >= 0

    def figures(s, r):  # the higher the guidance, the better; no time for the temperatures or a second round
        return 10.0 - s["guidance_scale"], 0.9

    evaluate = MadeUp(figures)
    result = _search(evaluate, affordable=affordable)
    assert result["out_of_time"] and [c[0]["guidance_scale"] for c in evaluate.calls] == [3.0, 0.0, 1.0, 2.0, 4.5]
    assert result["chosen"] == {**DEFAULTS, "guidance_scale": 4.5} and result["round"] == 0


def test_a_resumed_search_retraces_the_uninterrupted_one_whatever_the_clock_says():
    def figures(s, r):
        return (s["guidance_scale"] - 1) ** 2 + abs(s["randomize_temperature"] - 4) + 1, 0.9

    whole = MadeUp(figures)
    reference = _search(whole)
    done = {(json.dumps(s, sort_keys=True), r) for s, r in whole.calls}
    # After a kill, every evaluation is held already and the clock has run out: the same path, the same choice.
    again = MadeUp(figures)
    resumed = _search(again, affordable=lambda *a: False, cached=lambda s, r: (json.dumps(s, sort_keys=True), r) in done)
    assert resumed == reference and again.calls == whole.calls


def test_options_are_checked_and_durations_read():
    assert parse_duration("00:00:04:00") == 240 and parse_duration("01:30") == 90 and parse_duration(None) is None
    assert parse_duration(12) == 12.0
    with pytest.raises(ValueError, match="max_time=soon"):
        parse_duration("soon")
    with pytest.raises(ValueError, match="unknown sampling setting.*guidance_scal\\b"):
        SearchOptions.from_group({"space": {"guidance_scal": [1.0]}})
    with pytest.raises(ValueError, match="non-empty list"):
        SearchOptions.from_group({"space": {"guidance_scale": []}})
    with pytest.raises(ValueError, match="unknown fit_sampling option"):
        SearchOptions.from_group({"sample": 3})
    options = SearchOptions.from_group({"enabled": True, "max_time": "00:00:01:00", "space": {"num_steps": [4]}})
    assert options.max_time == 60 and options.space == {"num_steps": [4]}


def test_the_two_configs_offer_the_same_search(compose):
    """generator.train's fit_sampling group and the command's are the same options, with the same defaults."""
    train = compose("generator.train", ["experiment=small", "data.root=D", "tokenizer.spec=T"]).fit_sampling
    own = compose("generator.fit_sampling", ["generator.checkpoint=G"]).fit_sampling
    assert train.enabled is True and set(train) - {"enabled"} == set(own)
    assert {k: v for k, v in train.items() if k != "enabled"} == own
    assert compose("generator.train", ["experiment=imagenet_l32", "data.root=D"]).fit_sampling.enabled is False
    assert compose("generator.train", []).fit_sampling.enabled is False  # the demo: it kept the defaults there
    assert compose("generator.train", ["experiment=digits"]).fit_sampling.enabled is True
    assert set(own.space) <= set(SAMPLING_KEYS)
    SearchOptions.from_group(own)  # the shipped defaults pass the checks


def test_a_users_mistake_is_one_line(tmp_path, monkeypatch, capsys, compose):
    from generator.fit_sampling import _main

    monkeypatch.chdir(tmp_path)
    for argv, message in [
        (["generator.checkpoint=nope.safetensors"], "error: generator checkpoint not found: nope.safetensors"),
        (["generator.checkpoint=maskgit_demo"], "error: maskgit_demo ships with the package: pass out=FILE"),
        (["generator.checkpoint=maskgit_demo", "out=x.safetensors", "data.root=nowhere"],
         "error: no image folder <root>/train/<class>/* at nowhere: pass data.root="),
        (["generator.checkpoint=G", "fit_sampling.space.num_steps=[0]"], "error: num_steps must be >= 1, got 0"),
    ]:
        if argv[0] == "generator.checkpoint=G":  # a file that exists, so the bad value is what stops it
            make_tiny(tmp_path)
            argv = ["generator.checkpoint=generator.safetensors", *argv[1:]]
        with pytest.raises(SystemExit) as stop:
            _main(compose("generator.fit_sampling", argv))
        err = capsys.readouterr().err.strip()
        assert stop.value.code == 2 and err.startswith(message) and "\n" not in err, err


# ---------------------------------------------------------------- the whole step, on tiny models

# Small enough for seconds, big enough that the kill lands mid-search.
TINY_OPTIONS = ["fit_sampling.num_samples=90", "fit_sampling.confirm_samples=90", "fit_sampling.batch_size=45",
                "fit_sampling.judge_steps=30", "fit_sampling.max_time=null", "fit_sampling.dtype=fp32",
                "fit_sampling.device=cpu", "fit_sampling.passes=2", "fit_sampling.finalists=2"]
TINY_SPACE = {"guidance_scale": [0.0, 1.0, 2.0, 3.0], "randomize_temperature": [0.0, 1.0, 4.0],
              "softmax_temperature_annealing": [True, False], "num_steps": [2, 4, 8]}


def make_tiny(folder: Path) -> Path:
    """data/ (3 classes of coloured squares, 16 px, train and val), tokenizer.safetensors and
    generator.safetensors (random weights; its file records the tokenizer and data by relative path)."""
    rng = np.random.default_rng(0)
    for split, n in (("train", 20), ("val", 6)):
        for c in range(3):
            d = folder / "data" / split / f"class_{c}"
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                img = np.full((16, 16, 3), 30, np.uint8)
                y, x = rng.integers(0, 8, 2)
                img[y : y + 8, x : x + 8] = [(220, 40, 40), (40, 220, 40), (40, 40, 220)][c]
                Image.fromarray(img).save(d / f"{i:03d}.png")
    torch.manual_seed(0)
    tok = build_tokenizer(TINY_TOKENIZER)
    save_model_file(folder / "tokenizer.safetensors", kind="tokenizer", config=tok.config.to_dict(),
                    state_dict=tok.state_dict())
    gen = build_generator(TINY_GENERATOR)
    extra = {"sampling": {**DEFAULTS, "num_steps": 4}, "tokenizer": {"spec": "tokenizer.safetensors", "checkpoint": None},
             "data": {"root": "data", "split": "train", "builtin": None}, "classes": ["a", "b", "c"]}
    save_model_file(folder / "generator.safetensors", kind="generator", config=gen.config, state_dict=gen.state_dict(),
                    extra=extra)
    return folder


def _space(space: dict) -> str:
    """A space on the command line: these keys, the default space's others null (not searched)."""
    values = {k: None for k in ("guidance_scale", "randomize_temperature", "softmax_temperature_annealing",
                                "guidance_decay", "num_steps")}
    values.update(space)
    text = ",".join(f"{k}:null" if v is None else f"{k}:[{','.join(str(x).lower() for x in v)}]"
                    for k, v in values.items())
    return "fit_sampling.space={" + text + "}"


def _args() -> list[str]:
    return ["generator.checkpoint=generator.safetensors", *TINY_OPTIONS, _space(TINY_SPACE)]


def _run(cwd: Path) -> subprocess.CompletedProcess:
    env = job_env({"XDG_CACHE_HOME": str(cwd / "cache")})
    out = subprocess.run([sys.executable, "-m", "generator.fit_sampling", *_args()], cwd=cwd, env=env,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return out


def _comparable(record: dict) -> dict:
    """The record less what depends on the clock or on the run having been resumed."""
    table = [{"settings": r["settings"], "rounds": [{k: v for k, v in f.items() if k != "seconds"} for f in r["rounds"]]}
             for r in record["table"]]
    drop = {"table", "seconds", "judge_seconds", "cpu_seconds_this_run", "resumed", "path", "threads"}
    return {**{k: v for k, v in record.items() if k not in drop}, "table": table}


def _state_rows(path: Path) -> int:
    try:
        with safe_open(str(path), framework="pt") as f:
            return len(json.loads(f.metadata()[STATE_KIND])["rows"])
    except Exception:  # noqa: BLE001 - not there yet, or being replaced
        return 0


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """One run never stopped, as a user runs it (a fresh process, one thread, relative paths)."""
    cwd = make_tiny(tmp_path_factory.mktemp("uninterrupted"))
    before = read_model_file(cwd / "generator.safetensors")
    out = _run(cwd)
    return cwd, out, before


@pytest.mark.parametrize("stop", ["kill", "sigterm"])
def test_a_search_killed_midway_and_run_again_equals_one_never_stopped(uninterrupted, tmp_path, stop):
    """SIGKILL loses the candidate in hand; SIGTERM finishes and saves it, then one line and exit 143."""
    ref_dir, ref_out, _ = uninterrupted
    reference = read_model_extra(ref_dir / "generator.safetensors")["fit_sampling"]
    assert len(reference["table"]) >= 8 and "fit_sampling:" in ref_out.stdout and "written to" in ref_out.stdout

    cwd = make_tiny(tmp_path / "killed")
    at = random.Random(30).randint(2, 6)  # a seeded point: after this many candidates are in the state file
    job = Job("generator.fit_sampling", _args(), cwd, env={"XDG_CACHE_HOME": str(cwd / "cache")})
    state = state_path(cwd / "generator.safetensors")
    if stop == "kill":
        assert job.kill_at(lambda: _state_rows(state) >= at, 0.0), job.tail()
    else:
        job.wait_for(lambda: _state_rows(state) >= at)
        os.kill(job.proc.pid, signal.SIGTERM)
        assert job.wait() == 143, job.tail()
        lines = [line for line in job.output().splitlines() if line.strip()]
        assert lines[-1] == "interrupted: run the same command again to continue the search", job.tail()
        assert "Traceback" not in job.output(), job.tail()
    assert "fit_sampling" not in read_model_extra(cwd / "generator.safetensors")  # stopped before the rewrite
    done = _state_rows(state)
    assert at <= done < len(reference["table"])
    if stop == "sigterm":
        assert done <= at + 1  # the candidate under way when the signal came, and no other

    again = _run(cwd)
    resumed = read_model_extra(cwd / "generator.safetensors")["fit_sampling"]
    assert resumed["resumed"] and _comparable(resumed) == _comparable(reference)
    assert read_model_extra(cwd / "generator.safetensors")["sampling"] == reference["chosen"]
    assert "fit_sampling:" in again.stdout


@pytest.mark.slow
def test_a_state_is_reused_only_by_the_same_search(tmp_path, monkeypatch, caplog, compose):
    """In process: a finished search's state makes a rerun free; other search settings start afresh."""
    cwd = make_tiny(tmp_path)
    monkeypatch.chdir(cwd)
    monkeypatch.setenv("XDG_CACHE_HOME", str(cwd / "cache"))
    space = _space({"guidance_scale": [0.0, 1.0], "num_steps": [2]})
    group = dict(compose("generator.fit_sampling", ["generator.checkpoint=G", *TINY_OPTIONS, space]).fit_sampling)
    small = SearchOptions.from_group({**group, "num_samples": 30, "confirm_samples": 0, "batch_size": 30})
    first = fit_file("generator.safetensors", options=small)
    assert not first["resumed"] and len(first["table"]) >= 4 and first["rounds"] == [{"samples": 30, "seed": 1}]
    again = fit_file("generator.safetensors", options=small)  # the rewritten file, the same weights: reused
    assert again["resumed"] and _comparable(again) == _comparable(first) and again["cpu_seconds_this_run"] < 30
    assert again["defaults"] == first["defaults"]  # the defaults of the trained file, not the fitted settings
    other = SearchOptions.from_group({**group, "num_samples": 15, "confirm_samples": 0, "batch_size": 30})
    with caplog.at_level("INFO", logger="generator.fit_sampling"):
        third = fit_file("generator.safetensors", options=other)
    assert "belongs to another generator or other search settings" in caplog.text
    assert not third["resumed"] and third["rounds"] == [{"samples": 15, "seed": 1}]


@pytest.mark.slow
def test_the_search_is_repeatable_and_the_file_loads_everywhere(uninterrupted, tmp_path):
    ref_dir, _, before = uninterrupted
    path = ref_dir / "generator.safetensors"
    reference = read_model_extra(path)["fit_sampling"]
    # Another run, in another folder, from scratch: the same choice and table.
    cwd = make_tiny(tmp_path / "again")
    _run(cwd)
    assert _comparable(read_model_extra(cwd / "generator.safetensors")["fit_sampling"]) == _comparable(reference)
    # A rerun of the finished command reuses its state: the same record, no sampling.
    _run(ref_dir)
    assert _comparable(read_model_extra(path)["fit_sampling"]) == _comparable(reference)

    # The weights and config are untouched; sampling is the choice; the table says what was tried.
    kind, config, state = read_model_file(path)
    assert kind == before[0] and config == before[1]
    assert all(torch.equal(state[k], v) for k, v in before[2].items()) and set(state) == set(before[2])
    extra = read_model_extra(path)
    assert extra["sampling"] == reference["chosen"] and extra["tokenizer"]["spec"] == "tokenizer.safetensors"
    assert reference["defaults"] == {**SAMPLING_DEFAULTS, **DEFAULTS, "num_steps": 4}  # the file's, completed
    assert reference["table"][0]["settings"] == reference["defaults"] and reference["seed"] == 1
    assert reference["judge"]["kind"] == "demo_classifier" and "images of val/" in reference["judge"]["held_out"]
    assert "objective" in reference and "defaults" in summary(reference) and reference["margin"] >= 0
    assert load_generator(path).sampling == reference["chosen"]


@pytest.mark.slow
def test_explicit_sampling_options_win_over_the_fitted_ones(uninterrupted, monkeypatch):
    from omegaconf import OmegaConf

    from sampling.generate import generate
    from sampling.pipeline import load_pipeline

    ref_dir, _, _ = uninterrupted
    monkeypatch.chdir(ref_dir)
    # Pretend the search chose something unusual, so the override is visible either way.
    kind, config, state = read_model_file("generator.safetensors")
    extra = read_model_extra("generator.safetensors")
    chosen = {**extra["sampling"], "guidance_scale": 1.5, "num_steps": 3}
    save_model_file("fitted.safetensors", kind=kind, config=config, state_dict=state, extra={**extra, "sampling": chosen})
    assert load_pipeline(generator={"checkpoint": "fitted.safetensors"}).sampling == chosen
    pipe = load_pipeline(generator={"checkpoint": "fitted.safetensors"}, sampling={"guidance_scale": 0.5,
                                                                                   "num_steps": None})
    assert pipe.sampling == {**chosen, "guidance_scale": 0.5}
    out = generate(classes=0, n=2, generator={"checkpoint": "fitted.safetensors"}, out_dir="samples", device="cpu",
                   sampling={"guidance_scale": 0.5})
    assert out["sampling"]["guidance_scale"] == 0.5 and out["sampling"]["num_steps"] == 3
    assert generate(classes=0, n=2, generator={"checkpoint": "fitted.safetensors"}, out_dir="samples_fitted",
                    device="cpu")["sampling"] == chosen
    # eval.gfid reads the same way (its sampling group, null: the file's)
    from eval.samples import pipeline_from_config

    from conftest import compose_config

    cfg = compose_config("eval.gfid", ["generator.checkpoint=fitted.safetensors", "sampling.randomize_temperature=7.0"])
    assert pipeline_from_config(cfg).sampling == {**chosen, "randomize_temperature": 7.0}
    assert OmegaConf.select(cfg, "sampling.guidance_scale") is None


@pytest.mark.slow
def test_generator_train_ends_with_the_search_and_keeps_its_command_line_settings(official_tiny, tmp_path):
    """The last step of generator.train: the file it exports carries the fitted settings, except the
    sampling.* keys given on its command line, which stay as given."""
    tok = official_tiny / "tokenizer"
    args = [
        "experiment=demo", f"run_dir={tmp_path}/run", f"data.root={tmp_path}/demo", "data.builtin=demo",
        "data.demo_train_per_class=12", "data.demo_val_per_class=3", f"tokenizer.spec={tok}/config.yaml",
        f"tokenizer.checkpoint={tok}/tokenizer.bin", f"cache.dir={tmp_path}/cache", "cache.batch_size=32",
        "model.hidden_size=32", "model.depth=2", "model.num_heads=2", "model.mlp_dim=64", "batch_size=16",
        "trainer.max_steps=4", "trainer.max_time=null", "trainer.accelerator=cpu", "trainer.devices=1",
        "sample_every_n_steps=0", "sampling.num_steps=3", *TINY_OPTIONS[:4],
        "fit_sampling.enabled=true", "fit_sampling.max_time=null", "fit_sampling.device=cpu",
        _space({"guidance_scale": [0.0, 1.0], "num_steps": [2, 4]}),
    ]
    out = subprocess.run([sys.executable, "-m", "generator.train", *args], cwd=REPO, capture_output=True, text=True,
                         timeout=900, env=job_env({"XDG_CACHE_HOME": str(tmp_path / "xdg")}))
    assert out.returncode == 0, out.stderr[-3000:]
    assert "fit_sampling:" in out.stdout
    extra = read_model_extra(tmp_path / "run" / "generator.safetensors")
    record = extra["fit_sampling"]
    assert record["fixed"] == ["num_steps"] and set(record["search"]["space"]) == {"guidance_scale"}
    assert extra["sampling"]["num_steps"] == 3 and extra["sampling"] == record["chosen"]
    assert {r["settings"]["guidance_scale"] for r in record["table"]} == {0.0, 1.0, 3.0}

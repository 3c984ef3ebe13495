"""Every entry point's command line and its mistakes: each user error is one ``error:`` line and
exit 2, a bug keeps its traceback, and ``--help`` explains the options; the benchmarks' old flags too.

The checks of a command line run in-process (each entry point's ``main.check``: what its
``main()`` runs before Hydra); the rest run as a user runs them, to pin the exit code and stderr.
(What the commands write when they succeed: tests/test_command_outputs.py.)
"""
from __future__ import annotations

import importlib
import os
import subprocess
import sys

import pytest
from omegaconf import OmegaConf

from titok_core.cli import CONF, _flat_keys, describe_options
from titok_core.errors import BadFileError, MissingFileError, UsageError, UserError, exit_on_user_error

from commands import REPO, assert_one_line_error, run_module, tiny_args, tiny_generator_file, tiny_models

ENTRY_POINTS = {  # config -> module
    "generator/train": "generator.train",
    "tokenizer/train": "tokenizer.train",
    "generator/cache": "generator.cache",
    "sampling/generate": "sampling.generate",
    "sampling/serve": "sampling.serve",
    "tokenizer/reconstruct": "tokenizer.reconstruct",
    "eval/gfid": "eval.gfid",
    "generator/fit_sampling": "generator.fit_sampling",
}


def check(config: str, *argv: str):
    """The command-line checks of the entry point of ``conf/<config>.yaml``; returns the composed config."""
    return importlib.import_module(ENTRY_POINTS[config]).main.check(list(argv))


# (entry point, arguments that make a complete command)
COMPLETE = {
    "generator/train": ["experiment=small", "data.root=D", "tokenizer.spec=T"],
    "tokenizer/train": ["experiment=small", "data.root=D"],
    "generator/cache": ["data.root=D", "tokenizer.spec=titok_l32"],
    "sampling/generate": [],
    "sampling/serve": [],
    "tokenizer/reconstruct": ["inputs=x.png"],
    "eval/gfid": [],
    "generator/fit_sampling": ["generator.checkpoint=G"],
}


@pytest.fixture(scope="module")
def tiny(official_tiny) -> dict:
    return tiny_models(official_tiny)


# ---------------------------------------------------------------- a command line, checked before it runs


@pytest.mark.parametrize("config", sorted(COMPLETE))
def test_a_complete_command_composes(config):
    cfg = check(config, *COMPLETE[config])
    assert not OmegaConf.missing_keys(cfg)
    for word in COMPLETE[config]:  # every value given is in the config, where its key says
        key, value = word.split("=", 1)
        if key != "experiment":
            assert OmegaConf.select(cfg, key) == value, key
    # Every option the YAML documents (and --help lists) is in the composed config.
    documented = {key for key, _, _ in describe_options(CONF / f"{config}.yaml")}
    assert documented and documented <= set(_flat_keys(cfg)), documented - set(_flat_keys(cfg))


@pytest.mark.parametrize("config, argv, missing", [
    ("generator/train", ["experiment=small", "data.root=D"], "tokenizer.spec"),
    ("tokenizer/train", ["experiment=small"], "data.root"),
    ("generator/cache", ["tokenizer.spec=titok_l32"], "data.root"),
    ("tokenizer/reconstruct", [], "inputs"),
    ("generator/fit_sampling", [], "generator.checkpoint"),
])
def test_missing_mandatory_value(config, argv, missing):
    with pytest.raises(UsageError, match=f"missing value for .*{missing}.*: pass"):
        check(config, *argv)


@pytest.mark.parametrize("config", sorted(COMPLETE))
def test_unknown_key_suggests_the_closest(config):
    key, closest = {
        "generator/train": ("trainer.max_stepz", "trainer.max_steps"),
        "tokenizer/train": ("optim.lrr", "optim.lr"),
        "generator/cache": ("cache.batchsize", "cache.batch_size"),
        "sampling/generate": ("sampling.guidance_scal", "sampling.guidance_scale"),
        "sampling/serve": ("prot", "port"),
        "tokenizer/reconstruct": ("out_dri", "out_dir"),
        "eval/gfid": ("num_sample", "num_samples"),
        "generator/fit_sampling": ("fit_sampling.num_sample", "fit_sampling.num_samples"),
    }[config]
    with pytest.raises(UsageError, match=f"unknown option {key} \\(did you mean {closest}\\?\\)"):
        check(config, *COMPLETE[config], f"{key}=1")


@pytest.mark.parametrize("config", sorted(COMPLETE))
def test_an_added_key_is_refused(config):
    with pytest.raises(UsageError, match="nothing would read it"):
        check(config, *COMPLETE[config], "+something_new=4")


def test_an_added_key_that_exists_says_to_drop_the_plus():
    with pytest.raises(UsageError, match="trainer.accumulate_grad_batches is an option already; write "
                                         "trainer.accumulate_grad_batches=4"):
        check("generator/train", *COMPLETE["generator/train"], "+trainer.accumulate_grad_batches=4")


@pytest.mark.parametrize("config, argv, message", [
    ("generator/train", ["batch_size=many"], "batch_size=many: expected an integer"),
    ("tokenizer/train", ["optim.lr=fast"], "optim.lr=fast: expected a number"),
    ("generator/cache", ["data.hflip=maybe"], "data.hflip=maybe: expected true or false"),
    ("sampling/generate", ["n=two"], "n=two: expected an integer"),
    ("sampling/serve", ["port=http"], "port=http: expected an integer"),
    ("tokenizer/reconstruct", ["batch_size=1.5"], "batch_size=1.5: expected an integer"),
    ("eval/gfid", ["save_npz=true", "overlap=sometimes"], "overlap=sometimes: expected true or false"),
])
def test_wrong_type(config, argv, message):
    with pytest.raises(UsageError, match=message):
        check(config, *COMPLETE[config], *argv)


@pytest.mark.parametrize("config, argv, message", [
    ("generator/train", ["batch_size=0"], "batch_size=0: must be at least 1"),
    ("generator/train", ["sample_classes=0"], "sample_classes=0: must be at least 1"),
    ("tokenizer/train", ["optim.lr=-1e-3"], "optim.lr=-1e-3: must be positive"),
    ("tokenizer/train", ["data.val_images=0"], "data.val_images=0: must be at least 1"),
    ("generator/cache", ["cache.num_workers=-1"], "cache.num_workers=-1: must not be negative"),
    ("sampling/generate", ["sampling.num_steps=0"], "sampling.num_steps=0: must be at least 1"),
    ("sampling/serve", ["max_n=0"], "max_n=0: must be at least 1"),
    ("tokenizer/reconstruct", ["batch_size=-2"], "batch_size=-2: must be at least 1"),
    ("eval/gfid", ["num_samples=0"], "num_samples=0: must be at least 1"),
    ("eval/gfid", ["colour_blind_steps=0"], "colour_blind_steps=0: must be at least 1"),
])
def test_value_out_of_range(config, argv, message):
    with pytest.raises(UsageError, match=message):
        check(config, *COMPLETE[config], *argv)


@pytest.mark.parametrize("config", ["generator/train", "tokenizer/train", "generator/cache"])
def test_an_unknown_experiment_lists_the_experiments(config):
    argv = [a for a in COMPLETE[config] if not a.startswith("experiment=")]
    with pytest.raises(UsageError) as err:
        check(config, "experiment=smal", *argv)
    known = sorted(p.stem for p in (CONF / config.split("/")[0] / "experiment").glob("*.yaml"))
    assert "small" in known and str(err.value) == (
        f"experiment=smal: no such experiment (did you mean small?); the experiments are: {', '.join(known)}")


@pytest.mark.parametrize("config", ["generator/train", "tokenizer/train"])
def test_max_time_in_another_format_names_the_format(config):
    with pytest.raises(UsageError, match=r"^trainer\.max_time=5min: write days:hours:minutes:seconds, e\.g\. "
                                         r"trainer\.max_time=00:00:05:00 for five minutes$"):
        check(config, *COMPLETE[config], "trainer.max_time=5min")
    assert check(config, *COMPLETE[config], "trainer.max_time=00:00:05:00").trainer.max_time == "00:00:05:00"


def test_max_time_from_a_config_file_is_read_or_refused_in_one_line():
    from titok_core.lr_schedule import parse_max_time

    assert parse_max_time("01:02:03:04") == ((1 * 24 + 2) * 60 + 3) * 60 + 4 and parse_max_time(None) is None
    for bad in ("5min", "00:05:00", "00:00:05:0.5"):
        with pytest.raises(UsageError, match="write days:hours:minutes:seconds"):
            parse_max_time(bad)


@pytest.mark.parametrize("module, args", [
    ("tokenizer.reconstruct", ["inputs=x.png", "tokenizer.spec="]),
    ("sampling.generate", ["generator.spec=", "class=1", "n=1"]),
])
def test_an_empty_spec_says_so(tmp_path, module, args):
    kind = "tokenizer" if module.startswith("tokenizer") else "generator"
    line = assert_one_line_error(run_module(module, *args, cwd=tmp_path), f"{kind}.spec is empty: name a preset")
    assert "config.json" not in line


@pytest.mark.parametrize("config", sorted(COMPLETE))
def test_every_range_names_an_option_of_its_entry_point(config):
    """Each entry point declares its own range checks (titok_core.cli names no option): every key
    it declares is an option of its config, and -1 is out of each range."""
    ranges = importlib.import_module(ENTRY_POINTS[config]).main.ranges
    known = set(_flat_keys(check(config, *COMPLETE[config])))
    assert ranges.keys() and set(ranges.keys()) <= known, set(ranges.keys()) - known
    assert all(ranges.error(key, "-1").startswith(f"{key}=-1: must") for key in ranges.keys())


# The old spellings of every entry point, each once: the message names the new key.
@pytest.mark.parametrize("config, argv, new", [
    ("generator/train", ["model.sampling.guidance_scale=3"], "sampling.guidance_scale=3"),
    ("generator/train", ["model.seq_len=32"], "model.num_tokens=32"),
    ("generator/train", ["cache.flip=false"], "data.hflip=false"),
    ("generator/train", ["optim.ema_max_decay=0.99"], "optim.ema_decay=0.99"),
    ("tokenizer/train", ["data.train_split=train"], "data.split=train"),
    ("tokenizer/train", ["model.num_latent_tokens=32"], "model.num_tokens=32"),
    ("generator/cache", ["data_root=/data"], "data.root=/data"),
    ("generator/cache", ["checkpoint=t.bin"], "tokenizer.checkpoint=t.bin"),
    ("generator/cache", ["devices=8"], "trainer.devices=8"),
    ("generator/cache", ["cache.flip=false"], "data.hflip=false"),
    ("sampling/generate", ["guidance_scale=3"], "sampling.guidance_scale=3"),
    ("sampling/generate", ["checkpoint=g.bin"], "generator.checkpoint=g.bin"),
    ("sampling/generate", ["tokenizer_checkpoint=t.bin"], "tokenizer.checkpoint=t.bin"),
    ("sampling/serve", ["randomize_temperature=2"], "sampling.randomize_temperature=2"),
    ("tokenizer/reconstruct", ["checkpoint=t.bin"], "tokenizer.checkpoint=t.bin"),
    ("eval/gfid", ["checkpoint=g.bin"], "generator.checkpoint=g.bin"),
    ("eval/gfid", ["data_root=/val"], "data.root=/val"),
    ("eval/gfid", ["split=val"], "data.split=val"),
    ("eval/gfid", ["num_steps=8"], "sampling.num_steps=8"),
    ("eval/gfid", ["accelerator=gpu"], "trainer.accelerator=gpu"),
    ("eval/gfid", ["devices=8"], "trainer.devices=8"),
])
def test_old_spelling_names_the_new_key(config, argv, new):
    with pytest.raises(UsageError) as info:
        check(config, *COMPLETE[config], *argv)
    assert str(info.value) == f"{argv[0].split('=')[0]}= was renamed: write {new}"


@pytest.mark.parametrize("config, key, new", [
    ("sampling/generate", "generator", "generator.spec"), ("sampling/generate", "tokenizer", "tokenizer.spec"),
    ("sampling/serve", "generator", "generator.spec"), ("generator/cache", "tokenizer", "tokenizer.spec"),
    ("tokenizer/reconstruct", "tokenizer", "tokenizer.spec"), ("eval/gfid", "generator", "generator.spec"),
    ("eval/gfid", "tokenizer", "tokenizer.spec"), ("generator/train", "model", "model.preset"),
])
def test_a_model_given_as_one_value_says_which_key(config, key, new):
    with pytest.raises(UsageError) as info:
        check(config, *COMPLETE[config], f"{key}=x")
    assert str(info.value) == f"{key}= takes a group now: write {new}=x"


def test_a_preset_plus_overrides_composes_in_both_trainers():
    gen = check("generator/train", *COMPLETE["generator/train"], "model.preset=maskgit_l32", "model.hidden_size=512")
    assert (gen.model.preset, gen.model.hidden_size, gen.model.depth) == ("maskgit_l32", 512, 4)  # small's depth
    tok = check("tokenizer/train", *COMPLETE["tokenizer/train"], "model.preset=titok_l32", "model.num_tokens=64")
    assert (tok.model.preset, tok.model.num_tokens) == ("titok_l32", 64)
    from generator.presets import resolve_model

    config, sampling = resolve_model({"preset": "maskgit_l32", "hidden_size": 512, "depth": None}, codebook_size=4096,
                                     num_tokens=32, num_classes=1000)
    assert (config["hidden_size"], config["depth"], sampling["num_steps"]) == (512, 24, 8)
    with pytest.raises(UsageError, match="generator num_tokens=32 does not match the token cache \\(64\\)"):
        resolve_model({"preset": "maskgit_l32"}, codebook_size=4096, num_tokens=64, num_classes=1000)


def test_options_that_reach_the_trainer_compose():
    cfg = check("generator/train", *COMPLETE["generator/train"], "trainer.accumulate_grad_batches=4",
                "trainer.global_batch=2048", "logger=[csv,tensorboard]")
    assert cfg.trainer.accumulate_grad_batches == 4 and cfg.trainer.global_batch == 2048
    assert list(cfg.logger) == ["csv", "tensorboard"]


def test_help_lists_every_option_with_its_comment(tmp_path):
    rows = {key: comment for key, _, comment in describe_options(CONF / "sampling" / "generate.yaml")}
    assert rows["n"] == "how many samples"
    assert rows["generator.checkpoint"].startswith("weights:")
    assert "classifier-free guidance" in rows["sampling.guidance_scale"]
    assert "hydra" not in rows and "hydra.run.dir" not in rows

    proc = run_module("sampling.generate", "--help", cwd=tmp_path)
    assert proc.returncode == 0
    assert proc.stdout.startswith("Sample class-conditional images")
    assert "sampling.guidance_scale [null]" in proc.stdout and "classifier-free guidance scale" in proc.stdout
    assert "powered by Hydra" not in proc.stdout


# ---------------------------------------------------------------- as a user runs them: one line, exit 2


@pytest.mark.parametrize("module, args, fragment", [
    ("generator.train", ["experiment=small", "data.root=D"], "missing value for tokenizer.spec"),
    ("generator.cache", ["+trainer.accumulate_grad_batches=4"], "nothing would read it"),
    ("sampling.generate", ["guidance_scale=3"], "write sampling.guidance_scale=3"),
])
def test_one_line_and_exit_2(tmp_path, module, args, fragment):
    assert_one_line_error(run_module(module, *args, cwd=tmp_path), fragment)
    assert not list(tmp_path.iterdir())  # nothing written: not even a Hydra output folder


# ---------------------------------------------------------------- experiment= where --help offers it


@pytest.mark.parametrize("name", ["small", "demo", "digits", "imagenet_l32"])
def test_generator_cache_takes_the_generator_experiments_cache_settings(name):
    """generator.cache experiment=NAME composes the data, tokenizer and cache settings generator.train
    experiment=NAME trains on, so the cache it builds is the one training then finds."""
    given = ["data.root=D", "tokenizer.spec=T"]
    cache = check("generator/cache", f"experiment={name}", *given)
    train = check("generator/train", f"experiment={name}", *given)
    assert dict(cache.cache) == dict(train.cache)
    assert {k: cache.data[k] for k in ("root", "split", "format")} == {k: train.data[k] for k in ("root", "split", "format")}
    assert dict(cache.tokenizer) == dict(train.tokenizer)


def test_generator_cache_experiment_builds_the_cache_training_reads(tmp_path):
    from test_stop import TOKENIZER, _images

    root = _images(tmp_path / "letters", 6)
    proc = run_module("generator.cache", "experiment=small", f"data.root={root}", f"tokenizer.spec={TOKENIZER / 'config.yaml'}",
               f"tokenizer.checkpoint={TOKENIZER / 'tokenizer.bin'}", "cache.dtype=fp32", "trainer.accelerator=cpu",
               cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # experiment=small caches no mirrors: 6 sequences, in the folder generator.train experiment=small reads.
    (built,) = (tmp_path / "data" / "token_cache").iterdir()
    assert built.name.startswith("letters-") and built.name.endswith("-noflip")
    assert f"token cache data/token_cache/{built.name}: 6 sequences" in proc.stdout


def test_reconstruct_offers_no_experiment(tmp_path):
    help_text = run_module("tokenizer.reconstruct", "--help", cwd=tmp_path).stdout
    assert "experiment=" not in help_text
    proc = run_module("tokenizer.reconstruct", "experiment=small", "inputs=x.png", cwd=tmp_path)
    assert proc.returncode == 2 and proc.stderr.startswith("error: ")
    assert "Could not override" not in proc.stderr and "tokenizer.train" in proc.stderr


# ---------------------------------------------------------------- sampling.generate


@pytest.mark.parametrize(
    "overrides, fragments",
    [
        (["class=10", "n=2"], ["class 10 is out of range", "0..9"]),
        (["class=3", "n=0"], ["n=0: must be at least 1"]),
        (["class=3", "n=2", "generator.checkpoint=missing/generator.bin"], ["not found", "missing/generator.bin"]),
    ],
    ids=["class-out-of-range", "n-zero", "missing-checkpoint"],
)
def test_generate_errors(tiny, tmp_path, overrides, fragments):
    args = tiny_args(tiny)
    if any(o.startswith("generator.checkpoint=") for o in overrides):
        args = [a for a in args if not a.startswith("generator.checkpoint=")]
    proc = run_module("sampling.generate", *args, *overrides, f"out_dir={tmp_path / 'out'}", cwd=tmp_path)
    assert_one_line_error(proc, *fragments)
    assert not list((tmp_path / "out").glob("*.png"))


def test_generate_mismatched_tokenizer(tiny, tmp_path):
    checkpoint = tiny_generator_file(tmp_path / "gen32.safetensors", codebook_size=32)
    proc = run_module(
        "sampling.generate", f"generator.checkpoint={checkpoint}", f"tokenizer.spec={tiny['tokenizer.spec']}",
        f"tokenizer.checkpoint={tiny['tokenizer.checkpoint']}", "class=1", "n=2", f"out_dir={tmp_path / 'out'}",
        cwd=tmp_path,
    )
    assert_one_line_error(proc, "does not match the generator", "64 codes", "32 codes")


def test_a_shipped_generator_works_as_spec_and_the_class_it_resolved_is_printed(tmp_path):
    """generator.spec=maskgit_demo finds its tokenizer as generator.checkpoint=maskgit_demo does: the same images."""
    runs = {}
    for key in ("spec", "checkpoint"):
        out = tmp_path / key
        proc = run_module("sampling.generate", f"generator.{key}=maskgit_demo", "class=star", "n=2", "dtype=fp32",
                       f"out_dir={out}", cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr
        assert "class=star -> 3 (03_yellow_star)" in proc.stderr.splitlines()
        runs[key] = [p.read_bytes() for p in sorted(out.glob("*.png"))]
    assert len(runs["spec"]) == 3 and runs["spec"] == runs["checkpoint"]


def test_generate_never_mixes_two_runs_in_one_out_dir(tiny, tmp_path):
    out = tmp_path / "out"
    proc = run_module("sampling.generate", *tiny_args(tiny), "class=1", "n=3", "dtype=fp32", f"out_dir={out}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "class=1 -> 1 (class 1)" in proc.stderr
    first = {p.name: p.read_bytes() for p in out.glob("*.png")}
    # Another request into the same folder: refused before anything is done, the first run's files untouched.
    proc = run_module("sampling.generate", *tiny_args(tiny), "class=2", "n=2", "dtype=fp32", f"out_dir={out}", cwd=tmp_path)
    assert_one_line_error(proc, f"out_dir={out} already holds 4 file(s)", "overwrite=true")
    assert {p.name: p.read_bytes() for p in out.glob("*.png")} == first
    # overwrite=true: the new samples only.
    proc = run_module("sampling.generate", *tiny_args(tiny), "class=2", "n=2", "dtype=fp32", f"out_dir={out}",
                   "overwrite=true", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in out.glob("*.png")) == ["grid.png", "sample_00000_class2.png", "sample_00001_class2.png"]


@pytest.mark.parametrize("module, args, random_hint", [
    ("sampling.generate", ["generator.spec=maskgit_l32"], False),
    ("tokenizer.reconstruct", ["inputs=x.png", "tokenizer.spec=titok_b64"], False),
    ("eval.gfid", ["mode=inception", "generator.spec=maskgit_b64", "reference=ref.npz"], True),
])
def test_the_missing_weights_hint_fits_the_command(tmp_path, module, args, random_hint):
    """Each command names what it takes: random_weights=true only where it is an option (eval.gfid)."""
    (tmp_path / "ref.npz").touch()  # eval.gfid checks that the files it is given exist before it loads a model
    proc = run_module(module, *args, cwd=tmp_path)
    line = assert_one_line_error(proc, "is a released", "hf download fun-research/TiTok")
    assert ("random_weights=true builds it untrained" in line) == random_hint, line
    assert "random_weights=True" not in line


def test_a_refused_request_creates_no_out_dir(tiny, tmp_path):
    proc = run_module("sampling.generate", *tiny_args(tiny), "class=99999", "n=2", f"out_dir={tmp_path / 'out'}",
                   cwd=tmp_path)
    assert_one_line_error(proc, "class 99999 is out of range")
    assert not (tmp_path / "out").exists()
    # Nor does Hydra leave anything of its own: no outputs/ run folder, no .hydra/ copy, no log file.
    assert list(tmp_path.iterdir()) == []
    done = run_module("sampling.generate", *tiny_args(tiny), "class=1", "n=2", f"out_dir={tmp_path / 'out'}",
                      cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    assert all(p.suffix == ".png" for p in (tmp_path / "out").iterdir()), sorted((tmp_path / "out").iterdir())


def test_gfid_missing_reference_and_weights(tiny, tmp_path, inception_weights, reference_npz):
    common = ["mode=inception", *tiny_args(tiny), "num_samples=10", "batch_size=10", "state_dir=null", "out=null"]
    proc = run_module(
        "eval.gfid", *common, f"reference={tmp_path / 'nope.npz'}", f"inception_weights={inception_weights}",
        cwd=tmp_path,
    )
    assert_one_line_error(proc, "reference statistics not found", "nope.npz")
    proc = run_module(
        "eval.gfid", *common, f"reference={reference_npz}", f"inception_weights={tmp_path / 'no-inception.pth'}",
        cwd=tmp_path,
    )
    assert_one_line_error(proc, "no-inception.pth")


# ---------------------------------------------------------------- a user error is a type; a bug keeps its traceback


def test_only_user_errors_become_one_line(capsys, monkeypatch):
    monkeypatch.delenv("TITOK_FULL_ERROR", raising=False)
    for error in (UsageError("bad option x=1"), MissingFileError("no such file: f"), BadFileError("f is damaged")):
        with pytest.raises(SystemExit) as stop, exit_on_user_error():
            raise error
        assert stop.value.code == 2
        assert capsys.readouterr().err == f"error: {error}\n"
    with pytest.raises(ValueError, match="shapes"), exit_on_user_error():  # a bug: not a user error
        raise ValueError("operands could not be broadcast together with shapes (3,) (4,)")
    with pytest.raises(FileNotFoundError), exit_on_user_error():  # an OSError from inside a library: the same
        open("/nonexistent/titok-gen-test")
    assert capsys.readouterr().err == ""
    monkeypatch.setenv("TITOK_FULL_ERROR", "1")
    with pytest.raises(UsageError), exit_on_user_error():  # asked for: the traceback of a user error too
        raise UsageError("bad option x=1")
    # The classes a caller catches still catch them.
    assert issubclass(UsageError, ValueError) and issubclass(MissingFileError, FileNotFoundError)
    assert all(issubclass(c, UserError) for c in (UsageError, MissingFileError, BadFileError))


_BUG_THEN_FULL_ERROR = """
import os
import sys

import tokenizer.reconstruct as entry

args, real = sys.argv[1:], entry.pick_device


def bug(name):  # a shape bug deep inside, as numpy or torch would raise it
    raise ValueError("operands could not be broadcast together with shapes (3,) (4,)")


for case in ("bug", "full-error"):  # one interpreter for both: the imports are most of the time
    print(f"---- {case}", file=sys.stderr)
    entry.pick_device = bug if case == "bug" else real
    if case == "full-error":
        os.environ["TITOK_FULL_ERROR"] = "1"
    sys.argv = ["tokenizer.reconstruct", *args]
    try:
        entry.main()
    except SystemExit as stop:
        print(f"exit {stop.code}", file=sys.stderr)
"""


def test_a_bug_keeps_its_traceback_and_TITOK_FULL_ERROR_shows_a_user_errors(tmp_path):
    """tokenizer.reconstruct as a user runs it, first with a ValueError from inside (a bug: its
    traceback, not one line), then with a missing input under TITOK_FULL_ERROR=1 (a user error,
    shown with its traceback)."""
    (tmp_path / "run.py").write_text(_BUG_THEN_FULL_ERROR)
    missing = tmp_path / "images" / "missing.png"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("TITOK_FULL_ERROR", None)
    proc = subprocess.run([sys.executable, str(tmp_path / "run.py"), f"inputs={missing}", "tokenizer.spec=titok_demo",
                           f"out_dir={tmp_path / 'out'}"], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=180)
    assert proc.returncode == 0, proc.stderr
    bug, full = proc.stderr.split("---- full-error\n")
    for err, last in ((bug, "ValueError: operands could not be broadcast together with shapes (3,) (4,)"),
                      (full, f"MissingFileError: no such file or folder: {missing}")):
        assert "Traceback (most recent call last)" in err and last in err, err
        assert "tokenizer/reconstruct.py" in err  # the frames of the entry point are shown
        assert not any(line.startswith("error: ") for line in err.splitlines()), err
        assert err.rstrip().endswith("exit 1"), err  # not 2: that is the one-line exit


@pytest.mark.parametrize("module, old, new", [
    ("titok_bench.tokenizer", "--preset", "--tokenizer-spec"), ("titok_bench.generator", "--preset", "--generator-spec"),
    ("titok_bench.sampling", "--checkpoint", "--generator-checkpoint"), ("titok_bench.eval", "--tokenizer", "--tokenizer-spec"),
    ("titok_bench.cache", "--tokenizer", "--tokenizer-spec"), ("titok_bench.formats", "--split", "--data-split"),
])
def test_a_benchmark_flag_of_the_old_vocabulary_names_the_new_one(capsys, module, old, new):
    with pytest.raises(SystemExit) as stop:
        importlib.import_module(module).main(["--data-root", "d", old, "v"] if module.endswith("formats") else [old, "v"])
    assert stop.value.code == 2
    assert capsys.readouterr().err == f"error: {old} was renamed: write {new} v\n"

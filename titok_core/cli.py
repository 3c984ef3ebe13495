"""The command line of every Hydra entry point: one clear line for every mistake, and ``--help``.

``hydra_entry`` wraps an entry point's task function. Before Hydra runs, it composes the
config once with the user's overrides and turns each kind of mistake into one ``error: ...``
line on stderr and exit code 2:

* an old spelling of an option (``renamed``: old key -> new key; see CHANGELOG.md);
* an unknown key, with the closest known key suggested;
* ``+key=value`` (Hydra's "add a key"): every option we read is in the config already, so an
  added key would be read by nothing;
* a value of the wrong type for a key whose default is a number or a boolean;
* a number out of its range: each entry point names its own counts (at least 1), rates (positive)
  and sizes that may be 0 but not negative (:class:`Ranges`);
* a mandatory value (``???``) left missing.

While the task runs, Ctrl-C prints one line (``interrupted``) and exits 130; the user errors the
task raises (:mod:`titok_core.errors`) print one line and exit 2, and every other exception keeps
its traceback. ``TITOK_FULL_ERROR=1`` shows the traceback of the command line's errors too.
``--help`` prints the entry point's description, then every option with its default and the
comment beside it in the YAML, then the config groups to choose from.
"""
from __future__ import annotations

import difflib
import functools
import re
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from titok_core.errors import RESUME_HINT, UsageError, full_error, report

CONF = Path(__file__).resolve().parent.parent / "conf"


# --------------------------------------------------------------------------- overrides

_OVERRIDE = re.compile(r"^(?P<prefix>\+\+|\+|~)?(?P<key>[A-Za-z_][\w.\-@/]*)(?:=(?P<value>.*))?$", re.S)


_NAME = re.compile(r"^[A-Za-z0-9_\-]+$")  # a config group's choice written as a plain name
_DURATION = re.compile(r"^\d+:\d+:\d+:\d+$")  # Lightning's max_time: DD:HH:MM:SS, whole numbers


def parse_overrides(argv: list[str]) -> list[tuple[str, str, str | None]]:
    """Command-line words -> [(prefix, key, value)], leaving out Hydra's own flags and ``hydra.*`` keys."""
    out = []
    for word in argv:
        if word.startswith("-"):
            continue
        m = _OVERRIDE.match(word)
        if m is None:
            raise UsageError(f"cannot read {word!r}: write key=value")
        key = m["key"]
        if key == "hydra" or key.startswith(("hydra.", "hydra/")):
            continue
        out.append((m["prefix"] or "", key, m["value"]))
    return out


def _flat_keys(node, prefix: str = "") -> dict[str, object]:
    """Every key of a composed config (nested keys dotted) -> its value (containers included)."""
    from omegaconf import DictConfig, OmegaConf

    out: dict[str, object] = {}
    if not isinstance(node, DictConfig):
        return out
    for key in node.keys():
        full = f"{prefix}{key}"
        if OmegaConf.is_missing(node, key):
            out[full] = "???"
            continue
        value = node._get_node(key)
        out[full] = value
        child = node[key]
        if isinstance(child, DictConfig):
            out.update(_flat_keys(child, full + "."))
    return out


def _renamed(key: str, renamed: Mapping[str, str]) -> str | None:
    for old, new in renamed.items():
        if key == old or key.startswith(old + "."):
            return new + key[len(old):]
    return None


def _closest(key: str, known: list[str]) -> str:
    matches = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    if not matches:  # a last part that exists under another group: "accumulate_grad_batches" -> trainer.
        last = key.rsplit(".", 1)[-1]
        matches = [k for k in known if k.rsplit(".", 1)[-1] == last][:1]
    return f" (did you mean {matches[0]}?)" if matches else ""


def _type_error(key: str, value: str, default) -> str | None:
    """A one-line complaint when ``value`` cannot stand for a ``default`` that is a number or a bool."""
    text = value.strip()
    if text in ("null", "None") or text.startswith("${"):
        return None
    if isinstance(default, bool):
        if text.lower() not in ("true", "false"):
            return f"{key}={value}: expected true or false"
    elif isinstance(default, int):
        if not re.fullmatch(r"[+-]?\d[\d_]*", text):
            return f"{key}={value}: expected an integer"
    elif isinstance(default, float):
        try:
            float(text)
        except ValueError:
            return f"{key}={value}: expected a number"
    return None


@dataclass(frozen=True)
class Ranges:
    """The options of one entry point whose numbers have a range, as dotted keys.

    at_least_one: counts (batch sizes, steps); positive: rates (learning rates); not_negative:
    sizes that may be 0 (workers, warm-up steps, a guidance scale). null keeps its meaning where
    an option allows it. ``a | b`` is both. Each entry point passes its own to :func:`hydra_entry`,
    made of those of its config groups, each declared beside the code that reads the group (the
    trainers' common options: :data:`titok_core.training.TRAINER_RANGES`).
    """

    at_least_one: tuple[str, ...] = ()
    positive: tuple[str, ...] = ()
    not_negative: tuple[str, ...] = ()

    def __or__(self, other: Ranges) -> Ranges:
        return Ranges(*(tuple(dict.fromkeys(a + b)) for a, b in
                        zip((self.at_least_one, self.positive, self.not_negative),
                            (other.at_least_one, other.positive, other.not_negative))))

    def keys(self) -> tuple[str, ...]:
        return self.at_least_one + self.positive + self.not_negative

    def error(self, key: str, value: str) -> str | None:
        """A one-line complaint when ``value`` is a number out of ``key``'s range, else None."""
        try:
            number = float(value)
        except ValueError:
            return None
        if key in self.at_least_one and number < 1:
            return f"{key}={value}: must be at least 1"
        if key in self.positive and number <= 0:
            return f"{key}={value}: must be positive"
        if key in self.not_negative and number < 0:
            return f"{key}={value}: must not be negative"
        return None


def check_command_line(
    argv: list[str], *, config_dir: Path, config_name: str, renamed: Mapping[str, str] = {},
    scalar_groups: Mapping[str, str] = {}, ranges: Ranges = Ranges(),
):
    """Compose the config with the overrides in ``argv``; raise UsageError (one line) for any mistake.

    renamed: old dotted key -> new key. scalar_groups: a group that used to be one value ->
    the key that value goes to now (``generator=X`` -> ``generator.spec``). ranges: the entry
    point's options with a range. Returns the config.
    """
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import DictConfig, OmegaConf
    from omegaconf.nodes import ValueNode

    overrides = parse_overrides(argv)
    for prefix, key, value in overrides:
        new = _renamed(key, renamed)
        if new is not None:
            raise UsageError(f"{prefix}{key}= was renamed: write {new}={value if value is not None else '...'}")
    group_dirs = config_groups(config_dir, config_name)
    for _, key, _ in overrides:
        if "." not in key and key not in group_dirs and (config_dir / key).is_dir():
            users = [f"{config_dir.name}.{f.stem}" for f in sorted(config_dir.glob("*.yaml"))
                     if key in config_groups(config_dir, f.stem)]
            raise UsageError(f"{key}=: {config_dir.name}.{config_name} has no {key}s"
                             + (f" (they are {' and '.join(users)}'s)" if users else ""))
    selections = [f"{p}{k}={v}" for p, k, v in overrides if k.split("/")[0] in group_dirs and "." not in k]
    for _, key, value in overrides:
        if (key in group_dirs and value and value != "null" and _NAME.match(value)
                and not (config_dir / key / f"{value}.yaml").is_file()):
            choices = sorted(f.stem for f in (config_dir / key).glob("*.yaml"))
            raise UsageError(f"{key}={value}: no such {key}{_closest(value, choices)}; the {key}s are: {', '.join(choices)}")
        if key == "trainer.max_time" and value and value.strip("'\"") != "null" and not _DURATION.match(value.strip("'\"")):
            raise UsageError(f"{key}={value}: write days:hours:minutes:seconds, e.g. {key}=00:00:05:00 for five minutes")
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(config_dir), version_base="1.3"):
            try:
                base = compose(config_name=config_name, overrides=selections)
            except Exception as exc:  # noqa: BLE001 - a bad group choice
                raise UsageError(_first_line(exc)) from None
            known_values = _flat_keys(base)
            known = sorted(known_values)
            for prefix, key, value in overrides:
                if key.split("/")[0] in group_dirs and "." not in key:
                    continue
                if prefix in ("+", "++"):
                    if key in known_values:
                        raise UsageError(f"{prefix}{key}: {key} is an option already; write {key}={value}")
                    raise UsageError(f"{prefix}{key}: no option {key} exists, so nothing would read it"
                                     + _closest(key, known))
                if key not in known_values:
                    raise UsageError(f"unknown option {key}{_closest(key, known)}")
                node = known_values[key]
                if key in scalar_groups and value is not None and not value.strip().startswith("{"):
                    raise UsageError(f"{key}= takes a group now: write {scalar_groups[key]}={value}")
                default = node._value() if isinstance(node, ValueNode) else None
                if value is not None:
                    problem = _type_error(key, value, default) or ranges.error(key, value)
                    if problem:
                        raise UsageError(problem)
            try:
                cfg = compose(config_name=config_name, overrides=[f"{p}{k}={v}" if v is not None else f"{p}{k}"
                                                                  for p, k, v in overrides])
            except Exception as exc:  # noqa: BLE001 - anything Hydra refuses, in its own words
                raise UsageError(_first_line(exc)) from None
    finally:
        GlobalHydra.instance().clear()
    missing = sorted(k for k in _missing_keys(cfg))
    if missing:
        raise UsageError(f"missing value for {', '.join(missing)}: pass {missing[0]}=...")
    assert isinstance(cfg, DictConfig)
    OmegaConf.resolve(cfg)
    return cfg


def _missing_keys(cfg) -> set[str]:
    from omegaconf import OmegaConf

    try:
        return set(OmegaConf.missing_keys(cfg))
    except AttributeError:  # omegaconf < 2.1
        return {k for k, v in _flat_keys(cfg).items() if v == "???"}


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


# --------------------------------------------------------------------------- --help

_COMMENTED = re.compile(r"^(?P<indent>\s*)(?P<key>[A-Za-z_][\w\-]*):(?P<value>[^#]*?)\s*(#\s?(?P<comment>.*))?$")


def describe_options(yaml_path: Path) -> list[tuple[str, str, str]]:
    """(dotted key, default as written, the comment beside it) for every key of one YAML file.

    A comment on the lines right below a key (indented under its comment) continues it."""
    rows: list[list[str]] = []
    stack: list[tuple[int, str]] = []
    last_comment_col = None
    for line in yaml_path.read_text().splitlines():
        if not line.strip():
            last_comment_col = None
            continue
        stripped = line.lstrip()
        if stripped.startswith("#"):
            col = len(line) - len(stripped)
            if rows and last_comment_col is not None and col >= last_comment_col:
                rows[-1][2] = (rows[-1][2] + " " + stripped.lstrip("#").strip()).strip()
            continue
        if stripped.startswith("-"):
            continue
        m = _COMMENTED.match(line)
        if m is None:
            continue
        indent = len(m["indent"])
        while stack and stack[-1][0] >= indent:
            stack.pop()
        key = ".".join([k for _, k in stack] + [m["key"]])
        value = m["value"].strip()
        if key in ("defaults", "hydra") or key.startswith(("hydra.", "defaults.")):
            stack.append((indent, m["key"]))
            last_comment_col = None
            continue
        rows.append([key, value, (m["comment"] or "").strip()])
        last_comment_col = line.index("#") if m["comment"] is not None else None
        if value == "":
            stack.append((indent, m["key"]))
    return [(k, v, c) for k, v, c in rows]


def _chosen_groups(config_dir: Path, config_name: str) -> set[str]:
    """The groups ``<config_name>.yaml`` chooses from in its defaults list (``group: choice`` entries;
    ``fit_sampling_search@fit_sampling`` -> ``fit_sampling_search``, ``override hydra/job_logging`` ->
    ``hydra/job_logging``)."""
    import yaml

    defaults = (yaml.safe_load((config_dir / f"{config_name}.yaml").read_text()) or {}).get("defaults") or []
    return {next(iter(entry)).removeprefix("override ").split("@")[0] for entry in defaults if isinstance(entry, dict)}


def config_groups(config_dir: Path, config_name: str) -> set[str]:
    """The config groups (folders of ``config_dir``) that ``<config_name>.yaml`` chooses from in its
    defaults list; the other folders there belong to other entry points."""
    return {name for name in _chosen_groups(config_dir, config_name) if (config_dir / name).is_dir()}


def help_text(*, description: str, config_dir: Path, config_name: str) -> str:
    """The text of ``--help``: the description, every option of the YAML, then the config groups."""
    lines = [description.strip(), "", f"Options (key=value; defaults from {config_dir.name}/{config_name}.yaml):"]
    rows = describe_options(config_dir / f"{config_name}.yaml")
    width = min(34, max((len(k) for k, _, _ in rows), default=10) + 2)
    for key, value, comment in rows:
        shown = f"{key} [{value}]" if value else key
        wrapped = f"  {shown}\n  {'':<{width}} {comment}"
        lines.append((f"  {shown:<{width}} {comment}" if len(shown) < width else wrapped).rstrip())
    groups = sorted(config_dir / name for name in config_groups(config_dir, config_name))
    for group in groups:
        choices = sorted(f.stem for f in group.glob("*.yaml"))
        lines += ["", f"Config group {group.name}= (choose one): {', '.join(choices)}"]
    lines += ["", "Hydra's own flags still work: --cfg job prints the composed config."]
    return "\n".join(lines)


# --------------------------------------------------------------------------- the wrapper

# Hydra writes nothing of its own: no run folder, no .hydra/ copy of the config, no log file (the
# console handler stays). A command line that sets hydra.* itself keeps Hydra's behaviour.
HYDRA_IN_PLACE = ("hydra.output_subdir=null", "hydra.run.dir=.", "hydra.job_logging.root.handlers=[console]",
                  "~hydra.job_logging.handlers.file")


def hydra_entry(
    *, config: str, description: str, renamed: Mapping[str, str] = {}, scalar_groups: Mapping[str, str] = {},
    ranges: Ranges = Ranges(), on_interrupt: str = RESUME_HINT,
) -> Callable[[Callable], Callable[[], None]]:
    """Decorate ``task(cfg)`` as the ``main()`` of an entry point whose config is ``conf/<config>.yaml``.

    description: the module's docstring (printed by --help). renamed / scalar_groups / ranges: see
    :func:`check_command_line`. on_interrupt: the line printed when Ctrl-C (exit 130) or SIGTERM
    (exit 143) stops the task (see :func:`titok_core.stopping.stop_cleanly`). The returned
    ``main`` carries ``main.task`` (the task), ``main.check(argv)`` (the checks it runs on a
    command line, returning the composed config) and ``main.ranges``, for tests.
    """
    import hydra

    config_dir = CONF / Path(config).parent
    config_name = Path(config).name

    def check(argv: list[str]):
        return check_command_line(argv, config_dir=config_dir, config_name=config_name, renamed=renamed,
                                  scalar_groups=scalar_groups, ranges=ranges)

    def decorate(task: Callable) -> Callable[[], None]:
        @functools.wraps(task)
        def guarded(cfg) -> None:
            from titok_core.stopping import stop_cleanly

            with stop_cleanly(on_interrupt):
                task(cfg)

        hydra_main = hydra.main(config_path=str(config_dir), config_name=config_name, version_base="1.3")(guarded)

        def main() -> None:
            argv = sys.argv[1:]
            if "--help" in argv or "-h" in argv:
                print(help_text(description=description, config_dir=config_dir, config_name=config_name))
                return
            if not any(a.startswith("--") for a in argv):  # --cfg, --multirun ...: Hydra's own business
                try:
                    check(argv)
                except UsageError as exc:
                    if full_error():
                        raise
                    report(exc)
                except KeyboardInterrupt:
                    print("interrupted", file=sys.stderr)
                    sys.exit(130)
            from titok_core.quiet import quiet_libraries

            quiet_libraries()
            if not any(a.lstrip("~+").startswith(("hydra.", "hydra/")) for a in argv):
                # A config that picks its own job logging (e.g. stdout) has no file handler to drop.
                own_logging = "hydra/job_logging" in _chosen_groups(config_dir, config_name)
                sys.argv = [sys.argv[0], *argv, *(HYDRA_IN_PLACE[:2] if own_logging else HYDRA_IN_PLACE)]
            try:
                hydra_main()
            except KeyboardInterrupt:
                print(on_interrupt, file=sys.stderr)
                sys.exit(130)

        main.task = task  # tests call the task with a composed config
        main.check, main.ranges = check, ranges
        return main

    return decorate

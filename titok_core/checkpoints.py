"""Reading and writing model files safely, shared by the tokenizer and the generator.

Nothing here ever unpickles code: torch files are read with ``weights_only=True`` and
everything else goes through safetensors. Every failure is a :class:`CheckpointError`
whose message is one line that names the file and the problem.

Our own model files are ``.safetensors`` with two metadata entries, so a file alone
rebuilds the exact model: ``titok_gen.kind`` ("tokenizer" or "generator") and
``titok_gen.config`` (the JSON of the model's constructor config).

Files are told apart by their first bytes, not their names (a safetensors file named
``.bin`` reads as safetensors), and the wrong file gets a line that says what it is: a file
of the other kind, a Lightning training checkpoint (``last.ckpt``), something that is no model
file at all, a file cut short, one of our files whose tensors disagree with its own config,
one made for another config (another image size, say), a bare state dict of the other model.

One file (over 400 lines) on purpose: every model file the project reads or writes passes through
it, so no reader can skip a check that another one makes.
"""
from __future__ import annotations

import json
import os
import re
import tempfile
import zipfile
from contextlib import contextmanager
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Callable, Iterator

import torch
from torch import nn

from titok_core.errors import BadFileError, MissingFileError

KIND_KEY = "titok_gen.kind"
CONFIG_KEY = "titok_gen.config"
EXTRA_KEY = "titok_gen.extra"
WEIGHT_NAMES = ("model.safetensors", "pytorch_model.bin")
_HF_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")


class CheckpointError(BadFileError):
    """A model file or spec that cannot be used; the message is one line."""


class MissingWeightsError(CheckpointError):
    """A released preset asked for without its weights (see :func:`require_weights`)."""


# The official .bin release on the Hugging Face hub: the files the official configs name and its
# sampling script downloads (the L-32, B-64 and S-128 tokenizers and generators). The other released
# models are on the hub as repos of config.json + model.safetensors (the presets' HUB_REPOS).
BIN_REPO = "fun-research/TiTok"


@dataclass
class Resolved:
    """What a spec pointed at: a config (plain dict) and/or a weights file."""

    config: dict | None
    weights: Path | None
    source: str


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; it replaces ``path`` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the file ordinary permissions
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


_SAFETENSORS_MAX_HEADER = 100_000_000  # the format's own limit on the JSON header


def _file_format(path: Path) -> str:
    """What a file is by its first bytes: "safetensors", "torch" (a zip, torch.save's format),
    "pickle" (torch.save's legacy format), "empty" or "unknown"."""
    with open(path, "rb") as f:
        head = f.read(16)
    if not head:
        return "empty"
    if head.startswith(b"PK\x03\x04"):
        return "torch"
    if head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        return "pickle"
    if len(head) > 8 and head[8:9] == b"{" and 2 <= int.from_bytes(head[:8], "little") <= _SAFETENSORS_MAX_HEADER:
        return "safetensors"
    return "unknown"


def _is_lightning_checkpoint(path: Path) -> bool:
    """Whether a torch zip file is a Lightning checkpoint, read without unpickling anything."""
    try:
        with zipfile.ZipFile(path) as z:
            pickles = [n for n in z.namelist() if n.rsplit("/", 1)[-1] == "data.pkl"]
            return bool(pickles) and b"pytorch-lightning_version" in z.read(pickles[0])
    except (zipfile.BadZipFile, OSError, KeyError, ValueError):
        return False


def check_model_file(path: str | os.PathLike) -> str:
    """The format of a model file (``"safetensors"``, ``"torch"`` or ``"pickle"``), or CheckpointError
    with one line saying what the file is instead: missing, empty, not a model file, a torch file
    cut short, a Lightning training checkpoint."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    fmt = _file_format(path)
    if fmt == "empty":
        raise CheckpointError(f"cannot read checkpoint {path}: the file is empty")
    if fmt == "unknown":
        with open(path, "rb") as f:
            head = f.read(12)
        raise CheckpointError(
            f"cannot read checkpoint {path}: not a model file (neither safetensors nor a PyTorch file; "
            f"it begins {head!r})"
        )
    if fmt == "torch":
        if not zipfile.is_zipfile(path):
            raise CheckpointError(f"cannot read checkpoint {path}: the PyTorch file is truncated or damaged "
                                  "(its zip directory is missing)")
        if _is_lightning_checkpoint(path):
            raise CheckpointError(
                f"{path} is a Lightning training checkpoint (the state a run resumes from), not model weights: "
                "pass the model file the run exported, <run_dir>/tokenizer.safetensors or "
                "<run_dir>/generator.safetensors"
            )
    return fmt


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a flat ``{name: tensor}`` state dict from a safetensors or torch file.

    Torch files go through ``torch.load(weights_only=True)``. Raises CheckpointError for a
    missing, truncated or non-state-dict file (see :func:`check_model_file`).
    """
    path = Path(path)
    fmt = check_model_file(path)
    try:
        if fmt == "safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any reader failure is a bad file
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if first.startswith("Weights only load failed"):  # torch's advice to load it unsafely is not ours
            first = "it holds Python objects besides tensors, which are never unpickled here"
        elif fmt == "safetensors":
            first = f"the safetensors file is truncated or damaged ({first})"
        raise CheckpointError(f"cannot read checkpoint {path}: {first}") from exc
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        holds = type(state).__name__
        if isinstance(state, dict):
            holds += " of " + ", ".join(str(k) for k in list(state)[:4])
        raise CheckpointError(f"{path} is not a flat state dict of tensors (it holds a {holds})")
    return state


def read_config_file(path: str | os.PathLike) -> dict:
    """Read an official YAML config (resolved through OmegaConf) or a JSON config as a plain dict."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"config not found: {path}")
    try:
        if path.suffix in (".yaml", ".yml"):
            from omegaconf import OmegaConf

            config = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
        else:
            config = json.loads(path.read_text())
    except Exception as exc:  # noqa: BLE001
        raise CheckpointError(f"cannot parse config {path}: {exc}") from exc
    if not isinstance(config, dict):
        raise CheckpointError(f"config {path} is not a mapping")
    return config


def _weights_in(directory: Path) -> Path | None:
    for name in WEIGHT_NAMES:
        if (directory / name).is_file():
            return directory / name
    return None


def _from_hub(repo_id: str) -> Path:
    """Download (or find in the local hub cache) the config and weights of ``repo_id``."""
    from huggingface_hub import snapshot_download

    patterns = ["config.json", *WEIGHT_NAMES]
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns))
    except Exception as first_exc:  # noqa: BLE001 - offline or not found: try the cache alone
        try:
            return Path(snapshot_download(repo_id, allow_patterns=patterns, local_files_only=True))
        except Exception:  # noqa: BLE001
            raise CheckpointError(
                f"cannot fetch Hugging Face repo '{repo_id}' ({type(first_exc).__name__}); offline, "
                f"download config.json and model.safetensors from https://huggingface.co/{repo_id} "
                f"into a directory and pass that directory instead"
            ) from first_exc


def resolve_spec(spec: str | os.PathLike) -> Resolved | None:
    """Turn a spec into a config and/or weights file.

    Handles an existing directory (``config.json`` plus ``model.safetensors`` or
    ``pytorch_model.bin``), an existing config file (``.yaml``/``.yml``/``.json``), an
    existing weights file, and a Hugging Face repo id (``owner/name``). Returns None for
    anything else (a preset name, say), which the caller handles.
    """
    path = Path(spec)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise CheckpointError(f"directory {path} has no config.json")
        weights = _weights_in(path)
        return Resolved(read_config_file(path / "config.json"), weights, str(path))
    if path.is_file():
        if path.suffix in (".yaml", ".yml", ".json"):
            return Resolved(read_config_file(path), None, str(path))
        return Resolved(None, path, str(path))
    text = str(spec)
    if _HF_REPO_ID.match(text) and not text.startswith((".", "/")) and path.suffix == "":
        directory = _from_hub(text)
        weights = _weights_in(directory)
        if not (directory / "config.json").is_file():
            raise CheckpointError(f"Hugging Face repo '{text}' has no config.json")
        return Resolved(read_config_file(directory / "config.json"), weights, f"hf:{text}")
    return None


def key_mismatches(expected: dict[str, tuple], got: dict[str, tuple], *, against: str = "model") -> list[str]:
    """Differences between two ``{key: shape}`` maps: one phrase per kind, [] when they agree.

    Shape mismatches are listed in ``expected``'s order, each as "key (got) vs <against> (expected)"."""
    missing = sorted(set(expected) - set(got))
    unexpected = sorted(set(got) - set(expected))
    wrong = [f"{k} {tuple(got[k])} vs {against} {tuple(expected[k])}" for k in expected
             if k in got and tuple(got[k]) != tuple(expected[k])]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing key(s) e.g. {', '.join(missing[:3])}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected key(s) e.g. {', '.join(unexpected[:3])}")
    if wrong:
        problems.append(f"{len(wrong)} shape mismatch(es) e.g. {'; '.join(wrong[:3])}")
    return problems


class _FileStateDict(dict):
    """The tensors of one of our model files; ``path`` names it, so a mismatch can say the file
    disagrees with its own config."""

    path: Path


def _weights_kind(keys) -> str | None:
    """Which model a state dict's keys belong to ("tokenizer", "generator"), official or ours; None if unclear."""
    keys = set(keys)
    has = {prefix: any(k.startswith(prefix) for k in keys) for prefix in ("encoder.", "decoder.")}
    if "latent_tokens" in keys and all(has.values()):
        return "tokenizer"
    if keys & {"token_embed.weight", "model.embeddings.word_embeddings.weight", "embeddings.weight"}:
        return "generator"
    return None


def load_strict(module: nn.Module, state_dict: dict[str, torch.Tensor], *, what: str) -> None:
    """Load ``state_dict`` into ``module`` exactly: every key present, nothing extra, same shapes.

    CheckpointError otherwise, one line: the weights of the other model ("holds generator weights,
    not tokenizer weights"), one of our files that disagrees with its own config metadata (damaged
    or edited; the first mismatching key is named first), or the missing, unexpected and misshapen keys.
    """
    expected = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in state_dict.items()}
    own = isinstance(state_dict, _FileStateDict)
    problems = key_mismatches(expected, got, against="config" if own else "model")
    if not problems:
        module.load_state_dict(state_dict, strict=True)
        return
    file_kind, model_kind = _weights_kind(got), _weights_kind(expected)
    if file_kind and model_kind and file_kind != model_kind:
        raise CheckpointError(f"{what} holds {file_kind} weights, not {model_kind} weights")
    if own:
        raise CheckpointError(f"{state_dict.path} does not match its own config metadata ({CONFIG_KEY}; the file "
                              "is damaged or was edited): " + "; ".join(problems))
    raise CheckpointError(f"{what} does not match the model: " + "; ".join(problems))


def save_model_file(
    path: str | os.PathLike, *, kind: str, config: dict, state_dict: dict[str, torch.Tensor],
    extra: dict | None = None,
) -> None:
    """Write our own model file (safetensors + kind + config metadata), atomically.

    ``extra`` is JSON that travels with the weights (sampling settings, the tokenizer the
    model was trained on, training figures); read it back with :func:`read_model_extra`.
    """
    from safetensors.torch import save_file

    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state_dict.items()}
    metadata = {KIND_KEY: kind, CONFIG_KEY: json.dumps(config), EXTRA_KEY: json.dumps(extra or {})}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)


def _metadata(path: Path) -> dict:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return f.metadata() or {}
    except Exception as exc:  # noqa: BLE001
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(
            f"cannot read checkpoint {path}: the safetensors file is truncated or damaged ({first})"
        ) from exc


def _is_safetensors(path: Path) -> bool:
    return path.is_file() and _file_format(path) == "safetensors"


def read_model_extra(path: str | os.PathLike) -> dict:
    """The ``extra`` JSON of one of our model files ({} for any other file)."""
    path = Path(path)
    if not _is_safetensors(path):
        return {}
    return json.loads(_metadata(path).get(EXTRA_KEY, "{}"))


def read_model_file(path: str | os.PathLike) -> tuple[str, dict, dict[str, torch.Tensor]] | None:
    """Read our own model file as (kind, config, state_dict); None if ``path`` is not one."""
    path = Path(path)
    if not _is_safetensors(path):
        return None
    metadata = _metadata(path)
    if KIND_KEY not in metadata:
        return None
    try:
        config = json.loads(metadata[CONFIG_KEY])
    except (KeyError, ValueError) as exc:
        raise CheckpointError(f"{path} says it is a {metadata[KIND_KEY]} but its config metadata ({CONFIG_KEY}) "
                              f"is missing or not JSON") from exc
    state = _FileStateDict(read_state_dict(path))
    state.path = path
    return metadata[KIND_KEY], config, state


def read_own_model(
    path: str | os.PathLike, *, kind: str, config: dict | None, ignore: tuple[str, ...] = (),
    translate: Callable[[dict], dict] | None = None,
) -> tuple[dict, dict[str, torch.Tensor]] | None:
    """One of our model files as (config, state_dict), checked; None if ``path`` is not ours.

    ``translate`` turns the file's config into today's spelling (files written before a rename)
    before anything else sees it. Raises CheckpointError when the file holds another kind of
    model, or when ``config`` is given and differs from the file's (keys in ``ignore`` aside,
    e.g. dropout rates).
    """
    check_model_file(path)  # one line for what is no model file at all (or a Lightning checkpoint)
    found = read_model_file(path)
    if found is None:
        return None
    file_kind, file_config, state_dict = found
    if file_kind != kind:
        raise CheckpointError(f"{path} is a {file_kind} model file, not a {kind}")
    if translate is not None:
        file_config = translate(file_config)
    if config is not None:
        diff = sorted(k for k in (set(config) | set(file_config)) - set(ignore) if config.get(k) != file_config.get(k))
        if diff:
            shown = sorted(diff, key=lambda k: k != "image_size")[:2]  # the image size says most
            values = "; ".join(f"{k} {file_config.get(k)!r} in the file, {config.get(k)!r} expected" for k in shown)
            raise CheckpointError(
                f"{path} was made for another {kind} config (differs in: {', '.join(diff)}): {values}"
            )
    return file_config, state_dict


def package_file(package: str, filename: str) -> Path:
    """A file shipped in ``package`` (e.g. "generator.assets"), as a real path; an error when missing."""
    path = Path(str(resources.files(package) / filename))
    if not path.is_file():
        raise MissingFileError(f"shipped model file {path} is missing: reinstall titok-gen")
    return path


def require_weights(
    spec, *, kind: str, hub_repos: dict[str, str], files: dict[str, str], in_bin_repo: frozenset[str] = frozenset(),
) -> None:
    """Refuse a released preset (``spec`` in ``hub_repos``) that is about to be built with no weights.

    Random weights of a released model are never what a user means: a token cache, a training run
    or an FID on them is hours of compute for nothing. The one-line MissingWeightsError says how to
    pass the weights: the official ``.bin`` file as ``<kind>.checkpoint`` (with where to download it,
    for the presets in ``in_bin_repo``: :data:`BIN_REPO`), or the preset's hub repo as ``<kind>.spec``.
    Code that wants random weights says ``random_weights=True`` (eval.gfid: ``random_weights=true``).
    """
    if isinstance(spec, str) and spec in hub_repos:
        where = f"hf download {BIN_REPO} {files[spec]}" if spec in in_bin_repo else "the official .bin"
        raise MissingWeightsError(
            f"{spec} is a released {kind} and no weights were given: pass {kind}.checkpoint={files[spec]} "
            f"({where}) or {kind}.spec={hub_repos[spec]} (its config.json and model.safetensors, fetched when online)"
        )

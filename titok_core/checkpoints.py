"""Reading and writing model files safely, shared by the tokenizer and the generator.

Nothing here ever unpickles code: torch files are read with ``weights_only=True`` and
everything else goes through safetensors. Every failure is a :class:`CheckpointError`
whose message is one line that names the file and the problem.

Our own model files are ``.safetensors`` with two metadata entries, so a file alone
rebuilds the exact model: ``titok_gen.kind`` ("tokenizer" or "generator") and
``titok_gen.config`` (the JSON of the model's constructor config).
"""
from __future__ import annotations

import json
import os
import re
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Iterator

import torch
from torch import nn

KIND_KEY = "titok_gen.kind"
CONFIG_KEY = "titok_gen.config"
EXTRA_KEY = "titok_gen.extra"
WEIGHT_NAMES = ("model.safetensors", "pytorch_model.bin")
_HF_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")


class CheckpointError(ValueError):
    """A model file or spec that cannot be used; the message is one line."""


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


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a flat ``{name: tensor}`` state dict from a ``.safetensors`` or torch file.

    Torch files go through ``torch.load(weights_only=True)``. Raises CheckpointError for a
    missing, truncated or non-state-dict file.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any reader failure is a bad file
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"cannot read checkpoint {path}: {first}") from exc
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path} is not a flat state dict of tensors")
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


def key_mismatches(expected: dict[str, tuple], got: dict[str, tuple]) -> list[str]:
    """Differences between two ``{key: shape}`` maps: one phrase per kind, [] when they agree."""
    missing = sorted(set(expected) - set(got))
    unexpected = sorted(set(got) - set(expected))
    wrong = [f"{k} {tuple(got[k])} vs model {tuple(expected[k])}" for k in expected
             if k in got and tuple(got[k]) != tuple(expected[k])]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing key(s) e.g. {', '.join(missing[:3])}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected key(s) e.g. {', '.join(unexpected[:3])}")
    if wrong:
        problems.append(f"{len(wrong)} shape mismatch(es) e.g. {'; '.join(wrong[:3])}")
    return problems


def load_strict(module: nn.Module, state_dict: dict[str, torch.Tensor], *, what: str) -> None:
    """Load ``state_dict`` into ``module`` exactly: every key present, nothing extra, same shapes."""
    problems = key_mismatches(
        {k: tuple(v.shape) for k, v in module.state_dict().items()}, {k: tuple(v.shape) for k, v in state_dict.items()}
    )
    if problems:
        raise CheckpointError(f"{what} does not match the model: " + "; ".join(problems))
    module.load_state_dict(state_dict, strict=True)


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
        raise CheckpointError(f"cannot read checkpoint {path}: {exc}") from exc


def read_model_extra(path: str | os.PathLike) -> dict:
    """The ``extra`` JSON of one of our model files ({} for any other file)."""
    path = Path(path)
    if path.suffix != ".safetensors" or not path.is_file():
        return {}
    return json.loads(_metadata(path).get(EXTRA_KEY, "{}"))


def read_model_file(path: str | os.PathLike) -> tuple[str, dict, dict[str, torch.Tensor]] | None:
    """Read our own model file as (kind, config, state_dict); None if ``path`` is not one."""
    path = Path(path)
    if path.suffix != ".safetensors" or not path.is_file():
        return None
    metadata = _metadata(path)
    if KIND_KEY not in metadata:
        return None
    return metadata[KIND_KEY], json.loads(metadata[CONFIG_KEY]), read_state_dict(path)


def read_own_model(
    path: str | os.PathLike, *, kind: str, config: dict | None, ignore: tuple[str, ...] = ()
) -> tuple[dict, dict[str, torch.Tensor]] | None:
    """One of our model files as (config, state_dict), checked; None if ``path`` is not ours.

    Raises CheckpointError when the file holds another kind of model, or when ``config`` is
    given and differs from the file's (keys in ``ignore`` aside, e.g. dropout rates).
    """
    found = read_model_file(path)
    if found is None:
        return None
    file_kind, file_config, state_dict = found
    if file_kind != kind:
        raise CheckpointError(f"{path} is a {file_kind} checkpoint, not a {kind}")
    if config is not None:
        diff = sorted(k for k in (set(config) | set(file_config)) - set(ignore) if config.get(k) != file_config.get(k))
        if diff:
            raise CheckpointError(f"{path} was made for another {kind} config (differs in: {', '.join(diff)})")
    return file_config, state_dict


def package_file(package: str, filename: str) -> Path:
    """A file shipped in ``package`` (e.g. "generator.assets"), as a real path; an error when missing."""
    path = Path(str(resources.files(package) / filename))
    if not path.is_file():
        raise FileNotFoundError(f"shipped model file {path} is missing: reinstall titok-gen")
    return path

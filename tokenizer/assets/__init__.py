"""Model files shipped inside the package (package data, found through importlib.resources).

``SHIPPED`` maps a name, usable wherever a tokenizer spec is taken (``load_tokenizer("titok_demo")``,
``tokenizer.spec=titok_demo``), to its file in this folder.
"""
from __future__ import annotations

from importlib import resources
from pathlib import Path

SHIPPED = {
    "titok_demo": "titok_demo.safetensors",  # experiment=demo: 64x64 shapes, 32 tokens x 1000 FSQ codes
}


def package_file(package: str, filename: str) -> Path:
    """A file shipped in ``package`` (e.g. "generator.assets"), as a real path; an error when missing."""
    path = Path(str(resources.files(package) / filename))
    if not path.is_file():
        raise FileNotFoundError(f"shipped model file {path} is missing: reinstall titok-gen")
    return path


def shipped_path(name: str) -> Path | None:
    """The file of a shipped tokenizer ``name`` (None when ``name`` is not one)."""
    return package_file(__name__, SHIPPED[name]) if name in SHIPPED else None

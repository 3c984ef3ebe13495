"""Model files shipped inside the package (package data, found through importlib.resources).

``SHIPPED`` maps a name, usable wherever a tokenizer spec is taken (``load_tokenizer("titok_demo")``,
``tokenizer.spec=titok_demo``), to its file in this folder.
"""
from __future__ import annotations

from pathlib import Path

from titok_core.checkpoints import package_file

SHIPPED = {
    "titok_demo": "titok_demo.safetensors",  # experiment=demo: 64x64 shapes, 32 tokens x 1000 FSQ codes
}


def shipped_path(name: str) -> Path | None:
    """The file of a shipped tokenizer ``name`` (None when ``name`` is not one)."""
    return package_file(__name__, SHIPPED[name]) if name in SHIPPED else None

"""Generator files shipped inside the package (package data, found through importlib.resources)."""
from __future__ import annotations

from pathlib import Path

from titok_core.checkpoints import package_file

SHIPPED = {
    # The demo generator (experiment=demo trained longer than the 5-minute quick start), the
    # default of sampling.generate, eval.gfid and sampling.serve when there is no local demo run.
    "maskgit_demo": "maskgit_demo.safetensors",
}


def shipped_path(name: str) -> Path | None:
    """The file of a shipped generator ``name`` (None when ``name`` is not one)."""
    return package_file(__name__, SHIPPED[name]) if name in SHIPPED else None

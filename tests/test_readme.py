"""The README says what is so: its Python example runs as written, its model table is the presets'
table, and every path it cites is in this repository (or said to be the official repository's)."""
from __future__ import annotations

import os
import re

import torch

from conftest import REPO

README = (REPO / "README.md").read_text()


def test_the_python_example_runs_as_written(tmp_path, monkeypatch):
    block = re.search(r"## Python API\n\n```python\n(.*?)```", README, re.S)
    assert block, "no Python block under ## Python API"
    monkeypatch.chdir(tmp_path)  # no demo run here: load_pipeline() takes the shipped maskgit_demo
    namespace: dict = {}
    exec(compile(block[1], "README.md (Python API)", "exec"), namespace)
    # The shapes and ranges its comments state.
    assert namespace["ids"].shape == (2, 32) and namespace["ids"].dtype == torch.int64
    assert namespace["tokens"].shape == (2, 32) and namespace["tokens"].dtype == torch.int64
    images = namespace["images"]
    assert images.shape == (8, 3, 64, 64) and images.dtype == torch.float32
    assert 0 <= float(images.min()) and float(images.max()) <= 1


def test_the_model_table_is_the_presets_table():
    from generator.presets import HUB_REPOS as GEN_REPOS
    from generator.presets import IN_BIN_REPO as GEN_BIN
    from generator.presets import RELEASED_FILES as GEN_FILES
    from titok_core.checkpoints import BIN_REPO
    from tokenizer.presets import HUB_REPOS as TOK_REPOS
    from tokenizer.presets import IN_BIN_REPO as TOK_BIN
    from tokenizer.presets import RELEASED_FILES as TOK_FILES

    rows = re.findall(r"^\| [^|]+ \| `(\w+)` \| `([\w/]+)` \| `([\w.]+)` \|$", README, re.M)
    table = {preset: (repo, file) for preset, repo, file in rows}
    want = {p: (TOK_REPOS[p], TOK_FILES[p]) for p in TOK_REPOS} | {p: (GEN_REPOS[p], GEN_FILES[p]) for p in GEN_REPOS}
    assert table == want
    # Where the .bin files are: the one repo the code names, for the presets it says are there.
    assert f"`.bin`\nfiles of L-32, B-64 and S-128 are in the hub repo `{BIN_REPO}`" in README
    assert f"hf download {BIN_REPO} tokenizer_titok_l32.bin generator_titok_l32.bin" in README
    assert TOK_BIN == {"titok_l32", "titok_b64", "titok_s128"} and GEN_BIN == set(GEN_REPOS)


def test_every_path_the_readme_cites_is_here_or_said_to_be_the_official_repositorys():
    # Folders git ignores (runs/, outputs/, data/: what a run writes) are cited as where output goes, not as files here.
    ignored = {line.rstrip("/") for line in (REPO / ".gitignore").read_text().split() if line.endswith("/")}
    tops = {p.name for p in REPO.iterdir() if not p.name.startswith(".") and p.name not in ignored} | {"configs"}
    cited = re.finditer(r"[`(]((?:[\w.-]+/)+[\w.<>*-]*)[`)]", README)
    missing = []
    for m in cited:
        path = m[1]
        if path.split("/")[0] not in tops or "://" in README[max(0, m.start() - 8):m.end()]:
            continue
        here = REPO / path.split("<")[0].rstrip("*")
        before = " ".join(README[max(0, m.start() - 60):m.start()].split())
        if not here.exists() and "official repository" not in before:
            missing.append(path)
    assert missing == []
    assert not (REPO / "configs").exists()
    assert os.path.isdir(REPO / "docs")

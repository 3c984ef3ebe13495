"""The code passes the project's linter (ruff, configured in pyproject.toml: pycodestyle, pyflakes,
import order, lines of at most 130 characters)."""
from __future__ import annotations

import shutil
import subprocess
import sys

import pytest

from conftest import REPO


def test_ruff_finds_nothing():
    ruff = shutil.which("ruff", path=str(REPO / ".venv" / "bin")) or shutil.which("ruff")
    if ruff is None:
        try:
            import ruff as _  # noqa: F401
        except ImportError:
            pytest.fail("ruff is not installed: pip install -e '.[dev]'")
        command = [sys.executable, "-m", "ruff"]
    else:
        command = [ruff]
    done = subprocess.run([*command, "check", "--no-cache", str(REPO)], capture_output=True, text=True, cwd=REPO)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]


def test_the_longest_first_list_names_test_files_that_exist():
    from conftest import LONGEST_FIRST

    tests = REPO / "tests"
    assert [name for name in LONGEST_FIRST if not (tests / name).is_file()] == []
    assert len(set(LONGEST_FIRST)) == len(LONGEST_FIRST)


def test_a_test_runs_one_cpu_thread_unless_it_asks_for_more():
    import torch

    assert torch.get_num_threads() == 1


@pytest.mark.cpu_threads(2)
def test_a_golden_comparison_gets_the_two_threads_its_outputs_were_made_with():
    import torch

    assert torch.get_num_threads() == 2

"""Shared fixtures: the official golden outputs (tests/fixtures), composed Hydra configs, a
random Inception, and the CPU threads of each test (one; two where a golden output is compared)."""
from __future__ import annotations

import os

# One thread per test process, for torch and for numpy's BLAS (OpenBLAS), here and in the commands
# the tests start: the suite runs one worker per core, and two threads a worker contending for the
# cores made Inception 2.6x and a 2048x2048 eigendecomposition (every FID) 1.7x slower on a busy
# 2-core machine. Set before torch and numpy are first imported (below).
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

from pathlib import Path  # noqa: E402
from typing import Iterable  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CONF = REPO / "conf"
FIXTURES = Path(__file__).resolve().parent / "fixtures"  # regenerate: scripts/make_official_fixtures.py
OFFICIAL_TINY = FIXTURES / "official_tiny"


@pytest.fixture(scope="session")
def official_tiny() -> Path:
    """The official golden outputs of tests/fixtures/official_tiny (see its README.md).

    They are part of the repository: a missing file is a failure, never a skip.
    """
    missing = [p for p in ("meta.json", "tokenizer/tokenizer.bin", "generator_imagebert/generator.bin",
                           "generator_uvit/generator.bin") if not (OFFICIAL_TINY / p).is_file()]
    if missing:
        pytest.fail(f"golden fixtures missing under {OFFICIAL_TINY}: {', '.join(missing)} "
                    "(restore them from git, or regenerate with scripts/make_official_fixtures.py)")
    return OFFICIAL_TINY


def compose_config(entry: str, overrides: Iterable[str] = ()):
    """The config an entry point composes: ``compose_config("tokenizer.train", ["experiment=demo"])``.

    ``entry`` is the module (``tokenizer.train``, ``generator.cache``, ``eval.gfid``, ...) or
    ``<package>/<name>``; the config is conf/<package>/<name>.yaml with Hydra's command-line
    ``overrides`` applied, as ``python -m <entry> <overrides>`` composes it (no run directory made).
    """
    from hydra import compose, initialize_config_dir

    package, _, name = entry.replace("/", ".").rpartition(".")
    conf_dir = CONF / package.replace(".", "/")
    if not package or not (conf_dir / f"{name}.yaml").is_file():
        raise FileNotFoundError(f"no config for entry point {entry!r} (looked for {conf_dir / (name + '.yaml')})")
    with initialize_config_dir(config_dir=str(conf_dir), version_base="1.3"):
        return compose(config_name=name, overrides=list(overrides))


@pytest.fixture(scope="session")
def compose():
    """``compose(entry, overrides)`` -> the composed DictConfig of conf/<package>/<name>.yaml (see compose_config)."""
    return compose_config


@pytest.fixture(scope="session")
def inception_weights(tmp_path_factory) -> Path:
    """A local Inception weights file with non-degenerate random weights.

    No real Inception weights exist offline, so tests save a randomly initialised torch-fidelity
    Inception and pass its path, as a user would pass the real one.
    """
    import torch_fidelity.feature_extractor_inceptionv3 as tf_inception

    class RandomInception(tf_inception.FeatureExtractorInceptionV3):
        """torch-fidelity's Inception keeping its random init (its constructor loads an empty state dict)."""

        def load_state_dict(self, state_dict, strict=True, assign=False):
            return super().load_state_dict(state_dict, strict=False, assign=assign)

    root = tmp_path_factory.mktemp("inception")
    torch.save({}, root / "empty.pth")
    net = RandomInception("inception-v3-compat", ["2048"], feature_extractor_weights_path=str(root / "empty.pth"))
    gen = torch.Generator().manual_seed(0)
    for m in net.modules():
        # PyTorch's default conv init shrinks activations layer by layer; He init keeps pool3 alive.
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, nonlinearity="relu", generator=gen)
        elif isinstance(m, nn.Linear):  # large enough logits that the softmax, and so IS, is not flat
            nn.init.normal_(m.weight, std=0.5, generator=gen)
    path = root / "random-inception.pth"
    torch.save(net.state_dict(), path)
    return path


@pytest.fixture(scope="session")
def reference_npz(tmp_path_factory) -> Path:
    """Reference statistics in the format eval writes (mu [2048], sigma [2048,2048]), random but valid."""
    import numpy as np

    from eval.reference import save_reference_stats

    rng = np.random.default_rng(0)
    features = rng.normal(size=(64, 2048))
    path = tmp_path_factory.mktemp("reference") / "ref.npz"
    return save_reference_stats(path, features.mean(0), np.cov(features, rowvar=False), {"source": "test"})


@pytest.fixture(autouse=True)
def _cpu_threads(request):
    """torch's threads for the test: 1, or ``@pytest.mark.cpu_threads(n)``'s n. The golden outputs were
    made with 2 threads, and results move by ~3e-5 with other counts, so their comparisons ask for 2."""
    marker = request.node.get_closest_marker("cpu_threads")
    torch.set_num_threads(marker.args[0] if marker else 1)
    yield


# The test files that take longest, longest first (measured with --durations=0 on a 2-core CPU).
# With pytest-xdist each file runs whole on one worker (--dist loadfile, --no-loadscope-reorder),
# in this order and then the rest as collected, so that no long file is left to run alone at the end.
LONGEST_FIRST = (
    "test_command_line.py", "test_command_outputs.py", "test_kill_eval.py", "test_eval.py", "test_stop.py",
    "test_data_formats.py", "test_adm_table.py", "test_gpu_check.py", "test_installed.py",
    "test_generator_train.py", "test_training_screen.py", "test_multinode.py", "test_fit_sampling.py",
    "test_kill_resume.py", "test_tokenizer_train.py", "test_demo_gap.py", "test_fast_sampling.py",
    "test_readme.py", "test_gfid_overlap.py",
)


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the rest keep their order
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)

"""eval.gfid streams sample -> decode -> Inception as overlapped stages; the figures are those of the plain loop."""
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir

from eval.fidelity import InceptionFeatures
from eval.gfid import run
from eval.reference import load_reference_stats, save_reference_stats
from eval.samples import class_balanced_labels, pipeline_from_config
from sampling import sample_tokens
from titok_core.images import to_uint8
from titok_core.metrics import fid_from_stats

from conftest import CONF

EVAL_CONF = CONF / "eval"


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    features = np.random.default_rng(0).normal(size=(64, 2048))
    path = tmp_path_factory.mktemp("reference") / "ref.npz"
    return save_reference_stats(path, features.mean(0), np.cov(features, rowvar=False), {"source": "test"})


def _cfg(official_tiny, reference, inception_weights, **overrides):
    fx = official_tiny
    args = {
        "mode": "inception", "generator.spec": fx / "generator_imagebert" / "config.yaml",
        "generator.checkpoint": fx / "generator_imagebert" / "generator.bin", "tokenizer.spec": fx / "tokenizer" / "config.yaml",
        "tokenizer.checkpoint": fx / "tokenizer" / "tokenizer.bin", "reference": reference,
        "inception_weights": inception_weights, "num_samples": 10, "batch_size": 5, "state_dir": "null",
        "out": "null", "seed": 3, **overrides,
    }
    with initialize_config_dir(config_dir=str(EVAL_CONF), version_base="1.3"):
        return compose("gfid", overrides=[f"{k}={v}" for k, v in args.items()])


def test_pipelined_gfid_equals_the_plain_loop(official_tiny, reference, inception_weights):
    cfg = _cfg(official_tiny, reference, inception_weights, **{"trainer.accelerator": "cpu"}, dtype="fp32")
    result = run(cfg)
    assert result["overlap"] is True and result["num_samples"] == 10 and result["loop_seconds"] > 0

    # The loop eval.gfid ran before the stages were split: batch b with seed * 1_000_003 + b.
    pipe = pipeline_from_config(cfg)
    acc = InceptionFeatures(inception_weights)
    labels = class_balanced_labels(10, pipe.generator.num_classes)
    for b, start in enumerate(range(0, 10, 5)):
        rng = torch.Generator().manual_seed(3 * 1_000_003 + b)
        with torch.inference_mode():
            tokens = sample_tokens(pipe.generator, labels[start : start + 5], rng=rng, **pipe.sampling)
            acc.update(to_uint8(pipe.tokenizer.decode(tokens).float()))
    mu, sigma = acc.fid_stats()
    assert result["fid"] == fid_from_stats(mu, sigma, *load_reference_stats(reference))
    assert (result["is_mean"], result["is_std"]) == acc.inception_score()


@pytest.mark.gpu
def test_gpu_overlap_keeps_the_figures(official_tiny, reference, inception_weights):
    a = run(_cfg(official_tiny, reference, inception_weights, overlap=True))
    b = run(_cfg(official_tiny, reference, inception_weights, overlap=False))
    assert (a["fid"], a["is_mean"], a["is_std"]) == (b["fid"], b["is_mean"], b["is_std"])
    fast = run(_cfg(official_tiny, reference, inception_weights, sampler_compile="reduce-overhead",
                    decoder_compile="default"))
    assert fast["sampler_compile"] == "reduce-overhead" and np.isfinite(fast["fid"]) and fast["num_samples"] == 10

"""What the generator modes share: the models named by the config, class-balanced labels, the
order of the samples in an ADM .npz, and the sampler/decoder pair."""
from __future__ import annotations

import math

import numpy as np
import torch
from omegaconf import DictConfig

from sampling import sample_tokens
from sampling.fast import FastDecoder, StaticSampler
from sampling.pipeline import Pipeline, load_pipeline, pipeline_kwargs


def pipeline_from_config(cfg: DictConfig) -> Pipeline:
    """The generator, tokenizer and sampling settings of eval.gfid's ``generator``, ``tokenizer`` and
    ``sampling`` groups (null: the checkpoint's or preset's value; nothing: the latest demo run)."""
    return load_pipeline(**pipeline_kwargs(cfg), random_weights=bool(cfg.get("random_weights", False)))


def class_balanced_labels(num_samples: int, num_classes: int) -> torch.Tensor:
    """int64 [num_samples]: the same count of every class (50 per class for 50k / 1000), in class order."""
    per_class = math.ceil(num_samples / num_classes)
    return torch.arange(num_classes).repeat_interleave(per_class)[:num_samples]


def interleaved_order(labels: torch.Tensor | np.ndarray) -> np.ndarray:
    """The sample indices in the order an ADM .npz holds them: one of each class in turn.

    labels int64 [N] -> int64 [N]: first the first sample of every class (by class), then the
    second of every class, and so on; 50k samples of 1000 classes become class 0, 1, ..., 999,
    0, 1, ... as in TiTok's sample_imagenet_titok.py. The ADM evaluator computes the Inception
    Score over consecutive splits of 5,000 (unshuffled), so each split must hold every class
    alike; in class order, each would hold only 100 classes and the score would drop.
    """
    labels = np.asarray(labels, dtype=np.int64)
    by_class = np.argsort(labels, kind="stable")
    sorted_labels = labels[by_class]
    rank_in_class = np.empty(len(labels), dtype=np.int64)
    rank_in_class[by_class] = np.arange(len(labels)) - np.searchsorted(sorted_labels, sorted_labels, side="left")
    return np.lexsort((labels, rank_in_class))  # by rank within the class, then by class


def sampler_and_decoder(pipe: Pipeline, cfg: DictConfig):
    """(labels, rng) -> tokens and tokens -> images: eager by default, sampling.fast with compile modes."""
    sampler_mode, decoder_mode = cfg.get("sampler_compile", "none"), cfg.get("decoder_compile", "none")
    if sampler_mode == "none":
        def sampler(labels, rng):
            return sample_tokens(pipe.generator, labels, rng=rng, **pipe.sampling)
    else:
        sampler = StaticSampler(pipe.generator, sampling=pipe.sampling, compile=sampler_mode)
    decoder = pipe.tokenizer.decode if decoder_mode == "none" else FastDecoder(
        pipe.tokenizer, compile=decoder_mode, channels_last=True)
    return sampler, decoder

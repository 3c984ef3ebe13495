"""Judging one candidate: draw its samples with a fixed seed, decode them, and score them with the
dataset's classifier against the held-out images."""
from __future__ import annotations

import math
import os
from collections.abc import Callable
from pathlib import Path

import torch

from generator.sampler import sample_tokens
from titok_core.images import to_uint8
from titok_core.runtime import autocast


class Judge:
    """The dataset's classifier and its features of the held-out real images."""

    def __init__(self, root: str | os.PathLike, *, resolution: int, steps: int, device: torch.device):
        from titok_core.judges import heldout_description, judge_files, load_demo_classifier, load_judge_part

        self.root = Path(root)
        split = judge_files(root)  # a dataset the judges cannot split stops here, before any training
        self.classifier = load_demo_classifier(root, device=str(device), steps=steps, resolution=resolution)
        images, labels = load_judge_part(split, "heldout", resolution=self.classifier.resolution)
        self.real_features = self.classifier.features(images.float() / 255)
        self.held_out = heldout_description(split)
        self.held_out_images = len(labels)
        self.record = {
            "kind": "demo_classifier", "data_root": str(root), "held_out": self.held_out,
            "held_out_images": self.held_out_images, "steps": steps, "resolution": self.classifier.resolution,
            "classes": self.classifier.classes, "held_out_accuracy": self.classifier.config.get("val_accuracy"),
        }

    def identity(self) -> dict:
        from titok_core.judges import cache_key
        from titok_core.runs import dataset_fingerprint

        return {**{k: v for k, v in self.record.items() if k != "held_out_accuracy"},
                "data_root": str(self.root.resolve()), "data_files": dataset_fingerprint(self.root),
                "cache_key": cache_key(self.root, seed=0, steps=self.record["steps"],
                                       resolution=self.record["resolution"])}

    def fid(self, fake_features: torch.Tensor) -> float:
        from titok_core.judges import classifier_fid

        return classifier_fid(self.real_features, fake_features)


def class_balanced(num_samples: int, num_classes: int) -> torch.Tensor:
    """int64 [ceil(num_samples / num_classes) * num_classes]: the same count of every class, in class order."""
    return torch.arange(num_classes).repeat_interleave(math.ceil(num_samples / num_classes))


@torch.no_grad()
def draw_and_judge(
    generator, tokenizer, judge: Judge, settings: dict, *, labels: torch.Tensor, seed: int, batch_size: int,
    dtype: str, device: torch.device, on_batch: Callable[[int], None] | None = None,
) -> tuple[torch.Tensor, int]:
    """Sample one image per label with ``settings`` (one torch.Generator seeded ``seed``, drawn batch
    after batch), decode, judge as saved (uint8): (classifier features float32 [n,D], correct count)."""
    rng = torch.Generator(device=device).manual_seed(seed)
    features, correct = [], 0
    for start in range(0, len(labels), batch_size):
        y = labels[start : start + batch_size].to(device)
        with torch.inference_mode(), autocast(device, dtype):
            tokens = sample_tokens(generator, y, rng=rng, **settings)
            images = tokenizer.decode(tokens).float()
        images = to_uint8(images).float() / 255
        correct += int((judge.classifier.classify(images).argmax(-1) == y.cpu()).sum())
        features.append(judge.classifier.features(images))
        if on_batch is not None:
            on_batch(len(y))
    return torch.cat(features), correct

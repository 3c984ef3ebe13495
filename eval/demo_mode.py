"""``eval.gfid mode=demo`` (the default without a checkpoint): the demo generator judged by two
classifiers trained on the real demo images: class accuracy, a FID in the demo classifier's
feature space, precision/recall there, and by shape alone (a colour-blind classifier)."""
from __future__ import annotations

from pathlib import Path

import torch
from omegaconf import DictConfig
from tqdm import tqdm

from eval.adm import precision_recall
from eval.samples import class_balanced_labels, pipeline_from_config
from sampling import sample_tokens
from titok_core.errors import MissingFileError
from titok_core.images import save_png, to_uint8
from titok_core.metrics import psnr
from titok_core.runtime import autocast


def token_entropy(tokens: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean over classes and positions of the entropy (bits) of the tokens seen there.

    tokens int64 [N,L], labels int64 [N]. A diversity gauge for samples: compare it with the
    same statistic of as many real images' tokens (per class); samples that all look alike
    score far lower. Biased low for small counts, so compare equal counts only.
    """
    values = []
    for c in labels.unique():
        t = tokens[labels == c]  # (n, L)
        for column in t.T:
            p = torch.bincount(column).float()
            p = p[p > 0] / len(column)
            values.append(float(-(p * p.log2()).sum()))
    return sum(values) / max(1, len(values))


def evaluate_demo(cfg: DictConfig, device: torch.device) -> dict:
    """The demo domain (or any image-folder dataset), judged by two independent classifiers trained on its real images.

    The demo classifier gives class accuracy, a FID on its features and precision/recall in its
    feature space; the colour-blind classifier (:func:`titok_core.judges.colour_blind`) must
    recognise each sample by its shape alone, since every demo class also has its own colour.
    The judges train on ``<root>/train`` and judge against ``<root>/val``; without ``val/`` they
    hold out a fixed tenth of every class of ``train/`` (:func:`titok_core.judges.judge_files`).

    Beside the samples, the tokenizer's ceiling: what the same judges make of its reconstructions.
    Accuracies are measured on the reconstructions of the held-out images (``reconstruction_*``);
    the ceiling's classifier-FID, precision and recall on the reconstructions of as many training
    images per class as there are samples (what a generator that drew its training tokens exactly
    would give), against the same held-out images as the samples (``ceiling_*``). The ratios
    samples / ceiling: ``fid_ratio`` (1 is the best a generator can do; lower is better),
    ``accuracy_ratio`` and ``colour_blind_ratio`` (1 is the best; higher is better).
    """
    from titok_core.judges import (
        DEMO_FID_LABEL,
        classifier_fid,
        heldout_description,
        judge_files,
        load_demo_classifier,
        load_judge_part,
    )

    pipe = pipeline_from_config(cfg).to(device)
    data = pipe.extra.get("data", {})
    root = cfg.data.root or data.get("root")
    builtin = data.get("builtin") or ("demo" if data.get("demo") else None)
    if root and builtin and not cfg.data.root and not (Path(root) / "train").is_dir():
        from titok_core.builtin import make_builtin_dataset

        make_builtin_dataset(builtin, root, size=pipe.tokenizer.image_size)  # a fresh directory: make it again
    if not root or not (Path(root) / "train").is_dir():
        raise MissingFileError(f"demo data not found at {root}: pass data.root=... (the folder with train/ and val/)")
    split = judge_files(root)  # a dataset the judges cannot split stops here, before any training
    res = pipe.tokenizer.image_size
    classifier = load_demo_classifier(root, device=str(device), steps=cfg.classifier_steps, resolution=res)
    shape_judge = load_demo_classifier(root, device=str(device), colour_blind=True, steps=cfg.colour_blind_steps,
                                       resolution=res)
    num_classes = pipe.generator.num_classes

    def hits(judge, images: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Per class, how many of ``images`` the judge puts in their class ``y``: float [num_classes]."""
        y = y.cpu()
        return torch.bincount(y[judge.classify(images).argmax(-1).cpu() == y], minlength=num_classes).float()

    def reconstruct(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """uint8 [B,3,R,R] -> (tokens int64 [B,L] on the CPU, reconstructions float [B,3,R,R] in [0,1], as saved)."""
        with torch.inference_mode():
            tokens = pipe.tokenizer.encode(images.to(device).float() / 255)
            with autocast(device, cfg.dtype):
                recon = to_uint8(pipe.tokenizer.decode(tokens).float()).float() / 255
        return tokens.cpu(), recon

    labels = class_balanced_labels(cfg.demo_per_class * num_classes, num_classes)
    rng = torch.Generator(device=device).manual_seed(cfg.seed)
    feats, correct, shape_correct, sampled = [], torch.zeros(num_classes), torch.zeros(num_classes), []
    for start in tqdm(range(0, len(labels), cfg.batch_size), desc="demo samples", unit="batch", disable=None):
        y = labels[start : start + cfg.batch_size].to(device)
        with torch.inference_mode(), autocast(device, cfg.dtype):
            tokens = sample_tokens(pipe.generator, y, rng=rng, **pipe.sampling)
            images = pipe.tokenizer.decode(tokens).float()
        sampled.append(tokens.cpu())
        images = to_uint8(images).float() / 255  # judged as saved
        correct += hits(classifier, images, y)
        shape_correct += hits(shape_judge, images, y)
        feats.append(classifier.features(images).cpu())
        if cfg.save_images and start == 0:
            save_png(images, Path(cfg.save_images) / "demo_samples.png")
    val_images, val_labels = load_judge_part(split, "heldout", resolution=classifier.resolution)
    real = classifier.features(val_images.float() / 255).cpu()
    n = min(int(torch.bincount(val_labels).min()), cfg.demo_per_class)  # equal counts per class for both
    # The tokenizer's ceiling: what the judges make of its reconstructions of the held-out images.
    # A sample cannot keep a shape that the tokenizer's decoder never draws.
    recon_correct, recon_shape, recon_psnr, real_tokens = torch.zeros(num_classes), torch.zeros(num_classes), 0.0, []
    for part, y in zip(val_images.split(cfg.batch_size), val_labels.split(cfg.batch_size)):
        part_tokens, recon = reconstruct(part)
        real_tokens.append(part_tokens)
        recon_psnr += float(psnr(part.to(device).float() / 255, recon).sum())
        recon_correct += hits(classifier, recon, y)
        recon_shape += hits(shape_judge, recon, y)
    real_tokens = torch.cat(real_tokens)
    val_counts = torch.bincount(val_labels, minlength=num_classes).clamp(min=1).float()

    def first_n(y: torch.Tensor) -> torch.Tensor:
        return torch.cat([torch.nonzero(y == c).flatten()[:n] for c in range(num_classes)])

    fake_keep, real_keep = first_n(labels), first_n(val_labels)
    train_images, train_labels = load_judge_part(split, "train", resolution=classifier.resolution)
    # The real-vs-real scale: as many training images of every class as it has held-out ones.
    train_feats = classifier.features(train_images[real_reference_index(train_labels, val_labels)].float() / 255).cpu()
    # The ceiling's FID: reconstructions of demo_per_class training images of every class (evenly
    # strided within the class), scored against the held-out images exactly as the samples are.
    ceiling_index = _strided_per_class(train_labels, [cfg.demo_per_class] * num_classes)
    ceiling_feats, ceiling_correct, ceiling_shape = [], torch.zeros(num_classes), torch.zeros(num_classes)
    for index in ceiling_index.split(cfg.batch_size):
        _, recon = reconstruct(train_images[index])
        ceiling_feats.append(classifier.features(recon).cpu())
        ceiling_correct += hits(classifier, recon, train_labels[index])
        ceiling_shape += hits(shape_judge, recon, train_labels[index])
    ceiling_feats = torch.cat(ceiling_feats)
    per_class = (correct / cfg.demo_per_class).tolist()
    fake = torch.cat(feats)
    precision, recall = precision_recall(fake, real)
    real_precision, real_recall = precision_recall(train_feats, real)
    ceiling_precision, ceiling_recall = precision_recall(ceiling_feats, real)
    result = {
        "metric": "demo", "class_accuracy": float(correct.sum()) / len(labels), "per_class_accuracy": per_class,
        "colour_blind_accuracy": float(shape_correct.sum()) / len(labels),
        "colour_blind_per_class_accuracy": (shape_correct / cfg.demo_per_class).tolist(),
        "colour_blind_val_accuracy": shape_judge.config.get("val_accuracy"),
        "classifier_fid": classifier_fid(real, fake),
        "classifier_fid_real_train_vs_val": classifier_fid(real, train_feats),
        "precision": precision, "recall": recall,
        "token_entropy_bits": token_entropy(torch.cat(sampled)[fake_keep], labels[fake_keep]),
        "token_entropy_bits_real_val": token_entropy(real_tokens[real_keep], val_labels[real_keep]),
        "precision_recall_real_train_vs_val": [real_precision, real_recall],
        "fid_label": DEMO_FID_LABEL, "classifier_val_accuracy": classifier.config.get("val_accuracy"),
        "num_samples": len(labels), "model": pipe.source, "sampling": pipe.sampling, "seed": cfg.seed,
        "data": {"root": str(root)}, "generator_step": pipe.extra.get("global_step"),
        "heldout": heldout_description(split), "heldout_images": len(val_labels),
        "reconstruction_psnr": recon_psnr / len(val_labels),
        "reconstruction_class_accuracy": float(recon_correct.sum()) / len(val_labels),
        "reconstruction_colour_blind_accuracy": float(recon_shape.sum()) / len(val_labels),
        "reconstruction_colour_blind_per_class_accuracy": (recon_shape / val_counts).tolist(),
        "ceiling_images": len(ceiling_index),
        "ceiling_classifier_fid": classifier_fid(real, ceiling_feats),
        "ceiling_precision": ceiling_precision, "ceiling_recall": ceiling_recall,
        "ceiling_train_class_accuracy": float(ceiling_correct.sum()) / len(ceiling_index),
        "ceiling_train_colour_blind_accuracy": float(ceiling_shape.sum()) / len(ceiling_index),
    }
    result.update(gap_ratios(result))
    return result


def real_reference_index(train_labels: torch.Tensor, heldout_labels: torch.Tensor) -> torch.Tensor:
    """Which training images (int64 indices into ``train_labels``) stand beside the held-out ones for the
    real-vs-real figures: for every class, as many as it has held-out images, evenly spread over the class.

    A stride over the whole split (ordered by class) would drop the last classes wherever the split sizes are not
    multiples of each other (the digits: 1,528 against 269 left out class 9 and a quarter of class 8).
    """
    num_classes = int(max(train_labels.max(), heldout_labels.max())) + 1
    in_train = torch.bincount(train_labels, minlength=num_classes) > 0
    return _strided_per_class(train_labels, (torch.bincount(heldout_labels, minlength=num_classes) * in_train).tolist())


def _strided_per_class(labels: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """Indices into ``labels``: ``counts[c]`` of class c's, evenly spread over the class (:func:`_strided`), in class
    order; a class whose count is 0 gives none."""
    return torch.cat([_strided(torch.nonzero(labels == c).flatten(), n) for c, n in enumerate(counts)])


def _strided(index: torch.Tensor, count: int) -> torch.Tensor:
    """``count`` entries of ``index`` evenly spread over it (all of them, repeated in turn, when it is shorter)."""
    if len(index) >= count:
        return index[torch.linspace(0, len(index) - 1, count).round().long()]
    return index[torch.arange(count) % len(index)]


def gap_ratios(result: dict) -> dict:
    """The gap between the samples and the tokenizer's ceiling, from an :func:`evaluate_demo` result.

    fid_ratio: samples' classifier-FID / the ceiling's (>= 1 in practice; the target is <= 1.5);
    accuracy_ratio, colour_blind_ratio: samples' accuracy / the held-out reconstructions' (the
    target is >= 0.9). None where the denominator is 0.
    """
    def ratio(a: float, b: float) -> float | None:
        return a / b if b else None

    return {
        "fid_ratio": ratio(result["classifier_fid"], result["ceiling_classifier_fid"]),
        "accuracy_ratio": ratio(result["class_accuracy"], result["reconstruction_class_accuracy"]),
        "colour_blind_ratio": ratio(result["colour_blind_accuracy"], result["reconstruction_colour_blind_accuracy"]),
    }

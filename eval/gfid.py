"""Measure a generator (gFID, IS), a tokenizer (rFID, PSNR, SSIM) or the demo run.

    python -m eval.gfid                                    # the latest demo run: class accuracy + demo-classifier FID
    python -m eval.gfid mode=inception generator=maskgit_l32 checkpoint=generator_titok_l32.bin \
        tokenizer=titok_l32 tokenizer_checkpoint=tokenizer_titok_l32.bin reference=VIRTUAL_imagenet256_labeled.npz
    python -m eval.gfid mode=rfid tokenizer=titok_l32 tokenizer_checkpoint=... data_root=/data/imagenet/val

Samples stream through Inception batch by batch (no folder of PNGs; ``save_images`` keeps
them). With ``devices`` > 1 each process takes every W-th batch and the statistics are
gathered. Every ``state_every`` batches each process saves its accumulated statistics, so a
killed run resumes where it stopped. Prints one JSON line with the figures and what produced
them (and writes it to ``out``), then a short summary.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from pathlib import Path

import hydra
import numpy as np
import torch
from omegaconf import DictConfig
from tqdm import tqdm

from eval.fidelity import (
    InceptionFeatures,
    ReferenceStatsError,
    fid_from_stats,
    list_image_files,
    load_reference_stats,
    reference_stats_from_folder,
)
from sampling import sample_tokens
from sampling.fast import FastDecoder, StaticSampler, pipelined
from sampling.pipeline import SAMPLING_KEYS, load_pipeline
from tokenizer import CheckpointError, load_tokenizer
from titok_core.checkpoints import atomic_path
from titok_core.images import save_png, to_uint8
from titok_core.metrics import psnr, ssim
from titok_core.runtime import autocast, exit_on_user_error

log = logging.getLogger(__name__)


def class_balanced_labels(num_samples: int, num_classes: int) -> torch.Tensor:
    """int64 [num_samples]: the same count of every class (50 per class for 50k / 1000), in class order."""
    per_class = math.ceil(num_samples / num_classes)
    return torch.arange(num_classes).repeat_interleave(per_class)[:num_samples]


class Progress:
    """A rank's resumable state: which of its batches are done, its accumulators and running sums."""

    def __init__(self, path: Path | None, fingerprint: str):
        self.path, self.fingerprint = path, fingerprint
        self.done, self.sums = 0, {}

    def restore(self, accumulators: list[InceptionFeatures]) -> None:
        if self.path is None or not self.path.is_file():
            return
        state = torch.load(self.path, map_location="cpu", weights_only=True)
        if state.get("fingerprint") != self.fingerprint:
            log.warning("ignoring %s: made by another evaluation", self.path)
            return
        self.done = int(state["done"])
        self.sums = {k: float(v) for k, v in state["sums"].items()}
        for acc, s in zip(accumulators, state["accumulators"]):
            acc.load_state_dict(s)
        log.info("resuming from %s: %d batches done", self.path, self.done)

    def save(self, accumulators: list[InceptionFeatures]) -> None:
        if self.path is None:
            return
        state = {"fingerprint": self.fingerprint, "done": self.done, "sums": self.sums,
                 "accumulators": [a.state_dict() for a in accumulators]}
        with atomic_path(self.path) as tmp:
            torch.save(state, tmp)


def _fingerprint(**settings) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _reference_stats(reference: str, *, cache: str | None, resolution: int, weights, device, fabric):
    path = Path(reference)
    if path.is_dir():
        cache = Path(cache) if cache else path.parent / f"{path.name}.fid_stats_{resolution}.npz"
        if fabric.is_global_zero:
            reference_stats_from_folder(path, cache, resolution=resolution, weights_path=weights, device=device, progress=True)
        fabric.barrier()
        return load_reference_stats(cache)
    return load_reference_stats(path)


def _sampler_and_decoder(pipe, cfg: DictConfig):
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


def evaluate_generator(cfg: DictConfig, fabric, pipe=None) -> dict:
    """gFID and IS of ``num_samples`` class-balanced samples against reference statistics.

    pipe: an already loaded :class:`sampling.pipeline.Pipeline` for cfg's models (benchmarks reuse
    one, and with it the compiled code); None loads it.
    """
    if not cfg.reference:
        raise ReferenceStatsError(
            "mode=inception needs reference=...: the ADM VIRTUAL_imagenet256_labeled.npz, an .npz written by eval, "
            "or an image folder"
        )
    device = fabric.device
    if pipe is None:
        pipe = load_pipeline(
            generator=cfg.generator, checkpoint=cfg.checkpoint, tokenizer=cfg.tokenizer,
            tokenizer_checkpoint=cfg.tokenizer_checkpoint, sampling={k: cfg[k] for k in SAMPLING_KEYS},
        )
    pipe.to(device)
    mu_ref, sigma_ref = _reference_stats(
        cfg.reference, cache=cfg.reference_cache, resolution=pipe.tokenizer.image_size, weights=cfg.inception_weights,
        device=device, fabric=fabric,
    )
    labels = class_balanced_labels(cfg.num_samples, pipe.generator.num_classes)
    batches = [labels[i : i + cfg.batch_size] for i in range(0, len(labels), cfg.batch_size)]
    mine = list(range(fabric.global_rank, len(batches), fabric.world_size))
    acc = InceptionFeatures(cfg.inception_weights, device=device)
    fast = {k: cfg.get(k, "none") for k in ("sampler_compile", "decoder_compile")}
    fast = {k: v for k, v in fast.items() if v != "none"}  # only what changes the samples goes into the fingerprint
    fp = _fingerprint(source=pipe.source, checkpoint=cfg.checkpoint, tok=pipe.tokenizer.source, sampling=pipe.sampling,
                      n=cfg.num_samples, bs=cfg.batch_size, seed=cfg.seed, world=fabric.world_size, dtype=cfg.dtype,
                      inception=cfg.inception_weights, **fast)
    state_dir = Path(cfg.state_dir) if cfg.state_dir else None
    progress = Progress(state_dir / f"gfid-{fp}-rank{fabric.global_rank}.pt" if state_dir else None, fp)
    progress.restore([acc])
    sampler, decoder = _sampler_and_decoder(pipe, cfg)

    # Three stages per batch; on a GPU with overlap each runs on its own CUDA stream, so batch k+2
    # is sampled while k+1 decodes and k goes through Inception. The stages see the batches in
    # order, so the statistics are accumulated exactly as one after the other.
    def sample(k: int):
        b = mine[k]
        # One seed per batch, so a resumed or re-split run draws the same samples.
        rng = torch.Generator(device=device).manual_seed(cfg.seed * 1_000_003 + b)
        return k, sampler(batches[b].to(device), rng)

    def decode(item):
        k, tokens = item
        return k, decoder(tokens).float()

    def inception(item):
        k, images = item
        acc.update(to_uint8(images))
        return k, images

    stages = [sample, decode, inception]
    todo = range(progress.done, len(mine))
    bar = tqdm(total=len(mine), initial=progress.done, desc=f"gFID samples (rank {fabric.global_rank})", unit="batch",
               disable=None)
    start = time.perf_counter()
    with torch.inference_mode(), autocast(device, cfg.dtype):
        for k, images in pipelined(todo, stages, device=device, overlap=cfg.get("overlap", True)):
            if cfg.save_images:
                b = mine[k]
                for j, img in enumerate(images):
                    idx = b * cfg.batch_size + j
                    save_png(img, Path(cfg.save_images) / f"{idx:06d}_class{int(batches[b][j])}.png")
            progress.done = k + 1
            bar.update()
            if progress.done % cfg.state_every == 0:
                progress.save([acc])
    bar.close()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start  # sampling, decoding and Inception of this run's batches
    progress.save([acc])
    mu, sigma = acc.fid_stats()
    is_mean, is_std = acc.inception_score()
    return {
        "metric": "gFID", "fid": fid_from_stats(mu, sigma, mu_ref, sigma_ref), "is_mean": is_mean, "is_std": is_std,
        "num_samples": acc.count, "model": pipe.source, "checkpoint": cfg.checkpoint, "sampling": pipe.sampling,
        "seed": cfg.seed, "reference": str(cfg.reference), "inception_weights": cfg.inception_weights or "torch-fidelity default",
        "dtype": cfg.dtype, "processes": fabric.world_size, **fast, "overlap": bool(cfg.get("overlap", True)),
        "loop_seconds": round(seconds, 2), "batches_this_run": len(todo),
    }


def rfid_images(cfg: DictConfig, resolution: int):
    """The rFID images of ``data_root`` in any format: a map-style dataset of (uint8 [3,R,R], label)
    or None per unreadable image, or streamed WebDataset shards. A folder is read recursively
    (class subfolders or not); the ADM centre crop (``center_crop_uint8``) prepares each image."""
    from functools import partial

    from eval.fidelity import center_crop_uint8
    from titok_core.data import ImageRecordsDataset
    from titok_core.formats import detect_format, open_split

    fmt = detect_format(cfg.data_root) if cfg.get("data_format", "auto") == "auto" else cfg.data_format
    transform = partial(center_crop_uint8, resolution=resolution)
    split = cfg.get("split")
    if fmt == "folder":
        root = Path(cfg.data_root) / split if split else Path(cfg.data_root)
        paths = list_image_files(root)
        if not paths:
            raise FileNotFoundError(f"no images under {root}")
        records = [(str(p), 0, str(p)) for p in paths]
        return ImageRecordsDataset(records, classes=[], resolution=resolution, train=False, transform=transform)
    source = open_split(cfg.data_root, split, data_format=fmt, resolution=resolution, transform=transform)
    if fmt == "webdataset":
        source.transform = transform  # the streamed samples are decoded by _rfid_batches
    return source


def _rfid_batches(source, *, batch_size: int, limit: int | None, rank: int, world: int, start: int):
    """This rank's batches (b % world == rank) from its ``start``-th on: (uint8 [B',3,R,R] or None, skipped).

    Streamed shards are read in order by every rank; only its own batches are decoded."""
    from titok_core.formats import WebDatasetShards, decode_sample

    def stack(items):
        kept = [it[0] for it in items if it is not None]
        return (torch.stack(kept) if kept else None), len(items) - len(kept)

    if not isinstance(source, WebDatasetShards):
        n = min(len(source), limit) if limit else len(source)
        mine = list(range(0, n, batch_size))[rank::world]
        for s in mine[start:]:
            yield stack([source[i] for i in range(s, min(s + batch_size, n))])
        return
    transform = source.transform
    b, seen, pending = 0, 0, []

    def flush():
        nonlocal b
        batch, b = pending[:], b + 1
        pending.clear()
        if (b - 1) % world == rank and (b - 1) // world >= start:
            return stack([decode_sample(*sample, transform) for sample in batch])
        return None

    for shard in range(len(source)):
        if limit and seen >= limit:
            break
        for sample in source.samples(shard):
            if limit and seen >= limit:
                break
            pending.append(sample)
            seen += 1
            if len(pending) == batch_size and (out := flush()) is not None:
                yield out
    if pending and (out := flush()) is not None:
        yield out


def evaluate_tokenizer(cfg: DictConfig, fabric) -> dict:
    """rFID (reconstructions vs the originals), PSNR and SSIM over a dataset in any format."""
    if not cfg.data_root:
        raise FileNotFoundError("mode=rfid needs data_root=... (e.g. the ImageNet val folder)")
    if not cfg.tokenizer:
        raise CheckpointError("mode=rfid needs tokenizer=... (and tokenizer_checkpoint=...)")
    device = fabric.device
    tok = load_tokenizer(cfg.tokenizer, cfg.tokenizer_checkpoint).to(device)
    source = rfid_images(cfg, tok.image_size)
    if hasattr(source, "urls"):
        total = None  # a stream: its length is known once read
    else:
        total = min(len(source), cfg.num_samples) if cfg.num_samples else len(source)
    mine_total = None if total is None else len(list(range(0, total, cfg.batch_size))[fabric.global_rank :: fabric.world_size])
    real = InceptionFeatures(cfg.inception_weights, device=device, keep_logits=False, extractor=None)
    fake = InceptionFeatures(cfg.inception_weights, device=device, keep_logits=False, extractor=real.extractor)
    fp = _fingerprint(tok=tok.source, root=str(cfg.data_root), split=cfg.get("split"), n=total or cfg.num_samples,
                      bs=cfg.batch_size, world=fabric.world_size, dtype=cfg.dtype, inception=cfg.inception_weights)
    state_dir = Path(cfg.state_dir) if cfg.state_dir else None
    progress = Progress(state_dir / f"rfid-{fp}-rank{fabric.global_rank}.pt" if state_dir else None, fp)
    progress.restore([real, fake])
    sums = progress.sums or {"psnr": 0.0, "ssim": 0.0, "n": 0.0}
    sums.setdefault("skipped", 0.0)
    batches = _rfid_batches(source, batch_size=cfg.batch_size, limit=cfg.num_samples or None,
                            rank=fabric.global_rank, world=fabric.world_size, start=progress.done)
    for k, (x_u8, skipped) in enumerate(tqdm(batches, desc="rFID", unit="batch", initial=progress.done,
                                             total=mine_total, disable=None), start=progress.done):
        sums["skipped"] += skipped
        progress.done, progress.sums = k + 1, sums
        if x_u8 is None:
            continue
        x_u8 = x_u8.to(device)
        x = x_u8.float() / 255
        with torch.inference_mode(), autocast(device, cfg.dtype):
            recon = tok.decode(tok.encode(x)).float()
        recon_u8 = to_uint8(recon)
        real.update(x_u8)
        fake.update(recon_u8)
        sums["psnr"] += float(psnr(x, recon_u8.float() / 255).sum())
        sums["ssim"] += float(ssim(x, recon_u8.float() / 255).sum())
        sums["n"] += len(x)
        if progress.done % cfg.state_every == 0:
            progress.save([real, fake])
    progress.save([real, fake])
    totals = torch.tensor([sums["psnr"], sums["ssim"], sums["n"], sums["skipped"]], dtype=torch.float64, device=device)
    totals = fabric.all_reduce(totals, reduce_op="sum") if fabric.world_size > 1 else totals
    n = float(totals[2])
    if n == 0:
        raise FileNotFoundError(f"no readable images in {cfg.data_root}")
    mu_r, sigma_r = real.fid_stats()
    mu_f, sigma_f = fake.fid_stats()
    return {
        "metric": "rFID", "fid": fid_from_stats(mu_f, sigma_f, mu_r, sigma_r), "psnr": float(totals[0]) / n,
        "ssim": float(totals[1]) / n, "num_images": int(n), "num_skipped": int(totals[3]), "tokenizer": tok.source,
        "data_root": str(cfg.data_root),
        "inception_weights": cfg.inception_weights or "torch-fidelity default", "dtype": cfg.dtype,
    }


def precision_recall(fake: torch.Tensor, real: torch.Tensor, *, k: int = 3) -> tuple[float, float]:
    """Improved precision and recall (Kynkaanniemi et al. 2019) of features [N,D] vs [M,D], k-NN balls.

    Precision: the share of fake samples inside some real sample's k-NN ball (are samples
    realistic?); recall: the share of real samples inside some fake sample's ball (is the real
    variety covered?). Computed by torch-fidelity.
    """
    from torch_fidelity.metric_prc import prc_features_to_metric

    out = prc_features_to_metric(fake.float(), real.float(), prc_neighborhood=k, prc_batch_size=10000,
                                 save_cpu_ram=False, verbose=False)
    return float(out["precision"]), float(out["recall"])


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
    """The demo domain, judged by two independent classifiers trained on the real images.

    The demo classifier gives class accuracy, a FID on its features and precision/recall in its
    feature space; the colour-blind classifier (:func:`eval.demo_classifier.colour_blind`) must
    recognise each sample by its shape alone, since every demo class also has its own colour.
    """
    from eval.demo_classifier import DEMO_FID_LABEL, classifier_fid, load_demo_classifier, load_split

    pipe = load_pipeline(
        generator=cfg.generator, checkpoint=cfg.checkpoint, tokenizer=cfg.tokenizer,
        tokenizer_checkpoint=cfg.tokenizer_checkpoint, sampling={k: cfg[k] for k in SAMPLING_KEYS},
    ).to(device)
    data = pipe.extra.get("data", {})
    root = cfg.data_root or data.get("root")
    builtin = data.get("builtin") or ("demo" if data.get("demo") else None)
    if root and builtin and not cfg.data_root and not (Path(root) / "train").is_dir():
        from titok_core.builtin import make_builtin_dataset

        make_builtin_dataset(builtin, root, size=pipe.tokenizer.image_size)  # a fresh directory: make it again
    if not root or not (Path(root) / "train").is_dir():
        raise FileNotFoundError(f"demo data not found at {root}: pass data_root=... (the folder with train/ and val/)")
    res = pipe.tokenizer.image_size
    classifier = load_demo_classifier(root, device=str(device), steps=cfg.classifier_steps, resolution=res)
    shape_judge = load_demo_classifier(root, device=str(device), colour_blind=True, steps=cfg.colour_blind_steps,
                                       resolution=res)
    num_classes = pipe.generator.num_classes

    def hits(judge, images: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Per class, how many of ``images`` the judge puts in their class ``y``: float [num_classes]."""
        y = y.cpu()
        return torch.bincount(y[judge.classify(images).argmax(-1).cpu() == y], minlength=num_classes).float()

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
    val_images, val_labels = load_split(root, "val", resolution=classifier.resolution, classes=classifier.classes)
    real = classifier.features(val_images.float() / 255).cpu()
    with torch.inference_mode():
        real_tokens = torch.cat([pipe.tokenizer.encode(part.to(device).float() / 255).cpu()
                                 for part in val_images.split(cfg.batch_size)])
    n = min(int(torch.bincount(val_labels).min()), cfg.demo_per_class)  # equal counts per class for both
    # The tokenizer's ceiling: what the judges make of its reconstructions of the real val images.
    # A sample cannot keep a shape that the tokenizer's decoder never draws.
    recon_correct, recon_shape, recon_psnr = torch.zeros(num_classes), torch.zeros(num_classes), 0.0
    for part, part_tokens, y in zip(val_images.split(cfg.batch_size), real_tokens.split(cfg.batch_size),
                                    val_labels.split(cfg.batch_size)):
        with torch.inference_mode(), autocast(device, cfg.dtype):
            recon = to_uint8(pipe.tokenizer.decode(part_tokens.to(device)).float()).float() / 255
        recon_psnr += float(psnr(part.to(device).float() / 255, recon).sum())
        recon_correct += hits(classifier, recon, y)
        recon_shape += hits(shape_judge, recon, y)
    val_counts = torch.bincount(val_labels, minlength=num_classes).clamp(min=1).float()

    def first_n(y: torch.Tensor) -> torch.Tensor:
        return torch.cat([torch.nonzero(y == c).flatten()[:n] for c in range(num_classes)])

    fake_keep, real_keep = first_n(labels), first_n(val_labels)
    train_images, _ = load_split(root, "train", resolution=classifier.resolution, classes=classifier.classes)
    # An evenly strided subset (the split is ordered by class) the size of val: real-vs-real scale.
    step = max(1, len(train_images) // len(val_images))
    train_feats = classifier.features(train_images[::step][: len(val_images)].float() / 255).cpu()
    per_class = (correct / cfg.demo_per_class).tolist()
    fake = torch.cat(feats)
    precision, recall = precision_recall(fake, real)
    real_precision, real_recall = precision_recall(train_feats, real)
    return {
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
        "data_root": str(root), "generator_step": pipe.extra.get("global_step"),
        "reconstruction_psnr": recon_psnr / len(val_labels),
        "reconstruction_class_accuracy": float(recon_correct.sum()) / len(val_labels),
        "reconstruction_colour_blind_accuracy": float(recon_shape.sum()) / len(val_labels),
        "reconstruction_colour_blind_per_class_accuracy": (recon_shape / val_counts).tolist(),
    }


def run(cfg: DictConfig, pipe=None) -> dict:
    """Dispatch on ``mode``; returns the result dict (on every rank). pipe: see evaluate_generator."""
    from lightning import Fabric

    mode = cfg.mode
    if mode == "auto":
        mode = "demo" if cfg.generator is None and cfg.checkpoint is None else "inception"
    if mode not in ("demo", "inception", "rfid"):
        raise ValueError(f"mode must be auto, demo, inception or rfid, got {cfg.mode!r}")
    fabric = Fabric(accelerator=cfg.accelerator, devices=cfg.devices, num_nodes=cfg.num_nodes, strategy=cfg.strategy)
    fabric.launch()
    torch.manual_seed(cfg.seed)
    if mode == "demo":
        return evaluate_demo(cfg, fabric.device)
    if mode == "inception":
        return evaluate_generator(cfg, fabric, pipe)
    return evaluate_tokenizer(cfg, fabric)


def summary(result: dict) -> str:
    """One human line for a result."""
    if result["metric"] == "gFID":
        return (f"gFID {result['fid']:.3f}, IS {result['is_mean']:.2f} ± {result['is_std']:.2f} "
                f"over {result['num_samples']} samples of {result['model']}")
    if result["metric"] == "rFID":
        return (f"rFID {result['fid']:.3f}, PSNR {result['psnr']:.2f} dB, SSIM {result['ssim']:.4f} "
                f"over {result['num_images']} images ({result['tokenizer']})")
    worst = min(result["colour_blind_per_class_accuracy"])
    return (f"demo: {100 * result['class_accuracy']:.1f}% of {result['num_samples']} samples recognised as their class; "
            f"by shape alone (colour-blind classifier) {100 * result['colour_blind_accuracy']:.1f}% "
            f"(worst class {100 * worst:.0f}%); "
            f"{result['fid_label']} {result['classifier_fid']:.3f} (real train vs val: "
            f"{result['classifier_fid_real_train_vs_val']:.3f}); precision {result['precision']:.3f}, "
            f"recall {result['recall']:.3f} (real train vs val: {result['precision_recall_real_train_vs_val'][0]:.3f}, "
            f"{result['precision_recall_real_train_vs_val'][1]:.3f}); the tokenizer's reconstructions of real val "
            f"images: {result['reconstruction_psnr']:.2f} dB, colour-blind "
            f"{100 * result['reconstruction_colour_blind_accuracy']:.1f}% "
            f"(worst class {100 * min(result['reconstruction_colour_blind_per_class_accuracy']):.0f}%)")


@hydra.main(config_path="../conf/eval", config_name="gfid", version_base="1.3")
def main(cfg: DictConfig) -> None:
    with exit_on_user_error():
        result = run(cfg)
    if result.get("processes", 1) > 1 and not torch.distributed.get_rank() == 0:
        return
    line = json.dumps(result, default=lambda o: o.item() if isinstance(o, np.generic) else str(o))
    print(line)
    print(summary(result))
    if cfg.out:
        with atomic_path(cfg.out) as tmp:
            tmp.write_text(line + "\n")
        print(f"written to {cfg.out}")


if __name__ == "__main__":
    main()

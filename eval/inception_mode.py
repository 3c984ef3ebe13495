"""``eval.gfid mode=inception``: a generator's ADM table (IS, FID, precision, recall) on Inception.

Samples stream through Inception batch by batch (no folder of PNGs; ``save_images`` keeps
them, ``save_npz`` writes the ADM evaluator's sample batch). With ``trainer.devices`` > 1 each
process takes every W-th batch and the results are gathered. Every ``state_every`` batches
each process saves its state (eval.state), so a killed run resumes where it stopped.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig
from tqdm import tqdm

from eval import adm
from eval.fidelity import FEATURE_DIM, InceptionFeatures, gather_rows
from eval.reference import ReferenceBatch, ReferenceStatsError, load_reference
from eval.samples import class_balanced_labels, interleaved_order, pipeline_from_config, sampler_and_decoder
from eval.state import Progress, RowLog, fingerprint
from sampling.fast import pipelined
from titok_core.errors import UsageError
from titok_core.images import save_png, to_uint8
from titok_core.metrics import fid_from_stats
from titok_core.runs import file_identity
from titok_core.runtime import autocast

log = logging.getLogger(__name__)


def reference_for(cfg: DictConfig, *, resolution: int, device: torch.device, fabric) -> ReferenceBatch:
    """cfg.reference: what it needs from Inception is computed and cached by the first process, then read by all."""
    opts = dict(cache=cfg.reference_cache, resolution=resolution, weights_path=cfg.inception_weights, device=device)
    if fabric.is_global_zero:
        load_reference(cfg.reference, progress=True, **opts)
    fabric.barrier()
    return load_reference(cfg.reference, **opts)


def evaluate_generator(cfg: DictConfig, fabric, pipe=None) -> dict:
    """The ADM table of ``num_samples`` class-balanced samples against ``cfg.reference``.

    pipe: an already loaded :class:`sampling.pipeline.Pipeline` for cfg's models (benchmarks reuse
    one, and with it the compiled code); None loads it. The result holds the table's figures
    (``inception_score``: the evaluator's IS; ``fid``; ``precision``/``recall``: the evaluator's, with
    float16 distances, and ``precision_fp32``/``recall_fp32`` with float32 ones; all four None when
    the reference has no images) and torch-fidelity's IS (``is_mean``/``is_std``: 10 shuffled splits).
    """
    if not cfg.reference:
        raise ReferenceStatsError(
            "mode=inception needs reference=...: the ADM VIRTUAL_imagenet256_labeled.npz, an .npz written by eval, "
            "or an image folder"
        )
    state_dir = Path(cfg.state_dir) if cfg.state_dir else None
    if cfg.save_npz and state_dir is None:
        raise UsageError("save_npz needs state_dir: the samples are appended there batch by batch")
    device = fabric.device
    if pipe is None:
        pipe = pipeline_from_config(cfg)
    pipe.to(device)
    resolution = pipe.tokenizer.image_size
    reference = reference_for(cfg, resolution=resolution, device=device, fabric=fabric)
    labels = class_balanced_labels(cfg.num_samples, pipe.generator.num_classes)
    batches = [labels[i : i + cfg.batch_size] for i in range(0, len(labels), cfg.batch_size)]
    rank, world = fabric.global_rank, fabric.world_size
    mine = list(range(rank, len(batches), world))
    acc = InceptionFeatures(cfg.inception_weights, device=device)
    fast = {k: cfg.get(k, "none") for k in ("sampler_compile", "decoder_compile")}
    fast = {k: v for k, v in fast.items() if v != "none"}  # only what changes the samples goes into the fingerprint
    fp = fingerprint(source=pipe.source, checkpoint=cfg.generator.checkpoint, tok=pipe.tokenizer.source,
                     sampling=pipe.sampling, n=cfg.num_samples, bs=cfg.batch_size, seed=cfg.seed, world=world,
                     dtype=cfg.dtype, inception=cfg.inception_weights, **fast,
                     # the files themselves: a generator retrained in place is another evaluation
                     files=[file_identity(p) for p in (pipe.source, cfg.generator.checkpoint, pipe.tokenizer.source,
                                                       cfg.inception_weights)])

    def state_file(r: int, suffix: str) -> Path | None:
        return state_dir / f"gfid-{fp}-rank{r}{suffix}" if state_dir else None

    progress = Progress(state_file(rank, ".pt"), fp)
    progress.restore([acc])
    features = RowLog(state_file(rank, ".features"), (FEATURE_DIM,), np.float32)
    samples = RowLog(state_file(rank, ".samples"), (resolution, resolution, 3), np.uint8) if cfg.save_npz else None
    logs = [features] + ([samples] if samples is not None else [])
    committed = sum(len(batches[b]) for b in mine[: progress.done])
    if not all(rows.truncate(committed) for rows in logs):
        log.warning("%s: the per-batch files hold fewer rows than the %d batches done (a run without save_npz?): "
                    "starting again", state_dir, progress.done)
        acc.reset()
        progress.done, progress.sums = 0, {}
        for rows in logs:
            rows.truncate(0)
    sampler, decoder = sampler_and_decoder(pipe, cfg)

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
        images_u8 = to_uint8(images)
        return k, images, images_u8, acc.update(images_u8)

    from titok_core.stopping import at_safe_points, stop_point

    todo = range(progress.done, len(mine))
    bar = tqdm(total=len(mine), initial=progress.done, desc=f"gFID samples (rank {rank})", unit="batch", disable=None)
    start = time.perf_counter()
    # SIGTERM waits for the batch in hand, whose state is then saved (titok_core.stopping).
    with torch.inference_mode(), autocast(device, cfg.dtype), at_safe_points():
        for k, images, images_u8, pool in pipelined(todo, [sample, decode, inception], device=device,
                                                    overlap=cfg.get("overlap", True)):
            # The rows first, then the state that counts them: a kill in between leaves rows that
            # the next run cuts off and makes again.
            features.append(pool.cpu().numpy())
            if samples is not None:
                samples.append(images_u8.permute(0, 2, 3, 1).cpu().numpy())
            if cfg.save_images:
                b = mine[k]
                for j, img in enumerate(images):
                    idx = b * cfg.batch_size + j
                    save_png(img, Path(cfg.save_images) / f"{idx:06d}_class{int(batches[b][j])}.png")
            progress.done = k + 1
            bar.update()
            if progress.done % cfg.state_every == 0:
                progress.save([acc])
            stop_point(lambda: progress.save([acc]))
    bar.close()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start  # sampling, decoding and Inception of this run's batches
    progress.save([acc])

    mu, sigma = acc.fid_stats()
    is_mean, is_std = acc.inception_score()  # gathers every rank's logits, rank after rank
    # Rows arrive rank after rank, each rank's batches in order: which sample each gathered row is.
    gathered = np.concatenate([np.arange(len(labels))[b * cfg.batch_size : (b + 1) * cfg.batch_size]
                               for r in range(world) for b in range(r, len(batches), world)])
    row_of = np.empty(len(labels), dtype=np.int64)
    row_of[gathered] = np.arange(len(gathered))
    file_order = interleaved_order(labels)
    inception_score = adm.inception_score(acc.logits()[row_of[file_order]])
    sample_features = gather_rows(torch.from_numpy(np.array(features.read())))
    precision = recall = precision_fp32 = recall_fp32 = None
    if reference.features is not None:
        fake, real = sample_features.to(device), torch.from_numpy(reference.features).to(device)
        # The table's are the evaluator's (float16 distances), as papers report; the exact float32
        # figures go in the JSON beside them (docs/gfid.md).
        precision, recall = adm.precision_recall(fake, real, float16=True)
        precision_fp32, recall_fp32 = adm.precision_recall(fake, real)
    if samples is not None:
        _write_npz(cfg.save_npz, [RowLog(state_file(r, ".samples"), samples.row_shape, np.uint8) for r in range(world)],
                   row_of, file_order, labels, fabric)
    return {
        "metric": "gFID", "inception_score": inception_score, "fid": fid_from_stats(mu, sigma, reference.mu, reference.sigma),
        "sfid": None, "precision": precision, "recall": recall, "precision_fp32": precision_fp32,
        "recall_fp32": recall_fp32, "is_mean": is_mean, "is_std": is_std,
        "num_samples": acc.count, "reference_images": None if reference.features is None else len(reference.features),
        "reference_stats": reference.stats_from, "npz": str(cfg.save_npz) if cfg.save_npz else None,
        "model": pipe.source, "checkpoint": cfg.generator.checkpoint, "sampling": pipe.sampling,
        "seed": cfg.seed, "reference": str(cfg.reference), "inception": adm.INCEPTION_NAME,
        "inception_weights": cfg.inception_weights or "torch-fidelity default",
        "dtype": cfg.dtype, "processes": world, **fast, "overlap": bool(cfg.get("overlap", True)),
        "loop_seconds": round(seconds, 2), "batches_this_run": len(todo),
    }


def _write_npz(path, rank_samples: list[RowLog], row_of: np.ndarray, file_order: np.ndarray, labels, fabric) -> None:
    """The first process writes the ADM sample .npz from every rank's sample file (a shared state_dir)."""
    fabric.barrier()  # every rank's samples are on disk
    if fabric.is_global_zero:
        parts = [rows.read() for rows in rank_samples]
        starts = np.cumsum([0] + [len(p) for p in parts])

        def rows(indices: np.ndarray) -> np.ndarray:
            at = row_of[indices]
            part = np.searchsorted(starts, at, side="right") - 1
            return np.stack([parts[p][i - starts[p]] for p, i in zip(part, at)])

        adm.write_samples_npz(path, rows, file_order, labels.numpy())
        log.info("samples for the ADM evaluator: %s", path)
    fabric.barrier()

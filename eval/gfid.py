"""Measure a generator (the ADM table: IS, FID, precision, recall), a tokenizer (rFID, PSNR, SSIM) or the demo run.

    python -m eval.gfid                                    # the latest demo run: class accuracy + demo-classifier FID
    python -m eval.gfid mode=inception generator.spec=maskgit_l32 generator.checkpoint=generator_titok_l32.bin \\
        tokenizer.checkpoint=tokenizer_titok_l32.bin reference=VIRTUAL_imagenet256_labeled.npz [save_npz=samples.npz]
    python -m eval.gfid mode=rfid tokenizer.spec=titok_l32 tokenizer.checkpoint=... data.root=/data/imagenet/val

One module per mode: eval.inception_mode, eval.rfid_mode, eval.demo_mode; eval.state keeps what
lets a killed run resume (run the same command again). Prints one JSON line with the figures
and what produced them (and writes it to ``out``), then the table or a short summary.
"""
from __future__ import annotations

import json

import numpy as np
import torch
from omegaconf import DictConfig

from eval import adm
from eval.adm import precision_recall  # noqa: F401 - eval.gfid.precision_recall, as before the split
from eval.demo_mode import evaluate_demo
from eval.fidelity import check_weights_file
from eval.inception_mode import evaluate_generator
from eval.reference import check_reference_exists
from eval.rfid_mode import evaluate_tokenizer
from generator.sampler import SAMPLING_RANGES
from sampling.pipeline import RENAMED_MODEL_KEYS
from titok_core.checkpoints import MissingWeightsError, atomic_path
from titok_core.cli import Ranges, hydra_entry
from titok_core.errors import UsageError, exit_on_user_error

# Old spellings on the command line, refused with the new key (see CHANGELOG.md).
RENAMED = {
    **RENAMED_MODEL_KEYS, "data_root": "data.root", "split": "data.split", "data_format": "data.format",
    **{k: f"trainer.{k}" for k in ("accelerator", "devices", "num_nodes", "strategy")},
}
SCALAR_GROUPS = {"generator": "generator.spec", "tokenizer": "tokenizer.spec"}


def run(cfg: DictConfig, pipe=None) -> dict:
    """Dispatch on ``mode``; returns the result dict (on every rank). pipe: see evaluate_generator."""
    from lightning import Fabric

    mode = cfg.mode
    if mode == "auto":
        mode = "demo" if cfg.generator.spec is None and cfg.generator.checkpoint is None else "inception"
    if mode not in ("demo", "inception", "rfid"):
        raise UsageError(f"mode must be auto, demo, inception or rfid, got {cfg.mode!r}")
    # The files a user names are checked before any process, model or network is started.
    if mode in ("inception", "rfid"):
        check_weights_file(cfg.inception_weights)
    if mode == "inception" and cfg.reference:
        check_reference_exists(cfg.reference)
    trainer = cfg.trainer
    fabric = Fabric(accelerator=trainer.accelerator, devices=trainer.devices, num_nodes=trainer.num_nodes,
                    strategy=trainer.strategy)
    fabric.launch()
    launcher = fabric.strategy.launcher
    if launcher is not None and getattr(launcher, "procs", None):  # this process started the other ranks
        from titok_core.stopping import forward_signals

        forward_signals(lambda signum: [proc.send_signal(signum) for proc in launcher.procs])
    torch.manual_seed(cfg.seed)
    if mode == "demo":
        return evaluate_demo(cfg, fabric.device)
    if mode == "inception":
        return evaluate_generator(cfg, fabric, pipe)
    return evaluate_tokenizer(cfg, fabric)


def summary(result: dict) -> str:
    """What a person reads: the ADM table for a generator, one line for a tokenizer or the demo."""
    if result["metric"] == "gFID":
        reference = (f"{result['reference_images']} reference images" if result["reference_images"]
                     else "reference statistics only")
        lines = [
            f"ADM evaluator table: {result['num_samples']} samples of {result['model']} vs {result['reference']} "
            f"({reference})",
            f"Inception: {result['inception']}, weights {result['inception_weights']}",
            *adm.table(inception_score=result["inception_score"], fid=result["fid"], precision=result["precision"],
                       recall=result["recall"], precision_recall_missing="n/a (the reference holds no images)"),
        ]
        if result.get("npz"):
            lines.append(f"samples for the official evaluator: {result['npz']}")
        return "\n".join(lines)
    if result["metric"] == "rFID":
        return (f"rFID {result['fid']:.3f}, PSNR {result['psnr']:.2f} dB, SSIM {result['ssim']:.4f} "
                f"over {result['num_images']} images ({result['tokenizer']})")
    worst = min(result["colour_blind_per_class_accuracy"])
    lines = [
        f"demo: {100 * result['class_accuracy']:.1f}% of {result['num_samples']} samples recognised as their class; "
        f"by shape alone (colour-blind classifier) {100 * result['colour_blind_accuracy']:.1f}% "
        f"(worst class {100 * worst:.0f}%); "
        f"{result['fid_label']} {result['classifier_fid']:.3f} (real train vs val: "
        f"{result['classifier_fid_real_train_vs_val']:.3f}); precision {result['precision']:.3f}, "
        f"recall {result['recall']:.3f} (real train vs val: {result['precision_recall_real_train_vs_val'][0]:.3f}, "
        f"{result['precision_recall_real_train_vs_val'][1]:.3f}); the tokenizer's reconstructions of real val "
        f"images: {result['reconstruction_psnr']:.2f} dB, colour-blind "
        f"{100 * result['reconstruction_colour_blind_accuracy']:.1f}% "
        f"(worst class {100 * min(result['reconstruction_colour_blind_per_class_accuracy']):.0f}%)",
        f"{result['heldout']}",
        "the gap to the tokenizer's ceiling (its reconstructions, judged alike):",
        f"  {'':24} {'samples':>9} {'ceiling':>9} {'ratio':>7}",
    ]
    for name, ours, ceiling, ratio, pct in (
        ("class accuracy", "class_accuracy", "reconstruction_class_accuracy", "accuracy_ratio", True),
        ("shape accuracy", "colour_blind_accuracy", "reconstruction_colour_blind_accuracy", "colour_blind_ratio", True),
        ("classifier-FID", "classifier_fid", "ceiling_classifier_fid", "fid_ratio", False),
    ):
        a, b, r = result[ours], result[ceiling], result[ratio]
        fmt = (lambda v: f"{100 * v:8.1f}%") if pct else (lambda v: f"{v:9.3f}")
        lines.append(f"  {name:24} {fmt(a)} {fmt(b)} {'n/a' if r is None else f'{r:.2f}':>7}")
    lines.append("  (accuracies: reconstructions of the held-out images; FID: reconstructions of "
                 f"{result['ceiling_images']} training images, as many per class as samples, against the held-out "
                 "images; targets: FID ratio <= 1.5, accuracy ratios >= 0.9)")
    return "\n".join(lines)


def _main(cfg: DictConfig) -> None:
    with exit_on_user_error():
        try:
            result = run(cfg)
        except MissingWeightsError as exc:  # this command can build it untrained (benchmarks)
            raise MissingWeightsError(f"{exc}; random_weights=true builds it untrained (for timings only)") from None
    if result.get("processes", 1) > 1 and not torch.distributed.get_rank() == 0:
        return
    line = json.dumps(result, default=lambda o: o.item() if isinstance(o, np.generic) else str(o))
    print(line)
    print(summary(result))
    if cfg.out:
        with atomic_path(cfg.out) as tmp:
            tmp.write_text(line + "\n")
        print(f"written to {cfg.out}")


RANGES = SAMPLING_RANGES | Ranges(
    at_least_one=("num_samples", "batch_size", "state_every", "demo_per_class", "classifier_steps",
                  "colour_blind_steps", "trainer.num_nodes"),
    not_negative=("seed",))
main = hydra_entry(config="eval/gfid", description=__doc__, renamed=RENAMED, scalar_groups=SCALAR_GROUPS,
                   ranges=RANGES)(_main)


if __name__ == "__main__":
    main()

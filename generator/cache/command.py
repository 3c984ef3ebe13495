"""``python -m generator.cache``: the command line of the token cache."""
from __future__ import annotations

from pathlib import Path

from generator.cache.build import build_token_cache
from generator.cache.identity import dataset_identity, default_cache_dir


def _main(cfg) -> None:
    """``python -m generator.cache``: tokenize a dataset (any format of titok_core.formats), across
    GPUs/processes with Lightning Fabric."""
    from lightning import Fabric

    from tokenizer import load_tokenizer
    from titok_core.formats import open_split
    from titok_core.runtime import exit_on_user_error

    fabric = Fabric(**cfg.trainer)
    fabric.launch()
    with exit_on_user_error():
        tok = load_tokenizer(cfg.tokenizer.spec, cfg.tokenizer.checkpoint)
        dataset = open_split(cfg.data.root, cfg.data.split, data_format=cfg.data.format, resolution=tok.image_size)
        out_dir = Path(cfg.cache.dir or default_cache_dir(root=cfg.data.root, split=cfg.data.split, tokenizer=tok,
                                                         flip=cfg.cache.flip))
        manifest = build_token_cache(
            tokenizer=tok, tokenizer_source=str(cfg.tokenizer.spec), dataset=dataset, out_dir=out_dir,
            device=fabric.device, fabric=fabric, data=dataset_identity(cfg.data.root, cfg.data.split, cfg.data.format),
            **{k: v for k, v in cfg.cache.items() if k != "dir"},
        )
    if fabric.is_global_zero:
        print(
            f"token cache {out_dir}: {manifest['num_sequences']} sequences of {manifest['num_tokens']} tokens "
            f"from {manifest['num_images']} images ({manifest['num_skipped']} skipped)"
        )


RENAMED = {
    "data_root": "data.root", "split": "data.split", "data_format": "data.format", "checkpoint": "tokenizer.checkpoint",
    "out_dir": "cache.dir", "batch_size": "cache.batch_size", "dtype": "cache.dtype",
    "num_workers": "cache.num_workers",
    "decode": "cache.decode", "compile": "cache.compile", "accelerator": "trainer.accelerator",
    "devices": "trainer.devices", "num_nodes": "trainer.num_nodes", "strategy": "trainer.strategy",
}


def main() -> None:
    import generator.cache
    from titok_core.cli import hydra_entry

    # --help prints the package's description: what a cache is, its layout, how it resumes.
    entry = hydra_entry(config="generator/cache", description=generator.cache.__doc__, renamed=RENAMED,
                        scalar_groups={"tokenizer": "tokenizer.spec"},
                        on_interrupt="interrupted: the finished shards are kept; run the same command to resume")
    entry(_main)()

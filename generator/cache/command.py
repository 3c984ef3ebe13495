"""``python -m generator.cache``: the command line of the token cache."""
from __future__ import annotations

import sys

from titok_core.cli import Ranges, hydra_entry


def _main(cfg) -> None:
    """``python -m generator.cache``: tokenize a dataset (any format of titok_core.formats), across
    GPUs/processes with Lightning Fabric."""
    from lightning import Fabric

    from generator.cache.build import open_cache
    from titok_core.errors import exit_on_user_error
    from titok_core.stopping import forward_signals
    from tokenizer import load_tokenizer

    # Only the keys Fabric takes: the group is named trainer as in generator.train, whose experiments
    # (experiment=small ...) set training keys there too.
    fabric = Fabric(**{k: cfg.trainer[k] for k in FABRIC_KEYS if k in cfg.trainer})
    fabric.launch()
    launcher = fabric.strategy.launcher
    if launcher is not None and getattr(launcher, "procs", None):  # this process started the other ranks
        forward_signals(lambda signum: [proc.send_signal(signum) for proc in launcher.procs])
    with exit_on_user_error():
        tok = load_tokenizer(cfg.tokenizer.spec, cfg.tokenizer.checkpoint)
        out_dir, manifest = open_cache(tokenizer=tok, tokenizer_source=str(cfg.tokenizer.spec), data=cfg.data,
                                       cache=cfg.cache, device=fabric.device, fabric=fabric)
    if fabric.is_global_zero:
        print(
            f"token cache {out_dir}: {manifest['num_sequences']} sequences of {manifest['num_tokens']} tokens "
            f"from {manifest['num_images']} images ({manifest['num_skipped']} skipped)"
        )


INTERRUPTED = "interrupted: the finished shards are kept; run the same command to resume"
FABRIC_KEYS = ("accelerator", "devices", "num_nodes", "strategy")
RENAMED = {
    "data_root": "data.root", "split": "data.split", "data_format": "data.format", "checkpoint": "tokenizer.checkpoint",
    "out_dir": "cache.dir", "batch_size": "cache.batch_size", "dtype": "cache.dtype",
    "num_workers": "cache.num_workers",
    "decode": "cache.decode", "compile": "cache.compile", "accelerator": "trainer.accelerator",
    "devices": "trainer.devices", "num_nodes": "trainer.num_nodes", "strategy": "trainer.strategy",
    "cache.flip": "data.hflip",
}
SCALAR_GROUPS = {"tokenizer": "tokenizer.spec"}
# The cache group's options with a range (generator.cache and generator.train).
CACHE_RANGES = Ranges(at_least_one=("cache.batch_size",), not_negative=("cache.num_workers",))


# --help prints the package's description: what a cache is, its layout, how it resumes (the package's
# docstring is set before its __init__ imports this module).
main = hydra_entry(config="generator/cache", description=sys.modules["generator.cache"].__doc__, renamed=RENAMED,
                   scalar_groups=SCALAR_GROUPS, ranges=CACHE_RANGES | Ranges(at_least_one=("trainer.num_nodes",)),
                   on_interrupt=INTERRUPTED)(_main)

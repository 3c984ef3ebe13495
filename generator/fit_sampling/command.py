"""``python -m generator.fit_sampling``: the search on an existing generator file (the package's
docstring is its --help)."""
from __future__ import annotations

import sys

from omegaconf import DictConfig, OmegaConf

from generator.fit_sampling.options import FIT_SAMPLING_RANGES, SearchOptions
from generator.fit_sampling.report import summary
from generator.fit_sampling.run import fit_file
from titok_core.cli import hydra_entry
from titok_core.errors import exit_on_user_error


def _main(cfg: DictConfig) -> None:
    with exit_on_user_error():
        options = SearchOptions.from_group(cfg.fit_sampling)
        record = fit_file(cfg.generator.checkpoint, options=options, out=cfg.out, data_root=cfg.data.root,
                          tokenizer=OmegaConf.to_container(cfg.tokenizer, resolve=True))
    print(summary(record))
    print(f"written to {record['path']} (its sampling settings; explicit sampling.* options still win)")


# --help prints the package's description (its docstring is set before its __init__ imports this module).
main = hydra_entry(config="generator/fit_sampling", description=sys.modules["generator.fit_sampling"].__doc__,
                   ranges=FIT_SAMPLING_RANGES,
                   on_interrupt="interrupted: run the same command again to continue the search")(_main)

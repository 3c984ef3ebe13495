"""The benchmarks' flags speak the entry points' vocabulary: ``--tokenizer-spec``,
``--tokenizer-checkpoint``, ``--generator-spec``, ``--generator-checkpoint``, ``--data-root``,
``--data-split``, ``--data-format`` (the options ``tokenizer.spec=`` ... of the Hydra entry points).
An old spelling stops with one line naming the new flag, as an entry point's does (exit 2)."""
from __future__ import annotations

import argparse

from titok_core.errors import UsageError, report


class _Renamed(argparse.Action):
    def __init__(self, option_strings, dest, *, new: str, **kwargs):
        super().__init__(option_strings, dest, nargs="?", help=argparse.SUPPRESS, **kwargs)
        self.new = new

    def __call__(self, parser, namespace, values, option_string=None):
        report(UsageError(f"{option_string} was renamed: write {self.new}{f' {values}' if values else ''}"))


def renamed_flags(parser: argparse.ArgumentParser, renamed: dict[str, str]) -> None:
    """Refuse each old flag of ``renamed`` (old -> new) with ``error: --old was renamed: write --new VALUE``."""
    for old, new in renamed.items():
        parser.add_argument(old, action=_Renamed, new=new, dest=f"renamed_{old.lstrip('-').replace('-', '_')}")


def pipeline_flags(parser: argparse.ArgumentParser, *, presets: list[str]) -> None:
    """``--generator-spec`` (default maskgit_l32), ``--generator-checkpoint``, ``--tokenizer-spec`` (default: the
    generator's own) and ``--tokenizer-checkpoint`` of the benchmarks that sample, with their old spellings refused.
    Without checkpoints the weights are random: the timings are real."""
    parser.add_argument("--generator-spec", default="maskgit_l32",
                        help=f"generator spec ({', '.join(presets)}, or an official config)")
    parser.add_argument("--generator-checkpoint", default=None, help="generator weights (default: random)")
    parser.add_argument("--tokenizer-spec", default=None, help="tokenizer spec (default: the generator's)")
    parser.add_argument("--tokenizer-checkpoint", default=None, help="tokenizer weights (default: random)")
    renamed_flags(parser, {"--preset": "--generator-spec", "--checkpoint": "--generator-checkpoint",
                           "--tokenizer": "--tokenizer-spec"})

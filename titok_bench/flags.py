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

"""Silence library messages a user of this project cannot act on, and nothing else.

Each entry point calls :func:`quiet_libraries` once. It drops exactly these messages (matched by
their text), so a real warning, and every other line of the libraries, still shows:

* Lightning's tip to install litlogger (printed by every Trainer);
* torch's FutureWarning that ``isinstance(treespec, LeafSpec)`` is deprecated (raised inside Lightning);
* "The number of training batches (N) is smaller than the logging interval Trainer(log_every_n_steps=...)":
  a small dataset in a step-based run is not a mistake, metrics are logged by step across epochs;
* "The following callbacks returned in LightningModule.configure_callbacks will override existing
  callbacks passed to Trainer: ...": the tokenizer's module brings its own callback on purpose;
* "Trainer(val_check_interval=1) was configured so validation will run after every batch.": the
  entry point caps the validation interval at the batches of a tiny dataset.
"""
from __future__ import annotations

import logging
import re
import warnings

# Lightning's informational lines (logged through its rank-zero loggers).
INFO_LINES = (
    re.compile(r"^💡 Tip: For seamless cloud logging and experiment tracking, try installing \[litlogger\]"),
    re.compile(r"^The following callbacks returned in `LightningModule\.configure_callbacks` will override existing "
               r"callbacks passed to Trainer"),
    re.compile(r"^`Trainer\(val_check_interval=1\)` was configured so validation will run after every batch\.$"),
)
# Warnings (the warnings module), by message and category.
WARNINGS = (
    (r"`isinstance\(treespec, LeafSpec\)` is deprecated", FutureWarning),
    (r"The number of training batches \(\d+\) is smaller than the logging interval Trainer\(log_every_n_steps=\d+\)",
     Warning),
)
LOGGERS = ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero")


class _DropLines(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(p.search(message) for p in INFO_LINES)


_FILTER = _DropLines()


def quiet_libraries() -> None:
    """Install the filters (idempotent): warnings filters by message, a logging filter on Lightning's
    rank-zero loggers (the ones its ``rank_zero_info`` writes through)."""
    for message, category in WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)
    for name in LOGGERS:
        logger = logging.getLogger(name)
        if _FILTER not in logger.filters:
            logger.addFilter(_FILTER)

"""What every example silences: messages about things the examples do on purpose, and Lightning's advertisements.

The test suite filters the same warnings (``filterwarnings`` in pyproject.toml). Lightning's progress, seeds and
device lines, and every other warning, still show.
"""

from __future__ import annotations

import logging
import warnings

from lightning.pytorch.utilities.warnings import PossibleUserWarning

# Lightning logs its tips through whichever of these two loggers lightning_utilities was handed last.
_TIP_LOGGERS = ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero")


def _not_a_tip(record: logging.LogRecord) -> bool:
    """False for Lightning's "💡 Tip: ... try installing litlogger / litmodels" lines."""
    return "💡 Tip:" not in record.getMessage()


def quiet() -> None:
    """Silence, for this process: the warning that DataLoaders have few workers (``num_workers=0`` is deliberate: every
    example's data set is a tensor in memory), torch's deprecation of ``isinstance(x, LeafSpec)`` that
    Lightning triggers on every fit, and Lightning's tips about its cloud products. Safe to call more than once."""
    warnings.filterwarnings("ignore", ".*does not have many workers.*", category=PossibleUserWarning)
    warnings.filterwarnings("ignore", ".*LeafSpec.*is deprecated.*", category=FutureWarning)
    for name in _TIP_LOGGERS:
        logger = logging.getLogger(name)
        if _not_a_tip not in logger.filters:
            logger.addFilter(_not_a_tip)

"""Progress messages for people, printed once per job (by rank 0), without Lightning.

Messages go to the ``tipr`` logger at INFO. Unless the application configured
logging itself, a handler printing the bare message to stderr is attached, as
Lightning does for its own logger, so a notebook or a ``tipr`` command shows them.
"""

from __future__ import annotations

import logging
import os

logger = logging.getLogger("tipr")
if not logger.handlers and not logging.getLogger().handlers:
    _handler = logging.StreamHandler()
    _handler.setFormatter(logging.Formatter("%(message)s"))
    logger.addHandler(_handler)
    logger.setLevel(logging.INFO)


def _rank() -> int:
    """This process's global rank, from the launchers' variables (as Lightning reads it), 0 when none is set."""
    for name in ("RANK", "LOCAL_RANK", "SLURM_PROCID", "JSM_NAMESPACE_RANK"):
        if os.environ.get(name, "").isdigit():
            return int(os.environ[name])
    return 0


def rank_zero_info(message: str) -> None:
    """Log ``message`` at INFO on rank 0 only."""
    if _rank() == 0:
        logger.info(message)

"""Log formatting of the command line (no torch: Hydra's logging config imports it).

The console shows INFO lines as they are (the banner and the progress line stay readable) and
prefixes other levels with their name; ``train.log`` has the full format (see
``stability/conf/hydra/job_logging/stability.yaml``).
"""

from __future__ import annotations

import logging


class ConsoleFormatter(logging.Formatter):
    """``message`` for INFO, ``LEVEL: message`` for everything else."""

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        return text if record.levelno == logging.INFO else f"{record.levelname}: {text}"

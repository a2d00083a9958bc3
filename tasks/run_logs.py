"""What a run's log shows. Prefect logs "Finished in state Completed()" for every task and flow run that
succeeds: half of a rebuild's log, saying what the UI's state badges already say. Failures stay."""

from __future__ import annotations

import logging

_RUN_LOGGERS = ("prefect.task_runs", "prefect.flow_runs")


class _DropCompleted(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.levelno == logging.INFO and record.getMessage().startswith("Finished in state Completed"))


def quiet_completed_states() -> None:
    """Drop those lines for every handler: the console, and the API that the Prefect UI reads."""
    for name in _RUN_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(existing, _DropCompleted) for existing in logger.filters):
            logger.addFilter(_DropCompleted())

"""Structured JSON logs.

One JSON object per line on standard output, one event per state change. Every line
has ``timestamp`` (UTC, ISO 8601), ``level``, ``logger`` and ``event``; ids such as
``study`` (see :func:`service.uids.study_key`) and ``job`` are bound where they are
known. Patient data never enters a log call: the index holds none and the receive
path logs studies by their key only. pynetdicom's own logger is kept at WARNING,
because at DEBUG it prints whole data sets.
"""

from __future__ import annotations

import logging
import sys

import structlog

_LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}


def configure_logging(level: str = "info") -> None:
    """Send structlog and stdlib logging (pynetdicom, huey) to JSON lines on stdout."""
    shared: list[structlog.types.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    structlog.configure(
        processors=[
            *shared,
            structlog.processors.StackInfoRenderer(),
            structlog.processors.format_exc_info,
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=shared,
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            structlog.processors.format_exc_info,
            structlog.processors.JSONRenderer(),
        ],
    )
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(_LEVELS[level])
    # pynetdicom logs whole data sets and identifiers at DEBUG/INFO: never let them out.
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)

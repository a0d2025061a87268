"""Structured JSON logs.

One JSON object per line on standard output, one event per state change. Every line
has ``timestamp`` (UTC, ISO 8601), ``level``, ``logger`` and ``event``; ids such as
``study`` (see :func:`service.uids.study_key`) and ``job`` are bound where they are
known. Patient data never enters a log call: the index holds none and the receive
path logs studies by their key only.

Libraries are the other way patient data could leak: pynetdicom prints whole data
sets at DEBUG and quotes element values in its warnings, pydicom quotes invalid values
when it validates. Their loggers are kept at WARNING with every quoted value redacted,
pydicom does not validate on read (radnode validates the UIDs it uses itself), and
Python warnings from them are not printed. Warnings from every other library (MONAI
deprecations at bundle load, torch) become ``python.warning`` lines with their quoted
values redacted too, not free text on standard error amid the JSON.
"""

from __future__ import annotations

import logging
import re
import sys
import warnings

import structlog
from pydicom import config as pydicom_config

_LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}


_QUOTED = re.compile(r"'[^']*'|\"[^\"]*\"")


#: DICOM libraries whose log records may quote values: kept at WARNING, quotes redacted.
#: highdicom logs every attribute it copies at INFO, naming the source instance's UID
#: (found by review: 67 such lines per job).
_LIBRARIES = ("pynetdicom", "pydicom", "highdicom")


class RedactQuotedValues(logging.Filter):
    """Replace every quoted value in a DICOM library's log message with ``'<redacted>'``."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name.split(".", 1)[0] in _LIBRARIES:
            record.msg = _QUOTED.sub("'<redacted>'", record.getMessage())
            record.args = None
        return True


def _log_warning(
    message: Warning | str,
    category: type[Warning],
    filename: str,
    lineno: int,
    file: object = None,
    line: str | None = None,
) -> None:
    """``warnings.showwarning`` for a service: one JSON line, quoted values redacted
    (a library may quote what it was given). Python still shows each warning once per
    place it is raised from, so a warning in a loop is one line, not a flood."""
    structlog.get_logger("py.warnings").warning(
        "python.warning",
        category=category.__name__,
        message=_QUOTED.sub("'<redacted>'", str(message)),
        source=f"{filename.rsplit('/', 1)[-1]}:{lineno}",
    )


def quiet_libraries() -> None:
    """Keep pynetdicom and pydicom from logging data set contents.

    Their records are redacted by :class:`RedactQuotedValues` on the log handler.
    """
    pydicom_config.settings.reading_validation_mode = pydicom_config.IGNORE
    warnings.filterwarnings("ignore", module=r"pydicom(\..*)?")
    warnings.filterwarnings("ignore", module=r"pynetdicom(\..*)?")
    for name in _LIBRARIES:
        logging.getLogger(name).setLevel(logging.WARNING)


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
    handler.addFilter(RedactQuotedValues())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(_LEVELS[level])
    quiet_libraries()
    warnings.showwarning = _log_warning

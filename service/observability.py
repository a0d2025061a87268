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
import time
import warnings

import structlog
from pydicom import config as pydicom_config

_LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}


#: A quoted value: in single quotes that are not apostrophes (a quote with a letter
#: before it, as in "worker's", opens nothing: the text up to the next quote was
#: redacted, IT-ops pass; inside, one between letters belongs to the value, as in
#: 'O'Brien'), or in double quotes; a Python literal prefix (b'DOE', pydicom's repr of
#: a bytes value) is part of the quote (review).
QUOTED_VALUE = r"(?<!\w)[bBuUrRfF]{0,2}'(?:[^']|(?<=\w)'(?=\w))*'|[bBuUrRfF]{0,2}\"[^\"]*\""
#: Python's AttributeError message: a class and an attribute name, both identifiers.
_ATTRIBUTE_ERROR = r"'[A-Za-z_]\w*' object has no attribute '[A-Za-z_]\w*'"
#: One pass: an AttributeError message is kept whole, any other quoted value redacted.
_REDACTABLE = re.compile(f"(?P<keep>{_ATTRIBUTE_ERROR})|{QUOTED_VALUE}")


#: DICOM libraries whose log records may quote values: kept at WARNING, quotes redacted.
#: highdicom logs every attribute it copies at INFO, naming the source instance's UID
#: (found by review: 67 such lines per job).
_LIBRARIES = ("pynetdicom", "pydicom", "highdicom")


class RedactQuotedValues(logging.Filter):
    """Replace every quoted value in a DICOM library's log message with ``'<redacted>'``."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name.split(".", 1)[0] in _LIBRARIES:
            record.msg = redact_quoted(record.getMessage())
            record.args = None
        return True


#: pynetdicom's own lines for a connection radnode reports itself (``scu.association_failed``
#: and ``dicom.retry``, with what to do): two more error lines per try, without an action.
#: The last two come when the PACS dies or stalls during a delivery, which ``scu.sent``
#: (``association``: aborted or timed out) and ``dicom.retry`` report (acceptance pass:
#: an error line whose action pointed at association.* events a delivery has none of).
_PYNETDICOM_DUPLICATES = (
    "Association request failed",
    "TCP Initialisation Error",
    "Connection closed while waiting for DIMSE message",
    "DIMSE timeout reached while waiting for message response",
)


class DropReportedConnectionErrors(logging.Filter):
    """Drop pynetdicom's error lines for a connection that failed: radnode's
    ``scu.association_failed`` and ``dicom.retry`` say it, with an action (acceptance
    pass: each PACS retry logged two extra error lines)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.name.startswith("pynetdicom"):
            return True
        return not str(record.msg).startswith(_PYNETDICOM_DUPLICATES)


class ThrottleLibraryRepeats(logging.Filter):
    """Let each warning or error message of a library through once a minute.

    Why: while Redis is down huey's consumer logs "Error reading from queue" with a
    traceback about ten times a second (249 lines in 26 s, acceptance pass); radnode's
    own ``jobs.check_failed`` / ``worker.*`` lines already say the queue is down. And
    pydicom warns of a misspelt character set once per image it reads: 600 lines for
    one 100-image study (acceptance pass). The message is compared after its quoted
    values are redacted, so one per kind of problem gets through.
    """

    #: Top-level packages whose repeated lines are held back.
    PACKAGES = ("huey", *_LIBRARIES)

    def __init__(self, every_s: float = 60.0) -> None:
        super().__init__()
        self.every_s = every_s
        self._last: dict[str, float] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        package = record.name.split(".", 1)[0]
        if package not in self.PACKAGES or record.levelno < logging.WARNING:
            return True
        message = f"{package}:{record.getMessage()}"
        now = time.monotonic()
        if now - self._last.get(message, -self.every_s) < self.every_s:
            return False
        if len(self._last) >= 1000:  # messages that name a task differ each time
            self._last.clear()
        self._last[message] = now
        return True


def redact_quoted(text: str) -> str:
    """``text`` with every quoted value replaced by ``'<redacted>'``.

    Why: an exception from pydicom or highdicom quotes the value it refused, and that
    value can be patient data (a malformed birth date reached a job's error, its log
    lines and /api/jobs: acceptance pass). Used on job errors from exceptions. Python's
    own "'Dataset' object has no attribute 'ImagerPixelSpacing'" names code, not data,
    and stays: redacted it told the operator nothing (acceptance pass)."""
    return _REDACTABLE.sub(lambda m: m.group("keep") or "'<redacted>'", text)


def redact_exception_messages(
    logger: object, method: str, event_dict: structlog.types.EventDict
) -> structlog.types.EventDict:
    """structlog processor: quoted values in a logged traceback's messages redacted.

    Only the lines that are not indented: the ``ValueError: ...`` message lines (and
    chained ones). File and code lines, which quote source, stay readable."""
    text = event_dict.get("exception")
    if isinstance(text, str):
        event_dict["exception"] = "\n".join(
            line if line[:1].isspace() else redact_quoted(line) for line in text.split("\n")
        )
    return event_dict


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
        message=redact_quoted(str(message)),
        source=f"{filename.rsplit('/', 1)[-1]}:{lineno}",
        action=_NO_ACTION,
    )


def quiet_libraries() -> None:
    """Keep pynetdicom and pydicom from logging data set contents.

    Their records are redacted by :class:`RedactQuotedValues` on the log handler.
    """
    pydicom_config.settings.reading_validation_mode = pydicom_config.IGNORE
    warnings.filterwarnings("ignore", module=r"pydicom(\..*)?")
    warnings.filterwarnings("ignore", module=r"pynetdicom(\..*)?")
    ignore_library_notices()
    for name in (*_LIBRARIES, "huey"):  # huey: "Executing task", "Sleeping" at INFO/DEBUG
        logging.getLogger(name).setLevel(logging.WARNING)


#: Library warnings that say nothing to an operator. MONAI's ``Orientationd`` warns,
#: for every bundle that does not name its axis ``labels``, that the default will
#: change: radnode reads the labels itself (``input_axcodes``), and the line came
#: with every worker start, its axis codes redacted (acceptance pass).
_NOTICES = (r".*Orientationd\.__init__:labels",)


def ignore_library_notices() -> None:
    """Leave out the library warnings in :data:`_NOTICES`."""
    for message in _NOTICES:
        warnings.filterwarnings("ignore", message=message, category=FutureWarning)


#: The action of a library's warning that radnode has nothing to add to (every warning
#: line carries an action, docs/logging.md; IT-ops pass found these without one).
_NO_ACTION = "none: a library's notice, kept for the record; report it if it comes with a failure"

#: What to do about a library's warning or error, by its top-level package.
_LIBRARY_ACTIONS = {
    "huey": "check the job queue (queue.url, Redis); radnode retries on its own",
    "pynetdicom": "see radnode's own lines for the same peer around this one (association.*"
    " for what it receives, scu.* and dicom.* for deliveries)",
}


def name_library_records(
    logger: object, method: str, event_dict: structlog.types.EventDict
) -> structlog.types.EventDict:
    """structlog processor for stdlib records of other packages (huey, pynetdicom):
    ``event`` becomes ``library.<package>`` and their text goes to ``message``, so every
    line's ``event`` is a name from docs/logging.md (acceptance pass: huey wrote free
    text such as "Huey consumer started with 1 thread" as the event)."""
    package = str(event_dict.get("logger", "")).split(".", 1)[0]
    if package and package not in ("service", "dicom_nodes", "py"):
        event_dict["message"] = event_dict.get("event")
        event_dict["event"] = f"library.{package}"
        if method in ("warning", "error", "critical"):
            event_dict.setdefault("action", _LIBRARY_ACTIONS.get(package, _NO_ACTION))
    return event_dict


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
            redact_exception_messages,
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[*shared, name_library_records],
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            structlog.processors.format_exc_info,
            redact_exception_messages,
            structlog.processors.JSONRenderer(),
        ],
    )
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(formatter)
    handler.addFilter(RedactQuotedValues())
    handler.addFilter(ThrottleLibraryRepeats())  # after the redaction: it compares texts
    handler.addFilter(DropReportedConnectionErrors())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(_LEVELS[level])
    quiet_libraries()
    warnings.showwarning = _log_warning


class RepeatedFailureLog:
    """How a periodic check that keeps failing is logged: its traceback once per kind
    of failure (type and message), then one line a minute while that kind repeats.

    Why: an outage of the index disk or of Redis made the tracker, the completion
    monitor and the dispatcher log a traceback on every pass (29 in 6 s, then 51 a
    minute in the acceptance pass). Nothing resets on a pass that went through: a
    check that touches the failing part only on some passes reset it in between, and
    the flood came back (acceptance pass).
    """

    def __init__(self, event: str, action: str, every_s: float = 60.0) -> None:
        self.event, self.action, self.every_s = event, action, every_s
        self._last: tuple[str, float] | None = None  # kind, when it was logged

    def failed(self, exc: BaseException, logger: structlog.typing.FilteringBoundLogger) -> None:
        """Log ``exc`` (call from its ``except`` block), unless its kind was just logged."""
        kind = f"{type(exc).__name__}: {exc}"
        now = time.monotonic()
        if self._last is not None and self._last[0] == kind:
            if now - self._last[1] < self.every_s:
                return
            logger.error(self.event, reason=kind, repeated=True, action=self.action)
        else:
            logger.exception(self.event, reason=kind, action=self.action)
        self._last = (kind, now)

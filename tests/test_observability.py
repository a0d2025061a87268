"""Python warnings in a configured service process become redacted JSON log lines.

Run in a child interpreter: configure_logging changes process-wide state (the root
handler, warnings.showwarning) that the rest of the test session must not inherit.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import structlog

from tests.conftest import RADNODE, RadnodeProcess, free_port

REPO = Path(__file__).resolve().parent.parent


def _logged_by(script: str) -> tuple[subprocess.CompletedProcess[str], list[dict]]:
    """Run ``script`` in a fresh interpreter (logging configured as a service does it);
    return the process and its standard output's JSON lines."""
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    return done, [json.loads(line) for line in done.stdout.splitlines()]


def test_a_library_warning_is_one_redacted_json_line_on_stdout() -> None:
    script = textwrap.dedent(
        """
        import warnings
        from service.observability import configure_logging
        configure_logging("info")
        for _ in range(3):  # Python shows a warning once per place: one line
            warnings.warn("value 'DOE^JANE' is deprecated", FutureWarning, stacklevel=1)
        """
    )
    done, lines = _logged_by(script)
    assert done.stderr == ""
    assert len(lines) == 1
    (line,) = lines
    assert line["event"] == "python.warning"
    assert line["level"] == "warning"
    assert line["category"] == "FutureWarning"
    assert line["message"] == "value '<redacted>' is deprecated"
    assert line["action"].startswith("none")  # every warning line has one
    assert "DOE" not in done.stdout


def test_monais_labels_default_notice_is_left_out_and_other_warnings_are_not() -> None:
    script = textwrap.dedent(
        """
        import warnings
        from monai.transforms import Orientationd
        with warnings.catch_warnings(record=True) as seen:  # MONAI does warn, unlogged
            warnings.simplefilter("always")
            Orientationd(keys="image", axcodes="RAS")
        assert any("Orientationd.__init__:labels" in str(w.message) for w in seen), seen
        from service.observability import configure_logging
        configure_logging("info")
        Orientationd(keys="image", axcodes="RAS")
        warnings.warn("another library notice", FutureWarning, stacklevel=1)
        """
    )
    _, lines = _logged_by(script)
    assert [line["message"] for line in lines] == ["another library notice"]


def test_highdicom_info_lines_naming_instances_are_not_logged() -> None:
    """highdicom logs every attribute it copies at INFO with the source instance's UID
    (found by review: 67 lines a job); it is kept at WARNING, quoted values redacted."""
    script = textwrap.dedent(
        """
        import logging
        from service.observability import configure_logging
        configure_logging("debug")
        logging.getLogger("highdicom.base").info('copy attributes from dataset "1.2.3.4"')
        logging.getLogger("highdicom.seg").warning('odd value "1.2.3.4" in dataset')
        """
    )
    done, lines = _logged_by(script)
    assert [line["level"] for line in lines] == ["warning"]
    assert lines[0]["event"] == "library.highdicom" and lines[0]["action"]
    assert "1.2.3.4" not in done.stdout


def test_a_check_that_keeps_failing_is_logged_once_a_minute_whatever_passes_between() -> None:
    """Passes that do not touch the failing part went through and reset the throttle,
    so a Redis outage logged a traceback every 8 s (acceptance pass). Now one traceback
    per kind of failure, then one line a minute; another kind is logged at once."""
    from service.observability import RepeatedFailureLog

    failures = RepeatedFailureLog("x.check_failed", "check the disk", every_s=60.0)
    logger = structlog.get_logger("test")
    with structlog.testing.capture_logs() as events:
        for _ in range(20):
            try:
                raise ConnectionError("Redis is down")
            except ConnectionError as exc:
                failures.failed(exc, logger)
        try:
            raise OSError("disk full")
        except OSError as exc:
            failures.failed(exc, logger)
    assert [(e["event"], e["reason"]) for e in events] == [
        ("x.check_failed", "ConnectionError: Redis is down"),
        ("x.check_failed", "OSError: disk full"),
    ]
    assert all(e["action"] == "check the disk" for e in events)


def test_huey_repeating_an_error_while_redis_is_down_is_let_through_once_a_minute() -> None:
    import logging

    from service.observability import ThrottleLibraryRepeats

    throttle = ThrottleLibraryRepeats(every_s=60.0)

    def record(name: str, level: int, message: str) -> logging.LogRecord:
        return logging.LogRecord(name, level, __file__, 1, message, None, None)

    reading = record("huey.consumer", logging.ERROR, "Error reading from queue")
    assert sum(throttle.filter(reading) for _ in range(50)) == 1
    assert throttle.filter(record("huey.consumer", logging.ERROR, "Error reading schedule."))
    assert all(throttle.filter(record("huey", logging.INFO, "Executing task")) for _ in range(3))
    assert all(throttle.filter(record("service.worker", logging.ERROR, "x")) for _ in range(3))
    # pydicom warned of a misspelt character set once per image: 600 lines a study
    charset = record("pydicom.charset", logging.WARNING, "Unknown encoding '<redacted>'")
    assert sum(throttle.filter(charset) for _ in range(600)) == 1


def test_pynetdicoms_connection_error_lines_give_way_to_radnodes_own() -> None:
    import logging

    from service.observability import DropReportedConnectionErrors

    drop = DropReportedConnectionErrors()

    def record(name: str, message: str) -> logging.LogRecord:
        return logging.LogRecord(name, logging.ERROR, __file__, 1, message, None, None)

    assert not drop.filter(record("pynetdicom.transport", "TCP Initialisation Error: refused"))
    assert not drop.filter(
        record("pynetdicom.transport", "Association request failed: unable to connect")
    )
    # a PACS that dies or stalls mid-delivery: scu.sent and dicom.retry say it
    assert not drop.filter(
        record("pynetdicom.association", "Connection closed while waiting for DIMSE message")
    )
    assert drop.filter(record("pynetdicom.acse", "Association Aborted"))
    assert drop.filter(record("service.delivery", "TCP Initialisation Error"))


def test_a_logged_tracebacks_messages_lose_their_quoted_values() -> None:
    """pydicom and highdicom quote the value they refused; a malformed birth date
    reached the log that way (acceptance pass). Code lines stay readable."""
    from service.observability import redact_exception_messages, redact_quoted

    trace = (
        "Traceback (most recent call last):\n"
        '  File "x.py", line 1, in f\n'
        "    raise ValueError(f'bad {value!r}')\n"
        "ValueError: Unable to convert '1961029' to 'DA' object"
    )
    redacted = redact_exception_messages(None, "error", {"exception": trace})["exception"]
    assert "1961029" not in redacted
    assert "    raise ValueError(f'bad {value!r}')" in redacted
    assert redact_quoted('x "DOE^JANE" y') == "x '<redacted>' y"
    # an apostrophe opens no quote (radnode's own text was cut), and sits inside one
    assert redact_quoted("the worker's disk, the edge's path") == (
        "the worker's disk, the edge's path"
    )
    assert redact_quoted("name 'O'Brien^Pat' refused") == "name '<redacted>' refused"
    # Python's own AttributeError names code, not data
    error = "AttributeError: 'FileDataset' object has no attribute 'ImagerPixelSpacing'"
    assert redact_quoted(error + " for 'DOE'") == error + " for '<redacted>'"
    # pydicom's repr of a bytes value; text that looks like a placeholder (review)
    assert redact_quoted("bad value b'DOE^JOHN'") == "bad value '<redacted>'"
    assert redact_quoted(error + " \x001\x00") == error + " \x001\x00"


def test_every_log_event_the_code_emits_is_in_logging_md() -> None:
    """An operator's alert rules and dashboards go by docs/logging.md; the acceptance
    pass found events there was no row for (scu.sent, dicom.attempt, ...)."""
    import ast
    import re

    repo = Path(__file__).resolve().parents[1]
    doc = (repo / "docs" / "logging.md").read_text(encoding="utf-8")
    levels = {"debug", "info", "warning", "error", "exception", "critical"}
    name = re.compile(r"[a-z0-9_]+(\.[a-z0-9_]+)+")
    missing = []
    for package in ("service", "dicom_nodes"):
        for path in sorted((repo / package).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if not (
                    isinstance(node, ast.Call)
                    and isinstance(node.func, ast.Attribute)
                    and node.func.attr in levels
                    and node.args
                    and isinstance(node.args[0], ast.Constant)
                    and isinstance(node.args[0].value, str)
                    and name.fullmatch(node.args[0].value)
                ):
                    continue
                if f"`{node.args[0].value}`" not in doc:
                    missing.append(f"{node.args[0].value} ({path.name}:{node.lineno})")
    assert missing == []


def test_every_warning_and_error_the_code_emits_says_what_to_do() -> None:
    """docs/logging.md promises an ``action`` on every warning and error line; the
    acceptance pass found job.requeued and a failed job.finished without one."""
    import ast

    repo = Path(__file__).resolve().parents[1]
    without = []
    for package in ("service", "dicom_nodes"):
        for path in sorted((repo / package).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if (
                    isinstance(node, ast.Call)
                    and isinstance(node.func, ast.Attribute)
                    and node.func.attr in {"warning", "error", "exception", "critical"}
                    and node.args
                    and isinstance(node.args[0], ast.Constant)
                    and isinstance(node.args[0].value, str)
                    and "." in node.args[0].value  # an event name, not a message
                    and not {k.arg for k in node.keywords} & {"action", None}  # None: **kw
                ):
                    without.append(f"{node.args[0].value} ({path.name}:{node.lineno})")
    assert without == []


def test_library_lines_carry_a_documented_event_name_and_their_text_as_message() -> None:
    """huey wrote free text as the event ("Huey consumer started with 1 thread"), and
    "Error reading from queue" came without an action (acceptance pass)."""
    script = textwrap.dedent(
        """
        import logging
        from service.observability import configure_logging
        configure_logging("debug")
        logging.getLogger("huey.consumer").info("Huey consumer started with 1 thread")
        logging.getLogger("huey.consumer").error("Error reading from queue")
        logging.getLogger("service.node").info("not a library")
        """
    )
    _, lines = _logged_by(script)
    assert [line["event"] for line in lines] == ["library.huey", "not a library"]
    assert lines[0]["message"] == "Error reading from queue"
    assert "queue.url" in lines[0]["action"]


def test_a_node_that_cannot_start_says_why_in_the_json_log_too(tmp_path: Path) -> None:
    """A port in use left node.starting as the last JSON line and the reason in plain
    text on stderr only (IT-ops pass): a log shipper now gets node.failed."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        node = RadnodeProcess(
            data_dir=tmp_path / "data",
            port=taken.getsockname()[1],
            http_port=free_port(),
            extra_env={"RADNODE_NODE__HOST": "127.0.0.1"},
        )
        done = subprocess.run(
            [str(RADNODE), "serve"], env=node.env(), capture_output=True, text=True, timeout=120
        )
    assert done.returncode == 1
    events = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    (failed,) = [e for e in events if e["event"] == "node.failed"]
    assert failed["level"] == "critical" and "cannot listen on" in failed["reason"]
    assert "radnode: cannot listen on" in done.stderr

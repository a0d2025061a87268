"""service.beside: a function run beside the caller keeps the caller's log context."""

from __future__ import annotations

import threading

import pytest
import structlog

from service.beside import beside


def _log_and_name(value: int) -> str:
    structlog.get_logger("test").info("beside.ran", value=value)
    return threading.current_thread().name


def test_the_function_runs_on_its_own_thread_with_the_callers_job_id() -> None:
    with (
        structlog.testing.capture_logs(
            processors=[structlog.contextvars.merge_contextvars]
        ) as events,
        structlog.contextvars.bound_contextvars(job="job-7"),
        beside("side", _log_and_name, 3) as pending,
    ):
        name = pending.result()
    assert name.startswith("side") and name != threading.current_thread().name
    (event,) = [e for e in events if e["event"] == "beside.ran"]
    assert event["job"] == "job-7" and event["value"] == 3


def test_an_exception_of_the_function_reaches_the_caller() -> None:
    def fail() -> None:
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space left"), beside("side", fail) as pending:
        pending.result()

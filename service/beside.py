"""Run one function on a thread of its own while the caller does something else.

Why: a job's writing has parts that run without the GIL (gzip of the NIfTI copies,
numpy passes over a label map) next to parts that are Python (highdicom, pydicom); on
a worker with two cores, side by side they take the longer one's time, not the sum.
The function runs in a copy of the caller's context, so a line it logs carries the
job id the caller bound (structlog's context variables do not cross threads by
themselves).
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, TypeVar

T = TypeVar("T")


@contextlib.contextmanager
def beside(name: str, function: Callable[..., T], *args: Any, **kwargs: Any) -> Iterator[Future[T]]:
    """``function(*args, **kwargs)`` on a thread named ``name``, started on entering the
    block; leaving the block waits for it. Its result (or exception) is the future's."""
    with ThreadPoolExecutor(1, thread_name_prefix=name) as pool:
        yield pool.submit(contextvars.copy_context().run, function, *args, **kwargs)

"""The job queue: huey on SQLite (one machine) or Redis (workers elsewhere).

The queue only carries job ids. What a job is, and whether it still has to run, lives
in the study index (ARCHITECTURE step 5): after a crash the node flushes the queue and
enqueues every unfinished job again, so a job lost between dequeue and finish is never
lost for good, and a job already done is never run twice (the worker checks its state
first).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from huey import Huey, RedisHuey, SqliteHuey

from service.config import Settings

#: The one task name producers and consumers agree on.
TASK_NAME = "radnode.run_job"

JobHandler = Callable[[str], None]


def make_huey(settings: Settings) -> Huey:
    """SQLite under ``node.data_dir`` unless ``queue.url`` names a Redis server."""
    if settings.queue.url:
        return RedisHuey("radnode", url=settings.queue.url, results=False)
    path = Path(settings.node.data_dir) / "queue.sqlite3"
    path.parent.mkdir(parents=True, exist_ok=True)
    return SqliteHuey("radnode", filename=str(path), results=False, fsync=True)


class JobQueue:
    """Enqueue job ids; in a worker, run them with ``handler``."""

    def __init__(self, settings: Settings, handler: JobHandler | None = None) -> None:
        self.huey = make_huey(settings)
        self._handler = handler

        def run_job(job_id: str) -> None:
            if self._handler is None:
                raise RuntimeError("this process only enqueues jobs; run `radnode worker`")
            self._handler(job_id)

        self._task = self.huey.task(name=TASK_NAME, retries=0)(run_job)

    def enqueue(self, job_id: str) -> None:
        self._task(job_id)

    def depth(self) -> int:
        """Jobs waiting in the queue (not those a worker holds)."""
        return int(self.huey.pending_count())

    def reachable(self) -> bool:
        try:
            self.huey.pending_count()
        except Exception:
            return False
        return True

    def flush(self) -> None:
        """Drop everything queued; the caller enqueues what the index says is unfinished."""
        self.huey.flush()

    def consumer(self, workers: int = 1) -> Any:
        """A huey consumer that polls often (a job starts within half a second)."""
        return self.huey.create_consumer(
            workers=workers,
            worker_type="thread",
            periodic=False,
            initial_delay=0.05,
            backoff=1.2,
            max_delay=0.5,
            check_worker_health=True,
        )

"""``radnode status``: what a running node is doing, read from its HTTP API.

The command runs on the operator's shell, often on another machine than the node, so
it asks the node's status API (:mod:`service.api`) rather than opening the study index:
the API is the one place that decides what may be shown (keys and counts, no patient
data, no UIDs), and the CLI cannot show more than it does.

:func:`fetch_status` reads ``/api/workers``, ``/api/studies``, ``/api/jobs`` (recent,
and failed and refused ones separately so that they do not scroll away),
``/api/dead-letters`` and the job counts of ``/metrics``; :func:`render_status` turns
them into rich tables: the workers, the queue (jobs per pipeline and state), recent
studies, failed jobs and dead letters.
"""

from __future__ import annotations

import email.utils
import json
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text

from service.errors import StatusUnavailable
from service.records import JobState

#: One item of an API list, as the OpenAPI document describes it.
Item = Mapping[str, Any]

_STATE_STYLES = {
    "queued": "cyan",
    "running": "yellow",
    "done": "green",
    "failed": "bold red",
    "refused": "magenta",
    "receiving": "yellow",
    "complete": "green",
    "purging": "dim",
}


@dataclass(frozen=True)
class StatusSnapshot:
    """What the node's status API said at one moment."""

    base_url: str
    studies: tuple[Item, ...]
    jobs: tuple[Item, ...]
    failed_jobs: tuple[Item, ...]
    dead_letters: tuple[Item, ...]
    workers: tuple[Item, ...] = ()
    #: ``GET /readyz``'s body: whether the node can receive, and what is degraded.
    readiness: Item | None = None
    #: The node's clock when it answered (epoch seconds, from the HTTP ``Date``
    #: header); ages are measured on it, not on the clock of the machine that asks.
    node_time: float | None = None
    #: Jobs per (pipeline, state), all the node holds (``radnode_jobs`` of /metrics);
    #: None when it could not be read (then the queue table counts the recent jobs).
    job_counts: Mapping[tuple[str, str], int] | None = None


def _job_counts(base_url: str, timeout: float) -> dict[tuple[str, str], int] | None:
    """``radnode_jobs`` from the node's ``/metrics``: every job it holds, per pipeline
    and state; None if it cannot be read.

    Why: the table counted the last 20 jobs only, and disagreed with the metrics an
    operator's dashboard shows (acceptance pass: done 14 against 17)."""
    from prometheus_client.parser import text_string_to_metric_families

    url = base_url.rstrip("/") + "/metrics"
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            text = response.read().decode("utf-8")
        for family in text_string_to_metric_families(text):
            if family.name == "radnode_jobs":
                return {
                    (s.labels.get("pipeline", "?"), s.labels.get("state", "?")): int(s.value)
                    for s in family.samples
                }
        return None  # the index could not be read at this scrape
    except (OSError, ValueError, UnicodeDecodeError):  # URLError and HTTPError are OSErrors
        return None


def _get(base_url: str, path: str, key: str, timeout: float) -> tuple[Item, ...]:
    url = base_url.rstrip("/") + path
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            payload = json.loads(response.read().decode("utf-8"))
    except urllib.error.HTTPError as exc:
        raise StatusUnavailable(
            f"{url} answered HTTP {exc.code}; check that this is radnode's http port "
            "and that its version has the status API"
        ) from exc
    except (urllib.error.URLError, TimeoutError, ConnectionError) as exc:
        reason = getattr(exc, "reason", exc)
        raise StatusUnavailable(
            f"cannot reach {url} ({reason}); is 'radnode serve' running, and do "
            "http.host and http.port match?"
        ) from exc
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise StatusUnavailable(f"{url} did not answer JSON; is this radnode's http port?") from exc
    items = payload.get(key) if isinstance(payload, dict) else None
    if not isinstance(items, list):
        raise StatusUnavailable(f"{url} answered without a {key!r} list; versions differ?")
    return tuple(item for item in items if isinstance(item, dict))


def _readiness(base_url: str, timeout: float) -> tuple[Item | None, float | None]:
    """``/readyz``'s body, 200 or 503 alike, and the node's clock from its ``Date``
    header; None for what cannot be read (the other calls say why)."""
    url = base_url.rstrip("/") + "/readyz"
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            body, headers = response.read(), response.headers
    except urllib.error.HTTPError as exc:
        body, headers = exc.read(), exc.headers
    except (urllib.error.URLError, TimeoutError, ConnectionError):
        return None, None
    node_time = _http_date(headers.get("Date") if headers is not None else None)
    try:
        payload = json.loads(body.decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None, node_time
    return (payload if isinstance(payload, dict) else None), node_time


def _http_date(value: str | None) -> float | None:
    """Epoch seconds of an HTTP ``Date`` header; None if absent or unreadable.

    Why: "42s ago" and whether a delivery is "waiting" were measured on the clock of
    the machine running ``radnode status``; from a workstation whose clock is a few
    minutes off every age was wrong and due deliveries showed as waiting (review)."""
    if not value:
        return None
    try:
        return email.utils.parsedate_to_datetime(value).timestamp()
    except (TypeError, ValueError):
        return None


def fetch_status(base_url: str, timeout: float = 5.0, limit: int = 20) -> StatusSnapshot:
    """Read the node's status API at ``base_url`` (e.g. ``http://127.0.0.1:8080``).

    Raises :class:`StatusUnavailable` when the node cannot be reached or does not
    answer as radnode's API does.
    """
    if not base_url.startswith(("http://", "https://")):
        # "127.0.0.1:8080" without a scheme was read as "cannot reach ... is radnode
        # serve running", "nonsense" raised a traceback (acceptance pass)
        raise StatusUnavailable(
            f"{base_url!r} is not an HTTP address; give it as http://HOST:PORT"
            " (the node's node.http_port)"
        )
    query = f"?limit={limit}"
    failed = [
        *_get(base_url, f"/api/jobs{query}&state=failed", "jobs", timeout),
        *_get(base_url, f"/api/jobs{query}&state=refused", "jobs", timeout),
    ]
    # ISO 8601 UTC times sort as text; newest first, like the API's own lists.
    failed.sort(key=lambda j: str(j.get("finished_at") or ""), reverse=True)
    readiness, node_time = _readiness(base_url, timeout)
    return StatusSnapshot(
        base_url=base_url,
        studies=_get(base_url, f"/api/studies{query}", "studies", timeout),
        jobs=_get(base_url, f"/api/jobs{query}", "jobs", timeout),
        failed_jobs=tuple(failed[:limit]),
        dead_letters=_get(base_url, f"/api/dead-letters{query}", "dead_letters", timeout),
        workers=_get(base_url, "/api/workers", "workers", timeout),
        readiness=readiness,
        node_time=node_time,
        job_counts=_job_counts(base_url, timeout),
    )


def _seconds_since(iso: Any, now: float) -> float | None:
    """Seconds from the API's ISO time ``iso`` to ``now``; None if it is not one."""
    if not isinstance(iso, str):
        return None
    try:
        return now - datetime.fromisoformat(iso).timestamp()
    except ValueError:
        return None


def _age(iso: Any, now: float) -> str:
    """``"42s ago"``, ``"7m ago"``, ``"3h ago"``, ``"2d ago"``; ``-`` if unknown."""
    seconds = _seconds_since(iso, now)
    if seconds is None:
        return "-"
    seconds = max(seconds, 0.0)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{int(seconds // size)}{unit} ago"
    return f"{int(seconds)}s ago"


def _seconds(value: Any) -> str:
    return "-" if not isinstance(value, int | float) else f"{value:.1f}s"


def _state(value: Any) -> Text:
    text = str(value)
    return Text(text, style=_STATE_STYLES.get(text, ""))


def _study_state(study: Item) -> Text:
    """The study's state, and "instance lost" while an instance it lost in transit has
    not been stored since: its results are preliminary until the PACS sends it again,
    which is the operator's to arrange (review: the screen did not show it)."""
    text = _state(study.get("state"))
    if study.get("instance_lost"):
        text.append(" · instance lost", style="bold yellow")
    return text


def _queue_table(
    jobs: Sequence[Item], job_counts: Mapping[tuple[str, str], int] | None = None
) -> Table:
    states = [s.value for s in JobState]
    if job_counts is not None:
        counts = Counter({key: n for key, n in job_counts.items() if n})
        title = "Jobs by state (all the node holds)"
    else:
        counts = Counter((str(j.get("pipeline", "?")), str(j.get("state", "?"))) for j in jobs)
        title = f"Jobs by state (last {len(jobs)} jobs)"
    table = Table(title=title, title_justify="left")
    table.add_column("pipeline")
    for state in states:
        table.add_column(state, justify="right", style=_STATE_STYLES[state])
    for pipeline in sorted({p for p, _ in counts}):
        table.add_row(pipeline, *(str(counts[(pipeline, s)] or "") for s in states))
    if not counts:
        table.add_row("(no jobs)", *([""] * len(states)))
    return table


def _studies_table(studies: Sequence[Item], now: float) -> Table:
    table = Table(title="Recent studies", title_justify="left")
    for name, justify in (
        ("study", "left"),
        ("state", "left"),
        ("series", "right"),
        ("instances", "right"),
        ("last instance", "right"),
        ("receive", "right"),
    ):
        table.add_column(name, justify=justify)  # type: ignore[arg-type]
    for s in studies:
        table.add_row(
            str(s.get("study_key", "?")),
            _study_state(s),
            str(s.get("series_count", "")),
            str(s.get("instance_count", "")),
            _age(s.get("last_received_at"), now),
            _seconds(s.get("receive_s")),
        )
    if not studies:
        table.add_row("(no studies)", "", "", "", "", "")
    return table


#: Columns whose values are copied into commands (a job id into the retry URL): never
#: wrapped, or "efd0f23e6" / "160" could not be copied whole (acceptance pass).
_WHOLE = {"job": 12, "study": 16}


def _add_column(table: Table, name: str) -> None:
    if name in _WHOLE:
        table.add_column(name, no_wrap=True, min_width=_WHOLE[name])
    else:
        table.add_column(name, overflow="fold")


def _failed_table(jobs: Sequence[Item], now: float) -> Table:
    table = Table(title="Failed and refused jobs", title_justify="left")
    for name in ("job", "study", "pipeline", "state", "tries", "finished", "error"):
        _add_column(table, name)
    for j in jobs:
        table.add_row(
            str(j.get("job_id", "?")),
            str(j.get("study_key", "?")),
            str(j.get("pipeline", "?")),
            _state(j.get("state")),
            str(j.get("attempts", "")),
            _age(j.get("finished_at"), now),
            _failure_text(j),
        )
    if not jobs:
        table.add_row("(none)", "", "", "", "", "", "")
    return table


def _failure_text(job: Item) -> str:
    """The job's error, after what resolved it where a later job made the result (the
    acceptance pass could not tell a refusal already made good from a standing one)."""
    error = str(job.get("error") or "")
    if job.get("resolved_by"):
        return f"resolved: job {job['resolved_by']} made the result. {error}".strip()
    return error


#: A delivery not tried this long after it was due is waiting behind another one.
WAITING_AFTER_S = 30.0


def _undelivered(jobs: Sequence[Item], now: float) -> list[tuple[Item, str, str, Item]]:
    """(job, destination, what, delivery) for each result that has not reached its
    destination and is not a dead letter: deliveries being retried, deliveries not yet
    tried long after they were due (deliveries to one destination go in order: they
    wait behind one being retried; the acceptance pass found such results nowhere on
    this screen), and destinations a done job made no result for (its error says why)."""
    rows: list[tuple[Item, str, str, Item]] = []
    for job in jobs:
        deliveries = [d for d in job.get("deliveries") or () if isinstance(d, dict)]
        for d in deliveries:
            if d.get("state") != "pending":
                continue
            if int(d.get("attempts") or 0) > 0:
                rows.append((job, str(d.get("destination", "?")), "retrying", d))
            elif (_seconds_since(d.get("next_attempt_at"), now) or 0.0) > WAITING_AFTER_S:
                waiting = {**d, "error": "not tried yet: waiting behind an earlier result"}
                rows.append((job, str(d.get("destination", "?")), "waiting", waiting))
        if job.get("state") == "done" and job.get("error"):
            # the worker's reasons, "<destination>: <why>" joined by "; "
            for reason in str(job["error"]).split("; "):
                destination, _, why = reason.partition(": ")
                rows.append((job, destination, "not sent", {"error": why or reason}))
    return rows


def _undelivered_table(jobs: Sequence[Item], now: float) -> Table:
    table = Table(title="Results not delivered yet (done jobs)", title_justify="left")
    for name in ("job", "study", "pipeline", "destination", "state", "tries", "error"):
        _add_column(table, name)
    for job, destination, what, d in _undelivered(jobs, now):
        table.add_row(
            str(job.get("job_id", "?")),
            str(job.get("study_key", "?")),
            str(job.get("pipeline", "?")),
            destination,
            Text(what, style="bold red" if what == "not sent" else "yellow"),
            str(d.get("attempts", "")),
            str(d.get("error") or ""),
        )
    return table


def _dead_letters_table(letters: Sequence[Item], now: float) -> Table:
    table = Table(
        title="Dead letters (resend: POST /api/jobs/{id}/retry, or all of them:"
        " POST /api/dead-letters/resend; give up: /api/jobs/{id}/discard)",
        title_justify="left",
    )
    for name in ("job", "study", "pipeline", "destination", "tries", "given up", "error"):
        _add_column(table, name)
    for d in letters:
        table.add_row(
            str(d.get("job_id", "?")),
            str(d.get("study_key", "?")),
            str(d.get("pipeline", "?")),
            str(d.get("destination", "?")),
            str(d.get("attempts", "")),
            _age(d.get("dead_lettered_at"), now),
            str(d.get("error") or ""),
        )
    return table


def _workers_table(workers: Sequence[Item], now: float) -> Table:
    alive = sum(bool(w.get("alive")) for w in workers)
    table = Table(title=f"Workers ({alive} alive)", title_justify="left")
    for name in ("worker", "state", "device", "pipelines", "last seen"):
        _add_column(table, name)
    for w in workers:
        pipelines = w.get("pipelines")
        table.add_row(
            str(w.get("name", "?")),
            Text("alive", style="green") if w.get("alive") else Text("silent", style="bold red"),
            str(w.get("device", "")),
            ", ".join(f"{k} {v}" for k, v in pipelines.items())
            if isinstance(pipelines, dict)
            else "",
            _age(w.get("last_seen"), now),
        )
    if not workers:
        table.add_row(Text("(none: jobs wait in the queue)", style="bold red"), "", "", "", "")
    return table


def _readiness_table(readiness: Item) -> Table:
    """One row a check: ready, degraded (the queue: receiving goes on) or failing."""
    ready = bool(readiness.get("ready"))
    degraded = set(readiness.get("degraded") or ())
    title = "Node: ready" if ready else "Node: NOT READY"
    if degraded:
        title += f" (degraded: {', '.join(sorted(degraded))})"
    table = Table(title=title, title_justify="left")
    for name in ("check", "state", "detail"):
        _add_column(table, name)
    checks = readiness.get("checks") or {}
    for name, check in sorted(checks.items()):
        ok = isinstance(check, dict) and bool(check.get("ok"))
        state = "ok" if ok else ("degraded" if name in degraded else "failing")
        style = {"ok": "green", "degraded": "yellow", "failing": "bold red"}[state]
        detail = str(check.get("detail", "")) if isinstance(check, dict) else ""
        table.add_row(name, Text(state, style=style), detail)
    return table


def render_status(
    studies: Sequence[Item],
    jobs: Sequence[Item],
    dead_letters: Sequence[Item] | None = None,
    *,
    failed_jobs: Sequence[Item] | None = None,
    workers: Sequence[Item] | None = None,
    readiness: Item | None = None,
    now: float | None = None,
    job_counts: Mapping[tuple[str, str], int] | None = None,
) -> RenderableType:
    """The status screen: readiness, workers, queue, recent studies, failed jobs,
    results not delivered yet (retrying, or not made for a destination) and dead
    letters.

    Items are the API's JSON objects. ``failed_jobs`` defaults to the failed and
    refused jobs among ``jobs``; ``now`` (epoch seconds) is for stable test output.
    """
    now = time.time() if now is None else now
    if failed_jobs is None:
        failed_jobs = [j for j in jobs if j.get("state") in ("failed", "refused")]
    parts: list[RenderableType] = [
        *([_readiness_table(readiness)] if readiness is not None else []),
        *([_workers_table(workers, now)] if workers is not None else []),
        _queue_table(jobs, job_counts),
        _studies_table(studies, now),
        _failed_table(failed_jobs, now),
    ]
    if _undelivered(jobs, now):
        parts.append(_undelivered_table(jobs, now))
    if dead_letters:
        parts.append(_dead_letters_table(dead_letters, now))
    return Group(*parts)


def render_snapshot(snapshot: StatusSnapshot, now: float | None = None) -> RenderableType:
    """:func:`render_status` of everything :func:`fetch_status` read; ages on the
    node's clock when it was read (else this machine's)."""
    return render_status(
        snapshot.studies,
        snapshot.jobs,
        snapshot.dead_letters,
        failed_jobs=snapshot.failed_jobs,
        workers=snapshot.workers,
        readiness=snapshot.readiness,
        now=now if now is not None else snapshot.node_time,
        job_counts=snapshot.job_counts,
    )

"""The HTTP API: health, readiness, metrics and a small status API for operations.

Routes (the OpenAPI 3.1 document at ``GET /openapi.json`` describes each)::

    GET  /healthz                  the process answers (liveness)
    GET  /readyz                   200 when the node can receive; 503 names what stops it
    GET  /metrics                  Prometheus text format
    GET  /api/studies              recent studies: key, state, counts, times
    GET  /api/jobs                 recent jobs: id, pipeline, state, timings, error
    GET  /api/dead-letters         deliveries given up after their last retry
    GET  /api/workers              the workers heard from, alive or silent
    POST /api/jobs/{job_id}/retry  run a failed job again, or resend its dead letters
    POST /api/jobs/{job_id}/discard  give its dead letters up for good (bearer token)
    POST /api/dead-letters/resend  resend every dead letter (?destination=) (bearer token)
    GET  /openapi.json             this API's OpenAPI document

Why the standard library's :class:`~http.server.ThreadingHTTPServer` and not a web
framework: the API has ten small routes, no request bodies and no templates; the
node is threaded, not async; and every dependency of a device in a hospital network
is one more thing to keep patched and to list in its SBOM. A thread per request is
plenty for a scrape every 15 s and an operator's status command. The port is meant
for the operations network (``http.host`` defaults to loopback), not the internet.

What the API shows is chosen field by field, never by dumping a record: studies are
named by ``study_key`` and series by ``series_key`` (the same hash of the Series
Instance UID), jobs by ``job_id``. No UID, spool path, AE title or patient attribute
appears in a response. The data come through the :class:`StatusSource` protocol, which
the node implements over its study index and queue; this module never opens the
index itself.
"""

from __future__ import annotations

import hmac
import json
import re
import shutil
import socket
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Protocol, cast
from urllib.parse import parse_qs, urlsplit

import structlog
from pydantic import SecretStr

from service import __version__
from service.errors import StartupError
from service.metrics import Metrics
from service.records import JobRecord, JobState, StudySummary, WorkerView
from service.uids import study_key

log = structlog.get_logger("service.api")

#: ``limit`` of the list endpoints when the request gives none, and its maximum.
DEFAULT_LIMIT = 50
MAX_LIMIT = 500
#: A request body larger than this is refused (no route takes a body).
MAX_BODY_BYTES = 64 * 1024
#: Longest ``error`` text returned for a job; the index keeps the whole one.
MAX_ERROR_CHARS = 1000


class RetryOutcome(StrEnum):
    """What :meth:`StatusSource.retry_job` did."""

    #: The job was queued again.
    RETRIED = "retried"
    #: No job has that id.
    UNKNOWN_JOB = "unknown_job"
    #: The job is queued, running, or done with every delivery made: nothing to retry.
    NOT_RETRYABLE = "not_retryable"
    #: A later job of the same series and pipeline (the series grew) made or is making
    #: the result that replaces this one's: run or sent again, it would land after it.
    SUPERSEDED = "superseded"


@dataclass(frozen=True)
class DeadLetter:
    """A delivery given up after its last retry, without patient data."""

    job_id: str
    study_key: str
    pipeline: str
    destination: str
    attempts: int
    #: Operator-facing reason of the last failure (never patient data).
    error: str
    dead_lettered_at: float


@dataclass(frozen=True)
class DeliveryView:
    """Where one result of a job stands for one destination, without patient data."""

    destination: str
    kind: str
    #: ``pending`` (waiting for its first try or a retry), ``sent`` or ``dead``.
    state: str
    attempts: int
    #: When a pending delivery is tried next (None once sent or dead).
    next_attempt_at: float | None
    #: Operator-facing reason of the last failure, if any (never patient data).
    error: str | None


class StatusSource(Protocol):
    """What the API reads and asks for; the node implements it over index and queue.

    Methods are called from the HTTP server's request threads, several at a time, so
    they must be thread-safe (the study index is). ``readiness`` runs on every probe
    (every few seconds): keep it to cheap checks.
    """

    def recent_studies(self, limit: int) -> list[StudySummary]:
        """The ``limit`` studies that received an instance most recently, newest first."""
        ...

    def recent_jobs(self, limit: int, state: JobState | None = None) -> list[JobRecord]:
        """The ``limit`` most recently created jobs (only those in ``state`` if given)."""
        ...

    def dead_letters(self, limit: int) -> list[DeadLetter]:
        """The ``limit`` most recent dead-lettered deliveries not yet retried."""
        ...

    def resolved_by(self, jobs: Sequence[JobRecord]) -> dict[str, str]:
        """For each failed or refused job among ``jobs`` that a later job of the same
        series and pipeline has made a result for: that job's id, by job id."""
        ...

    def deliveries(self, job_ids: Sequence[str]) -> dict[str, list[DeliveryView]]:
        """The deliveries of these jobs (in the order they were made), by job id."""
        ...

    def workers(self) -> list[WorkerView]:
        """The workers heard from lately (alive or gone silent), by name."""
        ...

    def retry_job(self, job_id: str) -> RetryOutcome:
        """Queue job ``job_id`` again (a failed job, or a job with dead letters)."""
        ...

    def discard_dead_letters(self, job_id: str) -> list[str] | None:
        """Give up job ``job_id``'s dead letters for good; the destinations they were
        for (empty: it has none), or None when no job has that id."""
        ...

    def resend_dead_letters(self, destination: str | None) -> tuple[list[str], list[str]] | None:
        """Resend every dead letter (to ``destination`` only, if given), oldest first;
        the jobs resent, and those left dead because a later job replaces them. None
        when ``destination`` is neither configured nor named by any dead letter (a
        typo, which would otherwise be answered "nothing to resend")."""
        ...

    def readiness(self) -> dict[str, bool | str]:
        """Each readiness check by name: ``True`` passes; ``False`` or a text fails.

        A text says what is wrong and what to do, e.g. ``"12 MB free, below
        node.min_free_disk_mb (1024 MB); free disk space"``.
        """
        ...


#: Checks that are reported but do not make the node unready. Readiness answers "may
#: the PACS send now?": with the job queue down the node still receives and keeps
#: every instance, and the tracker queues the jobs once the queue answers. Gating on
#: it would make a Kubernetes readiness probe or a load balancer stop the PACS sending
#: during a Redis outage, which loses time and gains nothing (found by review).
ADVISORY_CHECKS = frozenset({"queue"})


def disk_space_check(path: Path, min_free_bytes: int) -> bool | str:
    """A readiness check: is there at least ``min_free_bytes`` free under ``path``?

    The same threshold as the receive path's, so the node reports not ready exactly
    when it would answer C-STOREs with A700; a full disk is not ready even with the
    threshold set to 0 (every write would fail: failure pass).
    """
    try:
        free = shutil.disk_usage(path).free
    except OSError as exc:
        return f"cannot read free space of node.data_dir: {exc.strerror}; check the volume"
    if free == 0:
        return "the disk under node.data_dir is full; free disk space"
    if free < min_free_bytes:
        return (
            f"{free // 2**20} MB free, below node.min_free_disk_mb "
            f"({min_free_bytes // 2**20} MB); free disk space under node.data_dir"
        )
    return True


# -- JSON views ----------------------------------------------------------------


def _iso(timestamp: float | None) -> str | None:
    if timestamp is None:
        return None
    moment = datetime.fromtimestamp(timestamp, UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _span(start: float | None, end: float | None) -> float | None:
    return None if start is None or end is None else round(end - start, 3)


def study_view(study: StudySummary) -> dict[str, Any]:
    """A study as the API shows it: its key, never its UID."""
    return {
        "study_key": study.study_key,
        "state": str(study.state),
        "instance_count": study.instance_count,
        "series_count": study.series_count,
        "first_received_at": _iso(study.first_received_at),
        "last_received_at": _iso(study.last_received_at),
        "completed_at": _iso(study.completed_at),
        "receive_s": _span(study.first_received_at, study.last_received_at),
        "instance_lost": study.instance_lost,
    }


def _clip_error(error: str | None) -> str | None:
    if error is not None and len(error) > MAX_ERROR_CHARS:
        return error[: MAX_ERROR_CHARS - 1] + "…"
    return error


def delivery_view(delivery: DeliveryView) -> dict[str, Any]:
    return {
        "destination": delivery.destination,
        "kind": delivery.kind,
        "state": delivery.state,
        "attempts": delivery.attempts,
        "next_attempt_at": _iso(delivery.next_attempt_at),
        "error": _clip_error(delivery.error),
    }


def job_view(
    job: JobRecord, deliveries: Sequence[DeliveryView] = (), resolved_by: str | None = None
) -> dict[str, Any]:
    """A job as the API shows it: keys instead of UIDs, no result path; with where each
    of its results stands (a result waiting for a PACS that is down shows here as
    ``pending`` with its attempts and last error, while the job itself is ``done``),
    and for a failed or refused job, the later job that made its series' result."""
    error = _clip_error(job.error)
    return {
        "job_id": job.job_id,
        "study_key": job.study_key,
        "series_key": study_key(job.series_uid),
        "pipeline": job.pipeline,
        "routes": list(job.routes),
        "destinations": list(job.destinations),
        "state": str(job.state),
        "attempts": job.attempts,
        "created_at": _iso(job.created_at),
        "started_at": _iso(job.started_at),
        "finished_at": _iso(job.finished_at),
        "wait_s": _span(job.created_at, job.started_at),
        "run_s": _span(job.started_at, job.finished_at),
        "error": error,
        "resolved_by": resolved_by,
        "preliminary": job.preliminary,
        "timings": dict(job.timings) if job.timings else {},
        "deliveries": [delivery_view(d) for d in deliveries],
    }


def worker_view(worker: WorkerView) -> dict[str, Any]:
    return {
        "name": worker.name,
        "alive": worker.alive,
        "device": worker.device,
        "pipelines": dict(worker.pipelines),
        "started_at": _iso(worker.started_at),
        "last_seen": _iso(worker.last_seen),
    }


def dead_letter_view(letter: DeadLetter) -> dict[str, Any]:
    return {
        "job_id": letter.job_id,
        "study_key": letter.study_key,
        "pipeline": letter.pipeline,
        "destination": letter.destination,
        "attempts": letter.attempts,
        "error": _clip_error(letter.error),
        "dead_lettered_at": _iso(letter.dead_lettered_at),
    }


# -- responses and routes --------------------------------------------------------


@dataclass(frozen=True)
class _Response:
    status: HTTPStatus
    body: bytes
    content_type: str = "application/json"
    headers: Mapping[str, str] = field(default_factory=dict)


def _json(status: HTTPStatus, payload: Mapping[str, Any], **headers: str) -> _Response:
    body = json.dumps(payload, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    return _Response(status, body, "application/json", headers)


def _problem(status: HTTPStatus, error: str, action: str, **headers: str) -> _Response:
    """An error body: what went wrong and what the caller can do about it."""
    return _json(status, {"error": error, "action": action}, **headers)


class _BadRequest(Exception):
    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


@dataclass(frozen=True)
class _Request:
    method: str
    path: str
    query: Mapping[str, list[str]]
    authorization: str | None
    params: Mapping[str, str]
    peer: str


_Handler = Callable[["ApiServer", _Request], _Response]

#: A job id as it may appear in a path: what the index issues (hex, uuid, dotted).
_JOB_ID = r"(?P<job_id>[A-Za-z0-9][A-Za-z0-9._:-]{0,127})"


@dataclass(frozen=True)
class Route:
    """One route: method, OpenAPI path template, and the pattern that matches it."""

    method: str
    template: str
    pattern: re.Pattern[str]
    handler: _Handler


def _route(method: str, template: str, handler: _Handler) -> Route:
    regex = "^" + re.escape(template).replace(re.escape("{job_id}"), _JOB_ID) + "$"
    return Route(method, template, re.compile(regex), handler)


def _limit(request: _Request) -> int:
    values = request.query.get("limit")
    if not values:
        return DEFAULT_LIMIT
    try:
        limit = int(values[-1])
    except ValueError:
        limit = 0
    if not 1 <= limit <= MAX_LIMIT:
        raise _BadRequest(f"limit must be a whole number from 1 to {MAX_LIMIT}")
    return limit


def _healthz(api: ApiServer, request: _Request) -> _Response:
    return _json(HTTPStatus.OK, {"status": "alive", "version": __version__})


def _readyz(api: ApiServer, request: _Request) -> _Response:
    try:
        checks = dict(api.source.readiness())
    except Exception as exc:
        # Not ready is the honest answer when the checks themselves cannot run; the
        # log line has the exception for whoever investigates.
        log.exception("api.readiness_failed", action="see the exception; the node is not ready")
        checks = {"readiness": f"the readiness checks raised {type(exc).__name__}; see the log"}
    failing = sorted(name for name, value in checks.items() if value is not True)
    failed = [name for name in failing if name not in ADVISORY_CHECKS]
    body = {
        "ready": not failed,
        "failed": failed,
        "degraded": [name for name in failing if name in ADVISORY_CHECKS],
        "checks": {
            name: {"ok": value is True, **({"detail": value} if isinstance(value, str) else {})}
            for name, value in sorted(checks.items())
        },
    }
    return _json(HTTPStatus.SERVICE_UNAVAILABLE if failed else HTTPStatus.OK, body)


def _metrics(api: ApiServer, request: _Request) -> _Response:
    return _Response(HTTPStatus.OK, api.metrics.exposition(), api.metrics.content_type)


def _studies(api: ApiServer, request: _Request) -> _Response:
    studies = api.source.recent_studies(_limit(request))
    return _json(
        HTTPStatus.OK,
        {"generated_at": _iso(time.time()), "studies": [study_view(s) for s in studies]},
    )


def _jobs(api: ApiServer, request: _Request) -> _Response:
    limit = _limit(request)
    state: JobState | None = None
    if request.query.get("state"):
        try:
            state = JobState(request.query["state"][-1])
        except ValueError as exc:
            allowed = ", ".join(s.value for s in JobState)
            raise _BadRequest(f"state must be one of {allowed}") from exc
    jobs = api.source.recent_jobs(limit, state)
    deliveries = api.source.deliveries([j.job_id for j in jobs])
    resolved = api.source.resolved_by(jobs)
    views = [job_view(j, deliveries.get(j.job_id, ()), resolved.get(j.job_id)) for j in jobs]
    return _json(HTTPStatus.OK, {"generated_at": _iso(time.time()), "jobs": views})


def _dead_letters(api: ApiServer, request: _Request) -> _Response:
    letters = api.source.dead_letters(_limit(request))
    return _json(
        HTTPStatus.OK,
        {
            "generated_at": _iso(time.time()),
            "dead_letters": [dead_letter_view(d) for d in letters],
        },
    )


def _workers(api: ApiServer, request: _Request) -> _Response:
    workers = api.source.workers()
    return _json(
        HTTPStatus.OK,
        {
            "generated_at": _iso(time.time()),
            "alive": sum(w.alive for w in workers),
            "workers": [worker_view(w) for w in workers],
        },
    )


def _retry(api: ApiServer, request: _Request) -> _Response:
    refusal = api.authorize(request)
    if refusal is not None:
        return refusal
    job_id = request.params["job_id"]
    outcome = api.source.retry_job(job_id)
    if outcome is RetryOutcome.UNKNOWN_JOB:
        return _problem(
            HTTPStatus.NOT_FOUND,
            "no job has this id",
            "take the job_id from GET /api/jobs",
        )
    if outcome is RetryOutcome.NOT_RETRYABLE:
        return _problem(
            HTTPStatus.CONFLICT,
            "the job is not in a retryable state",
            "only failed and refused jobs, done jobs that made no result for a destination"
            " (their error says why) and jobs with dead-lettered deliveries can be retried;"
            " check its state in GET /api/jobs",
        )
    if outcome is RetryOutcome.SUPERSEDED:
        return _problem(
            HTTPStatus.CONFLICT,
            "a later job of the same series and pipeline replaces this job's result",
            "the series grew after this job was made; retry the latest job of the series"
            " (GET /api/jobs) instead",
        )
    log.info("api.job_retried", job=job_id, peer_address=request.peer)
    return _json(HTTPStatus.ACCEPTED, {"job_id": job_id, "outcome": str(outcome)})


def _discard(api: ApiServer, request: _Request) -> _Response:
    refusal = api.authorize(request)
    if refusal is not None:
        return refusal
    job_id = request.params["job_id"]
    destinations = api.source.discard_dead_letters(job_id)
    if destinations is None:
        return _problem(
            HTTPStatus.NOT_FOUND, "no job has this id", "take the job_id from GET /api/jobs"
        )
    if not destinations:
        return _problem(
            HTTPStatus.CONFLICT,
            "the job has no dead letters",
            "see GET /api/dead-letters for the jobs that have",
        )
    log.warning(
        "api.dead_letters_discarded",
        job=job_id,
        destinations=destinations,
        peer_address=request.peer,
        action="none: these destinations will not get this job's result",
    )
    return _json(HTTPStatus.OK, {"job_id": job_id, "discarded": destinations})


def _resend_dead_letters(api: ApiServer, request: _Request) -> _Response:
    """After an outage longer than the retries (about three hours by default) every
    result to that destination is a dead letter, and resending them job by job was the
    only way (acceptance pass)."""
    refusal = api.authorize(request)
    if refusal is not None:
        return refusal
    values = request.query.get("destination")
    destination = values[-1] if values else None
    outcome = api.source.resend_dead_letters(destination)
    if outcome is None:
        return _problem(
            HTTPStatus.NOT_FOUND,
            "no destination has this name",
            "use a name from [[destinations]] in the configuration, or leave out"
            " ?destination= to resend every dead letter",
        )
    resent, superseded = outcome
    log.info(
        "api.dead_letters_resent",
        destination=destination,
        jobs=len(resent),
        superseded=len(superseded),
        peer_address=request.peer,
    )
    return _json(
        HTTPStatus.ACCEPTED,
        {"destination": destination, "resent": resent, "superseded": superseded},
    )


def _openapi(api: ApiServer, request: _Request) -> _Response:
    return _json(HTTPStatus.OK, openapi_document())


ROUTES: tuple[Route, ...] = (
    _route("GET", "/healthz", _healthz),
    _route("GET", "/readyz", _readyz),
    _route("GET", "/metrics", _metrics),
    _route("GET", "/api/studies", _studies),
    _route("GET", "/api/jobs", _jobs),
    _route("GET", "/api/dead-letters", _dead_letters),
    _route("GET", "/api/workers", _workers),
    _route("POST", "/api/jobs/{job_id}/retry", _retry),
    _route("POST", "/api/jobs/{job_id}/discard", _discard),
    _route("POST", "/api/dead-letters/resend", _resend_dead_letters),
    _route("GET", "/openapi.json", _openapi),
)


# -- the server --------------------------------------------------------------------


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    api: ApiServer


class _HTTPServer6(_HTTPServer):
    address_family = socket.AF_INET6


class _RequestHandler(BaseHTTPRequestHandler):
    server_version = "radnode"
    sys_version = ""
    #: Seconds a connection may stay silent; a stalled client cannot hold a thread.
    timeout = 10

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_POST(self) -> None:
        self._dispatch("POST")

    # Methods no endpoint takes: a JSON 405 (or 404) from the router, not http.server's
    # HTML 501 page (acceptance pass: every error answer is JSON, as documented).
    def do_DELETE(self) -> None:
        self._dispatch("DELETE")

    def do_PUT(self) -> None:
        self._dispatch("PUT")

    def do_PATCH(self) -> None:
        self._dispatch("PATCH")

    def log_message(self, format: str, *args: Any) -> None:
        # http.server writes access lines to stderr; radnode logs one JSON event per
        # request in _dispatch instead.
        return

    def _dispatch(self, method: str) -> None:
        started = time.monotonic()
        api = cast(_HTTPServer, self.server).api
        parts = urlsplit(self.path)
        route_name = "unmatched"
        try:
            response = self._read_body()
            if response is None:
                route, params, allowed = _match(parts.path, method)
                if route is None:
                    response = (
                        _problem(
                            HTTPStatus.METHOD_NOT_ALLOWED,
                            f"{method} is not allowed here",
                            f"use {', '.join(allowed)}",
                            Allow=", ".join(allowed),
                        )
                        if allowed
                        else _problem(
                            HTTPStatus.NOT_FOUND,
                            "no such endpoint",
                            "GET /openapi.json lists the endpoints",
                        )
                    )
                else:
                    route_name = route.template
                    request = _Request(
                        method=method,
                        path=parts.path,
                        query=parse_qs(parts.query),
                        authorization=self.headers.get("Authorization"),
                        params=params,
                        peer=self.client_address[0],
                    )
                    response = route.handler(api, request)
        except _BadRequest as exc:
            response = _problem(HTTPStatus.BAD_REQUEST, exc.message, "fix the query parameters")
        except Exception:
            log.exception(
                "api.unexpected_error",
                method=method,
                route=route_name,
                action="report this as a bug; the API keeps serving",
            )
            response = _problem(
                HTTPStatus.INTERNAL_SERVER_ERROR,
                "internal error",
                "see the node's log (event api.unexpected_error)",
            )
        self._send(response)
        log.debug(
            "api.request",
            method=method,
            route=route_name,
            status=int(response.status),
            duration_ms=round((time.monotonic() - started) * 1000, 1),
        )

    def _read_body(self) -> _Response | None:
        """Read and drop a request body (no route takes one); refuse a large one.

        Reading it keeps the connection clean: closing a socket with unread data makes
        the kernel reset it, and the client may lose the response.
        """
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            return _problem(HTTPStatus.BAD_REQUEST, "invalid Content-Length", "send no body")
        if length > MAX_BODY_BYTES:
            self.close_connection = True
            return _problem(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, "body too large", "send no body")
        if length > 0:
            self.rfile.read(length)
        return None

    def _send(self, response: _Response) -> None:
        try:
            self.send_response(response.status)
            self.send_header("Content-Type", response.content_type)
            self.send_header("Content-Length", str(len(response.body)))
            self.send_header("Cache-Control", "no-store")
            self.send_header("X-Content-Type-Options", "nosniff")
            for name, value in response.headers.items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(response.body)
        except (BrokenPipeError, ConnectionResetError):
            # The client went away (e.g. a health check that timed out); nothing to do.
            self.close_connection = True


def _match(path: str, method: str) -> tuple[Route | None, dict[str, str], list[str]]:
    """The route for ``method`` on ``path``, else the methods ``path`` allows."""
    allowed: list[str] = []
    for route in ROUTES:
        found = route.pattern.match(path)
        if found is None:
            continue
        if route.method == method:
            return route, found.groupdict(), []
        allowed.append(route.method)
    return None, {}, allowed


class ApiServer:
    """The HTTP API on its own port, served by a background thread.

    ``token`` guards the operator actions (``POST /api/jobs/{id}/retry``); without one
    they answer 403 and say how to enable them. ``port=0`` takes a free port, which
    :attr:`port` reports after :meth:`start`.
    """

    def __init__(
        self,
        source: StatusSource,
        metrics: Metrics,
        *,
        host: str = "127.0.0.1",
        port: int = 8080,
        token: str | SecretStr | None = None,
    ) -> None:
        self.source = source
        self.metrics = metrics
        self._host = host
        self._port = port
        secret = token.get_secret_value() if isinstance(token, SecretStr) else token
        self._token = secret.encode("utf-8") if secret else None
        self._server: _HTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        """The port actually bound (useful when configured as 0)."""
        if self._server is None:
            return self._port
        return int(self._server.server_address[1])

    @property
    def url(self) -> str:
        host = "127.0.0.1" if self._host in ("0.0.0.0", "") else self._host
        host = f"[{host}]" if ":" in host else host
        return f"http://{host}:{self.port}"

    @property
    def listening(self) -> bool:
        return self._server is not None

    def start(self) -> None:
        """Bind and serve in a background thread; returns once the socket listens."""
        server_class = _HTTPServer6 if ":" in self._host else _HTTPServer
        try:
            server = server_class((self._host, self._port), _RequestHandler)
        except OSError as exc:
            raise StartupError(
                f"cannot listen for HTTP on {self._host}:{self._port}: {exc.strerror}; "
                "stop the other program on that port or change http.port"
            ) from exc
        server.api = self
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.2}, name="http", daemon=True
        )
        self._thread.start()
        if self._token is None:
            log.warning(
                "api.operator_actions_disabled",
                reason="http.token is not set",
                action="set http.token to allow retrying jobs over the API",
            )
        log.info("api.listening", host=self._host, port=self.port)

    def stop(self) -> None:
        """Stop serving and close the socket; requests in progress finish first."""
        if self._server is None:
            return
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._server = None
        self._thread = None
        log.info("api.stopped")

    def authorize(self, request: _Request) -> _Response | None:
        """``None`` when the request carries the configured bearer token, else a refusal."""
        if self._token is None:
            return _problem(
                HTTPStatus.FORBIDDEN,
                "operator actions are disabled on this node",
                "set http.token in the configuration and restart the node",
            )
        scheme, _, given = (request.authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not given.strip():
            return _problem(
                HTTPStatus.UNAUTHORIZED,
                "a bearer token is required",
                "send the header 'Authorization: Bearer <http.token>'",
                **{"WWW-Authenticate": 'Bearer realm="radnode"'},
            )
        if not hmac.compare_digest(given.strip().encode("utf-8"), self._token):
            log.warning(
                "api.token_refused",
                peer_address=request.peer,
                action="check the token the client uses against http.token",
            )
            return _problem(
                HTTPStatus.FORBIDDEN,
                "the bearer token is not accepted",
                "use the token configured as http.token on this node",
            )
        return None


# -- OpenAPI -----------------------------------------------------------------------

_NULLABLE_TIME = {"type": ["string", "null"], "format": "date-time"}
_NULLABLE_SECONDS = {"type": ["number", "null"]}


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _content(schema: Mapping[str, Any]) -> dict[str, Any]:
    return {"application/json": {"schema": dict(schema)}}


def _error_response(description: str) -> dict[str, Any]:
    return {"description": description, "content": _content(_ref("Problem"))}


_LIMIT_PARAMETER = {
    "name": "limit",
    "in": "query",
    "required": False,
    "description": f"How many items to return (default {DEFAULT_LIMIT}).",
    "schema": {"type": "integer", "minimum": 1, "maximum": MAX_LIMIT, "default": DEFAULT_LIMIT},
}


def _list_response(key: str, item: str) -> dict[str, Any]:
    return {
        "description": f"The most recent {key.replace('_', ' ')}, newest first.",
        "content": _content(
            {
                "type": "object",
                "required": ["generated_at", key],
                "properties": {
                    "generated_at": {"type": "string", "format": "date-time"},
                    key: {"type": "array", "items": _ref(item)},
                },
            }
        ),
    }


_SCHEMAS: dict[str, Any] = {
    "Problem": {
        "type": "object",
        "required": ["error", "action"],
        "properties": {
            "error": {"type": "string", "description": "What went wrong."},
            "action": {"type": "string", "description": "What the caller can do about it."},
        },
    },
    "Study": {
        "type": "object",
        "description": "A study, named by its key (a hash of the Study Instance UID).",
        "required": ["study_key", "state", "instance_count", "series_count"],
        "properties": {
            "study_key": {"type": "string", "pattern": "^[0-9a-f]{16}$"},
            "state": {"type": "string", "enum": ["receiving", "complete", "purging"]},
            "instance_count": {"type": "integer", "minimum": 0},
            "series_count": {"type": "integer", "minimum": 0},
            "first_received_at": {"type": "string", "format": "date-time"},
            "last_received_at": {"type": "string", "format": "date-time"},
            "completed_at": _NULLABLE_TIME,
            "receive_s": _NULLABLE_SECONDS,
            "instance_lost": {
                "type": "boolean",
                "description": "An association sending it ended in the middle of an"
                " instance, which has not been stored since: its results are preliminary.",
            },
        },
    },
    "Job": {
        "type": "object",
        "description": "One series through one pipeline.",
        "required": ["job_id", "study_key", "pipeline", "state", "attempts"],
        "properties": {
            "job_id": {"type": "string"},
            "study_key": {"type": "string"},
            "series_key": {"type": "string", "description": "Hash of the Series Instance UID."},
            "pipeline": {"type": "string"},
            "routes": {"type": "array", "items": {"type": "string"}},
            "destinations": {"type": "array", "items": {"type": "string"}},
            "state": {"type": "string", "enum": [s.value for s in JobState]},
            "attempts": {"type": "integer", "minimum": 0},
            "created_at": {"type": "string", "format": "date-time"},
            "started_at": _NULLABLE_TIME,
            "finished_at": _NULLABLE_TIME,
            "wait_s": {**_NULLABLE_SECONDS, "description": "Seconds queued before it ran."},
            "run_s": {**_NULLABLE_SECONDS, "description": "Seconds from start to finish."},
            "error": {
                "type": ["string", "null"],
                "description": "Why it failed or was refused; for a done job, which"
                " destinations get no result and why (e.g. an HL7 message that could not"
                " be built).",
            },
            "resolved_by": {
                "type": ["string", "null"],
                "description": "For a failed or refused job: the later job of the same"
                " series and pipeline that made its result (the series came again"
                " complete, say); null while none has.",
            },
            "preliminary": {
                "type": "boolean",
                "description": "Made while its study lacked an instance lost in transit (an"
                " association aborted in the middle of it): its results are marked"
                " preliminary (SR Preliminary Flag, HL7 result status P).",
            },
            "timings": {
                "type": "object",
                "description": "Seconds per stage of the last run (load_s, inference_s …).",
                "additionalProperties": {"type": "number"},
            },
            "deliveries": {
                "type": "array",
                "description": "Where each result of the job stands, per destination.",
                "items": _ref("Delivery"),
            },
        },
    },
    "Delivery": {
        "type": "object",
        "required": ["destination", "kind", "state", "attempts"],
        "properties": {
            "destination": {"type": "string"},
            "kind": {"type": "string", "enum": ["dicom", "hl7"]},
            "state": {"type": "string", "enum": ["pending", "sent", "dead"]},
            "attempts": {"type": "integer", "minimum": 0},
            "next_attempt_at": _NULLABLE_TIME,
            "error": {"type": ["string", "null"], "description": "The last failure."},
        },
    },
    "DeadLetter": {
        "type": "object",
        "required": ["job_id", "destination", "attempts", "error", "dead_lettered_at"],
        "properties": {
            "job_id": {"type": "string"},
            "study_key": {"type": "string"},
            "pipeline": {"type": "string"},
            "destination": {"type": "string"},
            "attempts": {"type": "integer", "minimum": 1},
            "error": {"type": "string"},
            "dead_lettered_at": {"type": "string", "format": "date-time"},
        },
    },
    "Worker": {
        "type": "object",
        "description": "A worker process (local or on another machine), named host:pid.",
        "required": ["name", "alive", "device", "pipelines", "last_seen"],
        "properties": {
            "name": {"type": "string"},
            "alive": {
                "type": "boolean",
                "description": "Heard from within 4 heartbeats (queue.heartbeat_s).",
            },
            "device": {"type": "string"},
            "pipelines": {
                "type": "object",
                "description": "Pipelines loaded at start -> bundle version.",
                "additionalProperties": {"type": "string"},
            },
            "started_at": {"type": "string", "format": "date-time"},
            "last_seen": {"type": "string", "format": "date-time"},
        },
    },
    "Readiness": {
        "type": "object",
        "required": ["ready", "failed", "degraded", "checks"],
        "properties": {
            "ready": {"type": "boolean"},
            "failed": {"type": "array", "items": {"type": "string"}},
            "degraded": {"type": "array", "items": {"type": "string"}},
            "checks": {
                "type": "object",
                "additionalProperties": {
                    "type": "object",
                    "required": ["ok"],
                    "properties": {"ok": {"type": "boolean"}, "detail": {"type": "string"}},
                },
            },
        },
    },
}


#: The ``{job_id}`` path parameter of the operator actions.
_JOB_ID_PARAMETER = {"name": "job_id", "in": "path", "required": True, "schema": {"type": "string"}}


def _operator_errors() -> dict[str, Any]:
    """The answers every token-protected action on a job can give besides its own."""
    return {
        "401": _error_response("No bearer token was sent."),
        "403": _error_response("Wrong token, or no http.token configured."),
        "404": _error_response("No job has this id."),
    }


def openapi_document() -> dict[str, Any]:
    """The OpenAPI 3.1 description of :data:`ROUTES` (a test keeps the two in step)."""
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "radnode operations API",
            "version": __version__,
            "description": "Health, readiness, metrics and status of a radnode DICOM AI node. "
            "Responses carry no patient data: studies are named by study_key.",
        },
        "paths": {
            "/healthz": {
                "get": {
                    "operationId": "healthz",
                    "summary": "Liveness: the process answers.",
                    "responses": {
                        "200": {
                            "description": "Alive.",
                            "content": _content(
                                {
                                    "type": "object",
                                    "properties": {
                                        "status": {"type": "string"},
                                        "version": {"type": "string"},
                                    },
                                }
                            ),
                        }
                    },
                }
            },
            "/readyz": {
                "get": {
                    "operationId": "readyz",
                    "summary": "Readiness to receive: Storage SCP listening, disk free "
                    "(a job queue that does not answer is listed in `degraded`).",
                    "responses": {
                        "200": {"description": "Ready.", "content": _content(_ref("Readiness"))},
                        "503": {
                            "description": "Not ready; `failed` names the checks that failed.",
                            "content": _content(_ref("Readiness")),
                        },
                    },
                }
            },
            "/metrics": {
                "get": {
                    "operationId": "metrics",
                    "summary": "Prometheus metrics (text exposition format).",
                    "responses": {
                        "200": {
                            "description": "Every radnode_* metric.",
                            "content": {"text/plain": {"schema": {"type": "string"}}},
                        }
                    },
                }
            },
            "/api/studies": {
                "get": {
                    "operationId": "listStudies",
                    "summary": "Recent studies.",
                    "parameters": [_LIMIT_PARAMETER],
                    "responses": {
                        "200": _list_response("studies", "Study"),
                        "400": _error_response("A query parameter is invalid."),
                    },
                }
            },
            "/api/jobs": {
                "get": {
                    "operationId": "listJobs",
                    "summary": "Recent jobs with their state and timings.",
                    "parameters": [
                        _LIMIT_PARAMETER,
                        {
                            "name": "state",
                            "in": "query",
                            "required": False,
                            "description": "Only jobs in this state.",
                            "schema": {"type": "string", "enum": [s.value for s in JobState]},
                        },
                    ],
                    "responses": {
                        "200": _list_response("jobs", "Job"),
                        "400": _error_response("A query parameter is invalid."),
                    },
                }
            },
            "/api/dead-letters": {
                "get": {
                    "operationId": "listDeadLetters",
                    "summary": "Deliveries given up after their last retry.",
                    "parameters": [_LIMIT_PARAMETER],
                    "responses": {
                        "200": _list_response("dead_letters", "DeadLetter"),
                        "400": _error_response("A query parameter is invalid."),
                    },
                }
            },
            "/api/workers": {
                "get": {
                    "operationId": "listWorkers",
                    "summary": "Worker processes heard from lately, alive or silent.",
                    "responses": {
                        "200": {
                            "description": "The workers by name and how many are alive.",
                            "content": _content(
                                {
                                    "type": "object",
                                    "required": ["generated_at", "alive", "workers"],
                                    "properties": {
                                        "generated_at": {"type": "string", "format": "date-time"},
                                        "alive": {"type": "integer", "minimum": 0},
                                        "workers": {"type": "array", "items": _ref("Worker")},
                                    },
                                }
                            ),
                        }
                    },
                }
            },
            "/api/jobs/{job_id}/retry": {
                "post": {
                    "operationId": "retryJob",
                    "summary": "Queue a failed job (or one with dead letters) again.",
                    "security": [{"bearer": []}],
                    "parameters": [_JOB_ID_PARAMETER],
                    "responses": {
                        "202": {
                            "description": "Queued again.",
                            "content": _content(
                                {
                                    "type": "object",
                                    "required": ["job_id", "outcome"],
                                    "properties": {
                                        "job_id": {"type": "string"},
                                        "outcome": {"type": "string", "const": "retried"},
                                    },
                                }
                            ),
                        },
                        **_operator_errors(),
                        "409": _error_response("The job is not in a retryable state."),
                    },
                }
            },
            "/api/jobs/{job_id}/discard": {
                "post": {
                    "operationId": "discardDeadLetters",
                    "summary": "Give up a job's dead letters for good (its study can then be"
                    " purged after study.keep_days).",
                    "security": [{"bearer": []}],
                    "parameters": [_JOB_ID_PARAMETER],
                    "responses": {
                        "200": {
                            "description": "Discarded; the destinations they were for.",
                            "content": _content(
                                {
                                    "type": "object",
                                    "required": ["job_id", "discarded"],
                                    "properties": {
                                        "job_id": {"type": "string"},
                                        "discarded": {
                                            "type": "array",
                                            "items": {"type": "string"},
                                        },
                                    },
                                }
                            ),
                        },
                        **_operator_errors(),
                        "409": _error_response("The job has no dead letters."),
                    },
                }
            },
            "/api/dead-letters/resend": {
                "post": {
                    "operationId": "resendDeadLetters",
                    "summary": "Resend every dead letter, oldest first (after an outage);"
                    " a job a later one replaces is left as it is.",
                    "security": [{"bearer": []}],
                    "parameters": [
                        {
                            "name": "destination",
                            "in": "query",
                            "required": False,
                            "description": "Only the dead letters to this destination.",
                            "schema": {"type": "string"},
                        }
                    ],
                    "responses": {
                        "202": {
                            "description": "Queued again; the jobs resent and those left.",
                            "content": _content(
                                {
                                    "type": "object",
                                    "required": ["destination", "resent", "superseded"],
                                    "properties": {
                                        "destination": {"type": ["string", "null"]},
                                        "resent": {"type": "array", "items": {"type": "string"}},
                                        "superseded": {
                                            "type": "array",
                                            "items": {"type": "string"},
                                        },
                                    },
                                }
                            ),
                        },
                        "401": _error_response("No bearer token was sent."),
                        "403": _error_response("Wrong token, or no http.token configured."),
                        "404": _error_response(
                            "No destination of that name is configured or has dead letters."
                        ),
                    },
                }
            },
            "/openapi.json": {
                "get": {
                    "operationId": "openapi",
                    "summary": "This document.",
                    "responses": {
                        "200": {
                            "description": "OpenAPI 3.1 document.",
                            "content": _content({"type": "object"}),
                        }
                    },
                }
            },
        },
        "components": {
            "schemas": _SCHEMAS,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
    }

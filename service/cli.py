"""The ``radnode`` command line."""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path
from typing import Annotated, NoReturn

import structlog
import typer

from service import __version__
from service.config import PipelineInventory, Settings, load_settings
from service.errors import ConfigError, RadnodeError

app = typer.Typer(
    name="radnode",
    help="A DICOM AI node: receives studies from a PACS, runs MONAI pipelines, "
    "sends standard results back.",
    no_args_is_help=True,
    add_completion=False,
    # Rich tracebacks print local variables, which may hold patient data.
    pretty_exceptions_enable=False,
)
config_app = typer.Typer(help="Work with configuration files.", no_args_is_help=True)
app.add_typer(config_app, name="config")

ConfigOption = Annotated[
    Path | None,
    typer.Option("--config", "-c", help="TOML configuration file (environment overrides it)."),
]


def _settings_or_exit(path: Path | None) -> Settings:
    try:
        return load_settings(path)
    except ConfigError as exc:
        _exit_invalid(exc.problems)


#: What the node creates (spool, results, HL7 messages: patient data) is for its user
#: and group only, never for others (acceptance pass: 0644). Added to the umask the
#: process starts with: under 022, 0640 files; started with 007 (systemd UMask=0007),
#: 0660, so that workers of the same group on other machines can write (review).
PRIVATE_UMASK = 0o007


def _private_files() -> None:
    """Tighten the process umask (children inherit it); a stricter one is kept."""
    current = os.umask(PRIVATE_UMASK)
    os.umask(current | PRIVATE_UMASK)


def _quiet_deprecations() -> None:
    """For the commands an operator reads (config check, route, run): a library's
    FutureWarning or DeprecationWarning (MONAI's, as a bundle loads) is nothing the
    operator can act on and hid the answer on standard error (acceptance pass). The
    node and workers log them as python.warning instead."""
    for category in (FutureWarning, DeprecationWarning):
        warnings.filterwarnings("ignore", category=category)
    # pydicom's "Invalid value for VR UI: '<the value>'" quoted header values on the
    # console (PHI audit); what radnode refuses it says in its own words.
    warnings.filterwarnings("ignore", module=r"pydicom(\..*)?")


def _note_environment_overrides(settings: Settings) -> None:
    for key in settings.environment_overrides:
        typer.echo(f"note: {key} is set by the environment (RADNODE_*), not the file", err=True)


def _exit_invalid(problems: list[str]) -> NoReturn:
    """List every problem, one line each with its key, and exit 2 (as ``serve`` does)."""
    typer.echo(f"radnode: configuration is invalid ({len(problems)} problem(s)):", err=True)
    for problem in problems:
        typer.echo(f"  - {problem}", err=True)
    raise typer.Exit(code=2)


@app.command()
def serve(config: ConfigOption = None) -> None:
    """Run the node: Storage SCP, spool, study index and completion."""
    from service.node import Node
    from service.observability import configure_logging
    from service.startup_checks import startup_problems

    settings = _settings_or_exit(config)
    problems = startup_problems(settings)
    if problems:
        _exit_invalid(problems)
    _private_files()
    configure_logging(settings.log.level)
    try:
        Node(settings, config_path=config).run_until_signalled()
    except RadnodeError as exc:
        # In the JSON stream too, where a log shipper looks: it held node.starting and
        # then nothing, the reason in plain text on stderr only (IT-ops pass).
        structlog.get_logger("service.node").critical(
            "node.failed", reason=str(exc), action="fix what the reason says and start again"
        )
        typer.echo(f"radnode: {exc}", err=True)
        raise typer.Exit(code=1) from exc


@config_app.command("check")
def config_check(
    file: Annotated[Path, typer.Argument(help="TOML file to validate.")],
    load: Annotated[
        bool,
        typer.Option(
            "--load/--no-load",
            help="Load each routed bundle on the CPU, as a worker does (a few seconds each).",
        ),
    ] = True,
) -> None:
    """Validate a configuration file (and the RADNODE_* environment).

    Beyond the file's own keys, every route's pipeline must be a usable bundle in
    ``models.dir``: ``serve`` would start, but every job of such a route would fail.
    With ``--load`` (the default) each is also loaded as a worker loads it: a config
    that does not parse or instantiate, or weights that do not fit the network, passed
    the check and failed at the worker (acceptance pass).
    """
    from service.startup_checks import startup_problems

    _quiet_deprecations()
    settings = _settings_or_exit(file)
    inventory = PipelineInventory.scan(settings.models.dir)
    fatal = startup_problems(settings)
    problems = inventory.route_problems(settings.routes)
    if load:
        problems += inventory.load_problems(settings.routes)
    if fatal or (problems and not settings.queue.remote_workers_only):
        _exit_invalid(fatal + problems)
    for problem in problems:
        typer.echo(f"note: {problem} (fine if the remote workers have it)", err=True)
    _note_environment_overrides(settings)
    nothing = inventory.nothing_found()
    if nothing and not settings.routes:
        typer.echo(f"note: {nothing}; no pipeline will run", err=True)
    if settings.routes_source == "reference bundles":
        routes = f"no [[routes]]: the {len(settings.routes)} reference route(s) of models.dir"
    elif not settings.routes:
        routes = "routes = []: no pipeline runs"
    else:
        routes = f"{len(settings.routes)} route(s)"
    typer.echo(
        f"{file}: OK — AE {settings.node.ae_title} on port {settings.node.port}, "
        f"{len(settings.destinations)} destination(s), {routes}"
    )


@app.command()
def version() -> None:
    """Print radnode's version."""
    typer.echo(__version__)


@app.command()
def worker(
    config: ConfigOption = None,
    local: Annotated[
        bool, typer.Option("--local", hidden=True, help="Started by radnode serve.")
    ] = False,
) -> None:
    """Run pipeline workers only: take jobs from the queue (``queue.url``) and run them."""
    from service.observability import configure_logging
    from service.worker import run_worker

    settings = _settings_or_exit(config)
    _private_files()
    configure_logging(settings.log.level)
    try:
        run_worker(settings, local=local)
    except RadnodeError as exc:
        typer.echo(f"radnode: {exc}", err=True)
        raise typer.Exit(code=1) from exc
    except KeyboardInterrupt:  # stopped (SIGINT, or SIGTERM) while it was starting
        raise typer.Exit(code=0) from None
    _leave_at_once()


def _leave_at_once() -> None:
    """End a stopped worker without Python's teardown. A stop during a run (the node
    gone, docker stop) leaves the run's thread inside torch, and the teardown destroyed
    its native threads under it: libstdc++ wrote "terminate called without an active
    exception" amid the JSON log (acceptance pass). Everything worth keeping is written
    already (the run is taken for lost and runs again); the log is flushed first."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


@app.command(hidden=True)
def receiver(
    listen_fds: Annotated[str, typer.Option(help="Listening socket descriptors, comma-separated.")],
    counts_fd: Annotated[int, typer.Option(help="Pipe descriptor for counts to the node.")],
    config: ConfigOption = None,
) -> None:
    """An extra receiver process of ``radnode serve`` (node.receiver_processes)."""
    from service.observability import configure_logging
    from service.receivers import run_receiver

    settings = _settings_or_exit(config)
    _private_files()
    configure_logging(settings.log.level)
    run_receiver(settings, [int(fd) for fd in listen_fds.split(",")], counts_fd)


@app.command()
def route(
    folder: Annotated[
        Path, typer.Argument(help="Folder of DICOM files (searched recursively), or one file.")
    ],
    config: ConfigOption = None,
) -> None:
    """Show which pipelines the configured routes would run on a folder's series, and why
    not (including routes whose pipeline is not in models.dir)."""
    from service.offline import no_series_message, scan_folder
    from service.routing import format_plan, plan

    _quiet_deprecations()
    settings = _settings_or_exit(config)
    scan = scan_folder(folder)
    if not scan.series:
        typer.echo(no_series_message(folder, scan), err=True)
        raise typer.Exit(code=1)
    typer.echo(format_plan(plan(scan.series_infos(), settings.routes), scan.series_infos()))
    # Why nothing (or something) would not run: the routes' pipelines must be there.
    inventory = PipelineInventory.scan(settings.models.dir)
    _note_environment_overrides(settings)
    nothing = inventory.nothing_found()
    for line in [nothing] if nothing else inventory.route_problems(settings.routes):
        typer.echo(f"! {line}")


@app.command()
def run(
    folder: Annotated[
        Path, typer.Argument(help="Folder of DICOM files (searched recursively), or one file.")
    ],
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for the results.")],
    pipeline: Annotated[
        str | None,
        typer.Option(
            "--pipeline",
            "-p",
            help="Run this pipeline on every series it accepts "
            "(default: the configured routes decide).",
        ),
    ] = None,
    config: ConfigOption = None,
) -> None:
    """Run pipelines on a folder offline, the same way the node does, with progress."""
    from service.offline import run_folder

    _quiet_deprecations()
    settings = _settings_or_exit(config)
    try:
        failures = run_folder(folder, out, settings, pipeline=pipeline)
    except RadnodeError as exc:
        typer.echo(f"radnode: {exc}", err=True)
        raise typer.Exit(code=1) from exc
    raise typer.Exit(code=1 if failures else 0)


@app.command()
def status(
    url: Annotated[
        str | None,
        typer.Option("--url", help="The node's HTTP address (default: from the config)."),
    ] = None,
    config: ConfigOption = None,
) -> None:
    """Show the running node's workers, queue, recent studies, failed jobs and dead letters."""
    from rich.console import Console

    from service.status_view import fetch_status, render_snapshot

    if url is None:
        http = _settings_or_exit(config).http
        host = "127.0.0.1" if http.host in ("0.0.0.0", "::", "") else http.host
        url = f"http://{host}:{http.port}"
    # Piped (a cron mail, a ticket), rich assumed 80 columns and wrapped each error over
    # 40 lines (IT-ops pass); COLUMNS still wins where it is set.
    piped = not sys.stdout.isatty() and "COLUMNS" not in os.environ
    try:
        Console(width=200 if piped else None).print(render_snapshot(fetch_status(url)))
    except RadnodeError as exc:
        typer.echo(f"radnode: {exc}", err=True)
        raise typer.Exit(code=1) from exc


if __name__ == "__main__":
    app()

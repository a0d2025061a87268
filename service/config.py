"""Configuration: one typed object, validated at start.

Sources, later ones winning: built-in defaults, the TOML file given with
``--config``, then environment variables such as ``RADNODE_NODE__PORT=11112``
(``__`` separates sections; lists and tables are written as JSON, e.g.
``RADNODE_NODE__ALLOWED_CALLING_AETS='["PACS"]'``). Every mistake is reported at
once, one line each, naming its key, so an operator fixes the file in one pass.
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    SettingsError,
)

from dicom_nodes.policy import ae_title_problem, network_problem
from service.dicom_delivery import DicomDestinationSettings
from service.errors import ConfigError
from service.hl7 import Hl7DestinationSettings
from service.pipeline.bundle import discover_bundles
from service.reference_routes import reference_routes
from service.routing import RouteRule


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _check_ae_title(value: str) -> str:
    problem = ae_title_problem(value)
    if problem:
        raise ValueError(problem)
    return value.strip()


class NodeSettings(_Section):
    """The DICOM node itself: identity, listening address, storage and peers."""

    ae_title: str = "RADNODE"
    host: str = "0.0.0.0"
    port: int = Field(11112, ge=0, le=65535)
    data_dir: Path = Path("./radnode-data")
    #: Calling AE titles allowed to associate; empty accepts any (warned at start).
    allowed_calling_aets: list[str] = Field(default_factory=list)
    #: Concurrent associations each receiver process accepts (see receiver_processes).
    max_associations: int = Field(16, ge=1, le=1000)
    #: Processes that receive on the node's port: pynetdicom is pure Python, so one
    #: process serves all its associations on one CPU. With N > 1 the node starts N - 1
    #: ``radnode receiver`` processes that accept on the same sockets and write the same
    #: spool and index; concurrent associations then use up to N CPUs.
    receiver_processes: int = Field(1, ge=1, le=32)
    #: Maximum PDU length we announce for receiving, in bytes (0 = unlimited).
    max_pdu_bytes: int = Field(1_048_576, ge=0)
    network_timeout_s: float = Field(60.0, gt=0)
    dimse_timeout_s: float = Field(60.0, gt=0)
    #: Below this much free space in data_dir, C-STOREs are refused (A700).
    min_free_disk_mb: int = Field(1024, ge=0)
    #: Largest study the node accepts, in MB of stored instances; an instance that would
    #: take its study past it is refused with 0xA700. 0: no limit (min_free_disk_mb still
    #: protects the disk).
    max_study_mb: int = Field(0, ge=0)
    #: Peer IP addresses or CIDR networks allowed to associate; empty accepts any.
    allowed_peer_addresses: list[str] = Field(default_factory=list)
    #: Reject associations whose called AE title is not ours (reason 7).
    require_called_aet: bool = True
    #: DICOM TLS (BCP 195). With a certificate and no tls_port, ``port`` is TLS only;
    #: with tls_port, ``port`` stays plain and tls_port speaks TLS.
    tls_cert: Path | None = None
    tls_key: Path | None = None
    #: Password of an encrypted key; better in RADNODE_NODE__TLS_KEY_PASSWORD. Never logged.
    tls_key_password: SecretStr | None = None
    #: CA bundle that client certificates must chain to.
    tls_ca: Path | None = None
    tls_require_client_cert: bool = False
    tls_port: int | None = Field(None, ge=1, le=65535)

    _ae = field_validator("ae_title")(_check_ae_title)

    @field_validator("allowed_peer_addresses")
    @classmethod
    def _check_networks(cls, values: list[str]) -> list[str]:
        problems = [p for p in (network_problem(v) for v in values) if p]
        if problems:
            raise ValueError("; ".join(problems))
        return values

    @model_validator(mode="after")
    def _check_tls(self) -> NodeSettings:
        if self.tls_cert is None:
            given = [
                name
                for name in ("tls_key", "tls_ca", "tls_port")
                if getattr(self, name) is not None
            ]
            if self.tls_require_client_cert:
                given.append("tls_require_client_cert")
            if given:
                raise ValueError(f"{', '.join(given)} need node.tls_cert (TLS is off)")
        if self.tls_require_client_cert and self.tls_ca is None:
            raise ValueError("tls_require_client_cert needs node.tls_ca to check client certs")
        if self.tls_port is not None and self.tls_port == self.port:
            # both listeners would bind it; the second failed as "in use by another
            # program" (third acceptance pass)
            raise ValueError(
                f"tls_port and port are both {self.port}; give TLS a port of its own, or"
                " leave tls_port out to make port TLS-only"
            )
        return self

    @field_validator("allowed_calling_aets")
    @classmethod
    def _check_allowed(cls, values: list[str]) -> list[str]:
        return [_check_ae_title(v) for v in values]


class StudySettings(_Section):
    """When a study counts as complete, and how long the node keeps it."""

    #: Seconds without a new instance after which a study is complete.
    completion_timeout_s: float = Field(10.0, gt=0)
    #: Seconds without a new instance after which a study whose sending association
    #: was aborted (or cut by the node stopping) is complete: time for the PACS to send
    #: the rest again, instead of a result on part of the series sent as final.
    interrupted_wait_s: float = Field(120.0, ge=0)
    #: Days a study is kept after its last activity (instance received, job finished)
    #: once every job ended and every delivery was sent; then its spool files, results
    #: and index rows are removed (the PACS holds the study and the results). 0: never.
    keep_days: float = Field(7.0, ge=0)
    #: Seconds between retention passes.
    retention_check_s: float = Field(60.0, gt=0)


class HttpSettings(_Section):
    """The HTTP port for health, metrics and the status API."""

    host: str = "127.0.0.1"
    port: int = Field(8080, ge=0, le=65535)
    #: Bearer token for the API calls that change state (job retry). Empty: those are
    #: refused. Never logged.
    token: SecretStr | None = None


class ModelsSettings(_Section):
    """Where the pipelines (MONAI Bundles, one folder each) are, and where they run."""

    #: Folder of bundles; a route's ``pipeline`` is a folder name in it. Trusted code:
    #: bundle configs evaluate Python expressions, so only administrators may write here.
    dir: Path = Path("./models")
    #: torch device for inference ("cpu", "cuda:0"); empty: CUDA when torch sees it.
    device: str | None = None


class QueueSettings(_Section):
    """The job queue (huey) and the workers that take jobs from it."""

    #: Empty: SQLite under node.data_dir (one machine). ``redis://host:6379/0``: Redis.
    url: str | None = None
    #: Worker processes ``radnode serve`` starts itself (0: only separate ``radnode worker``).
    local_workers: int = Field(1, ge=0, le=16)
    #: CPU priority (nice) of those local workers: they share the CPU with the Storage
    #: SCP, and a PACS waiting on C-STORE responses matters more than a model finishing
    #: a little sooner. 0 runs them at the node's own priority.
    local_worker_niceness: int = Field(10, ge=0, le=19)
    #: Runs of one job before it is marked failed (a worker crash counts as a run).
    max_attempts: int = Field(2, ge=1, le=10)
    #: How often a worker says it is alive; a run silent for 4 beats is lost and runs again.
    heartbeat_s: float = Field(3.0, gt=0, le=300)
    #: Longest run of one job; a worker whose job runs longer (a bundle that hangs) ends
    #: itself, is restarted, and the job counts one attempt. 0: no limit.
    job_timeout_s: float = Field(1800.0, ge=0)

    @field_validator("url")
    @classmethod
    def _check_url(cls, value: str | None) -> str | None:
        if value and not value.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError("must be empty (SQLite) or a redis:// URL")
        return value or None

    @property
    def remote_workers_only(self) -> bool:
        """Only workers on other machines run jobs: the bundles may well live on them
        alone, so a pipeline missing here is a note, not an error."""
        return self.local_workers == 0 and bool(self.url)


class LogSettings(_Section):
    """Logging. JSON lines on standard output."""

    level: Literal["debug", "info", "warning", "error"] = "info"


#: Where results go: a DICOM Storage SCP (the PACS) or an HL7 MLLP listener (RIS/EHR),
#: told apart by ``type``.
DestinationSettings = Annotated[
    DicomDestinationSettings | Hl7DestinationSettings, Field(discriminator="type")
]


class Settings(BaseSettings):
    """Everything radnode reads at start."""

    model_config = SettingsConfigDict(
        env_prefix="RADNODE_",
        env_nested_delimiter="__",
        extra="forbid",
        frozen=True,
    )

    node: NodeSettings = Field(default_factory=NodeSettings)
    study: StudySettings = Field(default_factory=StudySettings)
    http: HttpSettings = Field(default_factory=HttpSettings)
    log: LogSettings = Field(default_factory=LogSettings)
    models: ModelsSettings = Field(default_factory=ModelsSettings)
    queue: QueueSettings = Field(default_factory=QueueSettings)
    destinations: list[DestinationSettings] = Field(default_factory=list)
    routes: list[RouteRule] = Field(default_factory=list)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # The file's values arrive as init arguments; the environment overrides them.
        return (env_settings, init_settings)

    #: True when no routes were configured and :func:`load_settings` used the reference ones.
    _reference_routes: bool = PrivateAttr(default=False)
    #: Keys the file sets that a ``RADNODE_*`` variable overrides (see
    #: :func:`environment_overrides`).
    _environment_overrides: tuple[str, ...] = PrivateAttr(default=())

    @property
    def environment_overrides(self) -> tuple[str, ...]:
        """Keys of the configuration file that the environment overrode, e.g.
        ``("http.port",)``: the start-up log names them."""
        return self._environment_overrides

    @property
    def routes_source(self) -> str:
        """Where the routes came from, for the start-up log."""
        return "reference bundles" if self._reference_routes else "configuration"

    def model_post_init(self, __context: Any) -> None:
        problems = _name_problems(
            [(r.name, list(r.destinations)) for r in self.routes],
            [d.name for d in self.destinations],
        )
        if problems:
            raise ConfigError(problems)
        # A destination without its own calling AE title calls as this node is called:
        # the literal default "RADNODE" went on after node.ae_title was changed, and a
        # PACS that checks calling AE titles refused the results (acceptance pass).
        # (Settings are frozen; this completes them while they are being made.)
        destinations = [
            d.model_copy(update={"calling_ae_title": self.node.ae_title})
            if isinstance(d, DicomDestinationSettings) and d.calling_ae_title is None
            else d
            for d in self.destinations
        ]
        object.__setattr__(self, "destinations", destinations)


#: ``user:password@`` in anything URL-like, and ``password=`` / ``token=`` parameters.
_SECRET_PARAMETER = re.compile(r"((?:password|passwd|token|secret)=)[^&\s]*", re.IGNORECASE)


def url_without_password(url: str) -> str:
    """A URL as it may be shown (``queue.url``): any password replaced by ``***``.

    Not by parsing: a malformed URL (a typo, a ``#`` or ``]`` in the password) parsed
    into another netloc, or raised, and was shown whole (review). Everything between
    the scheme and the last ``@`` is the user information, whatever it holds (a ``/``,
    ``:`` or ``@`` in a password showed part of it: second review); of it only a user
    name before the first ``:`` is kept."""
    head, at, host = url.rpartition("@")
    if at:
        scheme, sep, userinfo = head.rpartition("://") if "://" in head else ("", "", head)
        user, colon, _ = userinfo.partition(":")
        url = f"{scheme}{sep}{user}:***@{host}" if colon else f"{scheme}{sep}***@{host}"
    return _SECRET_PARAMETER.sub(r"\1***", url)


#: Parts of a key name that mark its value as a secret (never shown in a problem).
_SECRET_KEYS = ("password", "token", "secret")


def _is_secret(key: object) -> bool:
    return any(mark in str(key).lower() for mark in _SECRET_KEYS)


def _shown(value: Any) -> Any:
    """A value as a configuration problem may quote it: secrets as ``***``, passwords
    in URLs masked. A check of a whole section quotes the section, and the third
    acceptance pass found the TLS key password and the Redis password printed."""
    if isinstance(value, dict):
        return {k: "***" if _is_secret(k) else _shown(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(_shown(v) for v in value)
    if isinstance(value, str):
        return url_without_password(value)
    return value


def _format_validation_error(error: ValidationError) -> list[str]:
    problems = []
    for item in error.errors():
        key = ""
        for i, part in enumerate(item["loc"]):
            if i and item["loc"][i - 1] != "destinations" and part in ("dicom", "hl7"):
                continue  # the union's tag, not a key the operator wrote
            key += f"[{part}]" if isinstance(part, int) else f".{part}" if key else str(part)
        key = key or "(top level)"
        message = item["msg"].removeprefix("Value error, ")
        if item["type"] == "missing":
            message = "required, and has no default"
        elif item["type"] == "extra_forbidden":
            message = "unknown key (check its spelling and section)"
            variable = _environment_name(item["loc"])
            if variable in os.environ:  # not in the file: say where to look
                message = f"unknown key, from the environment variable {variable}"
        elif "input" in item and not any(_is_secret(part) for part in item["loc"]):
            message = f"{message} (got {_shown(item['input'])!r})"
        problems.append(f"{key}: {message}")
    return problems


def _raw_cross_references(data: dict[str, Any]) -> list[str]:
    """:func:`_name_problems` of the file as written.

    Why: :meth:`Settings.model_post_init` checks names only once every field is valid,
    so a file with a bad field and an unknown destination took two rounds of ``config
    check`` (acceptance pass: three). Only when the file, not the environment, gives
    both lists."""
    routes, destinations = data.get("routes"), data.get("destinations")
    if not (isinstance(routes, list) and isinstance(destinations, list)):
        return []
    if {"RADNODE_ROUTES", "RADNODE_DESTINATIONS"} & set(os.environ):
        return []
    routes = [r for r in routes if isinstance(r, dict)]
    return _name_problems(
        [(str(r.get("name", "")), [str(d) for d in r.get("destinations") or []]) for r in routes],
        [str(d.get("name", "")) for d in destinations if isinstance(d, dict)],
    )


def _name_problems(routes: list[tuple[str, list[str]]], destinations: list[str]) -> list[str]:
    """Names used twice, and routes that name a destination there is none of.
    ``routes``: (name, destination names) of each route."""
    problems = []
    route_names = [name for name, _ in routes]
    for name in sorted({n for n in route_names if n and route_names.count(n) > 1}):
        problems.append(f"routes: name {name!r} used twice")
    for name in sorted({n for n in destinations if n and destinations.count(n) > 1}):
        problems.append(f"destinations: the name {name!r} is used more than once")
    for i, (_, wanted) in enumerate(routes):
        for name in wanted:
            if name not in destinations:
                problems.append(
                    f"routes[{i}].destinations: {name!r} is not a configured destination"
                )
    return problems


def _environment_name(loc: tuple[Any, ...]) -> str:
    """The ``RADNODE_*`` variable that sets the key at ``loc`` (``RADNODE_NODE__PROT``)."""
    prefix = str(Settings.model_config["env_prefix"])
    delimiter = str(Settings.model_config["env_nested_delimiter"])
    return prefix + delimiter.join(str(part).upper() for part in loc)


def _radnode_variables() -> Iterator[tuple[str, list[str]]]:
    """Each ``RADNODE_*`` variable set, by name, with the key path it names, lower case
    (``RADNODE_NODE__PORT`` -> ``["node", "port"]``)."""
    prefix = str(Settings.model_config["env_prefix"])
    delimiter = str(Settings.model_config["env_nested_delimiter"])
    for name in sorted(os.environ):
        if name.startswith(prefix):
            yield name, name[len(prefix) :].lower().split(delimiter)


def _unknown_environment_names() -> list[str]:
    """``RADNODE_*`` variables that name no setting. pydantic-settings ignores them, so
    a misspelling (``RADNODE_NODE_PORT``, one underscore) went unnoticed and the
    default was used (found by review)."""
    delimiter = str(Settings.model_config["env_nested_delimiter"])
    return [
        f"environment: {name} names no setting (sections: "
        f"{', '.join(sorted(Settings.model_fields))}; nested keys after '{delimiter}')"
        for name, path in _radnode_variables()
        if path[0] not in Settings.model_fields
    ]


def environment_overrides(data: dict[str, Any]) -> tuple[str, ...]:
    """The keys of the file ``data`` that a ``RADNODE_*`` variable also sets.

    Why: the environment wins, silently. The container image set four such variables,
    so an operator's mounted file lost ``node.data_dir`` and ``http.port`` without a
    word (acceptance pass). Names only; values may be secrets."""
    found = []
    for _, path in _radnode_variables():
        node: Any = data
        for part in path:
            if not isinstance(node, dict) or part not in node:
                break
            node = node[part]
        else:
            found.append(".".join(path))
    return tuple(found)


def load_settings(path: Path | None = None) -> Settings:
    """Read defaults, the TOML file at ``path`` (if any) and the environment.

    Without any ``routes`` (not even ``routes = []``), the routes of the reference
    bundles installed in ``models.dir`` apply (:mod:`service.reference_routes`).
    Raises :class:`ConfigError` listing every problem found.
    """
    unknown = _unknown_environment_names()
    if unknown:
        raise ConfigError(unknown)
    data: dict[str, Any] = {}
    if path is not None:
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError as exc:
            raise ConfigError([f"{path}: file not found"]) from exc
        except IsADirectoryError as exc:
            raise ConfigError([f"{path}: is a folder; give the TOML file (--config FILE)"]) from exc
        except UnicodeDecodeError as exc:
            raise ConfigError(
                [f"{path}: not UTF-8 text (byte {exc.start}); save the file as UTF-8"]
            ) from exc
        except OSError as exc:
            raise ConfigError([f"{path}: cannot be read: {exc.strerror}"]) from exc
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError([f"{path}: not valid TOML: {exc}"]) from exc
    try:
        settings = Settings(**data)
    except ValidationError as exc:
        raise ConfigError(_format_validation_error(exc) + _raw_cross_references(data)) from exc
    except SettingsError as exc:
        # a RADNODE_* variable that must hold JSON (lists, routes, destinations) does not
        # (found by review: a traceback instead of one line)
        raise ConfigError([f"environment: {exc}; lists and tables are given as JSON"]) from exc
    if "routes" not in settings.model_fields_set:
        # No routes configured (file or environment): the reference bundles' routes.
        settings = settings.model_copy(update={"routes": reference_routes(settings.models.dir)})
        settings._reference_routes = True
    settings._environment_overrides = environment_overrides(data)
    return settings


@dataclass(frozen=True)
class PipelineInventory:
    """The bundles in ``models.dir`` and what they mean for the routes.

    ``serve`` starts even when a route names a pipeline that is not there (receiving
    must not stop for a missing model): it logs ``route.pipeline_missing`` and every job
    of that route fails. ``config check`` and ``route`` use this to say so before the
    first study arrives, with the same rule as ``serve``: a route's pipeline must be a
    bundle folder that :func:`~service.pipeline.bundle.discover_bundles` can read.
    """

    models_dir: Path
    usable: tuple[str, ...]
    #: bundle folder name -> why it cannot run (as ``serve`` logs ``pipeline.unusable``)
    unusable: dict[str, str]

    @classmethod
    def scan(cls, models_dir: Path) -> PipelineInventory:
        """Read every bundle's metadata under ``models_dir`` (no model is loaded)."""
        if not Path(models_dir).is_dir():
            return cls(Path(models_dir), (), {})
        specs, problems = discover_bundles(models_dir)
        return cls(Path(models_dir), tuple(sorted(specs)), problems)

    def load_problems(self, routes: Sequence[RouteRule]) -> list[str]:
        """One line per usable bundle of an enabled route that does not load on the CPU
        as a worker loads it (config that does not instantiate, weights that do not fit)."""
        from service.pipeline.bundle import BundleError, load_bundle, read_bundle_spec

        problems = []
        checked: set[str] = set()
        for i, route in enumerate(routes):
            name = route.pipeline
            if not route.enabled or name not in self.usable or name in checked:
                continue
            checked.add(name)
            try:
                load_bundle(read_bundle_spec(self.models_dir / name), "cpu")
            except BundleError as exc:
                problems.append(f"routes[{i}].pipeline: {exc}")
        return problems

    def route_problems(self, routes: Sequence[RouteRule]) -> list[str]:
        """One line per enabled route whose pipeline cannot run here, keyed like other
        problems (a route switched off until its model arrives is no problem)."""
        problems = []
        for i, route in enumerate(routes):
            key, name = f"routes[{i}].pipeline", route.pipeline
            if name in self.usable or not route.enabled:
                continue
            if name in self.unusable:
                problems.append(
                    f"{key}: bundle {name!r} under models.dir={self.models_dir} cannot run: "
                    f"{self.unusable[name]}"
                )
            elif not self.models_dir.is_dir():
                problems.append(f"{key}: no bundle {name!r}: {self._missing_dir()}")
            else:
                problems.append(
                    f"{key}: no bundle {name!r} under models.dir={self.models_dir}; "
                    f"available: {', '.join(self.usable) or 'none'} (install the bundle there, "
                    "one folder with configs/, or fix the route's pipeline)"
                )
        return problems

    def nothing_found(self) -> str | None:
        """Why no pipeline can run at all, or None when some bundle is usable."""
        if self.usable:
            return None
        if not self.models_dir.is_dir():
            return f"no pipelines found: {self._missing_dir()}"
        found = (
            "; ".join(f"{name} cannot run: {why}" for name, why in self.unusable.items())
            or "no bundle folder (with configs/) there"
        )
        return (
            f"no pipelines found under models.dir={self.models_dir}: {found}; install MONAI "
            "bundles there or set models.dir to the folder that holds them"
        )

    def _missing_dir(self) -> str:
        relative = "" if self.models_dir.is_absolute() else f" (relative to {Path.cwd()})"
        return (
            f"models.dir={self.models_dir} does not exist{relative}; set models.dir to the "
            "folder of MONAI bundles"
        )

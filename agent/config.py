"""Configuration: config/agent.yaml, then EBPF_AGENT_* environment, then CLI flags.

Unknown keys and bad values are errors that name the file, the field path and the
reason (``ConfigError``); the CLI turns them into one line and exit code 2.
"""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic.fields import FieldInfo
from pydantic_settings import (
    BaseSettings,
    EnvSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    SettingsError,
)

from agent.model.targets import (
    TargetError,
    TargetLimits,
    validate_cgroup_path,
    validate_comm,
    validate_container,
)

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "config" / "agent.yaml"


class ConfigError(Exception):
    """A configuration problem, already phrased for the operator."""


class Section(BaseModel):
    """A settings section: frozen, and passed as it is to where it is used."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class ApiSettings(Section):
    host: str = "127.0.0.1"
    port: int = Field(8765, ge=0, le=65535)
    unix_socket: Path | None = None
    unix_socket_mode: Literal["0600", "0660"] = "0600"
    unix_socket_group: str | None = None
    tls_certfile: Path | None = None
    tls_keyfile: Path | None = None
    # Host headers accepted (DNS-rebinding guard); the bind address is always added.
    trusted_hosts: list[str] = ["127.0.0.1", "localhost", "::1"]
    cors_origins: list[str] = Field(default_factory=list)
    shutdown_timeout_s: float = Field(5.0, gt=0, le=60)
    # -- authentication (agent/api/access/) --
    # "token": every endpoint but /health and /ui needs a token (with none configured,
    # one is generated into runtime_dir at start-up); "none": open, loopback only.
    auth: Literal["token", "none"] = "token"
    runtime_dir: Path = Path("/run/ebpf-agent")  # generated token + curl header file
    session_ttl_s: float = Field(8 * 3600.0, gt=0, le=30 * 86400)
    # Full stores refuse new entries (503), a token over its quota gets 429: nobody's
    # session or ticket is evicted to make room.
    max_sessions: int = Field(1024, ge=1, le=1_000_000)
    max_sessions_per_token: int = Field(64, ge=1, le=1_000_000)
    ticket_ttl_s: float = Field(30.0, gt=0, le=3600)
    max_tickets: int = Field(4096, ge=1, le=1_000_000)
    max_tickets_per_token: int = Field(256, ge=1, le=1_000_000)
    audit_entries: int = Field(1000, ge=1, le=1_000_000)  # the in-memory ring of GET /audit
    # Refused requests (401, 403) have their own ring: they never evict accepted ones.
    audit_refused_entries: int = Field(1000, ge=1, le=1_000_000)
    # Failed logins per address per minute answered at full speed; later ones are delayed.
    login_failures_per_minute: int = Field(5, ge=1, le=10_000)
    # Logins of one address handled at once; more get 429.
    logins_in_flight_per_client: int = Field(4, ge=1, le=1000)
    docs: bool = True  # /docs, /redoc, /openapi.json (behind the token like the rest)
    # -- limits on what a client may make the agent hold (before authentication too) --
    max_body_bytes: int = Field(1024 * 1024, ge=1024, le=1024**3)
    max_header_bytes: int = Field(32 * 1024, ge=1024, le=1024**2)  # request line + headers
    # To finish a request's headers; for a request without credentials (the login),
    # to finish its headers and body.
    header_timeout_s: float = Field(10.0, gt=0, le=600)
    body_timeout_s: float = Field(10.0, gt=0, le=600)  # to receive a body after the headers
    keepalive_timeout_s: float = Field(5.0, gt=0, le=600)  # idle between requests
    # Open connections at most (capped below RLIMIT_NOFILE at start-up). Connections not
    # yet authenticated may take all but a tenth (kept for authenticated callers); over
    # either limit the oldest unauthenticated connection is closed (408), whatever it is
    # doing, and a warning is logged (at most every 10 s).
    max_connections: int = Field(1000, ge=8, le=1_000_000)


class StreamSettings(Section):
    replay_buffer: int = Field(65536, ge=16, le=10_000_000)  # events
    # The replay ring's bytes (SSE frames of the buffered events); whichever bound is
    # reached first evicts the oldest events.
    replay_bytes: int = Field(16 * 1024 * 1024, ge=64 * 1024, le=2**32)
    heartbeat_s: float = Field(15.0, gt=0, le=3600)
    stall_timeout_s: float = Field(10.0, gt=0, le=3600)
    max_subscribers: int = Field(256, ge=1, le=100_000)
    # A live subscriber whose oldest unread event was stored longer ago than this skips
    # ahead to the younger ones (the skipped ones are counted as its drops): the latency
    # of a client slower than the intake stays bounded. 0: never skip (it then reads up
    # to replay_buffer events behind). A resume (Last-Event-ID) is exempt until it has
    # caught up once. The event routes take a max_lag_ms query parameter overriding it.
    max_lag_ms: int = Field(100, ge=0, le=3_600_000)
    # Containers GET /containers keeps event counts for; the least recently seen one is
    # evicted (counted) when full.
    max_containers: int = Field(4096, ge=1, le=1_000_000)


class OutputSettings(Section):
    directory: Path = Path("output")
    formats: list[Literal["console", "csv", "jsonl"]] = ["jsonl"]  # pydantic copies defaults
    queue_size: int = Field(65536, ge=16, le=10_000_000)
    flush_interval_s: float = Field(1.0, gt=0, le=60)
    snapshot_interval_s: float = Field(10.0, gt=0, le=86400)  # aggregate tables to CSV
    # Files are 0600 in a 0700 directory; with a group, 0640 and 0750 owned by it.
    group: str | None = None

    @field_validator("group")
    @classmethod
    def _known_group(cls, v: str | None) -> str | None:
        if v is not None:
            group_id(v)
        return v


def group_id(name: str) -> int:
    """The gid of a group name (or number); ValueError naming it when unknown."""
    import grp

    try:
        return grp.getgrgid(int(name)).gr_gid if name.isdigit() else grp.getgrnam(name).gr_gid
    except (KeyError, ValueError, OverflowError):
        raise ValueError(f"no such group: {name!r}") from None


def _power_of_two(v: int) -> int:
    if v & (v - 1):
        raise ValueError(f"{v} is not a power of two")
    return v


class TransportSettings(Section):
    """How events leave the kernel (every monitor's BccMonitor.cflags)."""

    kind: Literal["auto", "ringbuf", "perf"] = "auto"
    ringbuf_pages: int = Field(512, ge=1, le=65536)
    perf_pages: int = Field(64, ge=1, le=4096)
    # Perf buffer: wake the consumer once per this many events (per CPU); 1 = every
    # event. Events in between wait at most one poll timeout (100 ms). The ring buffer
    # wakes it when it had read everything (agent/bpf/common.h: RINGBUF_NOTIFY).
    wakeup_every: int = Field(32, ge=1, le=4096)
    # Ring buffer readers (agent/monitors/ringbuf.py), below their busy rate: after a
    # batch, wait this long for more events instead of a wake-up per event (an event
    # that finds the reader idle is handed on at once). The added latency is this at
    # most; 0: every event at once.
    max_delay_ms: int = Field(50, ge=0, le=1000)
    # How records become events (agent/monitors/compiled.py): "compiled" the extension
    # built from agent/monitors/fastpath.c at install (an error when it is missing),
    # "python" the reference decoder, "auto" the extension when it was built. The stream
    # hub's ring store follows (agent/stream/ring.py): Python with "python".
    decoder: Literal["auto", "compiled", "python"] = "auto"

    _pow2 = field_validator("ringbuf_pages", "perf_pages")(_power_of_two)


U32 = Annotated[int, Field(ge=0, le=2**32 - 1)]


def _checked(check: Callable[[object], str]) -> Callable[[str], str]:
    """A target value checked by the API's own rule (agent/model/targets.py), its
    message without the kind (pydantic names the field)."""
    def run(value: str) -> str:
        try:
            return check(value)
        except TargetError as e:
            raise ValueError(str(e).split(": ", 1)[-1]) from None
    return run


Comm = Annotated[str, AfterValidator(_checked(validate_comm))]  # 1-15 bytes
CgroupPath = Annotated[str, AfterValidator(_checked(validate_cgroup_path))]
ContainerPrefix = Annotated[str, AfterValidator(_checked(validate_container))]


class TargetSettings(Section):
    pids: list[U32] = Field(default_factory=list)
    uids: list[U32] = Field(default_factory=list)
    comms: list[Comm] = Field(default_factory=list)
    # cgroup v2 paths relative to its root (each matches its subtree); they must exist.
    cgroups: list[CgroupPath] = Field(default_factory=list)
    # Container id prefixes, 12-64 lower-case hex digits.
    containers: list[ContainerPrefix] = Field(default_factory=list)
    follow_children: bool = True
    max_pids: int = Field(10240, ge=1, le=1_000_000)
    max_uids: int = Field(1024, ge=1, le=65536)
    max_comms: int = Field(256, ge=1, le=65536)
    max_cgroups: int = Field(1024, ge=1, le=65536)
    max_containers: int = Field(1024, ge=1, le=65536)

    def limits(self) -> TargetLimits:
        """The kernel target maps' sizes (MAX_TARGET_* in common.h)."""
        return TargetLimits(self.max_pids, self.max_uids, self.max_comms, self.max_cgroups,
                            self.max_containers)

    @model_validator(mode="after")
    def _fit_the_maps(self) -> TargetSettings:
        for kind in ("pids", "uids", "comms", "cgroups", "containers"):
            size, cap = len(getattr(self, kind)), getattr(self, f"max_{kind}")
            if size > cap:
                raise ValueError(f"{size} {kind} exceed max_{kind}={cap} (the kernel map's size)")
        return self


class ProcessSettings(Section):
    """processes: the process table and its kernel tracker (agent/processes/)."""

    enabled: bool = True  # the tracker starts with the agent; off: no table, no API data
    capacity: int = Field(32768, ge=16, le=4_000_000)  # entries, live and exited; evictions counted
    exited_keep: int = Field(1024, ge=0, le=1_000_000)  # exited processes kept at most
    exited_ttl_s: float = Field(300.0, gt=0, le=86400)  # ... and for this long after their exit
    argv_bytes: int = Field(1024, ge=64, le=8192)  # of each exec's argument area
    ringbuf_pages: int = Field(64, ge=1, le=65536)  # the tracker's own ring buffer
    cgroup_paths: int = Field(4096, ge=16, le=1_000_000)  # created cgroups remembered (BPF map)
    # Ancestors (process_id, pid, comm) added to every event, parent first; 0 = none.
    event_ancestors: int = Field(0, ge=0, le=64)

    _pow2 = field_validator("ringbuf_pages")(_power_of_two)


class MonitorConfig(Section):
    enabled: bool = False
    options: dict[str, Any] = Field(default_factory=dict)


class NatsExportSettings(Section):
    """export.nats: every event published once to NATS JetStream (agent/export/nats.py)."""

    enabled: bool = False
    # One server or several (a cluster); a comma-separated string works too (environment).
    url: str | list[str] = "nats://127.0.0.1:4222"
    token: SecretStr | None = None
    user: str | None = None
    password: SecretStr | None = None
    creds_file: Path | None = None
    # {host} and {monitor} are replaced (dots in them become "_": a dot splits subjects).
    subject: str = "ebpf.{host}.{monitor}"
    stream: str = Field("EBPF", pattern=r"^[A-Za-z0-9_-]{1,64}$")
    stream_subjects: list[str] = ["ebpf.>"]  # what the stream captures when it is created
    stream_max_bytes: int = Field(1 << 30, ge=1 << 20)
    stream_max_age_s: float = Field(86400.0, gt=0)
    duplicate_window_s: float = Field(120.0, gt=0, le=86400)
    # Per monitor on/off; a monitor not listed is exported.
    monitors: dict[str, bool] = Field(default_factory=dict)
    buffer: int = Field(65536, ge=16, le=10_000_000)  # events waiting; overflow is counted
    batch: int = Field(256, ge=1, le=10_000)
    publish_timeout_s: float = Field(5.0, gt=0, le=300)
    reconnect_min_s: float = Field(0.2, gt=0, le=60)
    reconnect_max_s: float = Field(5.0, gt=0, le=600)

    @field_validator("url")
    @classmethod
    def _urls(cls, v: str | list[str]) -> str | list[str]:
        urls = [u.strip() for u in v.split(",")] if isinstance(v, str) else v
        if not urls or not all(u.startswith(("nats://", "tls://")) for u in urls):
            raise ValueError("expected nats://host:port (or tls://), or a list of them")
        return urls if len(urls) > 1 else urls[0]

    @field_validator("subject")
    @classmethod
    def _subject(cls, v: str) -> str:
        try:
            probe = v.format(host="h", monitor="m")
        except (KeyError, IndexError, ValueError) as e:
            raise ValueError(f"only {{host}} and {{monitor}} may appear ({e})") from None
        if not probe or any(c in probe for c in " \t\r\n") or "" in probe.split("."):
            raise ValueError("not a valid NATS subject")
        return v

    def servers(self) -> list[str]:
        return [self.url] if isinstance(self.url, str) else list(self.url)


class ExportSettings(Section):
    # The host name in exported events and subjects; default: this machine's hostname.
    host_name: str | None = Field(None, min_length=1, max_length=255)
    nats: NatsExportSettings = NatsExportSettings()


class LoggingSettings(Section):
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    file: Path | None = None
    audit_file: Path | None = None  # JSON lines, one per state-changing API request
    # Rotated past this size (the previous file kept as <audit_file>.1).
    audit_file_max_bytes: int = Field(64 * 1024**2, ge=64 * 1024, le=1024**4)


class TokenConfig(Section):
    """A named API token: exactly one of ``token``, ``token_file`` or ``sha256`` (the hex
    SHA-256 of the secret, so the config file need not hold it)."""

    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.@-]+$")
    scope: Literal["read", "control"]
    token: SecretStr | None = None
    token_file: Path | None = None
    sha256: str | None = Field(None, pattern=r"^[0-9a-fA-F]{64}$")

    @model_validator(mode="after")
    def _one_secret(self) -> TokenConfig:
        given = [k for k in ("token", "token_file", "sha256") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError("give exactly one of token, token_file, sha256")
        if self.token is not None and not self.token.get_secret_value():
            raise ValueError("token is empty")
        return self


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="EBPF_AGENT_", env_nested_delimiter="__", extra="forbid"
    )

    api: ApiSettings = ApiSettings()
    stream: StreamSettings = StreamSettings()
    output: OutputSettings = OutputSettings()
    transport: TransportSettings = TransportSettings()
    targets: TargetSettings = TargetSettings()
    monitors: dict[str, MonitorConfig] = Field(default_factory=dict)
    processes: ProcessSettings = ProcessSettings()
    export: ExportSettings = ExportSettings()
    logging: LoggingSettings = LoggingSettings()
    # Bearer token for the API (EBPF_AGENT_TOKEN), or a file holding it.
    token: SecretStr | None = None
    token_file: Path | None = None
    # Named tokens with a scope ("read" or "control"); `token` above is "default", control.
    tokens: list[TokenConfig] = Field(default_factory=list)
    pid_file: Path | None = None

    def resolve_token(self) -> str | None:
        if self.token is not None and self.token.get_secret_value():
            return self.token.get_secret_value()
        if self.token_file is not None:
            return read_token_file(self.token_file)
        return None


def check_token_file_mode(path: Path, mode: int) -> None:
    """Refuse a token file that group or others can read (as ssh does for keys)."""
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise ConfigError(
            f"token_file {path}: readable by group or others (mode "
            f"{stat.S_IMODE(mode):04o}); chmod 600 {path}")


def read_token_file(path: Path) -> str:
    try:
        with open(path, "rb") as f:
            check_token_file_mode(path, os.fstat(f.fileno()).st_mode)
            raw = f.read(64 * 1024 + 1)
    except OSError as e:
        raise ConfigError(f"token_file {path}: {e.strerror}") from None
    if len(raw) > 64 * 1024:
        raise ConfigError(f"token_file {path}: larger than 64 KiB; not a token")
    try:
        value = raw.decode("utf-8").strip()
    except UnicodeDecodeError as e:
        raise ConfigError(f"token_file {path}: not UTF-8 text (byte {e.start})") from None
    if not value:
        raise ConfigError(f"token_file {path} is empty")
    return value


class _EnvSource(EnvSettingsSource):
    """The environment, where a list may also be written as a comma list:
    EBPF_AGENT_TARGETS__PIDS=1,2 as well as [1,2]."""

    def decode_complex_value(self, field_name: str, field: FieldInfo | None,
                             value: Any) -> Any:
        try:
            return json.loads(value)
        except ValueError:
            if field is not None and "list" in str(field.annotation) and isinstance(value, str):
                return [part.strip() for part in value.split(",") if part.strip()]
            raise


class _YamlSource(PydanticBaseSettingsSource):
    """The YAML file's data as the lowest-priority settings source."""

    def __init__(self, settings_cls: type[BaseSettings], data: dict[str, Any]) -> None:
        super().__init__(settings_cls)
        self._data = data

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:
        return self._data.get(field_name), field_name, False

    def __call__(self) -> dict[str, Any]:
        return dict(self._data)


def _settings_class(data: dict[str, Any]) -> type[Settings]:
    """Settings whose sources are: CLI flags (init), then the environment, then ``data``."""

    class FileSettings(Settings):
        @classmethod
        def settings_customise_sources(
            cls,
            settings_cls: type[BaseSettings],
            init_settings: PydanticBaseSettingsSource,
            env_settings: PydanticBaseSettingsSource,
            dotenv_settings: PydanticBaseSettingsSource,
            file_secret_settings: PydanticBaseSettingsSource,
        ) -> tuple[PydanticBaseSettingsSource, ...]:
            env = _EnvSource(settings_cls, case_sensitive=False, env_prefix="EBPF_AGENT_",
                             env_nested_delimiter="__")
            return (init_settings, env, _YamlSource(settings_cls, data))

    return FileSettings


def read_yaml(path: Path) -> dict[str, Any]:
    try:
        text = path.read_bytes().decode("utf-8")
    except OSError as e:
        raise ConfigError(f"{path}: cannot read: {e.strerror}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text (byte {e.start})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}:{where}: invalid YAML: {getattr(e, 'problem', e)}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping")
    return data


def _has_path(data: Any, loc: tuple[Any, ...]) -> bool:
    for key in loc:
        in_dict = isinstance(data, dict) and key in data
        in_list = isinstance(data, list) and isinstance(key, int) and 0 <= key < len(data)
        if not (in_dict or in_list):
            return False
        data = data[key]
    return True


def _env_name(loc: tuple[Any, ...]) -> str | None:
    """The EBPF_AGENT_* variable that set ``loc`` (or a section holding it), if any."""
    names = {k.upper() for k in os.environ if k.upper().startswith("EBPF_AGENT_")}
    for end in range(len(loc), 0, -1):
        name = "EBPF_AGENT_" + "__".join(str(p) for p in loc[:end]).upper()
        if name in names:
            return name
    # A section-level error (targets: too many pids) from variables inside the section.
    inside = sorted(n for n in names if loc and n.startswith(f"EBPF_AGENT_{loc[0]}__".upper()))
    return ", ".join(inside) or None


def _origin(loc: tuple[Any, ...], path: Path | None, data: dict[str, Any],
            overrides: dict[str, Any]) -> str:
    """Where a value came from, in the sources' priority: flags, environment, file."""
    if _has_path(overrides, loc[:2]):
        return "command line"
    env = _env_name(loc)
    if env:
        return f"environment {env}"
    if path and _has_path(data, loc):
        return str(path)
    return "EBPF_AGENT_* environment/flags"


def _format_errors(err: ValidationError, path: Path | None, data: dict[str, Any],
                   overrides: dict[str, Any] | None = None) -> str:
    lines = []
    for e in err.errors():
        loc = tuple(e["loc"])
        field = ".".join(str(p) for p in loc)
        origin = _origin(loc, path, data, overrides or {})
        msg = "unknown key" if e["type"] == "extra_forbidden" else e["msg"]
        lines.append(f"{origin}: {field}: {msg}")
    return "; ".join(lines)


def load_settings(
    path: Path | None = None, overrides: dict[str, Any] | None = None, registry: Any = None
) -> Settings:
    """Settings from the YAML file at ``path`` (None: built-in defaults), the environment
    and ``overrides`` (nested dicts, as CLI flags give them). With ``registry``, each
    monitor's options are validated against that monitor's Options model."""
    data = read_yaml(path) if path is not None else {}
    try:
        settings: Settings = _settings_class(data)(**(overrides or {}))
    except ValidationError as e:
        raise ConfigError(_format_errors(e, path, data, overrides)) from None
    except SettingsError as e:  # an environment value that does not parse
        cause = e.__cause__
        raise ConfigError(f"EBPF_AGENT_* environment: {e}"
                          + (f": {cause}" if cause else "")) from None
    if registry is not None:
        validate_monitor_options(settings, registry, path)
    return settings


def config_warnings(settings: Settings) -> list[str]:
    """Settings that are valid but almost certainly not what was meant (``ebpf-agent
    check`` prints them, ``serve`` and ``run`` log them at start)."""
    out = []
    nats = settings.export.nats
    if "url" in nats.model_fields_set and "enabled" not in nats.model_fields_set:
        out.append("export.nats.url is set but export.nats.enabled is not: nothing is "
                   "exported to NATS (set enabled: true; enabled: false silences this)")
    return out


# Path settings, as (section or None, field).
PATH_FIELDS = (("output", "directory"), ("logging", "file"), ("api", "unix_socket"),
               ("api", "tls_certfile"), ("api", "tls_keyfile"), (None, "pid_file"),
               (None, "token_file"))


def absolute_paths(settings: Settings, base: Path | None = None) -> Settings:
    """Relative paths made absolute against ``base`` (the working directory): the daemon
    chdirs to /, where `output` would otherwise land, and a relative pid file would not
    be found again to remove it."""
    base = base or Path.cwd()
    updates: dict[str, Any] = {}
    for section, name in PATH_FIELDS:
        holder = getattr(settings, section) if section else settings
        value = getattr(holder, name)
        if value is None or value.is_absolute():
            continue
        if section is None:
            updates[name] = base / value
        else:
            current = updates.get(section, holder)
            updates[section] = current.model_copy(update={name: base / value})
    return settings.model_copy(update=updates) if updates else settings


def validate_monitor_options(settings: Settings, registry: Any, path: Path | None) -> None:
    where = str(path) if path else "config"
    for name, mon in settings.monitors.items():
        if name not in registry:
            known = ", ".join(registry.names())
            raise ConfigError(f"{where}: monitors.{name}: unknown monitor (known: {known})")
        try:
            registry.get(name).Options(**mon.options)
        except ValidationError as e:
            parts = []
            for err in e.errors():
                field = ".".join(str(p) for p in err["loc"])
                msg = "unknown key" if err["type"] == "extra_forbidden" else err["msg"]
                parts.append(f"{where}: monitors.{name}.options.{field}: {msg}")
            raise ConfigError("; ".join(parts)) from None

"""``ebpf-agent serve``: security checks, sockets, uvicorn (the PID file and daemon mode:
daemon.py).

We bind the sockets ourselves so one uvicorn server can serve TCP and a unix socket at
once, with the unix socket's mode and group set before anyone can connect.
"""

from __future__ import annotations

import asyncio
import contextlib
import grp
import ipaddress
import logging
import os
import signal
import socket
import ssl
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import uvicorn

from agent.api.access.connguard import GuardCollector, GuardState, fd_budget, protocol_class
from agent.api.access.principal import TokenStore
from agent.api.access.redact import RedactSecrets
from agent.api.access.redact import install as install_redaction
from agent.api.access.redact import uninstall as uninstall_redaction
from agent.api.daemon import Daemon, PidFile, StartupRefused
from agent.auth_files import (
    RuntimeDirError,
    generate_token_files,
    header_path,
    prepare_runtime_dir,
    remove_token_files,
)
from agent.config import Settings
from agent.core import memory
from agent.monitors.registry import MonitorRegistry

log = logging.getLogger(__name__)


# -- security checks ---------------------------------------------------------------------
def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None)
    except OSError:
        return False
    return bool(infos) and all(ipaddress.ip_address(i[4][0]).is_loopback for i in infos)


def check_security(settings: Settings) -> TokenStore:
    """The configured tokens (possibly none), or StartupRefused when unsafe."""
    api = settings.api
    tokens = TokenStore.from_settings(settings)
    if api.auth == "none":
        if tokens:
            raise StartupRefused("api.auth is none but tokens are configured: remove the "
                                 "tokens or set api.auth: token")
        if not is_loopback(api.host):
            raise StartupRefused(
                f"refusing api.auth: none on {api.host}:{api.port}: anyone who can reach "
                "that address could load kernel programs as root. api.auth: none is for "
                "loopback only (127.0.0.1 / ::1).")
    if (api.tls_certfile is None) != (api.tls_keyfile is None):
        raise StartupRefused("api.tls_certfile and api.tls_keyfile go together")
    if api.tls_certfile is not None and api.tls_keyfile is not None:
        check_tls_files(api.tls_certfile, api.tls_keyfile)
    return tokens


def generate_token(settings: Settings, check_only: bool = False) -> str | None:
    """Secure by default: a token for this run in api.runtime_dir (see agent.auth_files).
    ``check_only``: only make sure the directory can hold it (before forking, so that a
    refusal reaches the terminal); the token is written once the sockets are bound, so
    an agent that cannot start never replaces the token of one that runs."""
    try:
        if check_only:
            prepare_runtime_dir(settings.api.runtime_dir)
            return None
        return generate_token_files(settings.api.runtime_dir)
    except RuntimeDirError as e:
        raise StartupRefused(f"no token configured and cannot generate one: {e}") from None


def check_tls_files(certfile: Path, keyfile: Path) -> None:
    """Load the pair as uvicorn will, so a missing or bad file is one line, not a
    traceback from inside uvicorn."""
    for what, path in (("api.tls_certfile", certfile), ("api.tls_keyfile", keyfile)):
        try:
            with open(path, "rb"):
                pass
        except OSError as e:
            raise StartupRefused(f"{what} {path}: {e.strerror}") from None
    try:
        ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(certfile, keyfile)
    except (ssl.SSLError, OSError) as e:
        raise StartupRefused(
            f"api.tls_certfile {certfile} / api.tls_keyfile {keyfile}: not a certificate and "
            f"its private key in PEM ({getattr(e, 'reason', None) or e})") from None


# -- sockets -----------------------------------------------------------------------------
NOTSENT_LOWAT = 128 * 1024  # bytes queued unsent per connection at most (see tcp_socket)


def tcp_socket(host: str, port: int) -> socket.socket:
    try:
        family, kind, proto, _, addr = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
    except OSError as e:  # socket.gaierror: a name that does not resolve
        raise StartupRefused(f"api.host {host!r}: cannot resolve: {e.strerror}") from None
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    # Event streams: a client slower than the events would have megabytes of frames
    # waiting unsent in its socket (the send buffer autotunes up to tcp_wmem's maximum),
    # hundreds of ms old before they leave, unseen by the hub's stream.max_lag_ms.
    # TCP_NOTSENT_LOWAT (tcp(7)) bounds the unsent part only, not the data in flight, so
    # throughput is not capped; accepted sockets inherit it from the listener.
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NOTSENT_LOWAT, NOTSENT_LOWAT)
    try:
        sock.bind(addr)
    except OSError as e:
        sock.close()
        raise StartupRefused(f"cannot listen on {host}:{port}: {e.strerror}") from None
    sock.listen(2048)
    return sock


def unix_socket(path: Path, mode: str, group: str | None) -> socket.socket:
    if path.exists() or path.is_symlink():
        if not path.is_socket():
            raise StartupRefused(f"{path} exists and is not a socket")
        probe = socket.socket(socket.AF_UNIX)
        try:
            probe.connect(str(path))
            raise StartupRefused(f"{path} is in use by another server")
        except (ConnectionRefusedError, FileNotFoundError):
            path.unlink()  # stale: left by an agent that was killed
        finally:
            probe.close()
    gid = _group_id(group) if group else -1
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    perms = int(mode, 8)
    # The umask makes the socket file born with at most ``perms``: no window in which
    # another user could connect before chmod.
    old = os.umask(0o777 & ~perms)
    try:
        sock.bind(str(path))
    except OSError as e:
        sock.close()
        raise StartupRefused(f"cannot bind {path}: {e.strerror}") from None
    finally:
        os.umask(old)
    os.chmod(path, perms)
    if gid != -1:
        os.chown(path, -1, gid)
    sock.listen(2048)
    return sock


def _group_id(name: str) -> int:
    try:
        return grp.getgrnam(name).gr_gid
    except KeyError:
        raise StartupRefused(f"api.unix_socket_group: no group {name!r}") from None


def bind_sockets(settings: Settings) -> list[socket.socket]:
    api = settings.api
    sockets = [tcp_socket(api.host, api.port)]
    if api.unix_socket is not None:
        try:
            sockets.append(unix_socket(api.unix_socket, api.unix_socket_mode,
                                       api.unix_socket_group))
        except BaseException:
            sockets[0].close()
            raise
    return sockets


def describe(sock: socket.socket, tls: bool) -> str:
    if sock.family == socket.AF_UNIX:
        return f"unix:{sock.getsockname()}"
    host, port = sock.getsockname()[:2]
    host = f"[{host}]" if ":" in host else host
    return f"{'https' if tls else 'http'}://{host}:{port}"


# -- uvicorn -----------------------------------------------------------------------------
class AgentServer(uvicorn.Server):
    """uvicorn's server, ending event streams first on shutdown: uvicorn waits for open
    connections (up to api.shutdown_timeout_s) before the lifespan shutdown runs, so the
    streams must end by themselves for SIGTERM to be quick."""

    def __init__(self, config: uvicorn.Config, on_started: Callable[[], None]) -> None:
        super().__init__(config)
        self._on_started = on_started

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if self.started:
            self._on_started()

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        state = getattr(self.config.app, "state", None)
        ctx = getattr(state, "ctx", None)
        if ctx is not None:
            ctx.begin_shutdown()
            await asyncio.sleep(0)  # let the streams see it before connections are closed
        await super().shutdown(sockets)


@contextlib.contextmanager
def _signals_end_cleanly() -> Iterator[None]:
    """uvicorn re-raises the signal that stopped it once serve() returns, with the handler
    it found installed: make that a no-op so a SIGTERM'ed agent exits 0."""
    previous = {s: signal.signal(s, lambda *_: None) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def uvicorn_config(app: Any, settings: Settings, max_connections: int | None = None) \
        -> uvicorn.Config:
    api, stream = settings.api, settings.stream
    guard = GuardState(max_connections or api.max_connections, api.header_timeout_s,
                       api.max_header_bytes)
    state = getattr(app, "state", None)
    if state is not None and hasattr(state, "ctx"):  # its /metrics: what the guard closed
        collector = getattr(state, "connection_guard", None)
        if collector is None:
            state.connection_guard = collector = GuardCollector(guard)
            state.ctx.metrics.register(collector)
        collector.guard = guard  # the app served again (tests): the new server's counts
    return uvicorn.Config(
        app,
        http=protocol_class(guard),  # header deadline and size cap, connection cap
        timeout_keep_alive=api.keepalive_timeout_s,  # type: ignore[arg-type]
        h11_max_incomplete_event_size=api.max_header_bytes,
        ws_max_size=64 * 1024,  # the streams ignore what clients send
        access_log=True,
        lifespan="on",
        log_config=None,  # keep the agent's logging set-up (agent.cli)
        # uvicorn types it int but only ever passes it to asyncio.wait_for
        timeout_graceful_shutdown=api.shutdown_timeout_s,  # type: ignore[arg-type]
        ssl_certfile=str(api.tls_certfile) if api.tls_certfile else None,
        ssl_keyfile=str(api.tls_keyfile) if api.tls_keyfile else None,
        ws_ping_interval=stream.heartbeat_s,  # WebSocket heartbeat: protocol pings
        ws_ping_timeout=stream.stall_timeout_s,
        server_header=False,
        proxy_headers=False,
    )


def _report_when_ready(app: Any, daemon: Daemon) -> None:
    """The original process exits once the configured monitors are up (or failed)."""
    app.state.ctx.autostart_done.wait(300)
    daemon.report("ok")
    daemon.detach_stdio()


GIL_SWITCH_INTERVAL_S = 0.001


def serve(settings: Settings, registry: MonitorRegistry, daemon: bool = False) -> int:
    tokens = check_security(settings)  # before forking: refusals reach the terminal
    generate = settings.api.auth == "token" and not tokens
    if generate:
        generate_token(settings, check_only=True)
    pid_file = PidFile(settings.pid_file) if settings.pid_file else None
    if pid_file is not None:
        pid_file.acquire()
    runner = Daemon()
    if daemon and (code := runner.fork()) is not None:
        return code
    # The poller threads and the event loop share the GIL: a thread that gives it up for a
    # system call (the loop's socket writes, the poller's epoll) waits up to the switch
    # interval to get it back while the other one computes. 1 ms instead of 5 ms keeps
    # intake and fan-out moving together (bench/stream.py, bench/RESULTS.md).
    sys.setswitchinterval(GIL_SWITCH_INTERVAL_S)
    memory.tune_malloc()  # large blocks in their own mappings: see agent/core/memory.py
    redaction = install_redaction()
    generated: list[str] = []  # filled by _serve, removed here whatever happens
    try:
        return _serve(settings, registry, generate, generated, runner if daemon else None,
                      pid_file, redaction)
    except BaseException as e:
        runner.report(f"start-up failed: {e}")
        raise
    finally:
        if pid_file is not None:
            pid_file.release()
        for token in generated:
            remove_token_files(settings.api.runtime_dir, token)
        uninstall_redaction(redaction)


def _auth_summary(settings: Settings, generated: str | None) -> str:
    if settings.api.auth == "none":
        return "api.auth: none: NO AUTHENTICATION (loopback only)"
    if generated is not None:
        return f"token required; generated one: curl -H @{header_path(settings.api.runtime_dir)}"
    return "token required"


def _serve(settings: Settings, registry: MonitorRegistry, generate: bool,
           generated_out: list[str], daemon: Daemon | None, pid_file: PidFile | None,
           redaction: RedactSecrets) -> int:
    from agent.api.app import create_app

    if pid_file is not None:
        pid_file.write(os.getpid())
    max_connections = fd_budget(settings.api.max_connections)
    sockets = bind_sockets(settings)
    generated = None
    if generate:
        generated = generate_token(settings)
        assert generated is not None
        generated_out.append(generated)
        redaction.add(generated)
    app = create_app(settings, registry, generated_token=generated)
    for t in settings.tokens:
        if t.token is not None:
            redaction.add(t.token.get_secret_value())
    if (legacy := settings.resolve_token()) is not None:
        redaction.add(legacy)
    tls = settings.api.tls_certfile is not None
    where = ", ".join(describe(s, tls) for s in sockets)
    if settings.api.auth == "none":
        log.warning("api.auth is none: any local user can read every process's arguments "
                    "and load kernel programs through this API")

    def started() -> None:
        log.info("ebpf-agent API listening on %s (%s)", where,
                 _auth_summary(settings, generated))
        if daemon is not None:
            threading.Thread(target=_report_when_ready, args=(app, daemon), daemon=True).start()

    server = AgentServer(uvicorn_config(app, settings, max_connections), started)
    try:
        with _signals_end_cleanly():
            server.run(sockets=sockets)  # uvicorn's loop factory (uvloop when present)
    finally:
        for s in sockets:
            s.close()
        if settings.api.unix_socket is not None:
            with contextlib.suppress(OSError):
                settings.api.unix_socket.unlink()
    if not server.started:
        if daemon is not None:
            daemon.report("the API did not start (see the log)")
        return 1
    log.info("ebpf-agent stopped")
    return 0

"""The process around ``ebpf-agent serve``: an flock'ed PID file and daemon mode (double
fork, the original process waiting until the API is up)."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import stat
import sys
from pathlib import Path

from agent.config import ConfigError


class StartupRefused(ConfigError):
    """A start-up the agent refuses; the CLI prints it and exits non-zero."""


# -- PID file ----------------------------------------------------------------------------
class PidFile:
    """An flock'ed PID file. flock (not fcntl/lockf) because the lock belongs to the open
    file, which the daemon inherits across fork; it dies with the last holder."""

    def __init__(self, path: Path) -> None:
        self.path = path.absolute()  # removed on exit, after the daemon's chdir("/")
        self._fd: int | None = None

    def acquire(self) -> None:
        check_private_parent(self.path, "pid file")
        try:
            # O_NOFOLLOW: a symlink planted at the path must not make root truncate and
            # write its target.
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW,
                         0o644)
        except OSError as e:
            reason = "is a symbolic link" if e.errno == errno.ELOOP else e.strerror
            raise StartupRefused(f"pid file {self.path}: {reason}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EACCES):
                holder = _read_pid(self.path)
                raise StartupRefused(
                    f"another ebpf-agent (pid {holder or '?'}) holds {self.path}"
                ) from None
            raise
        holder = _read_pid(self.path)
        if holder and holder != os.getpid() and _alive_agent(holder):
            os.close(fd)  # a live agent that does not lock (an older one): leave it alone
            raise StartupRefused(f"pid {holder} in {self.path} is a running ebpf-agent")
        self._fd = fd

    def write(self, pid: int) -> None:
        assert self._fd is not None
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, f"{pid}\n".encode(), 0)

    def release(self) -> None:
        if self._fd is None:
            return
        if _read_pid(self.path) == os.getpid():
            with contextlib.suppress(OSError):
                self.path.unlink()
        os.close(self._fd)
        self._fd = None


def check_private_parent(path: Path, what: str) -> None:
    """Refuse a file in a directory others can write to: they could swap it for a link
    between our checks and our open (a /tmp-style directory, sticky or not)."""
    parent = path.parent
    try:
        st = parent.stat()
    except OSError as e:
        raise StartupRefused(f"{what} {path}: directory {parent}: {e.strerror}") from None
    if not stat.S_ISDIR(st.st_mode):
        raise StartupRefused(f"{what} {path}: {parent} is not a directory")
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise StartupRefused(
            f"{what} {path}: directory {parent} is writable by group or others "
            f"(mode {stat.S_IMODE(st.st_mode):04o}); use a directory only root can write, "
            "e.g. /run")


def _read_pid(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def _alive_agent(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (ProcessLookupError, PermissionError, OSError):
        return False
    return b"ebpf-agent" in cmdline or b"agent.cli" in cmdline


# -- daemon ------------------------------------------------------------------------------
class Daemon:
    """Double fork; the original process waits until the daemon is serving (or failed),
    so ``serve --daemon`` exits 0 only when the API is up."""

    def __init__(self) -> None:
        self._w: int | None = None

    def fork(self) -> int | None:
        """The exit code in the original process; None in the daemon."""
        r, w = os.pipe()
        if os.fork() > 0:
            os.close(w)
            return self._wait(r)
        os.close(r)
        os.setsid()
        if os.fork() > 0:
            os._exit(0)
        os.chdir("/")
        self._w = w
        return None

    @staticmethod
    def _wait(r: int) -> int:
        with os.fdopen(r, "rb") as f:
            message = f.read().decode(errors="replace")
        if message.startswith("ok"):
            return 0
        print(f"ebpf-agent: {message or 'the daemon exited during start-up'}", file=sys.stderr)
        return 1

    def report(self, message: str) -> None:
        if self._w is None:
            return
        with contextlib.suppress(OSError):
            os.write(self._w, message.encode())
            os.close(self._w)
        self._w = None

    def detach_stdio(self) -> None:
        null = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(null, fd)
        os.close(null)

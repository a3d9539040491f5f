"""The generated token of a secure-by-default agent, and how local clients find it.

With no token configured (and ``api.auth`` not ``none``) ``ebpf-agent serve`` generates a
random control token at start-up and writes, in ``api.runtime_dir`` (a 0700 directory,
/run/ebpf-agent by default):

- ``token``: the token alone (0600);
- ``auth.header``: ``Authorization: Bearer <token>``, a curl header file (0600), so
  ``curl -H @/run/ebpf-agent/auth.header ...`` works for root without copying secrets.

Local clients (the CLI, ebpf-agentctl) call :func:`default_token_header`.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import stat
from pathlib import Path

DEFAULT_RUNTIME_DIR = Path("/run/ebpf-agent")
TOKEN_NAME = "token"
HEADER_NAME = "auth.header"


class RuntimeDirError(Exception):
    """The runtime directory cannot hold a secret safely."""


def token_path(runtime_dir: Path = DEFAULT_RUNTIME_DIR) -> Path:
    return runtime_dir / TOKEN_NAME


def header_path(runtime_dir: Path = DEFAULT_RUNTIME_DIR) -> Path:
    return runtime_dir / HEADER_NAME


def read_token_if_readable(path: Path) -> str | None:
    """The token in ``path``, or None when there is none (or it is not ours to read)."""
    try:
        value = path.read_text().strip()
    except (OSError, UnicodeDecodeError):
        return None
    return value or None


def read_default_token(runtime_dir: Path = DEFAULT_RUNTIME_DIR) -> str | None:
    """The generated token, or None when there is none (or it is not ours to read)."""
    return read_token_if_readable(token_path(runtime_dir))


def default_token_header(runtime_dir: Path | None = None) -> dict[str, str]:
    """``{"Authorization": "Bearer <token>"}`` from the generated token file, or ``{}``.

    For local clients: ``httpx.Client(headers=default_token_header())``."""
    token = read_default_token(runtime_dir or DEFAULT_RUNTIME_DIR)
    return {"Authorization": f"Bearer {token}"} if token else {}


def prepare_runtime_dir(runtime_dir: Path) -> None:
    """Create the directory 0700, or accept an existing one that is ours and that no one
    else can write (systemd's RuntimeDirectory= may make it 0750 for a socket group)."""
    try:
        runtime_dir.mkdir(mode=0o700, parents=True)
    except FileExistsError:
        pass
    except OSError as e:
        raise RuntimeDirError(f"api.runtime_dir {runtime_dir}: {e.strerror}") from None
    st = os.lstat(runtime_dir)
    if not stat.S_ISDIR(st.st_mode):
        raise RuntimeDirError(f"api.runtime_dir {runtime_dir} is not a directory")
    if st.st_uid != os.geteuid():
        raise RuntimeDirError(f"api.runtime_dir {runtime_dir} belongs to uid {st.st_uid}")
    if st.st_mode & 0o022:
        raise RuntimeDirError(
            f"api.runtime_dir {runtime_dir} is writable by group or others "
            f"(mode {stat.S_IMODE(st.st_mode):04o}): refusing to keep a token there")


def _write_secret(path: Path, text: str) -> None:
    """Written to a fresh 0600 file, then renamed over ``path``: never readable by others,
    never through a symlink someone planted."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                 0o600)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def generate_token_files(runtime_dir: Path) -> str:
    """A new random token written to ``token`` and ``auth.header``; returns the token."""
    prepare_runtime_dir(runtime_dir)
    token = secrets.token_urlsafe(32)
    try:
        _write_secret(token_path(runtime_dir), token + "\n")
        _write_secret(header_path(runtime_dir), f"Authorization: Bearer {token}\n")
    except OSError as e:
        raise RuntimeDirError(f"api.runtime_dir {runtime_dir}: {e.strerror}") from None
    return token


def remove_token_files(runtime_dir: Path, token: str) -> None:
    """On exit: remove the files if they still hold our token (not a newer agent's)."""
    if read_default_token(runtime_dir) != token:
        return
    for path in (token_path(runtime_dir), header_path(runtime_dir)):
        with contextlib.suppress(OSError):
            path.unlink()

"""What the manager refuses with, and what each refusal means to a user.

One table, ``FAILURES``: the HTTP status the API answers (agent/api/errors.py) and the
exit code of ``ebpf-agent run`` (agent/cli.py) for each exception a command can raise.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from agent.model.targets import TargetError

EXIT_FAILURE = 1
EXIT_CONFIG = 2  # bad input: config, flags, options, targets
EXIT_UNSUPPORTED = 3  # this kernel (or this user) cannot run it


class UnknownMonitor(KeyError):
    """No monitor of that name is registered (404)."""


class MonitorUnsupported(Exception):
    """This kernel cannot run the monitor (or these options); 409 with the reason."""


class OptionsInvalid(ValueError):
    """Options (or a stats query) that fail validation; 422. ``errors`` is pydantic's
    list; ``where``: the request part they came from ("body" or "query"); ``monitor``:
    whose options they are; ``loc``: where they sit in that part (e.g. ("monitors",
    "exec") in a state document)."""

    def __init__(self, message: str, errors: list[Any] | None = None,
                 where: str = "body", monitor: str | None = None,
                 loc: tuple[str | int, ...] = ()) -> None:
        super().__init__(message)
        self.errors = errors or []
        self.where = where
        self.monitor = monitor
        self.loc = loc


class NotRunning(Exception):
    """A lease for a monitor that does not run (409)."""


class PreconditionFailed(Exception):
    """If-Match names a state that is no longer the current one (412)."""

    def __init__(self, current_etag: str) -> None:
        super().__init__(f"the state changed (current ETag {current_etag})")
        self.current_etag = current_etag


class StateRejected(Exception):
    """A desired state that could not be applied; everything was rolled back (409)."""

    def __init__(self, message: str, monitor: str | None, rolled_back: bool) -> None:
        super().__init__(message)
        self.monitor = monitor
        self.rolled_back = rolled_back


class ManagerClosed(RuntimeError):
    """A command sent after shutdown (503)."""

    def __init__(self) -> None:
        super().__init__("the monitor manager is shut down")


class CommandTimeout(TimeoutError):
    """The control thread did not answer in time (503)."""

    def __init__(self) -> None:
        super().__init__("the monitor control thread did not answer in time")


@dataclass(frozen=True)
class Failure:
    status: int  # HTTP
    exit_code: int  # ebpf-agent run


# First match wins: a class before its bases (OptionsInvalid and TargetError are
# ValueErrors).
FAILURES: tuple[tuple[type[BaseException], Failure], ...] = (
    (UnknownMonitor, Failure(404, EXIT_CONFIG)),
    (MonitorUnsupported, Failure(409, EXIT_UNSUPPORTED)),
    (NotRunning, Failure(409, EXIT_FAILURE)),
    (StateRejected, Failure(409, EXIT_FAILURE)),
    (PreconditionFailed, Failure(412, EXIT_FAILURE)),
    (OptionsInvalid, Failure(422, EXIT_CONFIG)),
    (TargetError, Failure(422, EXIT_CONFIG)),
    (ManagerClosed, Failure(503, EXIT_FAILURE)),
    (CommandTimeout, Failure(503, EXIT_FAILURE)),
)
# A ValueError raised while input is checked (monitors raise their own subclasses for
# bad options or queries, e.g. func's FuncPatternError; OutputPathError for an output
# file) is bad input. Anywhere else a ValueError is a bug: no entry, a 500.
BAD_INPUT = Failure(422, EXIT_CONFIG)


def failure_of(error: BaseException, checks_input: bool = False) -> Failure | None:
    """The entry for ``error``; None: not a refusal (a bug, left to propagate).
    ``checks_input``: the failing step checked user input (Command.checks_input)."""
    for kind, failure in FAILURES:
        if isinstance(error, kind):
            return failure
    if checks_input and isinstance(error, ValueError):
        return BAD_INPUT
    return None

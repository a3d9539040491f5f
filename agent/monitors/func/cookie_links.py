"""One BPF program for every probed function: uprobe_multi links with a cookie per
attach point (Linux 6.6+). The program reads the function's probe id with
bpf_get_attach_cookie(), so what is compiled does not grow with the number of functions
(func.c, FUNC_COOKIE_PROGRAMS) and one link per binary carries all its functions.

A link is all or nothing: the kernel refuses the whole link when one address cannot be
probed (x86 cannot single-step some instructions: ENOTSUPP). A refused group is split in
halves and retried, so k bad functions among n cost O(k log n) extra link attempts and
every other function is attached.

One CookieLinks holds the links of one process (pid), or of every process (pid 0).
A process that is gone (ESRCH) refuses every link alike: that is ProcessGone, not a
function refused.
"""

from __future__ import annotations

import errno
from collections.abc import Callable

from agent.kernel.probes import close_links, uprobe_multi_link


class ProcessGone(Exception):
    """The process a link was meant for no longer exists (ESRCH)."""


class CookieLinks:
    """uprobe_multi links of the two shared programs, one per binary and direction, for
    process ``pid`` (0: every process)."""

    def __init__(self, entry_fd: int, return_fd: int | None, pid: int = 0) -> None:
        self.entry_fd, self.return_fd, self.pid = entry_fd, return_fd, pid
        self.fds: list[int] = []

    def attach(self, path: str, ids: list[int], offsets: list[int], retprobe: bool,
               failed: Callable[[int, OSError], None]) -> list[int]:
        """Attaches what the kernel accepts; returns the ids attached, calls ``failed``
        for each refused one. ProcessGone when the process is gone."""
        prog = self.return_fd if retprobe else self.entry_fd
        assert prog is not None
        attached: list[int] = []
        pending = [(ids, offsets)]
        while pending:
            group, offs = pending.pop()
            try:
                self.fds.append(uprobe_multi_link(prog, path, offs, group, retprobe,
                                                  self.pid))
                attached += group
            except OSError as e:
                if e.errno == errno.ESRCH and self.pid:
                    raise ProcessGone(self.pid) from e
                if len(group) == 1:
                    failed(group[0], e)
                    continue
                half = len(group) // 2
                pending += [(group[:half], offs[:half]), (group[half:], offs[half:])]
        return attached

    def close(self) -> None:
        fds, self.fds = self.fds, []
        close_links(fds)

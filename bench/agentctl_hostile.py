"""ebpf-agentctl's peak RSS against hostile fake agents (issue 16): a host sending an
answer body without end, a host sending one SSE line without a newline, and a normal
host for comparison. Prints figures; the bound is asserted in tests/fleet/test_hostile.py.

    PYTHONPATH=. .venv/bin/python bench/agentctl_hostile.py
"""

from __future__ import annotations

import time

from tests.fleet.test_hostile import TOKEN, endless_json, endless_sse_line, one_host
from tests.support.fleet import agentctl_max_rss, fake_agents, hostile_agent


def main() -> None:
    with hostile_agent(endless_json) as evil:
        t0 = time.monotonic()
        r, rss = agentctl_max_rss(*one_host(evil.url), "--timeout", "20", "status")
        print(f"status endless body: {rss} kB {time.monotonic() - t0:.1f} s "
              f"{r.stderr.strip()}")
    with hostile_agent(endless_sse_line) as evil:
        r, rss = agentctl_max_rss(*one_host(evil.url), "events", "--duration", "8",
                                  "--no-renew")
        print(f"events endless line: {rss} kB {r.stderr.strip().splitlines()[1:2]}")
    with fake_agents(["a"], TOKEN) as good:
        r, rss = agentctl_max_rss("--host", f"a={good[0].url}", "--token", TOKEN, "status")
        print(f"status normal: {rss} kB")


if __name__ == "__main__":
    main()

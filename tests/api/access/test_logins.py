"""The login slow-down against parallel guessing (issue 16, item 5): an attempt counts
before it waits, and one address has at most api.logins_in_flight_per_client logins in
progress (429 beyond)."""

from __future__ import annotations

import asyncio

import httpx

from agent.api.access.logins import LoginLimiter
from agent.api.app import create_app
from tests.support.api import BASE, fake_registry, fake_report, settings

TOKENS = [{"name": "admin", "scope": "control", "token": "login-admin-0123"}]


def test_parallel_attempts_each_count_before_waiting() -> None:
    limiter = LoginLimiter(per_minute=2, clock=lambda: 0.0, max_in_flight=100)
    # 10 attempts at once: none has finished, yet each waits longer than the one before.
    attempts = [limiter.begin("10.0.0.1") for _ in range(10)]
    delays = [a[0] for a in attempts if a is not None]
    assert delays == [0.0, 0.0, 0.25, 0.5, 1.0, 2.0, 4.0, 5.0, 5.0, 5.0]  # MAX_DELAY_S: 5
    assert limiter.begin("10.0.0.2") == (0.0, 0.0)  # per address


def test_logins_in_flight_per_address_are_capped() -> None:
    limiter = LoginLimiter(per_minute=5, clock=lambda: 0.0, max_in_flight=4)
    assert [limiter.begin("10.0.0.1") is not None for _ in range(6)] == \
        [True] * 4 + [False] * 2
    assert limiter.too_many == 2
    limiter.end("10.0.0.1")
    assert limiter.begin("10.0.0.1") is not None  # a slot was freed
    assert limiter.begin("10.0.0.9") is not None  # another address has its own


def test_a_right_token_is_not_counted_as_a_failure() -> None:
    limiter = LoginLimiter(per_minute=1, clock=lambda: 0.0)
    attempt = limiter.begin("a")
    assert attempt is not None
    limiter.end("a")
    limiter.succeeded("a", attempt[1])
    assert limiter.delay("a") == 0.0  # the next attempt is still the first one


def test_100_parallel_wrong_logins_over_http() -> None:
    """100 wrong logins sent at once from one address: at most
    api.logins_in_flight_per_client are looked at, the rest get 429; every one looked at
    was counted as a failure."""
    s = settings(tokens=TOKENS, api={"login_failures_per_minute": 1,
                                     "logins_in_flight_per_client": 4})
    app = create_app(s, fake_registry(), report=fake_report())

    async def run() -> list[int]:
        transport = httpx.ASGITransport(app=app, client=("10.1.1.1", 5555))
        async with httpx.AsyncClient(transport=transport, base_url=BASE, timeout=60) as c:
            replies = await asyncio.gather(*(c.post("/auth/session", json={"token": "no"})
                                             for _ in range(100)))
        return [r.status_code for r in replies]

    statuses = asyncio.run(run())
    assert set(statuses) == {401, 429}
    looked_at = statuses.count(401)
    assert 1 <= looked_at <= 8 and statuses.count(429) == 100 - looked_at
    ctx = app.state.ctx
    assert ctx.auth_failures["login"] == looked_at
    assert ctx.logins.too_many == 100 - looked_at

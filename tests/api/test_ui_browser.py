"""The /ui console in a real headless Chromium against a real `ebpf-agent serve`: log in,
start the exec monitor, see the exec of a process this test launched, stop it; a read
token sees the page but is refused to start; attacker-chosen argv is shown as text."""

from __future__ import annotations

import json
import os
import subprocess
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from agent.api.app import create_app
from agent.kernel.identity import local_identity
from tests.support.api import (
    Agent,
    fake_registry,
    fake_report,
    settings,
    start_agent,
    thread_server,
    wait_tracker,
)
from tests.support.browser import browser_problem, chromium
from tests.support.cgroups import cgroup_dir, run_in, spawn_in
from tests.support.kernel import IN_CI, prog_ids_held_by, require_kernel

ADMIN, VIEWER = "ui-admin-token-7d1e4c", "ui-viewer-token-9a2b6f"
XSS = "<img src=x onerror=alert(1)>"
TOKENS = [{"name": "admin", "scope": "control", "token": ADMIN},
          {"name": "viewer", "scope": "read", "token": VIEWER}]


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    problem = browser_problem()
    if problem is not None:
        if IN_CI:
            pytest.fail(f"browser tests cannot run: {problem} (CI=true: must not skip)")
        pytest.skip(problem)
    with chromium() as b:
        yield b


@pytest.fixture(scope="module")
def agent(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Agent]:
    require_kernel()
    a = start_agent(tmp_path_factory.mktemp("ui"),
                    {"monitors": {"exec": {"enabled": False}}, "tokens": TOKENS},
                    token=None, headers={"Authorization": f"Bearer {ADMIN}"})
    try:
        yield a
    finally:
        a.stop()


def expect(locator: Any) -> Any:
    # Playwright's assertions poll without eval(): the page's CSP forbids it.
    from playwright.sync_api import expect as pw_expect

    return pw_expect(locator)


def open_page(browser: Any, url: str) -> tuple[Any, Any, list[str]]:
    context = browser.new_context(viewport={"width": 1400, "height": 900})
    page = context.new_page()
    page.set_default_timeout(20_000)
    dialogs: list[str] = []
    page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
    page.goto(f"{url}/ui")
    return context, page, dialogs


def login(page: Any, token: str) -> None:
    page.get_by_test_id("token-input").fill(token)
    page.get_by_test_id("login").click()
    page.get_by_test_id("monitor-exec-state").wait_for()


def test_login_start_exec_see_own_process_stop(browser: Any, agent: Agent) -> None:
    context, page, dialogs = open_page(browser, agent.url)
    try:
        login(page, ADMIN)
        assert page.get_by_test_id("who").text_content() == "admin (control scope)"
        state = page.get_by_test_id("monitor-exec-state")
        assert state.text_content() == "stopped"
        # The options box is prefilled from the monitor's defaults.
        options = json.loads(page.get_by_test_id("monitor-exec-options").input_value())
        assert options == agent.get("/monitors/exec").json()["options"]
        # The agent's own programs (the process table's tracker, loaded on its own thread
        # at start) stay loaded throughout.
        wait_tracker(agent)
        own = prog_ids_held_by(agent.proc.pid)
        page.get_by_test_id("monitor-exec-start").click()
        expect(state).to_have_text("running", timeout=60_000)  # BCC compiles meanwhile
        assert prog_ids_held_by(agent.proc.pid) - own  # programs really loaded

        marker = f"ui-marker-{uuid.uuid4().hex[:12]}"
        proc = subprocess.Popen(["/bin/echo", marker, XSS], stdout=subprocess.DEVNULL)
        proc.wait()
        row = page.locator(f"[data-testid=event-row][data-event*='{marker}']")
        row.wait_for()
        assert row.count() == 1
        assert row.get_attribute("data-monitor") == "exec"
        assert row.get_attribute("data-pid") == str(proc.pid)
        event = json.loads(row.get_attribute("data-event"))
        assert event["argv"] == ["/bin/echo", marker, XSS] and event["ret"] == 0
        assert event["uid"] == os.getuid()
        # The details column is the monitor's declared summary (GET /monitors), less
        # the fields the row has columns for. The argv is text: shown literally, no
        # element made of it, no script run.
        assert agent.get("/monitors/exec").json()["summary"] == (
            "pid={pid} ppid={ppid} uid={uid} comm={comm} ret={ret} {argv:words}")
        assert row.locator("td.details").text_content() == (
            f"ppid={os.getpid()} ret=0 /bin/echo {marker} {XSS}")
        assert page.locator("[data-testid=events] img").count() == 0
        assert dialogs == []
        # A click shows the whole event as JSON.
        row.click()
        expanded = page.get_by_test_id("event-json")
        assert json.loads(expanded.text_content()) == event

        page.get_by_test_id("monitor-exec-stop").click()
        expect(state).to_have_text("stopped")
        assert agent.get("/monitors/exec").json()["state"] == "stopped"
        assert prog_ids_held_by(agent.proc.pid) == own
        audit = [(e["token"], e["path"], e["status"])
                 for e in agent.get("/audit").json()["entries"]]
        assert ("admin", "/monitors/exec/start", 200) in audit
        assert ("admin", "/monitors/exec/stop", 200) in audit
    finally:
        context.close()


def test_top_list_panel_of_a_running_monitor(browser: Any, agent: Agent) -> None:
    """Generic: a panel per running monitor whose stats declare top lists (net)."""
    from tests.support.tcp import server, start_client

    assert agent.request("POST", "/monitors/net/start", json={}).status_code == 200
    context, page, _ = open_page(browser, agent.url)
    try:
        login(page, ADMIN)
        with server("127.0.0.1", 2, 300) as srv:
            clients = [start_client("127.0.0.1", srv.port, 700) for _ in range(2)]
            srv.received()
        row = page.locator(f"[data-testid=toplist-net-by_bytes] tr[data-row='out 127.0.0.1 "
                           f"{srv.port}']")
        expect(row).to_have_count(1, timeout=20_000)
        # bytes_sent: the two clients' 700 each; bytes_received: 300 each; then the
        # other columns: two connections, no failure.
        expect(row.locator("td")).to_have_text(["out", "127.0.0.1", str(srv.port), "1400",
                                                "600", "2", "0"])
        # The event rows render net's declared summary: a client's close, both ways.
        close = page.locator(f"[data-testid=event-row][data-monitor=net]"
                             f"[data-event*='\"dport\":{srv.port}'][data-event*='\"close\"']")
        expect(close).to_have_count(2, timeout=20_000)
        # Nulls render empty; the clients shut their side down first (closed_by local).
        assert sorted(close.nth(i).locator("td.details").text_content() for i in range(2)) == [
            f"close 127.0.0.1:{c.sport} -> 127.0.0.1:{srv.port} error= sent=700 received=300 "
            "closed_by=local" for c in sorted(clients, key=lambda c: str(c.sport))]
        agent.request("POST", "/monitors/net/stop")
        expect(page.get_by_test_id("toplist-net-by_bytes")).to_have_count(0, timeout=20_000)
    finally:
        agent.request("POST", "/monitors/net/stop")
        context.close()


def test_read_scope_sees_the_page_but_cannot_start(browser: Any, agent: Agent) -> None:
    context, page, _ = open_page(browser, agent.url)
    try:
        login(page, VIEWER)
        assert page.get_by_test_id("who").text_content() == "viewer (read scope)"
        page.get_by_test_id("monitor-exec-start").click()
        expect(page.get_by_test_id("monitor-exec-message")).to_have_text(
            "token 'viewer' has scope read: POST /monitors/exec/start needs scope control")
        assert agent.get("/monitors/exec").json()["state"] == "stopped"
        assert page.get_by_test_id("audit").is_hidden()  # the audit log is control-only
    finally:
        context.close()


def test_wrong_token_keeps_the_login(browser: Any, agent: Agent) -> None:
    context, page, _ = open_page(browser, agent.url)
    try:
        page.get_by_test_id("token-input").fill("not-the-token")
        page.get_by_test_id("login").click()
        expect(page.get_by_test_id("message")).to_have_text("wrong token")
        assert page.get_by_test_id("token-input").is_visible()
        assert context.cookies() == []
    finally:
        context.close()


def test_open_agent_needs_no_login(browser: Any) -> None:
    """api.auth: none (loopback only): the page goes straight to the console."""
    s = settings()
    app = create_app(s, fake_registry(), report=fake_report())
    with thread_server(app, s) as srv:
        context, page, _ = open_page(browser, srv.url)
        try:
            page.get_by_test_id("monitor-fake-state").wait_for()
            assert page.get_by_test_id("who").text_content() == \
                "open: no authentication (api.auth: none)"
            assert page.get_by_test_id("token-input").is_hidden()
        finally:
            context.close()


def test_top_list_panel_of_a_monitor_that_has_one(browser: Any, agent: Agent,
                                                  tmp_path_factory: pytest.TempPathFactory,
                                                  ) -> None:
    """The file monitor's stats describe top lists: the console shows them as tables,
    with the path this test failed to open twice as the most failing one."""
    d = tmp_path_factory.mktemp("ui-file")
    context, page, _dialogs = open_page(browser, agent.url)
    try:
        login(page, ADMIN)
        page.get_by_test_id("monitor-file-options").fill(
            json.dumps({"include_prefixes": [f"{d}/"]}))
        page.get_by_test_id("monitor-file-start").click()
        expect(page.get_by_test_id("monitor-file-state")).to_have_text("running",
                                                                       timeout=90_000)
        missing = f"{d}/missing"
        for _ in range(2):
            subprocess.run(["cat", missing], stderr=subprocess.DEVNULL, check=False)
        table = page.get_by_test_id("toplist-file-most_failing")
        expect(table.locator("tbody tr")).to_have_count(1, timeout=20_000)
        head = table.locator("thead th").all_text_contents()
        # The panel refreshes every 2 s: the row may show the first failure before the
        # second; wait for the count, then read the whole row.
        expect(table.locator("tbody tr td").nth(head.index("failures"))).to_have_text(
            "2", timeout=20_000)
        row = dict(zip(head, table.locator("tbody tr td").all_text_contents(), strict=True))
        assert (row["path"], row["failures"], row["opens"], row["last_error"]) == (
            missing, "2", "2", "ENOENT")
        page.get_by_test_id("monitor-file-stop").click()
        expect(page.get_by_test_id("monitor-file-state")).to_have_text("stopped")
        expect(page.get_by_test_id("top-lists")).to_be_hidden(timeout=10_000)
    finally:
        context.close()


def test_workload_column_process_lineage_and_containers(browser: Any, agent: Agent) -> None:
    """A process this test runs in a docker-named cgroup: its event row shows the
    container's short id, a click opens the process with this test's process as its
    parent, the parent opens with the process among its children, and the containers
    panel counts its exec. A process in a service cgroup shows its unit."""
    cid = uuid.uuid4().hex * 2
    unit = f"ebpf-agent-ui-{cid[:6]}.service"
    base = "/ebpf-agent-surface.slice/system.slice"
    context, page, dialogs = open_page(browser, agent.url)
    try:
        login(page, ADMIN)
        state = page.get_by_test_id("monitor-exec-state")
        if state.text_content() != "running":
            page.get_by_test_id("monitor-exec-start").click()
            expect(state).to_have_text("running", timeout=60_000)
        # A unique duration makes the sleep's argv the test's marker.
        marker = f"600.{uuid.uuid4().int % 10**9}"
        with cgroup_dir(f"{base}/docker-{cid}.scope") as d, \
                cgroup_dir(f"{base}/{unit}") as service:
            child = spawn_in(d, ["/bin/sleep", marker])
            try:
                assert run_in(service, ["/bin/echo", marker]).returncode == 0
                # The argv exactly (the shell that moved itself into the cgroup carries
                # the marker too, in its own exec events).
                row = page.locator("[data-testid=event-row][data-event*="
                                   f"'\"argv\":[\"/bin/sleep\",\"{marker}\"]']")
                row.wait_for()
                assert row.get_attribute("data-pid") == str(child.pid)
                assert row.get_by_test_id("event-workload").text_content() == cid[:12]
                echo = page.locator("[data-testid=event-row][data-event*="
                                    f"'\"argv\":[\"/bin/echo\",\"{marker}\"]']")
                echo.wait_for()
                assert echo.get_by_test_id("event-workload").text_content() == unit

                row.click()
                detail = page.get_by_test_id("process-detail")
                expect(detail).to_have_attribute("data-pid", str(child.pid))
                assert detail.get_attribute("data-process-id") == \
                    local_identity().of_pid(child.pid)
                ancestors = page.get_by_test_id("process-ancestors").get_by_test_id(
                    "process-link")
                assert ancestors.first.get_attribute("data-pid") == str(os.getpid())
                assert page.get_by_test_id("process-children").text_content() == "none"
                ancestors.first.click()  # open the parent: the sleep is among its children
                expect(detail).to_have_attribute("data-pid", str(os.getpid()))
                child_link = page.get_by_test_id("process-children").locator(
                    f"[data-testid=process-link][data-pid='{child.pid}']")
                expect(child_link).to_have_count(1)
                assert cid[:12] in child_link.text_content()
                child_link.click()
                expect(detail).to_have_attribute("data-pid", str(child.pid))

                ctr = page.locator(f"[data-testid=container-row][data-container-id='{cid}']")
                expect(ctr).to_have_attribute("data-events", "1", timeout=10_000)
                assert ctr.locator("td").first.text_content() == cid[:12]
                assert f"docker-{cid}.scope" in ctr.text_content()
            finally:
                child.kill()
                child.wait()
        assert dialogs == []
    finally:
        context.close()

"""The controller's inventory: YAML hosts with defaults, tokens, labels, selection."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.fleet.cli import show_stats
from agent.fleet.client import HostResult
from agent.fleet.inventory import Host, InventoryError, default_token, resolve_hosts
from agent.fleet.ops import (
    UsageError,
    fleet_syscalls,
    fleet_top_lists,
    parse_options,
    parse_target_values,
)


def write(tmp_path: Path, text: str, name: str = "inv.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_inventory_defaults_tokens_labels_and_select(tmp_path: Path) -> None:
    (tmp_path / "tok").write_text("from-file\n")
    inv = write(tmp_path, f"""
defaults:
  token_file: {tmp_path / 'tok'}
  labels: {{env: prod}}
hosts:
  - {{name: web1, url: "http://10.0.0.1:8765/", labels: {{role: web}}}}
  - {{name: db1, url: "https://10.0.0.2:8765", token: own, labels: {{role: db, env: test}}}}
""")
    hosts = resolve_hosts(inv, [], [], token_fallback=None)
    assert hosts == [
        Host("web1", "http://10.0.0.1:8765", "from-file", {"env": "prod", "role": "web"}),
        Host("db1", "https://10.0.0.2:8765", "own", {"env": "test", "role": "db"}),
    ]
    assert [h.name for h in resolve_hosts(inv, [], ["role=db"], token_fallback=None)] == ["db1"]
    assert [h.name for h in resolve_hosts(inv, [], ["env=prod", "role=web"],
                                          token_fallback=None)] == ["web1"]
    assert [h.name for h in resolve_hosts(inv, [], ["name=web1"], token_fallback=None)] == [
        "web1"]
    with pytest.raises(InventoryError, match="matches no host"):
        resolve_hosts(inv, [], ["role=cache"], token_fallback=None)


def test_host_args_env_default_and_token_fallback(tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    generated = tmp_path / "run-token"
    generated.write_text("generated-token\n")
    hosts = resolve_hosts(None, ["a=http://127.0.0.1:1"], [], token_fallback=generated)
    assert hosts == [Host("a", "http://127.0.0.1:1", "generated-token", {})]
    # --token fills hosts without one; the inventory's own tokens win.
    hosts = resolve_hosts(None, ["a=http://127.0.0.1:1"], [], token="cli",
                          token_fallback=tmp_path / "absent")
    assert hosts[0].token == "cli"
    # --token wins over a generated token file that exists (an agent on this machine).
    hosts = resolve_hosts(None, ["a=http://127.0.0.1:1"], [], token="cli",
                          token_fallback=generated)
    assert hosts[0].token == "cli"
    inv = write(tmp_path, "hosts:\n  - {name: own, url: 'http://127.0.0.1:3', token: mine}\n"
                          "  - {name: bare, url: 'http://127.0.0.1:4'}\n")
    assert [h.token for h in resolve_hosts(inv, [], [], token_fallback=generated)] == [
        "mine", "generated-token"]
    assert [h.token for h in resolve_hosts(inv, [], [], token="cli",
                                           token_fallback=generated)] == ["mine", "cli"]
    assert default_token(tmp_path / "absent") is None
    inv = write(tmp_path, "hosts:\n  - {name: x, url: 'http://127.0.0.1:2'}\n")
    monkeypatch.setenv("EBPF_AGENTCTL_INVENTORY", str(inv))
    assert [h.name for h in resolve_hosts(None, [], [], token_fallback=None)] == ["x"]


@pytest.mark.parametrize("text,message", [
    ("hosts: 3", "expected a mapping with a 'hosts' list"),
    ("hosts:\n  - {url: 'http://a:1'}", "name is required"),
    ("hosts:\n  - {name: a, url: 'ftp://a'}", "url must be http"),
    ("hosts:\n  - {name: a, url: 'http://a:1', colour: red}", "unknown keys: colour"),
    ("hosts:\n  - {name: a, url: 'http://a:1'}\n  - {name: a, url: 'http://b:1'}",
     "appears twice"),
    ("hosts:\n  - {name: a, url: 'http://a:1', token_file: /nonexistent/tok}",
     "token_file /nonexistent/tok"),
    ("hosts: [\n", "invalid YAML"),
    ("hosts: []\nextra: 1", "unknown keys: extra"),
])
def test_inventory_errors_name_the_problem(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(InventoryError, match=message):
        resolve_hosts(write(tmp_path, text), [], [], token_fallback=None)


def test_no_hosts_and_bad_arguments() -> None:
    with pytest.raises(InventoryError, match="no hosts"):
        resolve_hosts(None, [], [], token_fallback=None)
    with pytest.raises(InventoryError, match="NAME=URL"):
        resolve_hosts(None, ["justaname"], [], token_fallback=None)
    with pytest.raises(InventoryError, match="key=value"):
        resolve_hosts(None, ["a=http://x:1"], ["role"], token_fallback=None)


def test_option_and_target_parsing() -> None:
    assert parse_options(["max_args=40", "name=abc", "flag=true"], None) == {
        "max_args": 40, "name": "abc", "flag": True}
    assert parse_options([], '{"a": [1]}') == {"a": [1]}
    assert parse_options(["b=2"], '{"a": 1}') == {"a": 1, "b": 2}
    assert parse_options([], None) is None
    with pytest.raises(UsageError):
        parse_options([], "[1]")
    assert parse_target_values("pids", ["1,2", "3"]) == [1, 2, 3]
    assert parse_target_values("comms", ["bash", "sh"]) == ["bash", "sh"]
    with pytest.raises(UsageError):
        parse_target_values("pids", ["x"])


def test_fleet_wide_syscall_top_sums_hosts() -> None:
    def result(name: str, rows: list[tuple[str, int]]) -> HostResult:
        table = [{"name": n, "count": c, "errors": 1, "total_ns": c * 10} for n, c in rows]
        return HostResult(Host(name, "http://x:1"), {"syscall": {"syscalls": table}})

    results = [result("a", [("read", 100), ("write", 50)]),
               result("b", [("write", 80), ("openat", 5)]),
               HostResult(Host("c", "http://x:2"), error="unreachable")]
    top = fleet_syscalls(results, limit=2)
    assert top == [
        {"name": "write", "count": 130, "errors": 2, "total_ns": 1300, "hosts": 2},
        {"name": "read", "count": 100, "errors": 1, "total_ns": 1000, "hosts": 1},
    ]


def test_fleet_wide_top_lists_sum_hosts_by_declared_key(capsys: pytest.CaptureFixture) -> None:
    """Generic: driven by the top_lists a monitor's stats describe (net's endpoints,
    ordered by the sum of several columns)."""
    key = ["direction", "address", "port"]

    def row(addr: str, conns: int, nbytes: int) -> dict:
        return {"direction": "out", "address": addr, "port": 443, "connections": conns,
                "bytes": nbytes}

    def result(name: str, rows: list[dict]) -> HostResult:
        lists = {"by_connections": {"key": key, "sort": ["connections"], "rows": rows},
                 "by_bytes": {"key": key, "sort": ["bytes"], "rows": rows}}
        return HostResult(Host(name, "http://x:1"), {"net": {"top_lists": lists,
                                                              "endpoints": 9}})

    results = [result("a", [row("10.0.0.1", 5, 100), row("10.0.0.2", 1, 900)]),
               result("b", [row("10.0.0.2", 2, 50)]),
               HostResult(Host("c", "http://x:2"), error="unreachable")]
    top = fleet_top_lists(results, "net", limit=1)
    assert top == {
        "by_connections": [{**row("10.0.0.1", 5, 100), "hosts": 1}],
        "by_bytes": [{**row("10.0.0.2", 3, 950), "hosts": 2}],
    }
    assert fleet_top_lists(results, "syscall") == {}  # nothing described: no top lists
    show_stats(results, "table", "net", 1, "count")
    out = capsys.readouterr().out
    assert "fleet-wide by_bytes" in out and "HOSTS" in out
    assert [ln.split() for ln in out.splitlines() if "10.0.0.2" in ln] == [
        ["out", "10.0.0.2", "443", "2", "3", "950"]]  # key, hosts, the summed columns


def test_fleet_wide_top_lists_sum_hosts_by_key() -> None:
    """Any monitor's self-described top lists (the file monitor's, for one): rows with
    the same key add up, ordered by the list's sort column; hosts that failed or do
    not run the monitor add nothing."""
    def result(name: str, rows: list[tuple[str, int, int]]) -> HostResult:
        data = [{"path": p, "opens": o, "failures": f, "last_error": "ENOENT"}
                for p, o, f in rows]
        lists = {"most_opened": {"key": ["path"], "sort": "opens", "rows": data},
                 "most_failing": {"key": ["path"], "sort": "failures", "rows": data}}
        return HostResult(Host(name, "http://x:1"), {"file": {"top_lists": lists, "paths": 9}})

    results = [result("a", [("/etc/passwd", 10, 0), ("/x", 3, 3)]),
               result("b", [("/x", 9, 1), ("/etc/hosts", 1, 0)]),
               HostResult(Host("c", "http://x:2"), {"file": {}}),
               HostResult(Host("d", "http://x:3"), error="unreachable")]
    tops = fleet_top_lists(results, "file", limit=2)
    assert tops["most_opened"] == [
        {"path": "/x", "opens": 12, "failures": 4, "hosts": 2},
        {"path": "/etc/passwd", "opens": 10, "failures": 0, "hosts": 1},
    ]
    assert [r["path"] for r in tops["most_failing"]] == ["/x", "/etc/hosts"]
    assert fleet_top_lists(results, "net", limit=2) == {}

"""Config: the default file loads; errors name the file, the field and the reason."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.config import DEFAULT_CONFIG, ConfigError, absolute_paths, load_settings
from agent.monitors.registry import discover_monitors


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "agent.yaml"
    p.write_text(text)
    return p


def test_default_config_loads_and_validates_monitor_options() -> None:
    s = load_settings(DEFAULT_CONFIG, registry=discover_monitors())
    assert (s.api.host, s.api.port) == ("127.0.0.1", 8765)
    assert s.monitors["exec"].enabled and s.monitors["exec"].options["max_args"] == 20


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("api:\n  port: 70000\n", "api.port: Input should be less than or equal to 65535"),
        ("api:\n  prot: 1\n", "api.prot: unknown key"),
        ("bogus: 1\n", "bogus: unknown key"),
        ("transport:\n  ringbuf_pages: 3\n", "transport.ringbuf_pages: Value error, 3 is not"),
        ("output:\n  formats: [xml]\n", "output.formats.0: Input should be"),
        ("stream:\n  replay_bytes: 1000\n",
         "stream.replay_bytes: Input should be greater than or equal to 65536"),
        ("monitors:\n  exec:\n    options:\n      max_args: 0\n",
         "monitors.exec.options.max_args: Input should be greater than or equal to 1"),
        ("monitors:\n  exec:\n    options:\n      colour: red\n",
         "monitors.exec.options.colour: unknown key"),
        ("monitors:\n  nosuch: {}\n", "monitors.nosuch: unknown monitor"),
        ("api: [1, 2\n", "invalid YAML"),
        ("- a\n- b\n", "the top level must be a mapping"),
    ],
)
def test_errors_name_file_and_field(tmp_path: Path, text: str, message: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as err:
        load_settings(path, registry=discover_monitors())
    assert str(path) in str(err.value)
    assert message in str(err.value)


def test_environment_overrides_file_and_flags_override_both(tmp_path, monkeypatch) -> None:
    path = write(tmp_path, "api:\n  port: 1000\n  host: 127.0.0.2\n")
    monkeypatch.setenv("EBPF_AGENT_API__PORT", "2000")
    s = load_settings(path)
    assert (s.api.host, s.api.port) == ("127.0.0.2", 2000)
    s = load_settings(path, {"api": {"port": 3000}})
    assert (s.api.host, s.api.port) == ("127.0.0.2", 3000)


def test_bad_environment_value_is_attributed_to_the_environment(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("EBPF_AGENT_API__PORT", "many")
    with pytest.raises(ConfigError, match="EBPF_AGENT_.*api.port"):
        load_settings(write(tmp_path, "{}\n"))


def test_token_sources(tmp_path, monkeypatch) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("from-file\n")
    token_file.chmod(0o600)
    s = load_settings(write(tmp_path, f"token_file: {token_file}\n"))
    assert s.resolve_token() == "from-file"
    monkeypatch.setenv("EBPF_AGENT_TOKEN", "from-env")
    assert load_settings(write(tmp_path, "{}\n")).resolve_token() == "from-env"
    assert "from-env" not in repr(load_settings(write(tmp_path, "{}\n")))


# -- issue 7: config errors are one clear line ----------------------------------------------
def test_yaml_that_is_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "agent.yaml"
    path.write_bytes(b"api:\n  host: \xff\xfe\n")
    with pytest.raises(ConfigError, match=f"{path}: not UTF-8 text"):
        load_settings(path)


@pytest.mark.parametrize(("content", "mode", "message"), [
    (b"tok\xffen\n", 0o600, "not UTF-8 text"),
    (b"secret\n", 0o640, "readable by group or others"),
    (b"secret\n", 0o604, "readable by group or others"),
    (b"\n", 0o600, "is empty"),
])
def test_bad_token_files_are_refused(tmp_path: Path, content: bytes, mode: int,
                                     message: str) -> None:
    token_file = tmp_path / "token"
    token_file.write_bytes(content)
    token_file.chmod(mode)
    s = load_settings(write(tmp_path, f"token_file: {token_file}\n"))
    with pytest.raises(ConfigError, match=message):
        s.resolve_token()


@pytest.mark.parametrize(("name", "value", "field", "expected"), [
    ("EBPF_AGENT_TARGETS__PIDS", "1,2", "pids", [1, 2]),
    ("EBPF_AGENT_TARGETS__PIDS", "[1, 2]", "pids", [1, 2]),
    ("EBPF_AGENT_TARGETS__COMMS", "bash, sshd", "comms", ["bash", "sshd"]),
    ("EBPF_AGENT_API__TRUSTED_HOSTS", "a,b", "trusted_hosts", ["a", "b"]),
])
def test_list_environment_variables_take_comma_lists_or_json(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str, value: str, field: str,
        expected: list) -> None:
    monkeypatch.setenv(name, value)
    s = load_settings(write(tmp_path, "{}\n"))
    section = s.targets if "TARGETS" in name else s.api
    assert getattr(section, field) == expected


def test_an_environment_value_is_blamed_on_the_environment_not_the_file(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EBPF_AGENT_API__PORT", "abc")
    path = write(tmp_path, "api:\n  port: 1000\n")
    with pytest.raises(ConfigError) as err:
        load_settings(path)
    assert str(err.value).startswith("environment EBPF_AGENT_API__PORT: api.port:")
    assert str(path) not in str(err.value)


@pytest.mark.parametrize(("text", "message"), [
    ("targets:\n  comms: [abcdefghijklmnop]\n", "is 16 bytes"),
    ("targets:\n  comms: [\"éééééééé\"]\n", "is 16 bytes"),
    ("targets:\n  pids: [1, 2, 3]\n  max_pids: 2\n", "3 pids exceed max_pids=2"),
    ("targets:\n  comms: [\"\"]\n", "empty"),
    ("targets:\n  cgroups: [system.slice]\n", "targets.cgroups.0: Value error, 'system.slice' "
     "must start with '/'"),
    ("targets:\n  containers: [abc]\n", "targets.containers.0: Value error, 'abc' is not a "
     "container id prefix"),
    ("targets:\n  containers: [aaaaaaaaaaaa, bbbbbbbbbbbb]\n  max_containers: 1\n",
     "2 containers exceed max_containers=1"),
])
def test_targets_the_kernel_maps_cannot_hold(tmp_path: Path, text: str, message: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError, match=message) as err:
        load_settings(path)
    assert str(path) in str(err.value)


def test_cgroup_and_container_targets_are_normalized(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EBPF_AGENT_TARGETS__CONTAINERS", "4f3c4f3c4f3c,4f3c4f3c4f3c4f3c")
    s = load_settings(write(tmp_path, "targets:\n  cgroups: [/system.slice/, //a//b]\n"))
    assert s.targets.cgroups == ["/system.slice", "/a/b"]
    assert s.targets.containers == ["4f3c4f3c4f3c", "4f3c4f3c4f3c4f3c"]
    assert (s.targets.limits().cgroups, s.targets.limits().containers) == (1024, 1024)


def test_a_15_byte_comm_fits(tmp_path: Path) -> None:
    s = load_settings(write(tmp_path, "targets:\n  comms: [\"éééééééa\"]\n"))
    assert s.targets.comms == ["éééééééa"]


def test_relative_paths_become_absolute(tmp_path: Path) -> None:
    s = load_settings(write(tmp_path, "output:\n  directory: out\npid_file: run/a.pid\n"
                                      "logging:\n  file: log/a.log\n"))
    s = absolute_paths(s, tmp_path)
    assert s.output.directory == tmp_path / "out"
    assert s.pid_file == tmp_path / "run" / "a.pid"
    assert s.logging.file == tmp_path / "log" / "a.log"
    assert absolute_paths(s, Path("/elsewhere")) == s

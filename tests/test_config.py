"""Config: the default file loads; errors name the file, the field and the reason."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.config import DEFAULT_CONFIG, ConfigError, load_settings
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
    s = load_settings(write(tmp_path, f"token_file: {token_file}\n"))
    assert s.resolve_token() == "from-file"
    monkeypatch.setenv("EBPF_AGENT_TOKEN", "from-env")
    assert load_settings(write(tmp_path, "{}\n")).resolve_token() == "from-env"
    assert "from-env" not in repr(load_settings(write(tmp_path, "{}\n")))

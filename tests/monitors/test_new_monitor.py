"""Adding a monitor touches no shared file: tools/new_monitor.py generates a minimal
monitor folder into a temporary package, and that folder is discovered, validated,
listed by the API and runnable on the real kernel (CONTRIBUTING.md, "Adding a monitor")."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import httpx
import pytest
from pydantic import ValidationError

from agent.api.app import create_app
from agent.monitors.registry import MonitorRegistry, default_registry
from tests.support.api import read_sse, settings, thread_server
from tests.support.kernel import REPO, require_kernel

NAME = "hello"
TOOL = REPO / "tools" / "new_monitor.py"


@dataclass
class Generated:
    package: str  # import name of the temporary package
    root: Path  # its parent directory (on sys.path)
    files: list[Path]
    registry: MonitorRegistry  # agent.monitors and the temporary package


@pytest.fixture(scope="module")
def generated(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Generated]:
    root = tmp_path_factory.mktemp("newmon")
    package = f"extmons_{uuid.uuid4().hex[:8]}"  # unique: sys.modules caches packages
    (root / package).mkdir()
    (root / package / "__init__.py").write_text("")
    out = subprocess.run(
        [sys.executable, str(TOOL), NAME, "--into", str(root / package), "--tests",
         str(root / "tests"), "--package", package],
        capture_output=True, text=True, check=True,
    )
    files = [Path(line) for line in out.stdout.splitlines()]
    sys.path.insert(0, str(root))
    try:
        registry = MonitorRegistry()
        registry.discover()
        registry.discover(package)
        yield Generated(package, root, files, registry)
    finally:
        sys.path.remove(str(root))
        for mod in [m for m in sys.modules if m == package or m.startswith(f"{package}.")]:
            del sys.modules[mod]


def test_the_tool_writes_one_folder_and_one_test_file(generated: Generated) -> None:
    folder = generated.root / generated.package / NAME
    assert sorted(generated.files) == sorted([
        folder / "__init__.py", folder / "monitor.py", folder / f"{NAME}.h",
        folder / f"{NAME}.c", generated.root / "tests" / f"test_{NAME}.py",
    ])
    # Nothing in the repository changed.
    status = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--", "agent"],
                            capture_output=True, text=True, check=True).stdout
    assert f"/{NAME}/" not in status


def test_discovered_from_an_extra_package_and_validated(generated: Generated) -> None:
    reg = generated.registry
    assert {"exec", "func", "syscall", NAME} <= set(reg.names())
    assert NAME not in default_registry  # the app's registry is untouched
    cls = reg.get(NAME)
    assert cls.__module__ == f"{generated.package}.{NAME}.monitor"
    assert cls.description == "getppid(2) calls, one event each"
    assert cls.Options().model_dump() == {"label": NAME}
    with pytest.raises(ValidationError):
        cls.Options(label="x" * 40)
    with pytest.raises(ValidationError):
        cls.Options(bogus=1)


def load_test_module(path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"generated_{path.stem}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_generated_tests_pass(generated: Generated, monkeypatch: pytest.MonkeyPatch) -> None:
    require_kernel()
    tests = load_test_module(generated.root / "tests" / f"test_{NAME}.py")
    # loaded_monitor() uses the default registry: let it see the temporary package.
    monkeypatch.setattr("tests.support.monitors.default_registry", generated.registry)
    tests.test_event_layout()
    tests.test_event_of_a_getppid_call(None)


def test_listed_validated_started_and_streaming_over_the_api(
    generated: Generated, tmp_path: Path
) -> None:
    require_kernel()
    s = settings(output={"directory": str(tmp_path), "formats": []}, monitors={},
                 stream={"heartbeat_s": 0.5})
    app = create_app(s, generated.registry)
    with thread_server(app, s) as srv, httpx.Client(base_url=srv.url, timeout=120) as c:
        listed = {m["name"]: m for m in c.get("/monitors").json()}
        assert listed[NAME]["state"] == "stopped"
        assert listed[NAME]["options"] == {"label": NAME}
        schema = c.get(f"/monitors/{NAME}/schema").json()
        assert schema["properties"]["label"]["maxLength"] == 32
        components = c.get("/openapi.json").json()["components"]["schemas"]
        assert {"HelloOptions", "HelloStatsQuery", "HelloEvent"} <= set(components)
        assert {"cpu", "label", "ppid"} <= set(components["HelloEvent"]["properties"])
        r = c.post(f"/monitors/{NAME}/start", json={"label": "y" * 40})
        assert r.status_code == 422, r.text
        assert c.get(f"/monitors/{NAME}").json()["state"] == "stopped"
        r = c.post(f"/monitors/{NAME}/start", json={"label": "api"})
        assert r.status_code == 200, r.text
        assert r.json()["state"] == "running"
        reader = read_sse(f"{srv.url}/events", params={"monitor": NAME})
        try:
            child = subprocess.run(
                [sys.executable, "-c", "import os; os.getppid(); print(os.getpid())"],
                capture_output=True, text=True, check=True)
            pid = int(child.stdout)
            msg = reader.wait_for(lambda m: m.data.get("pid") == pid, timeout=30)
        finally:
            reader.stop()
        r = c.post(f"/monitors/{NAME}/stop")
        assert r.status_code == 200 and r.json()["state"] == "stopped"
    e = msg.data
    assert msg.event == NAME
    assert (e["monitor"], e["tid"], e["label"]) == (NAME, pid, "api")
    assert (e["ppid"], e["uid"], e["gid"]) == (
        os.getpid(), os.getuid(), os.getgid())

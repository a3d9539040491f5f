"""The container image, built without a Docker daemon (scripts/build-image.sh: debootstrap
base + buildah bud --isolation chroot --storage-driver vfs), run the way
docker/compose.yaml runs it: its root filesystem, the host's kernel, only the compose
file's mounts and only the capabilities it grants.

`make test` builds the image before pytest (2-3 min the first time on a 2-core VM under
load: debootstrap ~40 s, the build 40 s-2 min; nothing when the sources are unchanged),
so these tests download nothing; they fit CI's time and run there. Marked `slow` (they
take ~30 s); `make image-test` runs only them. Without an image of the current tree they
skip, or fail under CI=true."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import yaml

from tests.support.api import Agent, free_port, wait_until_ready
from tests.support.kernel import IN_CI, require_kernel

REPO = Path(__file__).resolve().parents[2]
IMAGE = "localhost/ebpf-agent:latest"
LABEL = "org.ebpf-agent.source"  # scripts/build-image.sh: hash of what the image copies
IMAGE_DIR = Path(os.environ.get("EBPF_AGENT_IMAGE_DIR", REPO / "build" / "image"))
ENTRYPOINT = "/opt/ebpf-agent/.venv/bin/ebpf-agent"

pytestmark = [pytest.mark.slow, pytest.mark.kernel]


def buildah(*args: str, **kw: object) -> subprocess.CompletedProcess[str]:
    cmd = ["buildah", "--root", str(IMAGE_DIR / "storage"), "--runroot", str(IMAGE_DIR / "run"),
           "--storage-driver", "vfs", *args]
    return subprocess.run(cmd, capture_output=True, text=True, check=True, **kw)  # type: ignore[call-overload]


@dataclass
class Rootfs:
    path: Path
    config: dict


def image_problem() -> str | None:
    """Why there is no image of the current sources to test, or None."""
    want = subprocess.run(["bash", "scripts/build-image.sh", "--source-hash"], cwd=REPO,
                          capture_output=True, text=True, check=True).stdout.strip()
    try:
        config = json.loads(buildah("inspect", "--type", "image", IMAGE).stdout)
    except subprocess.CalledProcessError:
        return f"no image {IMAGE} in {IMAGE_DIR}"
    have = (config["Docker"]["config"].get("Labels") or {}).get(LABEL)
    if have != want:
        return f"{IMAGE} was built from other sources ({LABEL}={have}, the tree is {want})"
    return None


@pytest.fixture(scope="module")
def rootfs() -> Iterator[Rootfs]:
    """The image `make test` (scripts/build-image.sh) built from this tree, mounted. The
    build runs before pytest, not here: nothing downloads while tests run."""
    require_kernel()
    problem = image_problem()
    if problem:
        message = f"{problem}: run `make image` (make test does)"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)
    config = json.loads(buildah("inspect", "--type", "image", IMAGE).stdout)
    ctr = buildah("from", IMAGE).stdout.strip()
    try:
        mnt = Path(buildah("mount", ctr).stdout.strip())
        yield Rootfs(mnt, config)
    finally:
        subprocess.run(["buildah", "--root", str(IMAGE_DIR / "storage"), "--runroot",
                        str(IMAGE_DIR / "run"), "--storage-driver", "vfs", "rm", ctr],
                       capture_output=True)


def compose_mounts() -> list[tuple[str, str, bool]]:
    """(host path, container path, read-only) of docker/compose.yaml's agent service."""
    compose = yaml.safe_load((REPO / "docker" / "compose.yaml").read_text())
    mounts = []
    for v in compose["services"]["ebpf-agent"]["volumes"]:
        if v["type"] == "bind":
            mounts.append((v["source"], v["target"], bool(v.get("read_only"))))
    return mounts


def compose_caps() -> list[str]:
    svc = yaml.safe_load((REPO / "docker" / "compose.yaml").read_text())["services"]["ebpf-agent"]
    assert svc["cap_drop"] == ["ALL"]
    return [c.lower() for c in svc["cap_add"]]


def in_image(root: Rootfs, command: list[str], caps: list[str] | None = None,
             data: Path | None = None, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(image_argv(root, command, caps, data), capture_output=True,
                          text=True, timeout=timeout)


def image_argv(root: Rootfs, command: list[str], caps: list[str] | None = None,
               data: Path | None = None, files: dict[str, Path] | None = None) -> list[str]:
    """``command`` chrooted into the image as compose.yaml runs it: a read-only root file
    system, /tmp a tmpfs, ``data`` (a host directory) as the /var/lib/ebpf-agent volume,
    ``files`` (image path: host file) bound in like compose secrets, compose.yaml's bind
    mounts, and only ``caps`` when given. All in a private mount namespace: nothing leaks
    to the host."""
    q = shlex.quote
    mnt = q(str(root.path))
    for target in ("/lib/modules", "/usr/src", "/var/lib/ebpf-agent"):  # mount points
        (root.path / target.lstrip("/")).mkdir(parents=True, exist_ok=True)
    for target in files or {}:
        (root.path / target.lstrip("/")).parent.mkdir(parents=True, exist_ok=True)
        (root.path / target.lstrip("/")).touch()
    steps = [f"mount --bind {mnt} {mnt}", f"mount -o remount,bind,ro {mnt}",
             f"mount -t proc proc {mnt}/proc",
             # /sys read-only, as a container engine mounts it; the binds go on top.
             f"mount -t sysfs -o ro sysfs {mnt}/sys",
             f"mount -t tmpfs tmpfs {mnt}/tmp"]
    if data is not None:
        steps.append(f"mount --bind {q(str(data))} {mnt}/var/lib/ebpf-agent")
    for target, source in (files or {}).items():
        steps.append(f"mount --bind {q(str(source))} {q(f'{root.path}{target}')}")
    for source, target, ro in compose_mounts():
        dest = q(f"{root.path}{target}")
        steps.append(f"mount --rbind {q(source)} {dest}")
        if ro:
            steps.append(f"mount -o remount,bind,ro {dest}")
    limit = ""
    if caps is not None:  # the image's own setpriv, after chroot (which needs CAP_SYS_CHROOT)
        bounding = ",".join(["-all", *(f"+{c}" for c in caps)])
        limit = f"setpriv --bounding-set {bounding} --inh-caps -all -- "
    steps.append(f"exec chroot {mnt} {limit}" + " ".join(q(c) for c in command))
    return ["unshare", "--mount", "--propagation", "private", "sh", "-ec", " && ".join(steps)]


def test_image_has_the_entry_point(rootfs: Rootfs) -> None:
    config = rootfs.config["Docker"]["config"]
    assert config["Entrypoint"][0] == ENTRYPOINT
    assert config["Cmd"] == ["serve", "--host", "0.0.0.0"]
    binary = rootfs.path / ENTRYPOINT.lstrip("/")
    assert binary.is_file() and os.access(binary, os.X_OK)


def test_image_runs_the_compiled_per_event_path(rootfs: Rootfs) -> None:
    """The image's wheel was built with gcc in its own stage (docker/Dockerfile): the
    agent in the image decodes and stores events with the extensions, not the Python
    fallbacks, and the image that runs has no compiler."""
    python = "/opt/ebpf-agent/.venv/bin/python"
    done = in_image(rootfs, [python, "-c",
                             "from agent.monitors import compiled; from agent.stream import ring; "
                             "print(compiled.available(), ring.compiled_available())"])
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["True", "True"]
    assert not (rootfs.path / "usr/bin/gcc").exists()


def test_check_runs_in_the_image_against_the_host_kernel(rootfs: Rootfs) -> None:
    done = in_image(rootfs, [ENTRYPOINT, "check", "--json"])
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["kernel"] == os.uname().release
    assert report["features"]["bcc"]["available"], report["features"]["bcc"]
    supported = {m["name"]: m["supported"] for m in report["monitors"]}
    assert supported["exec"] and supported["syscall"], report["monitors"]


def test_exec_monitor_runs_in_the_image_with_compose_caps_only(rootfs: Rootfs,
                                                                tmp_path: Path) -> None:
    """What compose.yaml grants (CAP_BPF, CAP_PERFMON, read-only root, tracefs, BTF and
    headers) is enough: the image's agent sees the exact exec of a process this test
    starts, and writes it to the data volume."""
    marker = f"image-{os.getpid()}-{time.monotonic_ns()}"
    result: dict[str, subprocess.CompletedProcess[str]] = {}

    def agent() -> None:
        result["agent"] = in_image(rootfs, [
            ENTRYPOINT, "run", "exec", "--duration", "10", "--format", "jsonl",
            "--output-dir", "/var/lib/ebpf-agent", "--comm", "echo"],
            caps=compose_caps(), data=tmp_path)

    thread = threading.Thread(target=agent)
    thread.start()
    jsonl = tmp_path / "exec.jsonl"  # the data volume, seen from the host
    seen = None
    while seen is None and thread.is_alive():
        subprocess.run(["/bin/echo", marker], capture_output=True, check=True)
        time.sleep(0.5)
        if jsonl.exists():
            events = [json.loads(line) for line in jsonl.read_text().splitlines()]
            seen = next((e for e in events if e["argv"] == ["/bin/echo", marker]), None)
    thread.join(60)
    agent_run = result["agent"]
    assert agent_run.returncode == 0, agent_run.stderr[-3000:]
    assert seen is not None, agent_run.stderr[-3000:]
    assert (seen["filename"], seen["comm"], seen["ret"], seen["uid"]) == \
        ("/bin/echo", "echo", 0, 0)
    assert seen["ppid"] == os.getpid()


@pytest.mark.parametrize("missing", ["bpf", "perfmon"])
def test_each_compose_capability_is_needed(rootfs: Rootfs, missing: str) -> None:
    """Without either capability compose.yaml grants, the monitor cannot load (exit 3,
    the kernel's EPERM): the grant is the minimum, and the limit above is real."""
    caps = [c for c in compose_caps() if c != missing]
    assert len(caps) == len(compose_caps()) - 1
    done = in_image(rootfs, [ENTRYPOINT, "run", "exec", "--duration", "1", "--format",
                             "jsonl", "--output-dir", "/tmp/out"], caps=caps)
    assert done.returncode == 3, done.stderr[-2000:]
    assert "Operation not permitted" in done.stderr


def test_serve_runs_in_the_image_as_compose_runs_it(rootfs: Rootfs, tmp_path: Path) -> None:
    """The entry point with `serve`, compose.yaml's environment (token from the secret
    file, output on the volume), its mounts and capabilities: ready with the token, 401
    without, and the exec monitor's counter in /metrics."""
    compose = yaml.safe_load((REPO / "docker" / "compose.yaml").read_text())
    svc = compose["services"]["ebpf-agent"]
    token = tmp_path / "token"
    token.write_text("image-token-0123456789\n")
    token.chmod(0o600)  # README: `install -m 0600 ... docker/token`
    data = tmp_path / "data"
    data.mkdir()
    entry = rootfs.config["Docker"]["config"]["Entrypoint"]
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("EBPF_AGENT_")}
    env.update(svc["environment"])
    log = tmp_path / "serve.log"
    with open(log, "wb") as out:
        # Loopback of this host instead of compose's 0.0.0.0 + published port.
        proc = subprocess.Popen(
            image_argv(rootfs, [*entry, "serve", "--host", "127.0.0.1", "--port", str(port)],
                       caps=compose_caps(), data=data,
                       files={"/run/secrets/ebpf-agent-token": token}),
            stdout=out, stderr=subprocess.STDOUT, env=env)
    agent = Agent(proc, f"http://127.0.0.1:{port}", "image-token-0123456789", log,
                  {"Authorization": "Bearer image-token-0123456789"})
    try:
        wait_until_ready(agent, timeout=120)
        assert httpx.get(f"{agent.url}/ready", timeout=10).status_code == 401
        monitors = {m["name"]: m["state"] for m in agent.get("/monitors").json()}
        assert monitors["exec"] == "running"  # enabled in the image's config/agent.yaml
        metrics = agent.get("/metrics").text
        assert 'ebpf_agent_monitor_running{monitor="exec"} 1.0' in metrics
    finally:
        assert agent.stop() == 0, log.read_text()[-3000:]

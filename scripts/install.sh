#!/usr/bin/env bash
# Idempotent set-up of a Debian 12 host for ebpf-agent (see docs/kernel.md).
# Every step checks first and skips what is already done.
set -euo pipefail
cd "$(dirname "$0")/.."

log() { printf '[install] %s\n' "$*"; }

need_root() {
  if [ "$(id -u)" -ne 0 ]; then
    echo "install.sh: must run as root (apt-get, mounts, /lib/modules)" >&2
    exit 1
  fi
}

DEB_PACKAGES=(python3-bpfcc bpfcc-tools bpftool bpftrace linux-headers-amd64 python3-venv python3-pip gcc libc6-dev util-linux procps iproute2
  # python3-dev: Python.h for the compiled per-event path (agent/monitors/fastpath.c,
  # built by setup.py at pip install; gcc and libc6-dev above compile it).
  python3-dev
  # strace: the ground truth the file monitor's kernel tests compare with.
  strace
  # openssl: the self-signed certificates of the TLS tests (tests/support/api.py).
  openssl
  # chromium: the headless browser the /ui tests drive through Playwright.
  # The consumers the packaging tests run (tests/packaging): Prometheus and promtool,
  # systemd-analyze, and the daemonless image build (buildah, debootstrap).
  prometheus systemd buildah debootstrap chromium)

install_debs() {
  local missing=()
  for p in "${DEB_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
  done
  if ((${#missing[@]})); then
    log "apt-get install ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"
  else
    log "Debian packages present"
  fi
}

quiet_system_prometheus() {
  # Debian's prometheus package may start a server on :9090. Tests start their own on a
  # free loopback port and never use it; stop and disable it so it scrapes nothing here.
  if command -v systemctl >/dev/null && systemctl is-enabled prometheus >/dev/null 2>&1; then
    log "disabling the system prometheus service (tests run their own)"
    systemctl disable --now prometheus >/dev/null 2>&1 || true
  elif [ -x /etc/init.d/prometheus ] && /etc/init.d/prometheus status >/dev/null 2>&1; then
    log "stopping the system prometheus service (tests run their own)"
    /etc/init.d/prometheus stop >/dev/null 2>&1 || true
    update-rc.d prometheus disable >/dev/null 2>&1 || true
  fi
}

mount_fs() {
  # BCC attaches tracepoints through tracefs and reads their format files there.
  if [ ! -e /sys/kernel/tracing/events ]; then
    log "mounting tracefs"; mount -t tracefs tracefs /sys/kernel/tracing || true
  fi
  if [ -d /sys/kernel/debug ] && ! mountpoint -q /sys/kernel/debug; then
    log "mounting debugfs"; mount -t debugfs debugfs /sys/kernel/debug || true
  fi
  if [ -d /sys/kernel/security ] && ! mountpoint -q /sys/kernel/security; then
    mount -t securityfs securityfs /sys/kernel/security 2>/dev/null || true
  fi
}

link_headers() {
  # BCC compiles C at run time against /lib/modules/$(uname -r)/build. This kernel ships
  # no headers; Debian's closest ones compile our programs, which never read kernel
  # structs through header types (offsets come from BTF, see agent/kernel/btf.py).
  local rel; rel=$(uname -r)
  if [ -e "/lib/modules/$rel/build" ]; then
    log "kernel headers present for $rel"; return
  fi
  local cand
  cand=$(ls -d /lib/modules/*-amd64 2>/dev/null | sort -V | tail -n 1 || true)
  if [ -z "$cand" ] || [ ! -e "$cand/build" ]; then
    echo "install.sh: no Debian kernel headers found under /lib/modules" >&2; exit 1
  fi
  if [ -e "/lib/modules/$rel" ] || [ -L "/lib/modules/$rel" ]; then
    log "/lib/modules/$rel exists without build/; leaving it alone"; return
  fi
  log "linking /lib/modules/$rel -> $cand (mismatched headers; see README)"
  ln -s "$cand" "/lib/modules/$rel"
}

make_venv() {
  # Debian's python3 (3.11) plus only the bcc package from dist-packages: a symlink, so
  # Debian's other (older) modules cannot shadow what pip installs in the venv.
  local py=/usr/bin/python3
  if [ ! -x .venv/bin/python ]; then
    log "creating .venv"; "$py" -m venv .venv
  fi
  local site; site=$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  if [ ! -e "$site/bcc" ]; then
    ln -s /usr/lib/python3/dist-packages/bcc "$site/bcc"
  fi
  # The stamp covers the extensions' sources too: a changed fastpath.c or ringstore.c is rebuilt.
  local stamp=.venv/.installed-$(cat pyproject.toml setup.py agent/monitors/fastpath.c agent/stream/ringstore.c | sha1sum | cut -c1-12)
  if [ ! -e "$stamp" ]; then
    log "pip install -e .[dev]"
    .venv/bin/pip install -q --upgrade pip
    .venv/bin/pip install -q -e '.[dev]'
    rm -f .venv/.installed-*; touch "$stamp"
  else
    log "virtualenv up to date"
  fi
}

need_root
install_debs
quiet_system_prometheus
mount_fs
link_headers
make_venv
log "done"

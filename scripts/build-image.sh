#!/usr/bin/env bash
# Builds the container image without a Docker daemon or any registry but Debian's and PyPI:
#   1. debootstrap --variant=minbase bookworm -> a root filesystem (cached in $IMAGE_DIR),
#   2. that rootfs committed as the base image localhost/ebpf-agent-base:bookworm,
#   3. buildah bud --isolation chroot --storage-driver vfs -f docker/Dockerfile on top.
# Storage lives in $IMAGE_DIR (default build/image), not in /var/lib/containers, so the
# build neither needs nor touches a system container store.
#
# The image is labelled with a hash of what the Dockerfile copies (org.ebpf-agent.source);
# an image whose label matches the tree is not rebuilt (FORCE=1 rebuilds). `make test`
# runs this before pytest, so the slow image tests check an image of the current sources
# and nothing downloads while tests run.
#
#   scripts/build-image.sh                # prints the image name on its last line
#   scripts/build-image.sh --source-hash  # the label value for the current tree
#   IMAGE_DIR=/tmp/img FORCE=1 scripts/build-image.sh
set -euo pipefail
cd "$(dirname "$0")/.."

IMAGE_DIR=${IMAGE_DIR:-build/image}
IMAGE=${IMAGE:-localhost/ebpf-agent:latest}
BASE_IMAGE=localhost/ebpf-agent-base:bookworm
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
LABEL=org.ebpf-agent.source

log() { printf '[image] %s\n' "$*" >&2; }

# What docker/Dockerfile COPYs (less .dockerignore's caches) and the Dockerfile itself.
source_hash() {
  find docker/Dockerfile pyproject.toml setup.py README.md agent config -type f \
       ! -path '*/__pycache__/*' ! -name '*.pyc' ! -name '*.so' -print0 \
    | LC_ALL=C sort -z | xargs -0 sha256sum | sha256sum | cut -c1-16
}

if [ "${1:-}" = "--source-hash" ]; then
  source_hash; exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
  echo "build-image.sh: must run as root (debootstrap, buildah with chroot isolation)" >&2
  exit 1
fi
for tool in buildah debootstrap; do
  command -v "$tool" >/dev/null || { echo "build-image.sh: $tool missing (make install installs it)" >&2; exit 1; }
done

mkdir -p "$IMAGE_DIR"
IMAGE_DIR=$(cd "$IMAGE_DIR" && pwd)
BUILDAH=(buildah --root "$IMAGE_DIR/storage" --runroot "$IMAGE_DIR/run" --storage-driver vfs)

hash=$(source_hash)
current=$("${BUILDAH[@]}" inspect --type image --format "{{index .Docker.Config.Labels \"$LABEL\"}}" \
            "$IMAGE" 2>/dev/null || true)
if [ -z "${FORCE:-}" ] && [ "$current" = "$hash" ]; then
  log "$IMAGE is up to date with the sources ($LABEL=$hash)"
  echo "$IMAGE"; exit 0
fi

rootfs="$IMAGE_DIR/rootfs"
if [ ! -e "$rootfs/.debootstrap-done" ]; then
  rm -rf "$rootfs"
  log "debootstrap --variant=minbase bookworm $rootfs"
  debootstrap --variant=minbase bookworm "$rootfs" "$MIRROR" >"$IMAGE_DIR/debootstrap.log" 2>&1 \
    || { tail -n 30 "$IMAGE_DIR/debootstrap.log" >&2; exit 1; }
  # What debian:bookworm-slim also does: no apt caches or docs kept in the image.
  rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/*.bin
  touch "$rootfs/.debootstrap-done"
fi

if ! "${BUILDAH[@]}" inspect --type image "$BASE_IMAGE" >/dev/null 2>&1; then
  log "committing $rootfs as $BASE_IMAGE"
  tar -C "$rootfs" --exclude=./.debootstrap-done -cf "$IMAGE_DIR/rootfs.tar" .
  ctr=$("${BUILDAH[@]}" from scratch)
  "${BUILDAH[@]}" add "$ctr" "$IMAGE_DIR/rootfs.tar" / >/dev/null
  "${BUILDAH[@]}" config --cmd /bin/bash --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin "$ctr"
  "${BUILDAH[@]}" commit --rm "$ctr" "$BASE_IMAGE" >/dev/null
  rm -f "$IMAGE_DIR/rootfs.tar"
fi

log "buildah bud --isolation chroot --storage-driver vfs -> $IMAGE (log: $IMAGE_DIR/build.log)"
# The host's CA bundle as the build secret `ca`: pip inside the build then trusts what the
# host trusts (a TLS-intercepting proxy's CA, for instance).
secret=()
ca=${PIP_CERT:-/etc/ssl/certs/ca-certificates.crt}
[ -s "$ca" ] && secret=(--secret "id=ca,src=$ca")
"${BUILDAH[@]}" bud --isolation chroot --format docker --layers=false "${secret[@]}" \
  --label "$LABEL=$hash" --build-arg "BASE=$BASE_IMAGE" -f docker/Dockerfile -t "$IMAGE" . \
  >"$IMAGE_DIR/build.log" 2>&1 || { tail -n 40 "$IMAGE_DIR/build.log" >&2; exit 1; }
# The previous build of $IMAGE, now untagged: vfs keeps full copies, so do not keep it.
"${BUILDAH[@]}" rmi --prune >/dev/null 2>&1 || true
log "built $IMAGE ($LABEL=$hash)"
echo "$IMAGE"

#!/usr/bin/env bash
# Provides a CRIU that can checkpoint containers on this kernel (4.2 or newer: 3.17 fails `criu check` on
# the vDSO, 4.1 cannot dump TCP sockets on kernels >= 6.16). Builds CRIU from Debian's source tarball
# (checksum pinned) with the patches in scripts/criu-patches applied, into $PREFIX, which the daemon puts
# first on the PATH of its lxc-checkpoint children. The patches make unprivileged containers with a veth
# restorable (upstream 4.2.1 fails with EOPNOTSUPP when the host has an interface of the same name); without
# them, the distribution's criu (when it is 4.2 or newer) serves privileged containers only, and the daemon
# says so. It also installs CRIU's own Python image library (pycriu, with the image definitions CRIU's
# `make lib` generates from its images/*.proto) in $PREFIX/lib/python: the daemon decodes a received
# checkpoint's images with it before a restore. Idempotent; as root.
set -euo pipefail

VERSION=4.2.1
TARBALL="criu_${VERSION}.orig.tar.xz"
SHA256=29ec0ee09e296479fe7048c80980e8ef1d0684d0b0204c2b101dfea19f6725b9
MIRROR="${STAPES_DEBIAN_MIRROR:-http://deb.debian.org/debian}"
PREFIX="${STAPES_CRIU_PREFIX:-/opt/stapes/criu}"
PATCHES="$(cd "$(dirname "$0")" && pwd)/criu-patches"
STAMP="$VERSION+stapes$(cat "$PATCHES"/*.patch | sha256sum | cut -c1-12)"
BUILD_DEPS=(build-essential pkg-config libprotobuf-dev libprotobuf-c-dev protobuf-c-compiler protobuf-compiler
            python3-protobuf libnl-3-dev libnet1-dev libcap-dev libaio-dev libgnutls28-dev libbsd-dev
            libnftables-dev uuid-dev xz-utils curl ca-certificates patch)

version_ok() {  # version_ok BINARY: at least 4.2 and `criu check` passes
    local bin=$1 v major minor
    v=$("$bin" --version 2>/dev/null | sed -n 's/^Version: *//p')
    major=${v%%.*}; minor=${v#*.}; minor=${minor%%.*}
    [ -n "$v" ] || return 1
    if [ "$major" -lt 4 ] || { [ "$major" -eq 4 ] && [ "$minor" -lt 2 ]; }; then return 1; fi
    "$bin" check >/dev/null 2>&1
}

# Lazy pages (post-copy moves) splice memory through pipes of 4 MiB; the kernel's default cap is 1 MiB.
if [ "$(cat /proc/sys/fs/pipe-max-size)" -lt 4194304 ]; then
    echo "fs.pipe-max-size = 4194304" > /etc/sysctl.d/60-stapes-criu.conf
    sysctl -q -w fs.pipe-max-size=4194304
    echo "setup-criu: raised fs.pipe-max-size to 4 MiB for CRIU's lazy pages (/etc/sysctl.d/60-stapes-criu.conf)"
fi

pycriu_ok() {  # pycriu_ok PYTHON: CRIU's image library imports and knows its image definitions
    PYTHONPATH="$PREFIX/lib/python" "$1" -c 'import pycriu.images; pycriu.images.pb.mnt_entry' >/dev/null 2>&1
}
PYTHONS=(/usr/bin/python3)
VENV_PYTHON="$(cd "$(dirname "$0")/.." && pwd)/.venv/bin/python"
[ -x "$VENV_PYTHON" ] && PYTHONS+=("$VENV_PYTHON")

if [ -x "$PREFIX/sbin/criu" ] && [ "$(cat "$PREFIX/BUILD" 2>/dev/null)" = "$STAMP" ] && version_ok "$PREFIX/sbin/criu" \
        && [ -f "$PREFIX/lib/python/pycriu/images/pb.py" ]
then
    echo "setup-criu: CRIU $STAMP ready in $PREFIX/sbin/criu"
    exit 0
fi

missing=()
for pkg in "${BUILD_DEPS[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if [ ${#missing[@]} -gt 0 ]; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q
    apt-get install -y -q --no-install-recommends "${missing[@]}"
fi

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
echo "setup-criu: building CRIU $VERSION from Debian's source (about a minute)"
curl -sSfL --retry 3 -o "$work/$TARBALL" "$MIRROR/pool/main/c/criu/$TARBALL"
echo "$SHA256  $work/$TARBALL" | sha256sum -c --quiet
tar -xJf "$work/$TARBALL" -C "$work"
for patch in "$PATCHES"/*.patch; do
    patch -d "$work/criu-$VERSION" -p1 --quiet < "$patch"
done
make -C "$work/criu-$VERSION" -j"$(nproc)" criu >"$work/build.log" 2>&1 || {
    tail -30 "$work/build.log" >&2; echo "setup-criu: the CRIU build failed (log above)" >&2; exit 1; }
# pycriu: `make lib` generates the images' *_pb2.py with protoc (pure Python: any protobuf runtime reads them).
make -C "$work/criu-$VERSION" -j"$(nproc)" lib >>"$work/build.log" 2>&1 || {
    tail -30 "$work/build.log" >&2; echo "setup-criu: the pycriu build failed (log above)" >&2; exit 1; }
rm -rf "$PREFIX/lib/python.new"
mkdir -p "$PREFIX/lib/python.new"
cp -r "$work/criu-$VERSION/lib/pycriu" "$PREFIX/lib/python.new/pycriu"
find "$PREFIX/lib/python.new" \( -name "*.pyc" -o -name __pycache__ -o -name Makefile -o -name "*.o" \) \
    -prune -exec rm -rf {} +
rm -rf "$PREFIX/lib/python"
mv "$PREFIX/lib/python.new" "$PREFIX/lib/python"
for python in "${PYTHONS[@]}"; do
    pycriu_ok "$python" || {
        echo "setup-criu: $python cannot import CRIU's pycriu from $PREFIX/lib/python" >&2; exit 1; }
done
install -D -m 0755 "$work/criu-$VERSION/criu/criu" "$PREFIX/sbin/criu"
echo "$STAMP" > "$PREFIX/BUILD"
if ! out=$("$PREFIX/sbin/criu" check 2>&1); then
    echo "$out" >&2
    echo "setup-criu: the built CRIU fails 'criu check' on this kernel; live container moves stay off" >&2
    exit 0
fi
echo "setup-criu: CRIU $STAMP installed in $PREFIX/sbin/criu ($out)"

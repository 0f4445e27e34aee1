#!/usr/bin/env bash
# Installs the Debian packages Stapes needs (Debian 12 or 13, as root). Idempotent: installs only what is
# missing, and runs apt-get update only when something is.
set -euo pipefail

if [ "$(id -u)" != 0 ]; then
    echo "setup-system: run as root (it installs Debian packages and runs containers)" >&2
    exit 1
fi

. /etc/os-release
codename="${VERSION_CODENAME:-}"
packages=(lxc busybox-static rsync btrfs-progs nftables tar gzip xz-utils python3 python3-venv python3-dev gcc
          ca-certificates curl incus-client incus-base iproute2 util-linux dnsmasq-base uidmap mmdebstrap zstd bzip2
          iputils-ping qemu-system-x86 qemu-utils ovmf)

backports=()
if [ "$codename" = bookworm ]; then
    # incus-client and incus-base (the official client and a real Incus daemon, the peers of the
    # compatibility and interop tests) are in bookworm-backports; so is QEMU 10 (bookworm's 7.2 corrupts
    # guests in pre-copy live migrations under TCG). Debian 13 has both in main.
    if ! grep -rqs "bookworm-backports" /etc/apt/sources.list /etc/apt/sources.list.d/; then
        cat > /etc/apt/sources.list.d/stapes-backports.sources <<SRC
Types: deb
URIs: http://deb.debian.org/debian
Suites: bookworm-backports
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SRC
        apt_update_needed=1
    fi
    backports=(incus-client incus-base qemu-system-x86 qemu-utils)
    # QEMU 7.2 from bookworm main already installed: upgraded to backports' 10.
    if dpkg-query -W -f='${Version}' qemu-system-x86 2>/dev/null | grep -q '^1:7\.'; then
        qemu_upgrade=1
    fi
fi

missing=()
for pkg in "${packages[@]}"; do
    if ! dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed"; then
        missing+=("$pkg")
    fi
done

if [ -n "${qemu_upgrade:-}" ]; then
    for pkg in qemu-system-x86 qemu-utils; do
        [[ " ${missing[*]} " == *" $pkg "* ]] || missing+=("$pkg")
    done
fi

if [ ${#missing[@]} -gt 0 ] || [ -n "${apt_update_needed:-}" ]; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q
    regular=()
    from_backports=()
    for pkg in "${missing[@]}"; do
        if [[ " ${backports[*]} " == *" $pkg "* ]]; then from_backports+=("$pkg"); else regular+=("$pkg"); fi
    done
    [ ${#regular[@]} -gt 0 ] && apt-get install -y -q --no-install-recommends "${regular[@]}"
    [ ${#from_backports[@]} -gt 0 ] && apt-get install -y -q --no-install-recommends -t bookworm-backports \
        "${from_backports[@]}"
fi

# Unprivileged containers map their ids into root's subordinate range, as Incus's do.
for file in /etc/subuid /etc/subgid; do
    if ! grep -qs '^root:' "$file"; then
        echo "root:1000000:1000000000" >> "$file"
        echo "setup-system: gave root the ids 1000000-1000999999 in $file (unprivileged containers)"
    fi
done

# dnsmasq (DHCP and DNS of the managed networks) drops root for a user of its own: as `nobody`, any other
# process running as nobody could signal it (docs/security.md).
if ! getent passwd stapes-dnsmasq >/dev/null; then
    useradd --system --user-group --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin stapes-dnsmasq
    echo "setup-system: created the system user stapes-dnsmasq (dnsmasq runs as it)"
fi

# QEMU drops root for a user of its own once it opened what it needs (the server passes it the disks, the UEFI
# variables and the taps as descriptors): a device-emulation escape is not host root (docs/security.md). In the
# group kvm, where the host has one, for /dev/kvm.
if ! getent passwd stapes-qemu >/dev/null; then
    useradd --system --user-group --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin stapes-qemu
    echo "setup-system: created the system user stapes-qemu (QEMU runs as it)"
fi
if getent group kvm >/dev/null && ! id -nG stapes-qemu | grep -qw kvm; then
    usermod -a -G kvm stapes-qemu
fi

# Make sure the python3 that builds the virtual environment can (pyenv or Debian's).
python3 -c 'import venv, ensurepip' 2>/dev/null || {
    echo "setup-system: python3 lacks venv/ensurepip; install python3-venv" >&2; exit 1; }
bash "$(dirname "$0")/setup-criu.sh"
bash "$(dirname "$0")/setup-vm.sh"
# The systemd unit stapes.service: installed (and daemon-reload), never started or enabled here.
bash "$(dirname "$0")/install-service.sh"
echo "setup-system: all system packages present"

#!/usr/bin/env bash
# The Debian packages Stapes's virtual machines need (Debian 12 or 13, as root), beside setup-system.sh's:
# QEMU 10 (bookworm-backports on Debian 12), OVMF, and what the image builders use (a static libc for the
# guest agent, the EFI stub, FAT and GPT tools). Idempotent: installs only what is missing, and runs
# apt-get update only when something is.
set -euo pipefail

if [ "$(id -u)" != 0 ]; then
    echo "setup-vm: run as root (it installs Debian packages)" >&2
    exit 1
fi

. /etc/os-release
codename="${VERSION_CODENAME:-}"
# qemu-system-x86 + qemu-utils: the hypervisor and qemu-img; ovmf: UEFI firmware; gcc + libc6-dev: the static
# guest agent; systemd-boot-efi: linuxx64.efi.stub (the tiny image's unified kernel image); binutils: objcopy;
# dosfstools + mtools: the EFI system partition without a loop mount; fdisk: sfdisk (GPT); e2fsprogs: mkfs.ext4
# -d; busybox-static: the tiny image's userland; cpio: its initramfs; mmdebstrap: the Debian VM images.
packages=(qemu-system-x86 qemu-utils ovmf gcc libc6-dev systemd-boot-efi binutils dosfstools mtools fdisk
          e2fsprogs busybox-static cpio mmdebstrap zstd)
from_backports=()
if [ "$codename" = bookworm ]; then
    from_backports=(qemu-system-x86 qemu-utils)  # QEMU 10: bookworm's 7.2 corrupts guests in TCG migrations
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
fi

installed() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q "install ok installed"; }
qemu_major() { dpkg-query -W -f='${Version}' qemu-system-x86 2>/dev/null | sed -E 's/^[0-9]+://; s/\..*//'; }

missing=()
for pkg in "${packages[@]}"; do
    installed "$pkg" || missing+=("$pkg")
done
# An old QEMU (bookworm's 7.2) is upgraded from backports too.
if installed qemu-system-x86 && [ -n "${from_backports[*]}" ] && [ "$(qemu_major)" -lt 10 ]; then
    missing+=(qemu-system-x86 qemu-utils)
fi

if [ ${#missing[@]} -gt 0 ]; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q
    regular=()
    backported=()
    for pkg in "${missing[@]}"; do
        if [[ " ${from_backports[*]} " == *" $pkg "* ]]; then backported+=("$pkg"); else regular+=("$pkg"); fi
    done
    [ ${#regular[@]} -gt 0 ] && apt-get install -y -q --no-install-recommends "${regular[@]}"
    [ ${#backported[@]} -gt 0 ] && apt-get install -y -q --no-install-recommends -t bookworm-backports \
        "${backported[@]}"
fi
echo "setup-vm: all packages for virtual machines present"

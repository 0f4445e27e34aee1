#!/usr/bin/env bash
# Step 1: a Debian bookworm rootfs for the nested-Stapes guest (mmdebstrap, root mode).
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=${ROOT:-$HERE/rootfs}
MIRROR="${STAPES_DEBIAN_MIRROR:-http://deb.debian.org/debian}"
PKGS=(linux-image-amd64 initramfs-tools systemd-sysv udev kmod e2fsprogs procps
      lxc uidmap dnsmasq-base iproute2 nftables rsync busybox-static
      # CRIU 4.2.1 (/opt/stapes/criu) runtime libraries
      libprotobuf-c1 libnl-3-200 libnet1 libnftables1 libgnutls30 libbsd0 libaio1 libcap2 libuuid1 python3-protobuf
      # pyenv's CPython 3.11.7 extension modules (ssl, ctypes, sqlite3, bz2, lzma, readline, curses, nis, expat)
      libssl3 libffi8 libsqlite3-0 libbz2-1.0 liblzma5 libncursesw6 libreadline8 libnsl2 libtirpc3 libexpat1
      libstdc++6 zlib1g)
MODULES='virtio_pci\nvirtio_blk\nvirtio_scsi\nsd_mod\nvirtio_net\nvirtio_console\next4\n'
rm -rf "$ROOT"
start=$(date +%s.%N)
mmdebstrap --mode=root --variant=minbase --include="$(IFS=,; echo "${PKGS[*]}")" \
  --aptopt='Acquire::Check-Valid-Until "false"' \
  --dpkgopt='path-include=/usr/share/doc/*/copyright' \
  --dpkgopt='path-exclude=/usr/share/man/*' --dpkgopt='path-exclude=/usr/share/doc/*' \
  --dpkgopt='path-exclude=/usr/share/info/*' --dpkgopt='path-exclude=/usr/share/locale/*' \
  --essential-hook='mkdir -p "$1/etc/initramfs-tools/conf.d" "$1/usr/share/initramfs-tools/modules.d"' \
  --essential-hook='echo MODULES=list > "$1/etc/initramfs-tools/conf.d/stapes.conf"' \
  --essential-hook="printf '$MODULES' > \"\$1/usr/share/initramfs-tools/modules.d/stapes\"" \
  bookworm "$ROOT" "$MIRROR"
end=$(date +%s.%N)
echo "mmdebstrap: $(echo "$end - $start" | bc) s"
du -sh --apparent-size "$ROOT"; du -sh "$ROOT"
ls -la "$ROOT"/boot

#!/usr/bin/env bash
# Step 2, the image builder's way: GPT disk, ESP with a UKI (the project's build_uki/build_esp: systemd-boot's
# stub + the guest's Debian kernel + its initramfs-tools initrd + cmdline), root ext4 partition
# (PARTLABEL/LABEL stapes-root). Written sparse (dd conv=sparse), no loop devices.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
W=$HERE/uki; rm -rf "$W"; mkdir -p "$W"
t0=$(date +%s.%N)
CMDLINE="root=LABEL=stapes-root rw console=ttyS0,115200 net.ifnames=0 systemd.unified_cgroup_hierarchy=0 probe.stage=${STAGE:-3} probe.poweroff=1"
/work/main/.venv/bin/python - "$HERE" "$W" "$CMDLINE" <<'PY'
import sys
from pathlib import Path
from stapes.server.images.busybox_vm import build_uki, build_esp
here, work, cmdline = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
uki = build_uki(here / "vmlinuz", here / "initrd.img", work, cmdline)
esp = build_esp(uki, work)
print("uki", uki.stat().st_size, "esp", esp.stat().st_size)
PY
ESP=$W/esp.img; ROOTIMG=$HERE/root.ext4
MIB=1048576
esp_s=$(( ($(stat -c %s "$ESP") + MIB - 1) / MIB ))
root_s=$(( ($(stat -c %s "$ROOTIMG") + MIB - 1) / MIB ))
DISK=$W/disk.raw
truncate -s $(( (1 + esp_s + root_s + 1) * MIB )) "$DISK"
sfdisk --quiet "$DISK" <<SF
label: gpt
start=$((MIB/512)), size=$((esp_s*MIB/512)), type=U, name=esp
start=$(((1+esp_s)*MIB/512)), size=$((root_s*MIB/512)), type=L, name=stapes-root
SF
dd if="$ESP" of="$DISK" bs=1M seek=1 conv=sparse,notrunc status=none
dd if="$ROOTIMG" of="$DISK" bs=1M seek=$((1+esp_s)) conv=sparse,notrunc status=none
echo "uki disk: $(awk "BEGIN{print $(date +%s.%N)-$t0}") s, $(du -h "$DISK" | cut -f1) allocated"
cp /usr/share/OVMF/OVMF_VARS_4M.fd "$W"/vars.fd

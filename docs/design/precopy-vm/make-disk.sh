#!/usr/bin/env bash
# Step 2: the disks: vda = the rootfs as a bare ext4 (mkfs.ext4 -d: no loop, no mount), vdb = results (ext4).
# With UKI=1 also a GPT disk (ESP holding a UKI: systemd-boot's stub + the guest's kernel + initrd + cmdline,
# root ext4 partition labelled stapes-root) for an OVMF boot, as src/stapes/server/images/debian_vm.py does.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=${ROOT:-$HERE/rootfs}
SIZE=${SIZE:-6G}
t0=$(date +%s.%N)
cp "$(ls "$ROOT"/boot/vmlinuz-* | sort | tail -1)" "$HERE"/vmlinuz
cp "$(ls "$ROOT"/boot/initrd.img-* | sort | tail -1)" "$HERE"/initrd.img
rm -f "$HERE"/root.ext4
mkfs.ext4 -q -F -L stapes-root -E root_owner=0:0 -d "$ROOT" "$HERE"/root.ext4 "$SIZE"
t1=$(date +%s.%N)
echo "mkfs.ext4 -d: $(awk "BEGIN{print $t1-$t0}") s; image $(du -h --apparent-size "$HERE"/root.ext4 | cut -f1) apparent, $(du -h "$HERE"/root.ext4 | cut -f1) allocated"
rm -f "$HERE"/results.ext4
mkfs.ext4 -q -F -L results "$HERE"/results.ext4 256M
ls -la "$HERE"/vmlinuz "$HERE"/initrd.img

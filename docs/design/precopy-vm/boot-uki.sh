#!/usr/bin/env bash
# OVMF boots the GPT disk's UKI (\EFI\BOOT\BOOTX64.EFI) under TCG.
set -uo pipefail
HERE=$(cd "$(dirname "$0")" && pwd); W=$HERE/uki
MEM=${MEM:-3072}; TIMEOUT=${TIMEOUT:-1800}; TAG=${TAG:-uki}
LOG=$HERE/console-$TAG.log; rm -f "$LOG"
t0=$(date +%s.%N)
qemu-system-x86_64 -accel tcg -cpu max -m "$MEM" -smp 2 -machine q35 -display none -no-reboot \
  -drive if=pflash,format=raw,readonly=on,file=/usr/share/OVMF/OVMF_CODE_4M.fd \
  -drive if=pflash,format=raw,file="$W"/vars.fd \
  -drive file="$W"/disk.raw,format=raw,if=virtio,cache=unsafe \
  -drive file="$HERE"/results.ext4,format=raw,if=virtio \
  -device virtio-rng-pci -serial file:"$LOG" -monitor none -nic none &
QPID=$!; echo $QPID > "$HERE"/qemu-$TAG.pid; echo "qemu pid $QPID"
marker=""
while kill -0 $QPID 2>/dev/null; do
  el=$(awk "BEGIN{print $(date +%s.%N)-$t0}")
  if [ -z "$marker" ] && grep -q "PROBE .* MULTIUSER-REACHED" "$LOG" 2>/dev/null; then
    marker=$el; echo "multi-user marker on the console after $marker s (host wall clock)"; fi
  if awk "BEGIN{exit !($el > $TIMEOUT)}"; then echo "timeout: killing qemu $QPID"; kill $QPID; break; fi
  sleep 0.5
done
wait $QPID 2>/dev/null
echo "qemu exited after $(awk "BEGIN{print $(date +%s.%N)-$t0}") s"
rm -f "$HERE"/qemu-$TAG.pid

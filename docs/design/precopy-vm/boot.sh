#!/usr/bin/env bash
# Boots the guest under TCG with -kernel/-initrd (no firmware), serial console to a file; waits for the
# probe's PROBE-DONE line (or a timeout), reports the time to the multi-user marker; kills only its own QEMU.
set -uo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
MEM=${MEM:-3072}; SMP=${SMP:-2}; TIMEOUT=${TIMEOUT:-3600}; STAGE=${STAGE:-4}; TAG=${TAG:-run}
APPEND="root=/dev/vda rw console=ttyS0,115200 net.ifnames=0 systemd.unified_cgroup_hierarchy=${UNIFIED:-0} probe.stage=$STAGE probe.poweroff=1 ${EXTRA:-}"
LOG=$HERE/console-$TAG.log; rm -f "$LOG"
t0=$(date +%s.%N)
qemu-system-x86_64 -accel tcg -cpu max -m "$MEM" -smp "$SMP" -machine q35 -display none -no-reboot \
  -kernel "$HERE"/vmlinuz -initrd "$HERE"/initrd.img -append "$APPEND" \
  -drive file="$HERE"/root.ext4,format=raw,if=virtio,cache=unsafe \
  -drive file="$HERE"/results.ext4,format=raw,if=virtio \
  -device virtio-rng-pci -serial file:"$LOG" -monitor none -nic none &
QPID=$!; echo $QPID > "$HERE"/qemu-$TAG.pid
echo "qemu pid $QPID"
marker=""
while kill -0 $QPID 2>/dev/null; do
  now=$(date +%s.%N); el=$(awk "BEGIN{print $now-$t0}")
  if [ -z "$marker" ] && grep -q "PROBE .* MULTIUSER-REACHED" "$LOG" 2>/dev/null; then
    marker=$el; echo "multi-user marker on the console after $marker s (host wall clock)"; fi
  if awk "BEGIN{exit !($el > $TIMEOUT)}"; then echo "timeout: killing qemu $QPID"; kill $QPID; break; fi
  sleep 0.5
done
wait $QPID 2>/dev/null
echo "qemu exited after $(awk "BEGIN{print $(date +%s.%N)-$t0}") s"
rm -f "$HERE"/qemu-$TAG.pid

#!/bin/bash
# Runs inside the guest (probe.service, after multi-user.target): every result goes to the serial console
# and to /results/results.txt (the second virtio disk, read on the host with debugfs).
mkdir -p /results; mount /dev/vdb /results 2>/dev/null
OUT=/results/results.txt
log() { echo "PROBE $(cut -d' ' -f1 /proc/uptime) $*" | tee -a $OUT > /dev/ttyS0; }
run() {  # run LABEL TIMEOUT CMD...: output and wall time
    local label=$1 to=$2; shift 2
    local t0=$(date +%s.%N)
    timeout "$to" "$@" > /tmp/out.$$ 2>&1; local rc=$?
    local t1=$(date +%s.%N)
    log "== $label rc=$rc time=$(awk "BEGIN{print $t1-$t0}") s"
    sed 's/^/    /' /tmp/out.$$ | tail -n ${TAIL:-40} | tee -a $OUT > /dev/ttyS0
}
sync_results() { sync; }
log "MULTIUSER-REACHED"
log "kernel $(uname -r) cmdline: $(cat /proc/cmdline)"
for p in KernelTimestampMonotonic InitRDTimestampMonotonic UserspaceTimestampMonotonic FinishTimestampMonotonic; do
    log "systemd $p=$(systemctl show -p $p --value)"; done
log "multi-user.target ActiveEnter=$(systemctl show multi-user.target -p ActiveEnterTimestampMonotonic --value) us"
log "$(nproc) cpus, $(free -m | awk '/Mem:/{print $2}') MiB; cgroups: $(mount | grep -c cgroup) mounts: $(mount | grep cgroup | awk '{print $3":"$5}' | tr '\n' ' ')"
run "systemctl --failed" 30 systemctl --failed --no-legend
if grep -q probe.stage=0 /proc/cmdline; then log "PROBE-DONE"; umount /results; systemctl poweroff --no-block; exit 0; fi
export PATH=/opt/stapes/criu/sbin:$PATH
C=/opt/stapes/criu/sbin/criu
run "criu --version" 30 $C --version
run "criu check --feature mem_dirty_track" 60 $C check --feature mem_dirty_track
run "criu check --feature uffd-noncoop" 60 $C check --feature uffd-noncoop
printf 'network-lock nftables\n' > /etc/criu.conf
CRIU_CONFIG_FILE=/etc/criu.conf run "criu check (network-lock nftables)" 120 $C check
CRIU_CONFIG_FILE=/etc/criu.conf run "criu check --all" 120 $C check --all
# Pre-copy for real, without Stapes: a 64 MiB process that keeps dirtying 1 MiB of it.
cat > /tmp/dirty.py <<'PY'
import time
b = bytearray(64 << 20)
for i in range(0, len(b), 4096): b[i] = 1
n = 0
while True:
    for i in range(0, 1 << 20, 4096): b[i] = n & 255
    n += 1
    time.sleep(0.05)
PY
setsid /usr/bin/python3 /tmp/dirty.py </dev/null >/dev/null 2>&1 3>&- &
DPID=$!; sleep 5
rm -rf /tmp/cr; mkdir -p /tmp/cr/1 /tmp/cr/2
CRIU_CONFIG_FILE=/etc/criu.conf run "criu pre-dump --track-mem (64 MiB process)" 300 $C pre-dump -t $DPID -D /tmp/cr/1 --track-mem -o pre.log
sleep 2
CRIU_CONFIG_FILE=/etc/criu.conf run "criu dump --track-mem --prev-images-dir ../1" 300 $C dump -t $DPID -D /tmp/cr/2 --track-mem --prev-images-dir ../1 -o dump.log
grep -E "Error" /tmp/cr/2/dump.log | head -5 | tee -a $OUT
CRIU_CONFIG_FILE=/etc/criu.conf run "criu restore (detached)" 300 $C restore -D /tmp/cr/2 -d -o restore.log
sleep 1; log "restored process alive: $(pgrep -f dirty.py | tr '\n' ' ')"
log "pages images: pre-dump $(du -sk /tmp/cr/1 | cut -f1) KiB, final dump $(du -sk /tmp/cr/2 | cut -f1) KiB"
for d in 1 2; do
  PYTHONPATH=/opt/stapes/criu/lib/python TAIL=30 run "stats of round $d" 60 /usr/bin/python3 -c "
import pycriu.images as I, sys
s = I.load(open('/tmp/cr/$d/stats-dump','rb'))['entries'][0]['dump']
print({k: s[k] for k in s})"
done
pkill -9 -f /tmp/dirty.py
if ! grep -q probe.stage=5 /proc/cmdline; then
# Python under TCG
cd /
run "python -c pass (cold)" 120 /work/main/.venv/bin/python -c pass
run "python -c pass" 120 /work/main/.venv/bin/python -c pass
run "python -c 'import stapes'" 120 /work/main/.venv/bin/python -c 'import stapes'
run "python -c 'import stapes.server.daemon'" 300 /work/main/.venv/bin/python -c 'import stapes.server.daemon'
run "python -c 'import stapes.server.daemon' (2nd)" 300 /work/main/.venv/bin/python -c 'import stapes.server.daemon'
run "stapesd --version" 300 /work/main/.venv/bin/stapesd --version
run "stapes --version" 300 /work/main/.venv/bin/stapes --version
run "pystone-ish loop (10M additions)" 300 /work/main/.venv/bin/python -c 'import time;t=time.perf_counter();s=0
for i in range(10_000_000): s+=i
print(time.perf_counter()-t)'
TAIL=80 run "lxc-checkconfig" 60 lxc-checkconfig
TAIL=12 run "importtime top (stapes.server.daemon)" 300 sh -c "/work/main/.venv/bin/python -X importtime -c 'import stapes.server.daemon' 2>&1 | sort -t'|' -k2 -n | tail -12"
fi
sync_results
# Stage 4: one stapesd, a busybox container
if grep -q probe.stage=4 /proc/cmdline; then
  mkdir -p /var/lib/stapes-a; chmod 711 /var/lib/stapes-a
  export STAPES_DIR=/var/lib/stapes-a
  t0=$(date +%s.%N)
  setsid /work/main/.venv/bin/stapesd --state-dir /var/lib/stapes-a --https-address 127.0.0.1:8443 \
      </dev/null >/results/stapesd-a.log 2>&1 &
  SPID=$!
  for i in $(seq 1 1200); do grep -q "stapesd ready" /results/stapesd-a.log && break; sleep 0.5; done
  log "stapesd ready after $(awk "BEGIN{print $(date +%s.%N)-$t0}") s (pid $SPID): $(grep -c 'stapesd ready' /results/stapesd-a.log)"
  TAIL=30 run "stapesd-a log" 5 cat /results/stapesd-a.log
  run "stapes info (server)" 300 /work/main/.venv/bin/stapes info
  run "stapes image list" 300 /work/main/.venv/bin/stapes image list
  run "stapes launch busybox c1" 600 /work/main/.venv/bin/stapes launch busybox c1
  run "stapes list" 300 /work/main/.venv/bin/stapes list
  run "stapes exec c1 -- cat /etc/hostname" 300 /work/main/.venv/bin/stapes exec c1 -- cat /etc/hostname
  run "stapes exec c1 -- cat /proc/self/uid_map" 300 /work/main/.venv/bin/stapes exec c1 -- cat /proc/self/uid_map
  run "stapes stop c1" 300 /work/main/.venv/bin/stapes stop c1 --force
  run "stapes delete c1" 300 /work/main/.venv/bin/stapes delete c1
  kill -TERM $SPID; for i in $(seq 1 60); do kill -0 $SPID 2>/dev/null || break; sleep 0.5; done
  log "stapesd-a stopped"
  sync_results
fi
# Stage 5: the project's own pre-copy test, two servers in the guest
if grep -q probe.stage=5 /proc/cmdline; then
  cd /work/main
  export STAPES_KEEP_LOGS=/results
  TAIL=80 run "guest mounts (non-trivial types)" 30 sh -c "findmnt -rn -o TARGET,FSTYPE,SOURCE | grep -v -E ' (ext4|cgroup|proc|sysfs|tmpfs|devtmpfs|devpts)( |$)'"
  (while :; do find /tmp -path '*stapes-test*' \( -name restore.log -o -name dump.log -o -name pre-dump.log \) -exec cp --parents {} /results/ \; 2>/dev/null; sleep 1; done) &
  TAIL=60 run "pytest test_incremental_memory_in_rounds" 1800 .venv/bin/pytest -q -x -p no:cacheprovider \
      "tests/integration/test_live_migration.py::test_incremental_memory_in_rounds"
  sync_results
fi
log "PROBE-DONE"
umount /results
grep -q probe.poweroff=1 /proc/cmdline && systemctl poweroff --no-block
exit 0

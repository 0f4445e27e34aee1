#!/usr/bin/env bash
# The main job, end to end: two local Stapes servers, a client trusted on both, containers on them.
# Everything it starts is stopped and removed on exit.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN="$PWD/.venv/bin"
ROOT="$(mktemp -d /tmp/stapes-demo.XXXXXX)"
chmod 711 "$ROOT"   # unprivileged containers' root (a high uid) must traverse to their files
PORT="${STAPES_DEMO_PORT:-8443}"
export STAPES_CONF="$ROOT/client"
pids=()

wait_address() {  # remote:name -> prints its IPv4 address once DHCP gave it one
    for _ in $(seq 120); do
        addr=$("$BIN/stapes" list "${1%%:*}:" --format csv -c n4 | awk -F, -v n="${1#*:}" '$1 == n {print $2}')
        [ -n "$addr" ] && { echo "$addr"; return 0; }
        sleep 0.5
    done
    echo "no address for $1" >&2; return 1
}
say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
run() { printf '$ %s\n' "$*"; "$@"; }

cleanup() {
    say "Cleaning up"
    for s in s1 s2; do
        [ -S "$ROOT/$s/unix.socket" ] || continue
        for name in $(STAPES_DIR="$ROOT/$s" STAPES_CONF="$ROOT/root-$s" "$BIN/stapes" list --all-projects \
                      --format csv -c n 2>/dev/null); do
            STAPES_DIR="$ROOT/$s" STAPES_CONF="$ROOT/root-$s" "$BIN/stapes" delete --force -q "$name" \
                2>/dev/null || true
        done
    done
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
    for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
    for s in s1 s2; do "$BIN/python" -m stapes.server.networks.cleanup "$ROOT/$s" >/dev/null 2>&1 || true; done
    rm -rf "$ROOT"
}
trap cleanup EXIT

start_server() {  # name address
    "$BIN/stapesd" --state-dir "$ROOT/$1" --https-address "$2" >"$ROOT/$1.log" 2>&1 &
    pids+=($!)
    for _ in $(seq 100); do
        [ -S "$ROOT/$1/unix.socket" ] && return 0
        kill -0 "${pids[-1]}" 2>/dev/null || break
        sleep 0.1
    done
    echo "stapesd $1 did not start:" >&2; cat "$ROOT/$1.log" >&2; exit 1
}

say "Starting two servers: s1 on 127.0.0.1:$PORT, s2 on 127.0.0.2:$PORT"
start_server s1 "127.0.0.1:$PORT"
start_server s2 "127.0.0.2:$PORT"

say "Trusting this client on both servers with single-use tokens"
for s in s1 s2; do
    token=$(STAPES_DIR="$ROOT/$s" STAPES_CONF="$ROOT/root-$s" "$BIN/stapes" config trust add "demo-$s" | tail -n1)
    addr=$([ $s = s1 ] && echo 127.0.0.1 || echo 127.0.0.2)
    run "$BIN/stapes" remote add "$s" "https://$addr:$PORT" --token "$token"
done
run "$BIN/stapes" remote list

say "The built-in busybox image (made locally from busybox-static)"
run "$BIN/stapes" image list s1:

say "Each server: what it is, and its own bridge (DHCP, DNS, NAT) on a subnet nothing else on the host uses"
run "$BIN/stapes" info s1:
run "$BIN/stapes" network list s1:
run "$BIN/stapes" network list s2:

say "Launching a container on s1 with limits, and running commands in it"
run "$BIN/stapes" launch s1:busybox c1 -c limits.memory=64MiB -c limits.cpu=1
run "$BIN/stapes" exec s1:c1 -- cat /etc/hostname
echo "# unprivileged by default: root inside (uid 0) is host uid 1000000"
run "$BIN/stapes" exec s1:c1 -- cat /proc/self/uid_map
echo "# its cgroups are mounted inside (cgroup v1 on this host), so it sees its own memory limit"
run "$BIN/stapes" exec s1:c1 -- sh -c 'echo "memory limit: $(cat /sys/fs/cgroup/memory/memory.limit_in_bytes 2>/dev/null || cat /sys/fs/cgroup/memory.max)"'
echo "hello through stdin" | run "$BIN/stapes" exec s1:c1 -- cat
set +e; run "$BIN/stapes" exec s1:c1 -- sh -c 'exit 3'; echo "exit status passed on: $?"; set -e

say "A profile and a project on s2"
run "$BIN/stapes" profile create s2:small
run "$BIN/stapes" profile set s2:small limits.memory=32MiB
run "$BIN/stapes" project create s2:staging
run "$BIN/stapes" --project staging launch s2:busybox web -p default -p small
run "$BIN/stapes" --project staging exec s2:web -- hostname
run "$BIN/stapes" --project staging config show s2:web --expanded

say "Listing both servers"
run "$BIN/stapes" list s1:
run "$BIN/stapes" list s2: --all-projects
run "$BIN/stapes" info s1:c1

say "Moving containers between the servers: pull, push and relay"
run "$BIN/stapes" launch s1:busybox mover
run "$BIN/stapes" exec s1:mover -- sh -c 'dd if=/dev/urandom of=/root/data.bin bs=1M count=64 2>/dev/null; md5sum /root/data.bin'
run "$BIN/stapes" snapshot create s1:mover before-move
run "$BIN/stapes" move s1:mover s2: --stateless           # stop, move, start; pull (the default): s2 dials s1
run "$BIN/stapes" exec s2:mover -- md5sum /root/data.bin
run "$BIN/stapes" snapshot list s2:mover
run "$BIN/stapes" stop s2:mover --force
run "$BIN/stapes" move s2:mover s1:mover2 --mode push     # s2 dials s1
run "$BIN/stapes" move s1:mover2 s2:mover3 --mode relay -c limits.memory=96MiB   # this client relays
run "$BIN/stapes" copy s2:mover3 s1:backup --instance-only
run "$BIN/stapes" exec s2:mover3 -- true 2>/dev/null || run "$BIN/stapes" start s2:mover3
run "$BIN/stapes" exec s2:mover3 -- sh -c 'echo changed > /root/new-file'
run "$BIN/stapes" stop s2:mover3 --force
run "$BIN/stapes" copy s2:mover3 s1:backup --refresh      # only what changed travels
run "$BIN/stapes" list s1:
run "$BIN/stapes" list s2:
run "$BIN/stapes" delete s1:backup
run "$BIN/stapes" delete s2:mover3

say "Live moves: a running container moves with its processes (CRIU), in pull, push and relay mode"
run "$BIN/stapes" launch s1:busybox counter
# A loop counting in a shell variable every 100 ms, with its PID (setsid: its session must be inside)
run "$BIN/stapes" exec s1:counter -- sh -c "setsid sh -c 'i=0; while true; do i=\$((i+1)); echo \$i \$\$ >> /root/counter; sleep 0.1; done' </dev/null >/dev/null 2>&1 &"
sleep 1
run "$BIN/stapes" exec s1:counter -- tail -1 /root/counter
run "$BIN/stapes" config set s1:counter migration.incremental.memory=true   # pre-copy, where the kernel can
run "$BIN/stapes" move s1:counter s2:
run "$BIN/stapes" exec s2:counter -- tail -1 /root/counter
run "$BIN/stapes" move s2:counter s1: --mode push
run "$BIN/stapes" move s1:counter s2: --mode relay
# The same process (same PID inside) went on counting: no reset, no gap
run "$BIN/stapes" exec s2:counter -- sh -c 'echo "$(wc -l < /root/counter) lines, the last: $(tail -1 /root/counter)"; awk "\$1 != NR { print \"gap at line \" NR; exit 1 }" /root/counter && echo "every number once, in order"'
run "$BIN/stapes" delete --force s2:counter

say "A networked, unprivileged container moves: owners inside, MAC address kept, an address on the target"
run "$BIN/stapes" launch s1:busybox web1
run "$BIN/stapes" launch s1:busybox web2
echo "address of web1 on s1: $(wait_address s1:web1)"; wait_address s1:web2 >/dev/null
run "$BIN/stapes" exec s1:web2 -- ping -c1 -W2 web1       # by name, from the network's DNS
run "$BIN/stapes" exec s1:web1 -- sh -c 'echo secret > /root/f && chown 1000:42 /root/f && chmod 4640 /root/f'
run "$BIN/stapes" exec s1:web1 -- stat -c '%n %u:%g %a' /root/f
run "$BIN/stapes" list s1: -c ns4
run "$BIN/stapes" config get s1:web1 volatile.eth0.hwaddr
run "$BIN/stapes" move s1:web1 s2: --stateless
echo "address of web1 on s2: $(wait_address s2:web1)"
run "$BIN/stapes" list s2: -c ns4
run "$BIN/stapes" exec s2:web1 -- stat -c '%n %u:%g %a' /root/f
run "$BIN/stapes" exec s2:web1 -- cat /sys/class/net/eth0/address
run "$BIN/stapes" delete --force s1:web2

say "A move to a server without the container's network is refused before anything moves"
run "$BIN/stapes" network create s1:backend
run "$BIN/stapes" launch s1:busybox db -d eth0,network=backend
run "$BIN/stapes" stop s1:db
run "$BIN/stapes" move s1:db s2: || true
run "$BIN/stapes" list s1: -c ns
run "$BIN/stapes" move s1:db s2: -d eth0,network=stapesbr0 --mode push
run "$BIN/stapes" start s2:db
echo "address of db on s2: $(wait_address s2:db)"
run "$BIN/stapes" delete --force s2:db s2:web1
run "$BIN/stapes" network delete s1:backend

say "A Debian 12 system image, built on s1 with mmdebstrap (cached for a week), booting its own init"
run "$BIN/stapes" image build debian/12 s1:
run "$BIN/stapes" launch s1:debian/12 deb
echo "address of deb on s1: $(wait_address s1:deb)"
run "$BIN/stapes" exec s1:deb -- sh -c 'ps -e | head -4; stat -c "%n %U:%G %a" /etc/shadow /usr/bin/passwd'
run "$BIN/stapes" move s1:deb s2: --stateless --mode relay
echo "address of deb on s2: $(wait_address s2:deb)"
run "$BIN/stapes" exec s2:deb -- sh -c 'stat -c "%n %U:%G %a" /etc/shadow /usr/bin/passwd'
run "$BIN/stapes" delete --force s2:deb

say "A failed move leaves everything as it was"
run "$BIN/stapes" launch s1:busybox safe
run "$BIN/stapes" stop s1:safe --force
run "$BIN/stapes" move s1:safe s2: -s nosuchpool || true
run "$BIN/stapes" list s1:
run "$BIN/stapes" delete s1:safe

say "An instance taking part in a move is busy: other changes are refused at once"
run "$BIN/stapes" storage create s1:slow dir rsync.bwlimit=8MiB   # a slow pool, so the move lasts a while
run "$BIN/stapes" init s1:busybox busy -s slow
dd if=/dev/urandom of="$ROOT/s1/storage-pools/slow/containers/busy/rootfs/data.bin" bs=1M count=24 status=none
printf '$ %s\n' "stapes move s1:busy s2: -s default --transport rsync &"
"$BIN/stapes" move s1:busy s2: -s default --transport rsync -q & mover=$!
sleep 1.5
run "$BIN/stapes" move s1:busy s2:second -s default || true
run "$BIN/stapes" delete s1:busy || true
wait "$mover"
run "$BIN/stapes" list s2:
run "$BIN/stapes" delete s2:busy
run "$BIN/stapes" storage delete s1:slow

say "Errors are one clear line, and change nothing"
run "$BIN/stapes" launch s1:busybox 9bad || true
run "$BIN/stapes" stop s1:c1 --force
run "$BIN/stapes" stop s1:c1 || true
run "$BIN/stapes" config set s1:c1 limits.bogus=1 || true

say "Daily use: a shell on a terminal, files, volumes, backups, images from instances, ephemeral instances"
run "$BIN/stapes" launch s1:busybox daily
echo '# a shell on a terminal of its own (what "stapes exec daily -- sh" opens in yours), fed by a pipe here'
printf 'tty; echo $((6*7)); exit 4\n' | run "$BIN/stapes" exec -t s1:daily -- sh || echo "exit status: $?"
echo "greetings from the host" > "$ROOT/hello.txt"
run "$BIN/stapes" file push "$ROOT/hello.txt" s1:daily/root/hello.txt --mode 0640 --uid 1000
run "$BIN/stapes" exec s1:daily -- ls -ln /root/hello.txt
run "$BIN/stapes" file pull s1:daily/etc/hostname -
run "$BIN/stapes" storage volume create s1:default shared
run "$BIN/stapes" storage volume attach s1:default shared daily /srv/shared
run "$BIN/stapes" exec s1:daily -- sh -c 'echo kept > /srv/shared/note; cat /srv/shared/note'
run "$BIN/stapes" config device list s1:daily
run "$BIN/stapes" list s1: status=running -c ns4 -f csv
echo "# export to a backup tarball, import it on s2 under a new name"
run "$BIN/stapes" storage volume detach s1:default shared daily
run "$BIN/stapes" stop s1:daily
run "$BIN/stapes" export s1:daily "$ROOT/daily.tar.gz" -q
run "$BIN/stapes" import s2: "$ROOT/daily.tar.gz" restored
run "$BIN/stapes" list s2: restored
echo "# publish an instance as an image, launch from it"
run "$BIN/stapes" publish s1:daily s1: --alias daily-image
run "$BIN/stapes" launch s1:daily-image fromimage -e
run "$BIN/stapes" exec s1:fromimage -- cat /root/hello.txt
echo "# an ephemeral instance goes away when it stops"
run "$BIN/stapes" stop s1:fromimage
run "$BIN/stapes" list s1: fromimage
run "$BIN/stapes" delete s1:daily s2:restored
run "$BIN/stapes" storage volume delete s1:default shared
run "$BIN/stapes" version s1:

say "Virtual machines: QEMU (TCG here: this host's KVM cannot run ordinary guests), the built-in tiny VM image"
run "$BIN/stapes" image build busybox --vm s1: -q
run "$BIN/stapes" image list s1:
run "$BIN/stapes" launch s1:busybox-vm v1 --vm -c limits.memory=256MiB -c limits.cpu=1 -d root,size=1GiB
for _ in $(seq 120); do
    "$BIN/stapes" console s1:v1 --show-log 2>/dev/null | grep -q 'heartbeat 2' && break
    sleep 0.5
done
echo "# its serial console log: the guest counts its heartbeats"
run "$BIN/stapes" console s1:v1 --show-log | grep heartbeat | tail -n 2
echo "# a command inside the VM, through the Stapes guest agent on a virtio-serial port"
for _ in $(seq 60); do "$BIN/stapes" exec s1:v1 -- true 2>/dev/null && break; sleep 0.5; done
run "$BIN/stapes" exec s1:v1 -- uname -r
run "$BIN/stapes" exec s1:v1 -- sh -c 'echo "kept on the disk" > /mnt/data/note; sync'
echo "# a running VM moves live only with migration.stateful=true: this one is refused, saying how to go on"
run "$BIN/stapes" move s1:v1 s2: || true
echo "# stopped, it moves with its disk (only the allocated data travels), and boots on s2"
run "$BIN/stapes" stop s1:v1
run "$BIN/stapes" snapshot create s1:v1 first
run "$BIN/stapes" move s1:v1 s2: --mode push
run "$BIN/stapes" start s2:v1
for _ in $(seq 60); do "$BIN/stapes" exec s2:v1 -- true 2>/dev/null && break; sleep 0.5; done
run "$BIN/stapes" exec s2:v1 -- cat /mnt/data/note
echo "# with migration.stateful=true it moves live: disk mirrored and memory sent while the guest runs"
run "$BIN/stapes" config set s2:v1 migration.stateful=true
run "$BIN/stapes" console s2:v1 --show-log | grep heartbeat | tail -n 1
run "$BIN/stapes" move s2:v1 s1:
sleep 2
echo "# the same guest goes on counting on s1 (no reboot: its heartbeat continues from where it was)"
run "$BIN/stapes" console s1:v1 --show-log | grep heartbeat | head -n 1
run "$BIN/stapes" exec s1:v1 -- cat /mnt/data/note
run "$BIN/stapes" list s1: v1 -c ntsS
run "$BIN/stapes" delete --force s1:v1

"$BIN/python" scripts/demo_incus.py

say "Stopping and deleting"
run "$BIN/stapes" delete s1:c1
run "$BIN/stapes" --project staging delete s2:web --force
run "$BIN/stapes" list s1:
say "Demo finished"

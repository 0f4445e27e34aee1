#!/usr/bin/env bash
# Step 3 (host side): put Stapes, its Python, the project's CRIU and the probe into the rootfs.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=${ROOT:-$HERE/rootfs}
t0=$(date +%s.%N)
mkdir -p "$ROOT"/opt/stapes "$ROOT"/root/.pyenv/versions "$ROOT"/work/main
rsync -a /opt/stapes/criu "$ROOT"/opt/stapes/
# CPython 3.11.7 without its test suite and without its own site-packages (the venv does not see them)
rsync -a --exclude=/3.11.7/lib/python3.11/test/ --exclude=/3.11.7/lib/python3.11/site-packages/ \
      /root/.pyenv/versions/3.11.7 "$ROOT"/root/.pyenv/versions/
mkdir -p "$ROOT"/root/.pyenv/versions/3.11.7/lib/python3.11/site-packages
# the repository (read only from here), its venv (editable install pointing at /work/main/src)
rsync -a --exclude=/.git/ --exclude=/.mypy_cache/ --exclude=/.ruff_cache/ --exclude=/.pytest_cache/ \
      /work/main/ "$ROOT"/work/main/
# the guest copy of the test harness: TCG is slower, give a server longer to come up
sed -i 's/def start(self, timeout: float = 30)/def start(self, timeout: float = 600)/' \
      "$ROOT"/work/main/tests/integration/harness.py
install -m 755 "$HERE"/probe.sh "$ROOT"/usr/local/sbin/probe.sh
cat > "$ROOT"/etc/systemd/system/probe.service <<'UNIT'
[Unit]
Description=Stapes nested probe
After=multi-user.target

[Service]
Type=oneshot
ExecStart=/usr/local/sbin/probe.sh
TimeoutStartSec=infinity
StandardOutput=journal

[Install]
WantedBy=multi-user.target
UNIT
mkdir -p "$ROOT"/etc/systemd/system/multi-user.target.wants
ln -sf /etc/systemd/system/probe.service "$ROOT"/etc/systemd/system/multi-user.target.wants/probe.service
# what a host gets from scripts/setup-system.sh / setup-criu.sh
echo "root:1000000:1000000000" > "$ROOT"/etc/subuid
echo "root:1000000:1000000000" > "$ROOT"/etc/subgid
echo "fs.pipe-max-size = 4194304" > "$ROOT"/etc/sysctl.d/60-stapes-criu.conf
echo stapes-nested > "$ROOT"/etc/hostname
printf '127.0.0.1 localhost\n127.0.1.1 stapes-nested\n::1 localhost ip6-localhost\n' > "$ROOT"/etc/hosts
echo "/dev/vda / ext4 rw,errors=remount-ro 0 1" > "$ROOT"/etc/fstab
# a fixed machine-id: no first-boot logic
echo 5f0c1d6e3a2b4c8d9e7f60718293a4b5 > "$ROOT"/etc/machine-id
sed -i 's/^root:[^:]*:/root::/' "$ROOT"/etc/shadow
# nothing at boot that this guest does not need
for u in apt-daily.timer apt-daily-upgrade.timer e2scrub_all.timer e2scrub_reap.service fstrim.timer \
         lxc.service lxc-net.service lxc-monitord.service serial-getty@ttyS0.service; do
    ln -sf /dev/null "$ROOT"/etc/systemd/system/$u
done
rm -f "$ROOT"/var/cache/apt/archives/*.deb "$ROOT"/var/lib/apt/lists/*_Packages 2>/dev/null || true
echo "customise: $(awk "BEGIN{print $(date +%s.%N)-$t0}") s"
du -sh "$ROOT"

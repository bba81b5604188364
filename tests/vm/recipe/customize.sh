#!/bin/bash
# mmdebstrap --customize-hook: turns the minbase tree ($1) into the VM suite's base guest (the
# Debian side; tests/vm/build.py then installs cva with image/install.sh, exactly as a user's
# image build does, and the test tools into /opt/venv). $CVA_VM_RECIPE is this folder.
set -euo pipefail
root=$1
recipe=${CVA_VM_RECIPE:?}

echo cva-vm > "$root/etc/hostname"
printf '127.0.0.1 localhost\n127.0.1.1 cva-vm\n' > "$root/etc/hosts"
printf 'LABEL=cvavmroot / ext4 rw,errors=remount-ro 0 1\n' > "$root/etc/fstab"
chroot "$root" passwd -d root >/dev/null     # console login for debugging (cva_vm.keep=1)

install -m 0755 "$recipe/cva-vm-job"           "$root/usr/local/sbin/cva-vm-job"
install -m 0755 "$recipe/cva-vm-stage"         "$root/usr/local/sbin/cva-vm-stage"
install -m 0755 "$recipe/kata-agent-standin"   "$root/usr/local/sbin/kata-agent-standin"
install -m 0644 "$recipe/cva-vm-job.service"   "$root/etc/systemd/system/cva-vm-job.service"
install -m 0644 "$recipe/cva-vm-stage.service" "$root/etc/systemd/system/cva-vm-stage.service"
install -m 0644 "$recipe/cva-vm.network"       "$root/etc/systemd/network/20-cva-vm.network"
install -m 0644 "$recipe/modprobe.conf"        "$root/etc/modprobe.d/cva-vm.conf"
install -D -m 0644 "$recipe/journald.conf"     "$root/etc/systemd/journald.conf.d/cva-vm.conf"

# Kata's guest layout: kata-containers.target is the default unit; it requires basic.target,
# tmp.mount (Debian ships the unit outside the search path) and kata-agent.service (a stand-in).
install -m 0644 "$recipe/kata-containers.target" "$root/usr/lib/systemd/system/kata-containers.target"
install -m 0644 "$recipe/kata-agent.service"     "$root/usr/lib/systemd/system/kata-agent.service"
install -m 0644 "$root/usr/share/systemd/tmp.mount" "$root/etc/systemd/system/tmp.mount"
ln -sfn /usr/lib/systemd/system/kata-containers.target "$root/etc/systemd/system/default.target"
# The suite's own services join kata's target (multi-user.target is never reached).
wants="$root/etc/systemd/system/kata-containers.target.wants"
mkdir -p "$wants"
ln -sfn /etc/systemd/system/cva-vm-job.service "$wants/cva-vm-job.service"
ln -sfn /etc/systemd/system/cva-vm-stage.service "$wants/cva-vm-stage.service"
ln -sfn /lib/systemd/system/systemd-networkd.service "$wants/systemd-networkd.service"
chroot "$root" systemctl enable systemd-networkd.service
chroot "$root" systemctl mask \
    apt-daily.timer apt-daily-upgrade.timer dpkg-db-backup.timer e2scrub_all.timer \
    fstrim.timer e2scrub_reap.service getty@tty1.service getty-static.service

# A small initrd: the root file system is ext4 on virtio-blk, nothing else is needed early.
printf 'MODULES=list\nCOMPRESS=zstd\n' > "$root/etc/initramfs-tools/conf.d/cva-vm.conf"
printf 'virtio_pci\nvirtio_blk\next4\n' >> "$root/etc/initramfs-tools/modules"
chroot "$root" update-initramfs -u -k all

# /opt/venv: the guest tests' venv (pytest, ...; build.py installs them after cva). It sees the
# product venv /opt/cva through a .pth at the end of its path; the product never sees it.
chroot "$root" python3 -m venv /opt/venv
purelib=$(chroot "$root" /opt/venv/bin/python -c 'import sysconfig; print(sysconfig.get_path("purelib"))')
product=$(chroot "$root" python3 -c 'import sysconfig; print(sysconfig.get_path("purelib", vars={"base": "/opt/cva", "platbase": "/opt/cva"}))')
echo "$product" > "$root$purelib/cva-product.pth"

#!/bin/bash
# mmdebstrap --customize-hook: turns the minbase tree ($1) into the VM suite's base guest (the
# Debian side, cached as base-<key>; tests/vm/build.py then runs harness.sh, installs cva with
# image/install.sh, exactly as a user's image build does, and the test tools into /opt/venv).
# $CVA_VM_RECIPE is this folder. Only the files BASE_FILES in build.py names are used here.
set -euo pipefail
root=$1
recipe=${CVA_VM_RECIPE:?}

echo cva-vm > "$root/etc/hostname"
printf '127.0.0.1 localhost\n127.0.1.1 cva-vm\n' > "$root/etc/hosts"
printf 'LABEL=cvavmroot / ext4 rw,errors=remount-ro 0 1\n' > "$root/etc/fstab"
chroot "$root" passwd -d root >/dev/null     # console login for debugging (cva_vm.keep=1)

install -m 0644 "$recipe/cva-vm.network"       "$root/etc/systemd/network/20-cva-vm.network"
install -m 0644 "$recipe/modprobe.conf"        "$root/etc/modprobe.d/cva-vm.conf"
install -D -m 0644 "$recipe/journald.conf"     "$root/etc/systemd/journald.conf.d/cva-vm.conf"
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

#!/bin/bash
# mmdebstrap --customize-hook: turns the minbase tree ($1) into the bootable test guest.
# $CVA_VM_RECIPE is this folder; $CVA_VM_WHEELS a host folder with the guest's wheels plus
# requirements.txt and constraints.txt (downloaded/built on the host: pip inside the chroot
# never touches the network).
set -euo pipefail
root=$1
recipe=${CVA_VM_RECIPE:?}
wheels=${CVA_VM_WHEELS:?}

echo cva-vm > "$root/etc/hostname"
printf '127.0.0.1 localhost\n127.0.1.1 cva-vm\n' > "$root/etc/hosts"
printf 'LABEL=cvavmroot / ext4 rw,errors=remount-ro 0 1\n' > "$root/etc/fstab"
chroot "$root" passwd -d root >/dev/null     # console login for debugging (cva_vm.keep=1)

install -m 0755 "$recipe/cva-vm-job"         "$root/usr/local/sbin/cva-vm-job"
install -m 0644 "$recipe/cva-vm-job.service" "$root/etc/systemd/system/cva-vm-job.service"
install -m 0644 "$recipe/cva-vm.network"     "$root/etc/systemd/network/20-cva-vm.network"
install -m 0644 "$recipe/modprobe.conf"      "$root/etc/modprobe.d/cva-vm.conf"
install -D -m 0644 "$recipe/journald.conf"   "$root/etc/systemd/journald.conf.d/cva-vm.conf"

chroot "$root" systemctl enable systemd-networkd.service cva-vm-job.service
chroot "$root" systemctl mask \
    apt-daily.timer apt-daily-upgrade.timer dpkg-db-backup.timer e2scrub_all.timer \
    fstrim.timer e2scrub_reap.service getty@tty1.service getty-static.service

# A small initrd: the root file system is ext4 on virtio-blk, nothing else is needed early.
printf 'MODULES=list\nCOMPRESS=zstd\n' > "$root/etc/initramfs-tools/conf.d/cva-vm.conf"
printf 'virtio_pci\nvirtio_blk\next4\n' >> "$root/etc/initramfs-tools/modules"
chroot "$root" update-initramfs -u -k all

# /opt/venv with the project's dependencies, offline from the host's wheels.
mkdir -p "$root/tmp/cva-wheels"
cp -a "$wheels/." "$root/tmp/cva-wheels/"
chroot "$root" python3 -m venv /opt/venv
chroot "$root" env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root \
    /opt/venv/bin/pip install --quiet --no-index --disable-pip-version-check \
    --find-links /tmp/cva-wheels \
    -r /tmp/cva-wheels/requirements.txt -c /tmp/cva-wheels/constraints.txt
chroot "$root" env -i PATH=/usr/bin:/bin /opt/venv/bin/python -c 'import tpm2_pytss, cryptography, grpc'
rm -rf "$root/tmp/cva-wheels"

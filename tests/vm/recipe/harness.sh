#!/bin/bash
# The VM suite's own files on a copy of the base tree ($1), before image/install.sh: the job
# runner, the stage step, and kata's guest layout. Run by tests/vm/build.py for every image
# build (cheap: a change here does not rebuild the Debian base tree). $2 is this folder.
set -euo pipefail
root=$1
recipe=$2

install -m 0755 "$recipe/cva-vm-job"           "$root/usr/local/sbin/cva-vm-job"
install -m 0755 "$recipe/cva-vm-stage"         "$root/usr/local/sbin/cva-vm-stage"
install -m 0755 "$recipe/kata-agent-standin"   "$root/usr/local/sbin/kata-agent-standin"
install -m 0644 "$recipe/cva-vm-job.service"   "$root/etc/systemd/system/cva-vm-job.service"
install -m 0644 "$recipe/cva-vm-stage.service" "$root/etc/systemd/system/cva-vm-stage.service"

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
# the serial console login of `python -m tests.vm.shell` / cva_vm.keep=1
ln -sfn /lib/systemd/system/getty.target "$wants/getty.target"


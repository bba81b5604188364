#!/bin/sh
# Install cva into a guest root file system directory (the step between kata osbuilder's
# rootfs.sh and image_builder.sh; a mkosi postinst; the VM suite's image build).
#
#   image/install.sh --rootfs DIR --dist DIST --tee tdx|snp|tpm[,...] [--config FILE]
#                    [--python python3] [--hooks DIR]
#
# DIST is what `make dist` writes: the cva wheel, wheels/, requirements.lock, tpm.lock.
# Run as root (it chroots into DIR to build the venv with the guest's own Python). It writes:
#   /opt/cva/                 venv: cva + its locked dependencies (+ the tpm extra when the TEE
#                             list has tpm), offline from DIST, --require-hashes; no pip;
#                             deterministic .pyc (checked-hash)
#   /usr/lib/systemd/system/cva.service  and its WantedBy links in /etc/systemd/system/
#                             {kata-containers,multi-user}.target.wants/
#   /etc/cva/config.toml      only with --config (without it cva runs on its defaults)
#   /etc/lvm/lvmlocal.conf    a marked block: LVM event autoactivation off
#   /etc/modules-load.d/cva.conf   dm_crypt, dm_integrity, the virtio vsock transport and the
#                             TEE guest drivers of --tee
#   /usr/share/oci/hooks/STAGE/NAME  every regular file of image/hooks/STAGE/ (mode 0755;
#                             --hooks DIR: another folder of that layout)
# Reproducible: the same DIR, DIST and arguments give byte-identical files with mtimes
# SOURCE_DATE_EPOCH (default: the time stamp inside the cva wheel).
set -eu
umask 022
export LC_ALL=C

here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/.." && pwd)
rootfs= dist= tee= config= python=python3 hooks=$here/hooks

die() { echo "image/install.sh: $*" >&2; exit 1; }

while [ $# -gt 0 ]; do
    case $1 in
        --rootfs) rootfs=${2:?}; shift 2 ;;
        --dist) dist=${2:?}; shift 2 ;;
        --tee) tee=${2:?}; shift 2 ;;
        --config) config=${2:?}; shift 2 ;;
        --python) python=${2:?}; shift 2 ;;
        --hooks) hooks=${2:?}; shift 2 ;;
        -h|--help) sed -n '2,/^set -eu/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) die "unknown argument $1 (see --help)" ;;
    esac
done
[ -n "$rootfs" ] || die "--rootfs DIR is required"
[ -n "$dist" ] || die "--dist DIST is required (make dist writes dist/)"
[ -n "$tee" ] || die "--tee is required: tdx, snp or tpm (comma-separated for several)"
[ "$(id -u)" = 0 ] || die "run as root (it chroots into the rootfs)"
rootfs=$(cd "$rootfs" && pwd) || die "no rootfs directory $rootfs"
[ "$rootfs" != / ] || die "refusing to install into / (pass a guest rootfs directory)"
dist=$(cd "$dist" && pwd) || die "no dist directory $dist"

modules="dm_crypt dm_integrity vmw_vsock_virtio_transport"
extras=udev
for t in $(echo "$tee" | tr ',' ' '); do
    case $t in
        tdx) modules="$modules tdx_guest" ;;
        snp) modules="$modules sev-guest" ;;
        tpm) modules="$modules tpm_crb tpm_tis"; extras="$extras tpm" ;;
        *) die "--tee $t: expected tdx, snp or tpm" ;;
    esac
done

set -- "$dist"/confidential_volume_agent-*-py3-none-any.whl
[ $# = 1 ] && [ -f "$1" ] || die "expected exactly one cva wheel in $dist (run make dist)"
wheel=$1
version=$(basename "$wheel" | cut -d- -f2)
[ -f "$dist/requirements.lock" ] && [ -d "$dist/wheels" ] || die "$dist lacks requirements.lock or wheels/ (run make dist)"
case " $extras " in *" tpm "*) [ -f "$dist/tpm.lock" ] || die "$dist lacks tpm.lock" ;; esac
[ -d "$rootfs/etc/lvm" ] || die "the rootfs has no /etc/lvm: install lvm2 in it first"
if [ -n "$config" ]; then [ -f "$config" ] || die "no config file $config"; fi
if [ -d "$hooks" ]; then
    bad=$(find "$hooks" ! -type f ! -type d)
    [ -z "$bad" ] || die "$hooks may hold only regular files and folders (kata skips symlinks): $bad"
fi

in_root() { chroot "$rootfs" /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root \
    LC_ALL=C.UTF-8 PYTHONHASHSEED=0 PYTHONDONTWRITEBYTECODE=1 SOURCE_DATE_EPOCH="$epoch" "$@"; }
epoch=${SOURCE_DATE_EPOCH:-0}
in_root "$python" -c 'import sys, ensurepip; sys.exit(sys.version_info < (3, 11))' 2>/dev/null \
    || die "the rootfs needs $python >= 3.11 with venv/ensurepip (Debian/Ubuntu: python3-venv); see README"

# --- /opt/cva -------------------------------------------------------------------------------
stage=/tmp/cva-install
rm -rf "$rootfs$stage" "$rootfs/opt/cva"
mkdir -p "$rootfs$stage"
cp -R "$dist/wheels" "$rootfs$stage/wheels"
cp "$wheel" "$dist"/*.lock "$rootfs$stage/"
if [ -z "${SOURCE_DATE_EPOCH:-}" ]; then
    epoch=$(in_root "$python" -c 'import sys, zipfile, calendar
with zipfile.ZipFile(sys.argv[1]) as zf:
    print(max(calendar.timegm(i.date_time + (0, 0, -1)) for i in zf.infolist()))' \
        "$stage/$(basename "$wheel")")
fi
locks="-r $stage/requirements.lock"
case " $extras " in *" tpm "*) locks="$locks -r $stage/tpm.lock" ;; esac
pip="/opt/cva/bin/python -m pip install --quiet --no-index --no-cache-dir --no-compile
    --disable-pip-version-check --find-links $stage/wheels --find-links $stage"
in_root "$python" -m venv /opt/cva
# shellcheck disable=SC2086  # word splitting of $pip and $locks is intended
in_root $pip --require-hashes --no-deps $locks
# shellcheck disable=SC2086
in_root $pip --no-deps "confidential-volume-agent==$version"
in_root /opt/cva/bin/python -m pip uninstall --quiet --yes pip setuptools 2>/dev/null \
    || in_root /opt/cva/bin/python -m pip uninstall --quiet --yes pip
find "$rootfs/opt/cva" -name __pycache__ -type d -prune -exec rm -rf {} +
in_root /opt/cva/bin/python -m compileall -q -j 1 --invalidation-mode checked-hash \
    /opt/cva/lib >/dev/null
in_root /opt/cva/bin/cva --version >/dev/null || die "/opt/cva/bin/cva --version failed in the rootfs"
# shellcheck disable=SC2086
for extra in $extras; do
    case $extra in
        tpm) probe=tpm2_pytss ;;
        udev) probe=pyudev ;;
    esac
    in_root /opt/cva/bin/python -c "import $probe" \
        || die "the $extra extra does not import in the rootfs (its shared libraries: see README)"
done
rm -rf "$rootfs$stage"
touch -h -d "@$epoch" "$rootfs/tmp"

# --- systemd, config, LVM, modules, hooks ---------------------------------------------------
written="/opt/cva"
put() {  # put MODE SOURCE TARGET: install one regular file
    install -D -m "$1" "$2" "$rootfs$3"
    written="$written $3"
}
put 0644 "$repo/systemd/cva.service" /usr/lib/systemd/system/cva.service
for target in kata-containers.target multi-user.target; do
    mkdir -p "$rootfs/etc/systemd/system/$target.wants"
    ln -sfn /usr/lib/systemd/system/cva.service "$rootfs/etc/systemd/system/$target.wants/cva.service"
    written="$written /etc/systemd/system/$target.wants/cva.service"
done
if [ -n "$config" ]; then
    put 0644 "$config" /etc/cva/config.toml
fi

lvmlocal=$rootfs/etc/lvm/lvmlocal.conf
begin="# BEGIN cva (image/install.sh)"
end="# END cva"
if [ -f "$lvmlocal" ]; then
    awk -v b="$begin" -v e="$end" '$0 == b {skip = 1} !skip {print} $0 == e {skip = 0}' \
        "$lvmlocal" > "$lvmlocal.cva-new"
else
    : > "$lvmlocal.cva-new"
fi
cat >> "$lvmlocal.cva-new" <<EOF
$begin
# cva checks an LV (plain linear, its own VG) before it activates it: udev must not activate a
# host-written VG (thin, raid, ...) as soon as its disk appears.
global {
	event_activation = 0
}
activation {
	auto_activation_volume_list = []
}
$end
EOF
chmod 0644 "$lvmlocal.cva-new"
mv "$lvmlocal.cva-new" "$lvmlocal"
written="$written /etc/lvm/lvmlocal.conf"

mkdir -p "$rootfs/etc/modules-load.d"
{
    echo "# cva (image/install.sh): device-mapper targets, the vsock transport, TEE guest drivers"
    for m in $modules; do echo "$m"; done
} > "$rootfs/etc/modules-load.d/cva.conf"
chmod 0644 "$rootfs/etc/modules-load.d/cva.conf"
written="$written /etc/modules-load.d/cva.conf"

if [ -d "$hooks" ]; then
    for stage_dir in "$hooks"/*/; do
        [ -d "$stage_dir" ] || continue
        stage_name=$(basename "$stage_dir")
        for hook in "$stage_dir"*; do  # no dot files (.gitkeep)
            [ -f "$hook" ] || continue
            put 0755 "$hook" "/usr/share/oci/hooks/$stage_name/$(basename "$hook")"
        done
    done
fi

# --- fixed time stamps: what was written, and every directory on the way to it ---------------
for path in $written; do
    find "$rootfs$path" -exec touch -h -d "@$epoch" {} +
    dir=$(dirname "$path")
    while [ "$dir" != / ]; do
        touch -h -d "@$epoch" "$rootfs$dir"
        dir=$(dirname "$dir")
    done
done
echo "image/install.sh: cva $version installed into $rootfs (tee: $tee; SOURCE_DATE_EPOCH=$epoch)"

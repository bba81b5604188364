"""Storage drivers: libcryptsetup binding, LUKS2 header defence, LVM, filesystems, mounts."""

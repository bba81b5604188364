"""A `container:<devicePath>` disk: the block device a container's own OCI spec lists (pure).

Kata hot-plugs a block-mode PVC (`volumeDevices`) for the container that uses it, with no
virtio serial, on virtio-scsi by default (SPEC §e.7). kata-agent keeps the spec's
`linux.devices[].path` (the PVC's `devicePath`) and rewrites `major`/`minor` to the guest's
device; that guest-side config.json (`/run/kata-containers/<cid>/config.json`) is what this
reads. The config is hostile input: exactly one entry with that path, a block device, numbers
in range. The MAJ:MIN only names a candidate: the usual checks (header, MAC and key, or the
blank proof before a format) still decide whether cva opens or creates anything on it.
"""

from __future__ import annotations

from agent.errors import InputError
from agent.policy import oci_config_json

MAX_DEVNUM = (1 << 32) - 1


class DeviceSpecError(InputError):
    """The container's spec does not name one usable block device at the devicePath."""


def spec_device(config: bytes, device_path: str) -> tuple[int, int]:
    """(major, minor) of the block device the OCI config lists at `device_path`."""
    doc = oci_config_json(config, DeviceSpecError)
    linux = doc.get("linux") if isinstance(doc, dict) else None
    devices = linux.get("devices") if isinstance(linux, dict) else None
    if not isinstance(devices, list):
        devices = []
    hits = [d for d in devices if isinstance(d, dict) and d.get("path") == device_path]
    if not hits:
        raise DeviceSpecError(
            f"the container's spec lists no device at {device_path} (linux.devices); is the PVC"
            " a block-mode volume (volumeDevices) with that devicePath?"
        )
    if len(hits) > 1:
        raise DeviceSpecError(f"the container's spec lists {device_path} {len(hits)} times")
    dev = hits[0]
    if dev.get("type") != "b":
        raise DeviceSpecError(f"{device_path} in the container's spec is not a block device")
    numbers = []
    for key in ("major", "minor"):
        value = dev.get(key)
        if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= MAX_DEVNUM:
            raise DeviceSpecError(f"{device_path} in the container's spec has no valid {key}")
        numbers.append(value)
    return numbers[0], numbers[1]

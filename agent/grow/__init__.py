"""Online grow: the daemon hears the kernel say a disk changed size (block `change` uevent with
RESIZE=1) and grows the mounted volume(s) on it (luks.grow). Entry point of host-influenced
input: the uevent bytes are parsed as hostile (agent.grow.uevent)."""

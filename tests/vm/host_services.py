"""Host processes the guest can reach during the VM suite (the registry other streams extend).

Each `HostService` is started on a free 127.0.0.1 port before the first boot, reached from
the guest through a qemu guestfwd (one socat per connection), and its guest-side URL is passed
to the guest tests in the environment variable `env_var`. Placeholders in `argv`: `{port}`
(the host port to listen on, always on 127.0.0.1), `{job}` (the host job folder, seen in the
guest as /mnt/vmjob), `{python}` (the host interpreter). The process runs with cwd = the repo.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class HostService:
    name: str
    env_var: str
    argv: tuple[str, ...]
    scheme: str = "http"
    ready_timeout: float = 30.0


# Extra arguments for the loopback KBS (tests/kbs/server.py, the kbs stream owns them),
# e.g. ("--resource", "kbs:///cva/key/vm-test=<hex>").
KBS_ARGS: tuple[str, ...] = ()


def host_services(repo: Path) -> list[HostService]:
    services = [
        HostService(
            name="echo",
            env_var="CVA_TEST_ECHO_URL",
            argv=("{python}", "-m", "tests.vm.echo_server", "--port", "{port}"),
        )
    ]
    if (repo / "tests" / "kbs" / "server.py").is_file():
        services.append(
            HostService(
                name="kbs",
                env_var="CVA_TEST_KBS_URL",
                argv=("{python}", "-m", "tests.kbs.server", "--port", "{port}", *KBS_ARGS),
            )
        )
    return services

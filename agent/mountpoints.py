"""Where a SecureMount may mount: an allow-list, pure (no I/O).

kata-agent asks CDH (here: cva) to mount in exactly two places (SPEC e.5):

- `/run/kata-containers/image` -- the trusted image storage (sent as `/run/kata-containers/image/`,
  with a trailing slash: kata's `KATA_IMAGE_WORK_DIR`);
- `/run/kata-containers/sandbox/storage/<id>` -- a block emptyDir, where `<id>` is one path
  component the kata runtime makes as base64url of the volume's source.

Nothing else is accepted unless the trusted image's config names it (`[securemount]
mount_roots`, agent.config): a root `"/abs/dir"` admits exactly that directory, `"/abs/dir/*"`
admits one `<id>` component below it. A root may never be `/`, a protected path, below one, or an
ancestor of one (a mount there would hide it).

A mount point is hostile text from the host: it must be absolute and normalised (one trailing
slash is dropped, as kata sends one; `//`, `/./`, `..`, NUL, relative paths are refused), match a
root, and not touch a protected path. The daemon checks the path the kernel resolved it to again
with the same rule (`MountRules.refusal`), so a symlink on the way cannot redirect it, and every
directory it creates on the way with `MountRules.on_the_way`.
"""

from __future__ import annotations

import posixpath
import re
from collections.abc import Iterable
from dataclasses import dataclass

KATA_IMAGE_STORAGE = "/run/kata-containers/image"  # kata-agent's KATA_IMAGE_WORK_DIR
KATA_SANDBOX_STORAGE = "/run/kata-containers/sandbox/storage"  # kataGuestSandboxStorageDir()
MAX_PATH_CHARS = 4096
MAX_COMPONENT_CHARS = 255  # NAME_MAX
# one `<id>` component of a `dir/*` root: base64url (RFC 4648 section 5), padding allowed
COMPONENT = re.compile(r"[A-Za-z0-9_-]{1,255}={0,2}")

# Paths no SecureMount may cover, land below, or sit above (a mount on an ancestor hides them):
# the guest's programs, libraries and config, cva's own venv and state, systemd's unit
# directories, CDH's/AA's sockets, kata's shared container rootfs directory, root's home.
PROTECTED_PATHS: tuple[str, ...] = (
    "/bin",
    "/boot",
    "/dev",
    "/etc",
    "/lib",
    "/lib32",
    "/lib64",
    "/libx32",
    "/opt",
    "/proc",
    "/root",
    "/run/confidential-containers",
    "/run/cva",
    "/run/kata-containers/shared",
    "/run/systemd",
    "/sbin",
    "/sys",
    "/usr",
    "/var/lib",
)


class MountPointError(ValueError):
    """A mount point or root that is not allowed; `rule` names why, the text says what."""

    def __init__(self, rule: str, message: str) -> None:
        super().__init__(message)
        self.rule = rule


def _show(value: str) -> str:
    return repr(value[:64] + ("..." if len(value) > 64 else ""))


def is_normalised(path: str) -> bool:
    """Absolute, no NUL, no empty/`.`/`..` component, no trailing slash (except `/`)."""
    return (
        path.startswith("/")
        and "\x00" not in path
        and len(path) <= MAX_PATH_CHARS
        and not path.startswith("//")
        and posixpath.normpath(path) == path
    )


def normalise_request_path(value: str) -> str:
    """The request's mount point with ONE trailing slash dropped (kata sends
    `/run/kata-containers/image/`); anything else not normalised raises MountPointError."""
    path = value[:-1] if len(value) > 1 and value.endswith("/") else value
    if not is_normalised(path):
        raise MountPointError(
            "not-normalised",
            f"mount_point {_show(value)} must be an absolute, normalised guest path",
        )
    return path


def _within(path: str, root: str) -> bool:
    """`path` is `root` or below it."""
    return root in (path, "/") or path.startswith(root + "/")


@dataclass(frozen=True)
class MountRoot:
    """`path` itself (children=False) or one `<id>` component below it (children=True)."""

    path: str
    children: bool

    def __str__(self) -> str:
        return f"{self.path}/*" if self.children else self.path

    def admits(self, path: str) -> bool:
        if not self.children:
            return path == self.path
        parent, _, name = path.rpartition("/")
        return (parent or "/") == self.path and COMPONENT.fullmatch(name) is not None

    def on_the_way(self, path: str) -> bool:
        """`path` is a directory that must exist for a mount this root admits."""
        return _within(self.path, path) or self.admits(path)


def protection_of(path: str, protected: Iterable[str]) -> str | None:
    """The protected path `path` equals, lies below, or is an ancestor of (None: none)."""
    for p in protected:
        if _within(path, p) or _within(p, path):
            return p
    return None


BUILTIN_ROOTS = (
    MountRoot(KATA_IMAGE_STORAGE, children=False),
    MountRoot(KATA_SANDBOX_STORAGE, children=True),
)


def parse_root(text: str, protected: Iterable[str] = PROTECTED_PATHS) -> MountRoot:
    """One image-config root (`/abs/dir` or `/abs/dir/*`), validated; raises MountPointError."""
    children = text.endswith("/*")
    path = text[:-2] if children else text
    if not is_normalised(path) or "*" in path:
        raise MountPointError(
            "mount-root", f"mount root {_show(text)} must be an absolute, normalised path"
        )
    if path == "/":
        raise MountPointError("mount-root", f"mount root {_show(text)} would cover /")
    hit = protection_of(path, protected)
    if hit is not None:
        raise MountPointError(
            "mount-root", f"mount root {_show(text)} would cover or hide protected {hit}"
        )
    return MountRoot(path, children)


@dataclass(frozen=True)
class MountRules:
    """The allow-list one daemon applies: kata's two places plus the image config's roots."""

    roots: tuple[MountRoot, ...] = BUILTIN_ROOTS
    protected: tuple[str, ...] = PROTECTED_PATHS

    @classmethod
    def build(
        cls, extra_roots: Iterable[MountRoot] = (), extra_protected: Iterable[str] = ()
    ) -> MountRules:
        protected = tuple(dict.fromkeys((*PROTECTED_PATHS, *extra_protected)))
        return cls(roots=(*BUILTIN_ROOTS, *extra_roots), protected=protected)

    def refusal(self, path: str) -> MountPointError | None:
        """Why a mount at `path` (normalised) is refused, or None when it is allowed."""
        if not is_normalised(path):
            return MountPointError(
                "not-normalised", f"{_show(path)} is not an absolute, normalised guest path"
            )
        hit = protection_of(path, self.protected)
        if hit is not None:
            return MountPointError(
                "protected", f"{_show(path)} would cover, hide or land in protected {hit}"
            )
        if not any(root.admits(path) for root in self.roots):
            allowed = ", ".join(str(r) for r in self.roots)
            return MountPointError(
                "not-allowed",
                f"{_show(path)} is not an allowed SecureMount mount point (allowed: {allowed};"
                " more only through the image config's [securemount] mount_roots)",
            )
        return None

    def on_the_way(self, path: str) -> MountPointError | None:
        """Why cva must not create directory `path` for a mount (None: it may)."""
        if (
            is_normalised(path)
            and any(root.on_the_way(path) for root in self.roots)
            and not any(_within(path, p) for p in self.protected)  # an ancestor is fine: mkdir
        ):
            return None
        return MountPointError(
            "not-allowed", f"{_show(path)} is not on the way to an allowed mount point"
        )

"""agent.mountpoints: the SecureMount allow-list, its config roots, and hostile paths."""

from __future__ import annotations

import base64
import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.config import ConfigError, parse_config
from agent.mountpoints import (
    KATA_IMAGE_STORAGE,
    KATA_SANDBOX_STORAGE,
    PROTECTED_PATHS,
    MountPointError,
    MountRoot,
    MountRules,
    normalise_request_path,
    parse_root,
)

DEFAULT = MountRules()
ID = re.compile(r"[A-Za-z0-9_-]+={0,2}")


def accepted(value: str, rules: MountRules = DEFAULT) -> str | None:
    """What the request check makes of `value`: the mount point, or None when refused."""
    try:
        path = normalise_request_path(value)
    except MountPointError:
        return None
    return None if rules.refusal(path) is not None else path


def test_kata_image_storage_with_and_without_the_trailing_slash() -> None:
    assert accepted("/run/kata-containers/image/") == KATA_IMAGE_STORAGE
    assert accepted("/run/kata-containers/image") == KATA_IMAGE_STORAGE


@pytest.mark.parametrize("source", ["/dev/vdb", "/dev/disk/by-id/virtio-x", "a" * 150, "?>~"])
def test_kata_sandbox_storage_base64url_ids(source: str) -> None:
    for encode in (base64.urlsafe_b64encode, lambda b: base64.urlsafe_b64encode(b).rstrip(b"=")):
        path = f"{KATA_SANDBOX_STORAGE}/{encode(source.encode()).decode()}"
        assert accepted(path) == path
        assert accepted(path + "/") == path


@pytest.mark.parametrize(
    "path",
    [
        "/",
        "/run",
        "/run/kata-containers",
        "/run/confidential-containers",
        "/run/systemd/system",
        "/var/lib",
        "/root",
        "/opt/venv/lib/python3.11/site-packages",
        "/run/cva",
        "/tmp/x",
        "/run/kata-containers/sandbox/storage",
        "/run/kata-containers/sandbox/storage/a+b",  # base64 (not url): '+' and '/'
        "/run/kata-containers/sandbox/storage/.hidden",
        "/run/kata-containers/sandbox/storage/a===",
        "/run/kata-containers/sandbox/storage/" + "A" * 256,
        "/run/kata-containers/sandbox/storage/ab/cd",
        "/run/kata-containers/image/x",
        "/run/kata-containers/0123abcd",
    ],
)
def test_hostile_paths_are_refused(path: str) -> None:
    assert accepted(path) is None
    assert accepted(path + "/") is None


@pytest.mark.parametrize(
    "value",
    ["", "relative", "/a//b", "//run/kata-containers/image", "/run/kata-containers/image//",
     "/run/./kata-containers/image", "/run/kata-containers/image/..", "/x\x00/y", "/a/b/."],
)  # fmt: skip
def test_not_normalised_is_refused_as_such(value: str) -> None:
    with pytest.raises(MountPointError) as info:
        normalise_request_path(value)
    assert info.value.rule == "not-normalised"


def oracle(path: str, extra: tuple[MountRoot, ...] = ()) -> bool:
    """An independent statement of the allow-list (no shared code with agent.mountpoints)."""
    if path == KATA_IMAGE_STORAGE:
        return True
    parent, _, name = path.rpartition("/")
    if parent == KATA_SANDBOX_STORAGE and ID.fullmatch(name) and len(name) <= 257:
        return True
    for root in extra:
        if (not root.children and path == root.path) or (
            root.children and parent == root.path and ID.fullmatch(name)
        ):
            return True
    return False


_parts = st.sampled_from(
    ["", ".", "..", "run", "kata-containers", "image", "sandbox", "storage", "etc", "cva",
     "confidential-containers", "a", "x=", "Zm9v", "-", "\x00", " ", "*", "mnt", "scratch"]
)  # fmt: skip
_paths = st.one_of(
    st.lists(_parts, max_size=7).map("/".join),
    st.lists(_parts, max_size=7).map(lambda p: "/" + "/".join(p)),
    st.lists(_parts, max_size=7).map(lambda p: "/" + "/".join(p) + "/"),
    st.text(max_size=60),
    st.text(alphabet="/.a=-_", max_size=30),
)


@given(_paths)
def test_nothing_outside_the_allowed_roots_is_ever_accepted(value: str) -> None:
    path = accepted(value)
    if path is None:
        return
    assert value in (path, path + "/")
    assert oracle(path), f"{value!r} was accepted as {path!r}"
    for protected in PROTECTED_PATHS:
        assert not (path == protected or path.startswith(protected + "/"))
        assert not protected.startswith(path + "/")


EXTRA = (parse_root("/mnt/scratch/*"), parse_root("/srv/cache"))


@given(_paths)
def test_config_roots_admit_exactly_what_they_say(value: str) -> None:
    path = accepted(value, MountRules.build(EXTRA))
    if path is not None:
        assert oracle(path, EXTRA), f"{value!r} was accepted as {path!r}"


def test_config_roots() -> None:
    rules = MountRules.build(EXTRA)
    assert accepted("/mnt/scratch/abc", rules) == "/mnt/scratch/abc"
    assert accepted("/mnt/scratch", rules) is None
    assert accepted("/srv/cache/", rules) == "/srv/cache"
    assert accepted("/srv/cache/x", rules) is None
    assert str(EXTRA[0]) == "/mnt/scratch/*"


@pytest.mark.parametrize(
    "root",
    ["/", "/*", "/run", "/run/*", "/run/kata-containers", "/run/confidential-containers/x",
     "/var", "/var/lib/x/*", "/opt/venv", "/usr/local/*", "/root", "/etc/x", "relative",
     "/a/../b", "/a/", "/a//b", "/a/**", "/a/*/b", "/a*", "/run/systemd/system"],
)  # fmt: skip
def test_config_roots_that_cover_or_hide_a_protected_path_are_refused(root: str) -> None:
    with pytest.raises(MountPointError):
        parse_root(root)


def test_own_directories_are_protected_in_rules() -> None:
    rules = MountRules.build((), ("/run/kata-containers/image",))
    assert accepted("/run/kata-containers/image/", rules) is None


@pytest.mark.parametrize(
    ("path", "ok"),
    [
        ("/run", True),
        ("/run/kata-containers", True),
        ("/run/kata-containers/sandbox", True),
        ("/run/kata-containers/sandbox/storage", True),
        ("/run/kata-containers/sandbox/storage/abc", True),
        ("/run/kata-containers/image", True),
        ("/etc", False),
        ("/run/cva", False),
        ("/run/cva/x", False),
        ("/tmp", False),
        ("/run/kata-containers/sandbox/storage/a/b", False),
    ],
)
def test_directories_cva_may_create_on_the_way(path: str, ok: bool) -> None:
    assert (DEFAULT.on_the_way(path) is None) == ok


def test_image_config_section() -> None:
    cfg = parse_config('[securemount]\nmount_roots = ["/mnt/scratch/*", "/srv/cache"]\n')
    assert cfg.securemount.mount_roots == EXTRA
    assert accepted("/mnt/scratch/v1", cfg.mount_rules) == "/mnt/scratch/v1"
    assert accepted("/run/cva/x", cfg.mount_rules) is None


@pytest.mark.parametrize(
    ("doc", "needle"),
    [
        ('[securemount]\nmount_roots = "/mnt"\n', "must be a list"),
        ("[securemount]\nmount_roots = [1]\n", "must be strings"),
        ('[securemount]\nmount_roots = ["/run"]\n', "protected"),
        ('[securemount]\nmount_roots = ["/"]\n', "would cover /"),
        ('[securemount]\nmount_roots = ["/mnt/../etc"]\n', "normalised"),
        ('[securemount]\nmount_roots = ["/run/kata-containers/x/*"]\n', "run/kata-containers"),
        ('[paths]\nstate_dir = "/srv/cva"\n[securemount]\nmount_roots = ["/srv"]\n', "/srv/cva"),
        ("[securemount]\nother = 1\n", "securemount.other"),
    ],
)
def test_image_config_refusals(doc: str, needle: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(needle)):
        parse_config(doc)

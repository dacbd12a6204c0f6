"""Capabilities facet on the real kernel: drops happen in forked children only."""

from __future__ import annotations

import errno
import os
import socket

import pytest

from pytest_isolate.facets import caps
from pytest_isolate.facets import namespaces as ns
from tests.forked import in_child


def _raw_socket() -> str:
    try:
        socket.socket(socket.AF_PACKET, socket.SOCK_RAW).close()
        return "OK"
    except OSError as e:
        return errno.errorcode[e.errno]


def _as_userns_root() -> None:
    """Full capabilities without being host root: a user namespace of our own."""
    if os.geteuid() != 0:
        uid, gid = os.geteuid(), os.getegid()
        ns.unshare(ns.CLONE_NEWUSER | ns.CLONE_NEWNET)
        ns.write_id_maps(uid, gid)
    else:
        ns.unshare(ns.CLONE_NEWNET)  # raw sockets then only ever see our own netns


def test_drop_zone_list():
    def child():
        _as_userns_root()
        before = {"sys_admin": caps.has_cap(caps.CAP_SYS_ADMIN), "raw": _raw_socket()}
        caps.drop(caps.ZONE_DROP)
        eff, perm, inh = caps.get_caps()
        return {
            "before": before,
            "raw": _raw_socket(),
            "bounding": [c for c in caps.ZONE_DROP if c <= caps.last_cap() and caps.in_bounding_set(c)],
            "eff_perm": [caps.NAMES[c] for c in caps.ZONE_DROP if (eff | perm | inh) >> c & 1],
            "chown_kept": caps.has_cap(caps.CAP_CHOWN),
            "chroot_kept": caps.has_cap(caps.CAP_SYS_CHROOT),
        }

    got = in_child(child)
    assert got["before"] == {"sys_admin": True, "raw": "OK"}
    assert got["raw"] == "EPERM"
    assert got["bounding"] == []
    assert got["eff_perm"] == []
    assert got["chown_kept"] and got["chroot_kept"]


def test_dropped_caps_do_not_come_back_on_exec():
    """Bounding-set drop sticks: a root shell exec'd afterwards has no CAP_SYS_ADMIN."""

    def child():
        _as_userns_root()
        caps.drop([caps.CAP_SYS_ADMIN])
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.dup2(w, 1)
            os.execv("/bin/sh", ["sh", "-c", "grep -E '^Cap(Eff|Bnd)' /proc/self/status"])
        os.close(w)
        out = os.read(r, 4096).decode()
        os.waitpid(pid, 0)
        return dict(line.split(":\t") for line in out.strip().splitlines())

    got = in_child(child)
    for key in ("CapEff", "CapBnd"):
        assert not int(got[key], 16) >> caps.CAP_SYS_ADMIN & 1


def test_jail_list_only_net_admin():
    def child():
        _as_userns_root()
        caps.drop(caps.JAIL_DROP)
        return {
            "net_admin": caps.in_bounding_set(caps.CAP_NET_ADMIN),
            "sys_admin": caps.has_cap(caps.CAP_SYS_ADMIN),
        }

    assert in_child(child) == {"net_admin": False, "sys_admin": True}


def test_no_new_privs():
    def child():
        before = caps.get_no_new_privs()
        caps.no_new_privs()
        return [before, caps.get_no_new_privs()]

    assert in_child(child) == [False, True]


def test_new_session():
    def child():
        caps.new_session()
        first = os.getsid(0) == os.getpid()
        caps.new_session()  # already the leader: a no-op, not an error
        return [first, os.getsid(0) == os.getpid()]

    assert in_child(child) == [True, True]


@pytest.mark.parametrize("keep_std", [True, False])
def test_close_fds(keep_std):
    def child():
        # The result pipe of in_child must survive: keep what was open before (not 0-2).
        before = {int(fd) for fd in os.listdir("/proc/self/fd")} - {0, 1, 2}
        a = os.open("/dev/null", os.O_RDONLY)
        b = os.open("/dev/null", os.O_RDONLY)
        c = os.open("/dev/null", os.O_RDONLY)
        keep = (before - {a, c}) | {b}  # before held listdir's own fd: maybe a
        caps.close_fds(keep, keep_std=keep_std)

        def is_open(fd: int) -> bool:
            try:
                os.fstat(fd)
                return True
            except OSError:
                return False

        return {"a": is_open(a), "b": is_open(b), "c": is_open(c), "stdin": is_open(0)}

    got = in_child(child)
    assert got == {"a": False, "b": True, "c": False, "stdin": keep_std}

"""Namespaces facet on the real kernel: each check runs in a forked child."""

from __future__ import annotations

import json
import os
import random
import socket
import threading
from pathlib import Path
from typing import Any

import pytest

from pytest_isolate.facets import namespaces as ns
from tests.forked import in_child

root_only = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to create namespaces without a user namespace")


@root_only
def test_unshare_uts_and_hostname_stay_in_the_child():
    host_name = socket.gethostname()
    host_uts = ns.ns_id("uts")

    def child():
        ns.unshare(ns.CLONE_NEWUTS)
        ns.sethostname("isolate-unit")
        return {"name": socket.gethostname(), "uts": ns.ns_id("uts")}

    got = in_child(child)
    assert got["name"] == "isolate-unit"
    assert got["uts"] != host_uts
    assert socket.gethostname() == host_name


@root_only
def test_setns_goes_back():
    def child():
        home = os.open("/proc/self/ns/net", os.O_RDONLY)
        before = ns.ns_id("net")
        ns.unshare(ns.CLONE_NEWNET)
        inside = ns.ns_id("net")
        ns.setns(home, ns.CLONE_NEWNET)
        return [before, inside, ns.ns_id("net")]

    before, inside, after = in_child(child)
    assert before == after != inside


def test_unshare_error_carries_errno():
    with pytest.raises(OSError) as exc:
        ns.unshare(0x1)  # not a namespace flag (CSIGNAL bits): EINVAL
    assert exc.value.errno == 22


def test_write_id_maps_in_user_namespace():
    uid, gid = os.geteuid(), os.getegid()

    def child():
        ns.unshare(ns.CLONE_NEWUSER)
        ns.write_id_maps(uid, gid)
        return {
            "uid": os.getuid(),
            "uid_map": Path("/proc/self/uid_map").read_text().split(),
            "setgroups": Path("/proc/self/setgroups").read_text().strip(),
        }

    got = in_child(child)
    assert got == {"uid": 0, "uid_map": ["0", str(uid), "1"], "setgroups": "deny"}


def test_userns_available_here():
    assert ns.userns_available() is None


@root_only
def test_userns_probe_names_the_sysctl():
    """A user namespace whose user.max_user_namespaces is 0 cannot nest: the reason says so."""

    def child():
        ns.unshare(ns.CLONE_NEWUSER)
        ns.write_id_maps(0, 0)
        Path("/proc/sys/user/max_user_namespaces").write_text("0")
        ns._probe_cache.clear()
        return ns.userns_available()

    reason = in_child(child)
    assert "user.max_user_namespaces" in reason


def test_clone_fork_makes_a_working_pid_namespace_init():
    """clone_fork: the child is PID 1 of new namespaces and CPython is sane in it."""
    parent_rand = random.random()
    r, w = os.pipe()
    flags = ns.CLONE_NEWUSER | ns.CLONE_NEWPID | ns.CLONE_NEWNS
    pid = ns.clone_fork(flags)
    if pid == 0:  # pragma: no cover - child
        try:
            os.close(r)
            out: dict[str, Any] = {"pid": os.getpid(), "rand": random.random()}
            t = threading.Thread(target=lambda: out.setdefault("thread", True))
            t.start()
            t.join()
            k = os.fork()  # a normal fork from the clone child: the runner of a jail
            if k == 0:
                os._exit(7)
            _, st = os.waitpid(k, 0)
            out["grandchild_pid"] = k
            out["grandchild_exit"] = os.waitstatus_to_exitcode(st)
            os.write(w, json.dumps(out).encode())
        finally:
            os._exit(0)
    os.close(w)
    data = b""
    while chunk := os.read(r, 1 << 16):
        data += chunk
    os.close(r)
    _, st = os.waitpid(pid, 0)
    assert st == 0
    got = json.loads(data)
    assert got["pid"] == 1
    assert got["thread"] is True
    assert got["grandchild_pid"] > 1 and got["grandchild_exit"] == 7
    assert got["rand"] != parent_rand  # at-fork hooks ran (random reseeded)

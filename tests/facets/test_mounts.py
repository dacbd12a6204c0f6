"""Mounts, overlay changes and devices facets on the real kernel, each in a child's private mount namespace."""

from __future__ import annotations

import errno
import os
import stat
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from pytest_isolate.facets import devices, mounts, overlay_changes
from pytest_isolate.facets import namespaces as ns
from tests import forked

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="mount tests run as root")


def in_child(fn: Callable[[], Any], flags: int = ns.CLONE_NEWNS) -> Any:
    """Run ``fn`` in a forked child with a private mount namespace (+ ``flags``).

    With CLONE_NEWPID the function runs in a grandchild (the PID namespace's init), so
    a fresh /proc can be mounted.
    """

    def setup() -> None:
        ns.unshare(flags)
        if flags & ns.CLONE_NEWPID:
            k = os.fork()
            if k:
                os.waitpid(k, 0)
                os._exit(0)
        mounts.make_private("/")

    return forked.in_child(fn, setup)


def _mounted(path: str) -> bool:
    return path in mounts.mountpoints()


def test_overlay_changes_are_listed(tmp_path):
    lower = tmp_path / "lower"
    (lower / "etc").mkdir(parents=True)
    (lower / "etc" / "a.conf").write_text("a\n")
    (lower / "etc" / "gone").write_text("x\n")
    (lower / "opt" / "d").mkdir(parents=True)
    (lower / "opt" / "d" / "old").write_text("old\n")
    (lower / "tmp").mkdir()
    (lower / "lib" / "__pycache__").mkdir(parents=True)
    (lower / "lib2").mkdir()
    work = tmp_path / "fs"
    work.mkdir()

    def child():
        mounts.mount_tmpfs(work)
        for d in ("upper", "work", "root"):
            (work / d).mkdir()
        m = work / "root"
        mounts.mount_overlay(m, lower, work / "upper", work / "work")
        (m / "etc" / "a.conf").write_text("changed\n")
        (m / "etc" / "gone").unlink()
        (m / "etc" / "new").write_text("new\n")
        os.system(f"rm -r {m / 'opt' / 'd'}")  # noqa: S605 - a real rm, as a test would
        (m / "opt" / "d").mkdir()
        (m / "opt" / "d" / "fresh").write_text("fresh\n")
        (m / "srv" / "deep").mkdir(parents=True)
        (m / "srv" / "deep" / "f").write_text("f\n")
        (m / "tmp" / "junk").write_text("junk\n")
        (m / "lib" / "__pycache__" / "x.cpython-311.pyc").write_bytes(b"\0" * 10)
        # A module imported for the first time: a new __pycache__ of .pyc files only.
        (m / "lib2" / "__pycache__").mkdir()
        (m / "lib2" / "__pycache__" / "y.cpython-311.pyc").write_bytes(b"\0" * 10)
        (m / "lib2" / "__pycache__" / "y.cpython-311-pytest-9.2.0.pyc").write_bytes(b"\0" * 10)
        # What the import system would not write there is listed all the same.
        (m / "lib" / "__pycache__" / "note.txt").write_text("x\n")
        changes, used = overlay_changes.scan_upper(work / "upper", ["/tmp"], lower)
        return {
            "changes": changes,
            "used": used,
            "size": overlay_changes.upper_size(work / "upper"),
            "host_a": (lower / "etc" / "a.conf").read_text(),
        }

    got = in_child(child)
    assert sorted(got["changes"]) == sorted(
        [
            "modified /etc/a.conf",
            "deleted /etc/gone",
            "created /etc/new",
            "replaced /opt/d/ (1 entries)",
            "created /srv/ (2 entries)",
            "created /lib/__pycache__/note.txt",
        ]
    )
    assert got["host_a"] == "a\n"
    assert got["used"] > 0 and got["size"] == got["used"]


def test_bind_of_shared_mount_is_made_private(tmp_path):
    """The propagation trap: a bind of a *shared* mount (systemd makes /dev shared) joins
    its peer group, so unmounting below the copy unmounts the original's submount too
    (the host's /dev/pts). bind() makes the copy private before anything else."""
    t = tmp_path / "t"
    t.mkdir()

    def child():
        mounts.mount_tmpfs(t)
        src = t / "src"
        src.mkdir()
        mounts.mount_tmpfs(src)  # stands for /dev ...
        (src / "pts").mkdir()
        mounts.mount_tmpfs(src / "pts")  # ... and /dev/pts
        mounts.mount(None, src, None, mounts.MS_SHARED | mounts.MS_REC)
        res = {}
        for name, private in (("unsafe", False), ("safe", True)):
            dst = t / name
            dst.mkdir()
            mounts.bind(src, dst, recursive=True, private=private)
            mounts.umount2(dst / "pts", mounts.MNT_DETACH)
            res[name] = _mounted(str(src / "pts"))
            mounts.detach_tree(dst)
            if not res[name]:  # the trap fired: put it back for the next case
                mounts.mount_tmpfs(src / "pts")
        mounts.detach_tree(t)
        return res

    got = in_child(child)
    assert got == {"unsafe": False, "safe": True}


def test_remove_tree_never_crosses_a_mount(tmp_path):
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "keep").write_text("keep\n")
    box = tmp_path / "box"

    def child():
        (box / "sub" / "mnt").mkdir(parents=True)
        (box / "sub" / "file").write_text("x\n")
        mounts.bind(precious, box / "sub" / "mnt")
        ok = mounts.remove_tree(box)
        state = {"ok": ok, "keep": (precious / "keep").exists(), "file": (box / "sub" / "file").exists()}
        mounts.umount2(box / "sub" / "mnt")
        state["ok_after"] = mounts.remove_tree(box)
        state["box"] = box.exists()
        return state

    got = in_child(child)
    assert got == {"ok": False, "keep": True, "file": False, "ok_after": True, "box": False}


def test_mask_paths_and_fresh_proc(tmp_path):
    root = tmp_path / "root"
    (root / "proc").mkdir(parents=True)

    def child():
        mounts.mount_proc(root / "proc")
        done = mounts.mask_paths(root)
        res = {"done": done, "pids": sorted(int(p) for p in os.listdir(root / "proc") if p.isdigit())}
        try:
            with open(root / "proc/sys/kernel/core_pattern", "w") as f:
                f.write("|/bin/false")
            res["core_pattern"] = "WRITABLE"
        except OSError as e:
            res["core_pattern"] = errno.errorcode[e.errno]
        res["kmsg"] = (root / "proc/kmsg").read_bytes()[:1].decode()
        mounts.detach_tree(root / "proc")
        return res

    got = in_child(child, ns.CLONE_NEWNS | ns.CLONE_NEWPID)
    assert got["pids"] == [1]
    assert "/proc/sys" in got["done"] and "/proc/kmsg" in got["done"]
    assert got["core_pattern"] == "EROFS"
    assert got["kmsg"] == ""


def test_readonly_paths_proc_sys(tmp_path):
    """The jail's /proc/sys: read-only, nothing masked; and what keeping CAP_SYS_ADMIN
    costs: root remounts it read-write (opened for writing only, never written)."""
    root = tmp_path / "root"
    (root / "proc").mkdir(parents=True)

    def open_for_write(path: Path) -> str:
        try:
            os.close(os.open(path, os.O_WRONLY))
        except OSError as e:
            return errno.errorcode[e.errno]
        return "WRITABLE"

    def child():
        mounts.mount_proc(root / "proc")
        done = mounts.readonly_paths(root, ["/proc/sys", "/proc/no-such-entry"])
        core = root / "proc/sys/kernel/core_pattern"
        res = {"done": done, "core_pattern": open_for_write(core), "kmsg_mounted": _mounted(f"{root}/proc/kmsg")}
        mounts.remount_bind(root / "proc/sys", readonly=False)
        res["after_remount"] = open_for_write(core)
        mounts.detach_tree(root / "proc")
        return res

    got = in_child(child, ns.CLONE_NEWNS | ns.CLONE_NEWPID)
    assert got == {"done": ["/proc/sys"], "core_pattern": "EROFS", "kmsg_mounted": False,
                   "after_remount": "WRITABLE"}


def test_minimal_dev(tmp_path):
    dev = tmp_path / "dev"
    dev.mkdir()

    def child():
        made = devices.populate(dev)
        res = {"made": sorted(made), "ls": sorted(os.listdir(dev))}
        with open(dev / "null", "w") as f:
            res["null"] = f.write("discard")
        res["zero"] = (dev / "zero").open("rb").read(4).hex()
        res["null_is_chr"] = stat.S_ISCHR(os.stat(dev / "null").st_mode)
        fd = os.open(dev / "ptmx", os.O_RDWR | os.O_NOCTTY)
        res["pts"] = sorted(os.listdir(dev / "pts"))
        os.close(fd)
        try:
            (dev / "sda").touch()
            res["create"] = "OK"
        except OSError as e:
            res["create"] = errno.errorcode[e.errno]
        mounts.detach_tree(dev)
        return res

    got = in_child(child)
    assert got["ls"] == sorted(
        ["null", "zero", "full", "random", "urandom", "tty", "pts", "ptmx", "shm", "mqueue"]
        + ["fd", "stdin", "stdout", "stderr", "core"]
    )
    assert got["null"] == 7 and got["zero"] == "00000000" and got["null_is_chr"]
    assert got["pts"] == ["0", "ptmx"]  # a private devpts: only the pty we just opened
    assert got["create"] == "EROFS"
    assert os.listdir(dev) == []


def test_needed_binds(tmp_path):
    bt = tmp_path / "basetemp"
    bt.mkdir()
    # Host / as the lower layer: what is on the root filesystem is visible already.
    plain = mounts.needed_binds(Path("/"), Path(__file__).parent, bt)
    assert (bt.resolve(), False) in plain
    for p, ro in plain:
        assert ro or p == bt.resolve()
    # A prepared rootfs: the running interpreter and the rootdir must be bound read-only.
    custom = mounts.needed_binds(tmp_path, Path(__file__).parent, bt)
    bound = [p for p, ro in custom if ro]
    assert any(Path(sys.prefix).resolve().is_relative_to(p) for p in bound)
    assert any(Path(__file__).parent.resolve().is_relative_to(p) for p in bound)
    assert custom[-1] == (bt.resolve(), False) or (bt.resolve(), False) in custom
    # Parents before children, so nested binds stack the right way round.
    assert [len(p.parts) for p, _ in custom] == sorted(len(p.parts) for p, _ in custom)


def test_plan_split_has_no_overlay_over_a_mount():
    mps = mounts.mountpoints()
    layers = mounts.plan_split("/", mps)
    kinds = {layer.path: layer.kind for layer in layers}
    assert kinds["/"] == "dir"
    assert kinds["/proc"] == kinds["/sys"] == kinds["/dev"] == "special"
    for name in os.listdir("/"):
        assert "/" + name in kinds
    for layer in layers:
        if layer.kind == "overlay":
            assert not any(m.startswith(layer.path + "/") for m in mps), layer
    assert mounts.needs_split("/", userns=True)
    assert not mounts.needs_split("/", userns=False)

"""zone tier: a jail plus a cgroup of its own (hard memory, pids, CPU, IO limits), a
minimal /dev, a masked /proc, dangerous capabilities dropped, no_new_privs and a
session of its own.
"""

from __future__ import annotations

import ctypes
import errno
import os
import stat
from pathlib import Path

import pytest

pytestmark = pytest.mark.isolate("zone")


def test_dev_has_no_disks() -> None:
    devices = sorted(os.listdir("/dev"))
    print(f"/dev: {' '.join(devices)}")
    blocks = [d for d in devices if stat.S_ISBLK(os.stat(f"/dev/{d}", follow_symlinks=False).st_mode)]
    assert blocks == []


def test_root_cannot_mount(tmp_path: Path) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    target = tmp_path / "mnt"
    target.mkdir()
    rc = libc.mount(b"none", str(target).encode(), b"tmpfs", 0, None)
    if rc == 0:  # never leave it mounted, even when the demo's expectation is wrong
        libc.umount2(str(target).encode(), 2)
    assert rc == -1 and ctypes.get_errno() == errno.EPERM  # CAP_SYS_ADMIN is gone


@pytest.mark.isolate(memory="64M")
def test_fails_on_purpose_memory_bomb() -> None:
    # 512 MiB in 16 MiB steps against a 64 MiB budget: the cgroup stops it (the OOM
    # killer ends the test) and the report lists the memory overuse.
    hog = []
    for _ in range(32):
        hog.append(b"x" * (16 << 20))

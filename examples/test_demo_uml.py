"""uml tier: the tests run in a User-Mode Linux guest, a kernel of their own running as
a host process; root in the guest mounts, loads modules and changes sysctls of the
guest only. The guest boots once per worker; each test gets a fresh sandbox inside it.
"""

from __future__ import annotations

import ctypes
import os
from pathlib import Path

import pytest

pytestmark = pytest.mark.isolate("uml")


def test_runs_on_its_own_kernel() -> None:
    with open("/proc/cpuinfo") as f:
        cpuinfo = f.read()
    print(f"guest kernel {os.uname().release}")
    assert "User Mode Linux" in cpuinfo


@pytest.mark.isolate(allow=["mount"])  # expected: reported as allowed, no warning
def test_mount_a_tmpfs_in_the_guest(tmp_path: Path) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    target = tmp_path / "mnt"
    target.mkdir()
    assert libc.mount(b"none", str(target).encode(), b"tmpfs", 0, b"size=1m") == 0, os.strerror(ctypes.get_errno())
    try:
        with open("/proc/self/mountinfo") as f:
            assert f" {target} " in f.read()
        (target / "hello").write_text("only the guest sees this mount\n")
    finally:
        libc.umount2(str(target).encode(), 2)

"""jail tier: own mount, PID, IPC, UTS and network namespaces, and an overlay root
entered with pivot_root (a user namespace as well when pytest is not root).

The test sees its own hostname, only its own processes and only a loopback interface;
the double chroot that leaves a chroot ends at the jail's own root. Not confined: CPU,
memory and process counts (no cgroup), and most capabilities of root inside.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
from demo_escape import root_after_double_chroot, root_id

pytestmark = pytest.mark.isolate("jail")

#: Module code runs at collection, outside any sandbox: these are the host's.
HOST_NAME = socket.gethostname()
HOST_ROOT = root_id()


def test_own_hostname() -> None:
    name = socket.gethostname()
    print(f"host: {HOST_NAME}, jail: {name}")
    assert name != HOST_NAME
    socket.gethostbyname(name)  # resolvable inside, as on a normal host


def test_sees_only_its_own_processes() -> None:
    pids = sorted(int(p) for p in os.listdir("/proc") if p.isdigit())
    print(f"processes visible: {pids}")
    assert len(pids) < 10


def test_network_is_loopback_only() -> None:
    names = [name for _, name in socket.if_nameindex()]
    assert names == ["lo"]
    with socket.create_server(("127.0.0.1", 0)) as server:  # its own loopback
        port = server.getsockname()[1]
        with socket.create_connection(("127.0.0.1", port), timeout=2):
            pass


def test_double_chroot_stays_inside(tmp_path: Path) -> None:
    assert root_id() != HOST_ROOT, "not in a sandbox: refusing to try an escape"
    root = root_after_double_chroot(tmp_path)
    print(f"after the double chroot: {root}")
    assert root != HOST_ROOT

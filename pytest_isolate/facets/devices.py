"""The minimal ``/dev`` of a zone.

A bound host ``/dev`` hands uid 0 the host's disks (``/dev/vda``), ``/dev/mem`` and
``/dev/kmsg``. A zone gets a tmpfs with only the nodes ordinary programs need. The
nodes are bind mounts of the host's: ``mknod`` is refused in a user namespace, and a
bind keeps working after CAP_MKNOD is dropped.
"""

from __future__ import annotations

import os
from pathlib import Path

from pytest_isolate.facets import mounts

#: Character devices bound from the host.
NODES = ("null", "zero", "full", "random", "urandom", "tty")
#: Symlinks every Linux userland expects.
LINKS = {
    "fd": "/proc/self/fd",
    "stdin": "/proc/self/fd/0",
    "stdout": "/proc/self/fd/1",
    "stderr": "/proc/self/fd/2",
    "core": "/proc/kcore",
    "ptmx": "pts/ptmx",
}


def populate(dev: str | os.PathLike[str], userns: bool = False, shm_size: int | None = None) -> list[str]:
    """Mount a tmpfs on ``dev`` and fill it; returns the names it created.

    ``pts`` is a new devpts instance, so the test's pseudo-terminals are its own and it
    cannot open the host's (``/dev/pts/N`` of the user's terminal). ``shm`` is a tmpfs for
    POSIX shared memory and multiprocessing semaphores.
    """
    d = Path(dev)
    mounts.mount_tmpfs(d, size=1 << 20, mode=0o755, extra="nr_inodes=64")
    made: list[str] = []
    for name in NODES:
        host = Path("/dev") / name
        if not host.exists():
            continue
        (d / name).touch(mode=0o666)
        try:
            # Made private all at once below: nothing is mounted in between.
            mounts.bind(host, d / name, private=False)
        except OSError:
            (d / name).unlink()
            continue
        made.append(name)
    (d / "pts").mkdir(mode=0o755)
    # gid=5 (tty) is unmapped in a user namespace: the kernel would refuse the mount.
    opts = "newinstance,ptmxmode=0666,mode=0620" + ("" if userns else ",gid=5")
    try:
        mounts.mount("devpts", d / "pts", "devpts", mounts.MS_NOSUID | mounts.MS_NOEXEC, opts)
        made.append("pts")
    except OSError:
        pass
    (d / "shm").mkdir(mode=0o1777)
    mounts.mount_tmpfs(d / "shm", size=shm_size, mode=0o1777)
    made.append("shm")
    (d / "mqueue").mkdir(mode=0o755)
    for name, target in LINKS.items():
        os.symlink(target, d / name)
        made.append(name)
    # A bind of a node of a *shared* host /dev joins its peer group: a mount later put
    # on top of our copy would then show up on the host's node.
    mounts.make_private(d, recursive=True)
    # Nothing more may be created here by the test (it would be a node smuggled in
    # through a bind it made before dropping caps); the sub-mounts stay writable.
    mounts.mount(None, d, None, mounts.MS_REMOUNT | mounts.MS_RDONLY | mounts.MS_NOSUID | mounts.MS_NODEV)
    return made

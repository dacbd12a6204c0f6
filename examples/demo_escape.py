"""The escape the demo tries: root's classic double chroot.

Kept apart from the tests so the chroot and jail demos try exactly the same thing and
get different verdicts.
"""

from __future__ import annotations

import os
from pathlib import Path


def root_id(path: str = "/") -> tuple[int, int]:
    """(device, inode) of a directory: equal ids mean the same directory."""
    st = os.stat(path)
    return st.st_dev, st.st_ino


def root_after_double_chroot(workdir: Path) -> tuple[int, int] | str:
    """Try the escape in a throwaway child, so the calling test stays where it is.

    The child chroots into a subdirectory while its working directory stays outside,
    climbs with "..", and chroots to where the climb ended. Returns the id of the root
    it ended up in, or why the kernel refused.
    """
    inner = workdir / "inner"
    inner.mkdir()
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.chroot(inner)
            for _ in range(64):
                os.chdir("..")
            os.chroot(".")
            os.write(w, "{} {}".format(*root_id()).encode())
        except OSError as exc:
            os.write(w, f"refused: {exc}".encode())
        finally:
            os._exit(0)
    os.close(w)
    with os.fdopen(r) as f:
        answer = f.read()
    os.waitpid(pid, 0)
    if not answer or answer.startswith("refused"):
        return answer or "refused: the child died"
    dev, ino = answer.split()
    return int(dev), int(ino)

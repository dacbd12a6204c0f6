"""The run's switch namespace, shared by every controller of the run (xdist workers).

``net.Switch`` is one switch; ``SharedSwitch`` lets the controllers of one run (the
pytest-xdist workers) use the same one, and the last of them delete it.
``sweep_stale_switches`` removes switches nobody uses any more: left by runs that died,
or by an ``open`` cut short. Controller side only; no sandbox imports this module.

``net`` is imported where it is used, not with this module: whether this process ever
imported it tells the controller's session end whether there can be a switch to sweep
(``leftovers.sweep``'s ``loaded_only``).
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any

from pytest_isolate.leftovers import _identity, _starttime


class SharedSwitch:
    """A run's switch namespace, shared by every controller of the run (xdist workers).

    Each user holds a shared ``flock`` on the switch's lock file for as long as it uses
    it; whoever can take the lock exclusively is the last one and deletes the switch.
    A lock nobody holds at all marks a switch left by runs that died: swept on sight.

    As root the switch is a mount under /run/netns that every user finds by name.
    Unprivileged it lives only as long as a holder process (``net.Switch._create_held``):
    the first user starts one tied to the lock file, not to itself, and writes
    ``<pid> <start time>`` into the lock file; later users join that holder's netns
    (their tests join its user namespace, as the first user's do). The holder exits by
    itself once nobody holds the lock shared, even if every user was SIGKILLed.
    """

    def __init__(self, switch: Any, fd: int, lock: Path, holder: int | None = None) -> None:
        self.switch = switch
        self.path = switch.path
        self.fd = fd
        self.lock = lock
        self.holder = holder  # pid of the unprivileged switch's holder, ours or not

    @classmethod
    def open(cls, switch_id: str) -> SharedSwitch:
        while True:
            opened = cls._try_open(switch_id)
            if opened is not None:
                return opened

    @classmethod
    def _try_open(cls, switch_id: str) -> SharedSwitch | None:
        """One attempt; None when the lock file was replaced meanwhile (retry)."""
        import fcntl

        from pytest_isolate.facets import net

        lock = Path(f"/tmp/pytest-isolate-switch-{switch_id}.lock")
        fd = _open_lock(lock)
        try:
            # A second lock file serialises creation; the users' lock above stays shared.
            mutex = _open_lock(Path(f"{lock}.create"))
        except BaseException:
            os.close(fd)
            raise
        try:
            fcntl.flock(mutex, fcntl.LOCK_EX)
            # Shared before looking: an unprivileged holder lives while anyone holds it.
            fcntl.flock(fd, fcntl.LOCK_SH)
            # The last user (or sweep_stale) unlinks both files: ours may be stale ones.
            if not (_same_file(fd, lock) and _same_file(mutex, Path(f"{lock}.create"))):
                os.close(fd)
                return None
            path = os.path.join(net.NETNS_DIR, net.switch_name(switch_id))
            holder = None
            if os.path.exists(path) and _is_mountpoint(path):
                switch = net.Switch(run_id=switch_id, path=path)
            else:
                holder, held = _published_holder(fd, switch_id)
                if held is not None:
                    switch = net.Switch(run_id=switch_id, path=held)
                else:
                    switch = net.Switch.create(switch_id, lock=str(lock))
                    if switch.holder is not None:
                        holder = switch.holder.pid
                    # Who made it, and where (``sweep_stale_switches``): the holder's
                    # pid and start time, or "- -" for a mounted switch.
                    os.ftruncate(fd, 0)
                    who = f"{holder} {_starttime(holder)}" if holder is not None else "- -"
                    os.pwrite(fd, f"{who} {' '.join(_identity())}\n".encode(), 0)
        except BaseException:
            os.close(fd)
            raise
        finally:
            os.close(mutex)
        return cls(switch, fd, lock, holder)

    def close(self) -> None:
        import fcntl

        from pytest_isolate.facets import net

        try:
            mutex = _open_lock(Path(f"{self.lock}.create"))
        except OSError:
            mutex = -1
        try:
            if mutex >= 0:
                fcntl.flock(mutex, fcntl.LOCK_EX)
            try:
                fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return  # others still use it (closing our fd lets go of the lock)
            # The last user: newcomers from now on make a switch of their own.
            if _same_file(self.fd, self.lock):
                self.lock.unlink(missing_ok=True)
            if mutex >= 0 and _same_file(mutex, Path(f"{self.lock}.create")):
                Path(f"{self.lock}.create").unlink(missing_ok=True)
            if self.holder is None:
                self.switch.close()
                with contextlib.suppress(OSError):  # only if empty; /run/netns may be ours
                    os.rmdir(os.path.dirname(self.path))
                return
            os.close(self.fd)  # lets the holder take the lock and exit
            self.fd = -1
            net.wait_holder_gone(self.holder, self.switch.run_id)
            holder = getattr(self.switch, "holder", None)
            if holder is not None:  # ours: reap it, drop the pipe
                with contextlib.suppress(Exception):
                    holder.wait(timeout=1)
                if holder.stdout is not None:
                    holder.stdout.close()
                self.switch.holder = None
        finally:
            if self.fd >= 0:
                os.close(self.fd)
                self.fd = -1
            if mutex >= 0:
                os.close(mutex)


def _open_lock(path: Path) -> int:
    """Open (or create) a lock file of ours; one of another user is refused, since its
    content tells us which namespace to hand to tests."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    if os.fstat(fd).st_uid != os.geteuid():
        os.close(fd)
        raise PermissionError(f"{path} belongs to another user")
    return fd


def _same_file(fd: int, path: Path) -> bool:
    try:
        a, b = os.fstat(fd), os.stat(path, follow_symlinks=False)
    except OSError:
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def _published_holder(fd: int, switch_id: str) -> tuple[int | None, str | None]:
    """(pid, netns path) of the live holder the lock file names, or (None, None)."""
    from pytest_isolate.facets import net

    try:
        pid_s, start = os.pread(fd, 200, 0).decode().split()[:2]
        pid = int(pid_s)
    except (OSError, ValueError, UnicodeDecodeError):
        return None, None
    if _starttime(pid) != start:  # gone, or a recycled pid
        return None, None
    path = net.held_switch_path(pid, switch_id)
    return (pid, path) if path is not None else (None, None)


def sweep_stale_switches(switch_id: str = "*") -> list[str]:
    """Remove switches (and their lock files) that nobody holds: users hold the lock
    shared for as long as they use the switch (``SharedSwitch``). ``switch_id``: only
    that one (a controller's own at its end, left by an ``open`` cut short)."""
    import fcntl

    removed = []
    me = _identity()
    for lock in Path("/tmp").glob(f"pytest-isolate-switch-{switch_id}.lock"):
        sid = lock.name.removeprefix("pytest-isolate-switch-").removesuffix(".lock")
        try:
            # Read-only: inside a sandbox whose root is an overlay of the host's, opening
            # for writing would copy the file up, and our lock would be on the copy.
            fd = os.open(lock, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
        except OSError:
            continue
        try:
            fields = os.pread(fd, 200, 0).decode(errors="replace").split()
            # Made in another pid namespace or kernel: not ours to judge (``owner_dead``).
            foreign = len(fields) >= 4 and tuple(fields[2:4]) != me
            if not foreign:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # BlockingIOError included: someone uses it
            foreign = True
        if foreign:
            os.close(fd)
            continue
        with contextlib.suppress(Exception):
            from pytest_isolate.facets import net

            removed += net.sweep(sid)
        lock.unlink(missing_ok=True)
        Path(f"{lock}.create").unlink(missing_ok=True)
        os.close(fd)
    return removed


def _is_mountpoint(path: str) -> bool:
    with open("/proc/self/mountinfo", encoding="utf-8") as f:
        return any(line.split()[4] == path for line in f)

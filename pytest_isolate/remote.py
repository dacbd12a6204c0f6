"""execnet remote side: start the fork server next to this gateway and relay to it.

Sent by ``gateway.remote_exec(remote)``, so it must not import ``pytest_isolate`` at
module level: the first message carries the controller's ``sys.path``. It runs wherever
the gateway lives — on the host, or inside a UML guest — and is deliberately thin: the
gateway's IO thread makes this process unfit to fork, so all forking happens in the
single-threaded fork server it starts.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading


def _site_state(flags: list[str]) -> str:
    """Statements that give a server started with ``-S`` the prefixes ``site`` would have.

    UML starts its server without ``site`` (every file lookup costs there), but in a venv
    it is ``site`` that makes ``sys.prefix``/``sys.exec_prefix`` the venv's (from the
    ``pyvenv.cfg`` beside ``sys.executable``); without it a test in the guest saw the
    base interpreter's. This gateway ran ``site``: its values are the ones to carry.
    """
    if "-S" not in flags or sys.flags.no_site:
        return ""
    return f"sys.prefix = {sys.prefix!r}; sys.exec_prefix = {sys.exec_prefix!r}; "


def serve(channel) -> None:  # type: ignore[no-untyped-def]
    init = channel.receive()
    sys.path[:] = init["sys_path"]
    from pytest_isolate import wire

    _subreaper()
    proc, cmd_w, evt_r = _forked_server() or _spawn_server(init)
    try:
        wire.send(cmd_w, init)
    except OSError:
        pass  # a forked server configures before this comes, and may have died doing it: see below
    # Before "ready" (the server still collects): a controller that must stop a worker
    # it started early knows which process to end.
    channel.send(("server", proc.pid))

    def to_server(msg) -> None:  # type: ignore[no-untyped-def]
        try:
            if msg is None:  # channel closed: the controller is gone
                os.close(cmd_w)
                return
            os.write(cmd_w, msg)
        except OSError:
            pass

    channel.setcallback(to_server, endmarker=None)
    # Frames from the server go up unparsed: the controller decodes them. We watch the
    # server process itself, not only the pipe: a test the server forked may hold the
    # pipe open after the server died (e.g. the test killed it).
    import select

    pidfd = os.pidfd_open(proc.pid)
    buf = bytearray()
    captures: list[int] = []

    def forward(data: bytes) -> None:
        buf.extend(data)
        while len(buf) >= 4:
            n = int.from_bytes(buf[:4], "big")
            if len(buf) < 4 + n:
                return
            frame = bytes(buf[4 : 4 + n])
            if not captures and b'"capture_fds"' in frame:
                captures.extend(_open_captures(proc.pid, frame))
            channel.send(frame)
            del buf[: 4 + n]

    # A UML guest's server writes its tests' uncaptured output into pipes of ours
    # (``uml_init.fork_server``): relayed as ("out", 1 or 2, bytes), for the controller
    # to write where in-process they would go.
    stem = sys.modules.get("pytest_isolate.stem")
    outputs = dict(zip(getattr(stem, "server_output", None) or (), (1, 2), strict=False))

    def relay(fd: int, drain: bool = False) -> None:
        while True:
            try:
                data = os.read(fd, 1 << 16)
            except (BlockingIOError, OSError):
                return
            if not data:
                os.close(fd)
                del outputs[fd]
                return
            channel.send(("out", outputs[fd], data))
            if not drain:
                return

    try:
        while True:
            ready, _, _ = select.select([evt_r, pidfd, *outputs], [], [])
            for fd in [f for f in ready if f in outputs]:
                relay(fd)
            if evt_r in ready:
                data = os.read(evt_r, 1 << 20)
                if not data:
                    break
                forward(data)
            elif pidfd in ready:  # server gone; take what it wrote, then stop
                os.set_blocking(evt_r, False)
                try:
                    while data := os.read(evt_r, 1 << 20):
                        forward(data)
                except BlockingIOError:
                    pass
                break
        for fd in list(outputs):  # what the server's last tests wrote (a daemon may hold on)
            os.set_blocking(fd, False)
            relay(fd, drain=True)
    finally:
        code = proc.wait()
        output = _read_captures(captures)
        _kill_orphans()
        if not channel.isclosed():
            try:
                channel.send(("exit", code, output))
            except OSError:
                pass


def _forked_server() -> tuple[_Child, int, int] | None:
    """The server this gateway forked before execnet started, if it was forked from the
    stem (``stem._gateway``) or is a UML guest's worker (``uml_init.fork_server``); it
    waits for ``init`` like a spawned one."""
    stem = sys.modules.get("pytest_isolate.stem")
    pre = getattr(stem, "server", None)
    if pre is None:
        return None
    pid, cmd_w, evt_r = pre
    return _Child(pid), cmd_w, evt_r


def _spawn_server(init):  # type: ignore[no-untyped-def]
    from pytest_isolate import wire

    cmd_r, cmd_w = os.pipe()
    evt_r, evt_w = os.pipe()
    here = os.path.dirname(os.path.dirname(os.path.abspath(wire.__file__)))
    path = [here, *init["sys_path"]]
    flags = list(init.get("python_flags", ()))
    boot = f"import sys; sys.path[:0] = {path!r}; {_site_state(flags)}from pytest_isolate.forkserver import main; main()"
    proc = subprocess.Popen(
        [sys.executable, *flags, "-c", boot, str(cmd_r), str(evt_w)],
        pass_fds=(cmd_r, evt_w),
        stdin=subprocess.DEVNULL,
        cwd=init["dir"],
        # Out of the terminal's process group: Ctrl-C goes to the controller, which
        # then shuts workers down in order instead of racing them.
        start_new_session=True,
    )
    os.close(cmd_r)
    os.close(evt_w)
    return proc, cmd_w, evt_r


class _Child:
    """``Popen``'s pid and wait for a server this process forked."""

    def __init__(self, pid: int) -> None:
        self.pid = pid

    def wait(self) -> int:
        while True:
            try:
                return os.waitstatus_to_exitcode(os.waitpid(self.pid, 0)[1])
            except InterruptedError:
                continue
            except ChildProcessError:
                return -9


def _open_captures(pid: int, ready: bytes) -> list[int]:
    """Our own handles on the server's capture tmpfiles (deleted files: only /proc/<pid>/fd
    reaches them), opened while it lives."""
    import json

    fds = []
    for n in json.loads(ready).get("capture_fds", []):
        try:
            fds.append(os.open(f"/proc/{pid}/fd/{n}", os.O_RDONLY | os.O_CLOEXEC))
        except OSError:
            pass
    return fds


def _read_captures(fds: list[int], limit: int = 64 << 10) -> list[str]:
    """What the test in progress had printed (stdout, stderr), its last ``limit`` bytes."""
    out = []
    for fd in fds:
        try:
            size = os.fstat(fd).st_size
            out.append(os.pread(fd, limit, max(0, size - limit)).decode(errors="replace"))
        except OSError:
            out.append("")
        finally:
            os.close(fd)
    return out


def _kill_orphans() -> None:
    """We are a subreaper: whatever a dead fork server left running is ours to kill."""
    import signal

    me = os.getpid()
    for _ in range(50):
        kids: list[int] = []
        for tid in os.listdir(f"/proc/{me}/task"):
            try:
                with open(f"/proc/{me}/task/{tid}/children", encoding="utf-8") as f:
                    kids += [int(x) for x in f.read().split()]
            except OSError:
                pass
        if not kids:
            return
        for pid in kids:
            try:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
            except OSError:
                pass


def _subreaper() -> None:
    import ctypes

    ctypes.CDLL(None).prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER


if __name__ == "__channelexec__":
    threading.current_thread().name = "isolate-remote"
    serve(channel)  # type: ignore[name-defined]  # noqa: F821

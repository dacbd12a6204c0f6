"""Escape detection inside the sandbox: the audit hook ``arm`` installs in the test process.

``arm`` runs in the test's process, inside the sandbox, right before the test protocol.
It installs an audit hook (``sys.addaudithook``) and a few thin wrappers
(``os.chroot``/``os.mknod``, which have no audit event in 3.11, and ctypes functions
looked up by name, whose calls have none either) and sends one wire message per boundary
crossing it sees; escapes.py turns the messages into verdicts on the host side. Where the
sandbox can tell by itself (the root or a namespace after the call is the host's, the
call failed) the message carries ``ok``/``host``. It can only see Python-level calls of
the test process and its forks; C code and subprocesses are covered by the host-side
layers (canaries.py). It lives apart from the verdicts because it runs among the test's
code: everything it calls is bound where this module is first imported (the fork server,
before any fork), so a test that replaces ``os`` functions cannot change it, and
replacing this module's names is reported as ``tamper``.
"""

from __future__ import annotations

import ctypes
import os
import stat
import sys
import types
from collections.abc import Callable, Iterable
from fcntl import F_DUPFD_CLOEXEC as _F_DUPFD_CLOEXEC
from fcntl import fcntl as _fcntl
from typing import Any

from pytest_isolate import wire
from pytest_isolate.observe import calls, hostview
from pytest_isolate.observe.calls import (
    _LIBC,
    _MOVES,
    _NS_WATCH,
    _ROOT,
    _ROOT_CHANGING,
    _SAFE_DEV,
    _SYSCALLS,
    _TOOLS,
    _USERMODE_HELPERS,
    _W,
    _WRITABLE,
    _WRITABLE_EXACT,
    AF_INET,
    AF_INET6,
    AF_PACKET,
    AF_UNIX,
    SOCK_RAW,
    TIOCLINUX,
    TIOCSTI,
    _acts,
    _alive,
    _exists,
    _fspath,
    _isdir,
    _num,
    _pgid,
    _ppid,
    _text,
    _where,
)
from pytest_isolate.observe.escapes import _FOLLOW_ROOT
from pytest_isolate.observe.hostview import (  # bound here: the hook's globals are guarded
    CAP_SYS_ADMIN,
    HOST_NS,
    HOST_ROOT,
    IN_GUEST,
    _ctty,
    _has_cap,
    _host_services,
    _is_loopback,
    _lacks,
    _ns_ids,
    _os,
    _port_owner,
    _probe_device,
    _read_int,
    _root_id,
    _unix_owner,
)

__all__ = ["arm", "resume"]

#: At most this many audit messages per test (a loop writing 10 000 files is one finding).
MAX_MESSAGES = 64

_ORIG_OS = {name: getattr(os, name) for name in ("chroot", "mknod") if hasattr(os, name)}
_ORIG_GETITEM = ctypes.CDLL.__getitem__


# --- the hook ---------------------------------------------------------------------------


class _State:
    """Everything the hook needs, reachable only through its closure."""

    __slots__ = ("fd", "pipe", "me", "seen", "sent", "busy", "writable", "canary", "nodes",
                 "spawns", "over", "ports", "abstract")

    def __init__(self) -> None:
        self.seen: set[tuple[str, str]] = set()
        self.sent = 0
        self.busy = False
        self.nodes: set[str] = set()
        self.spawns = 0
        self.over = False


def _build() -> tuple[Callable[[int, list[str], bool], None], Callable[[], None], Callable[[], None]]:
    """Make the hook, its handlers and wrappers once, where this module is imported (the
    warm fork server, or the stem it is forked from): a forked test process then only
    fills in its state and installs them. Building them there costs ~0.5 ms per test in
    copy-on-write faults alone."""
    st = _State()
    st.fd, st.pipe = -1, None

    def from_environment() -> None:
        """The run's tripwires, from the environment: the fork server's, the same for
        every test, read once it is the run's (``refresh_environment``)."""
        canary = (os.environ.get("PYTEST_ISOLATE_CANARY_DIR"), os.environ.get("PYTEST_ISOLATE_CANARY_FILE"))
        st.canary = tuple(c for c in canary if c)
        st.ports, st.abstract = _host_services()

    from_environment()

    def shares(kind: str) -> bool | None:
        """Is this process in the host's ``kind`` namespace *now*? (Asked when needed, not
        at arm: a stat per kind in a fresh fork costs ~20 us, and most tests ask nothing.)"""
        h = HOST_NS.get(kind)
        if h is None:
            return None
        try:
            return _os.stat(f"/proc/self/ns/{kind}").st_ino == h
        except OSError:
            return None

    def position() -> tuple[tuple[int, int], dict[str, int]]:
        return _root_id(), _ns_ids(_NS_WATCH)

    def report(technique: str, detail: str, ok: bool | None = None, host: bool | None = None,
               where: str | None = None) -> None:
        key = (technique, detail)
        if key in st.seen or st.fd < 0:
            return
        if st.sent >= MAX_MESSAGES:
            if not st.over:
                st.over = True
                _send(st, {"t": "audit", "technique": "tamper" if technique == "tamper" else technique,
                           "detail": f"more than {MAX_MESSAGES} findings; the rest were not reported",
                           "where": None})
            return
        st.seen.add(key)
        st.sent += 1
        if ok is None and host is None:
            refused = _lacks(technique, shares)
            if refused:
                ok, detail = False, f"{detail} ({refused})"
        msg: dict[str, Any] = {"t": "audit", "technique": technique, "detail": detail,
                               "where": where if where is not None else _where(3)}
        if ok is not None:
            msg["ok"] = ok
        if host is not None:
            msg["host"] = host
        _send(st, msg)

    def own(pid: int) -> bool:
        """Is ``pid`` this test's process or one of its descendants? A descendant whose
        parent died was adopted by the fork server (a subreaper; in-process: init), so
        it is no longer below us: it is still the test's while it stays in the process
        group the test leads (psutil's tests kill a child, then its orphaned child)."""
        if pid == st.me:
            return True
        target, seen = pid, 0
        while pid > 1 and seen < 64:
            pid = _ppid(pid)
            if pid == st.me:
                return True
            seen += 1
        return _os.getpgrp() == st.me and _pgid(target) == st.me

    def at_host_root() -> bool:
        try:
            return _root_id() == HOST_ROOT
        except OSError:
            return False

    def after_root_change(technique: str, detail: str, before: tuple[tuple[int, int], dict[str, int]],
                          ok: bool) -> None:
        """A call that may move us (root or namespaces): did it land on the host's?"""
        host: bool | None = None
        if ok:
            root_before, ns_before = before
            host = _root_id() == HOST_ROOT and root_before != HOST_ROOT
            if not host:
                now = _ns_ids(_NS_WATCH)
                # Only kinds known before: a process chrooted where /proc is missing
                # sees its namespaces again once back at a root with /proc.
                joined = [k for k, v in now.items()
                          if v == HOST_NS.get(k) and k in ns_before and ns_before[k] != v]
                if joined:
                    host = True
                    detail += f" (joined the host's {'/'.join(joined)} namespace)"
            else:
                detail += " (now at the host's root)"
        report(technique, detail, ok=ok, host=host, where=_where(3))

    # -- path classification ---------------------------------------------------------
    def classify_path(p: str, write: bool) -> tuple[str, str] | None:
        if p.startswith("/proc/"):
            rest = p[6:]
            head, _, tail = rest.partition("/")
            if head.isdigit():
                if own(int(head)):
                    return None
                sub = tail.partition("/")[0]
                if sub in ("root", "cwd", "fd", "map_files"):
                    return "proc-root", p
                if sub == "mem" and write:
                    return "ptrace", p
                if sub == "ns":
                    return "setns", p
                return None
            if not write:
                return None
            if p.startswith(_USERMODE_HELPERS):
                return "core-pattern", p
            if p == "/proc/sysrq-trigger":
                return "sysrq", p
            if p.startswith("/proc/sys/"):
                return "sysctl", p
            if head in ("self", "thread-self"):
                return None
            return "sysctl", p
        if p.startswith("/dev/"):
            if p in _SAFE_DEV or p.startswith(("/dev/pts/", "/dev/shm/", "/dev/fd/", "/dev/mqueue/", "/dev/hugepages/")):
                return None
            return "device", p
        if p in st.nodes:
            return "device", p
        if not write:
            return None
        if p.endswith(("/release_agent", "/notify_on_release")):
            return "release-agent", p
        if p.startswith(_USERMODE_HELPERS):
            return "core-pattern", p
        if p.startswith("/sys/"):
            return "sysfs", p
        if st.canary and p.startswith(st.canary):
            return "write-host-file", p
        if p in _WRITABLE_EXACT or p.startswith(st.writable) or "/__pycache__/" in p:
            return None
        return "write-host-file", p

    # -- handlers (event -> function(args)) ------------------------------------------
    def on_open(args: tuple[Any, ...]) -> None:
        path, _mode, flags = args
        p = _fspath(path)
        if p is None:
            return
        write = bool(flags & _W) if isinstance(flags, int) else False
        if not p.startswith("/"):
            if not write:
                return
            p = os.path.join(_os.getcwd(), p)
        elif not write and not p.startswith(("/proc/", "/dev/")) and p not in st.nodes:
            return
        p = os.path.normpath(p)
        found = classify_path(p, write)
        if found is None:
            return
        technique, detail = found
        if technique == "write-host-file" and _where(3) is None:
            return  # the interpreter's own doing (import machinery, pytest internals)
        host: bool | None = None
        if technique == "device":
            refused = _probe_device(p)
            if refused:
                report(technique, f"open {detail}: {refused} (refused by the kernel)", ok=False)
                return
        if technique == "write-host-file":
            parent = os.path.dirname(p)
            if not _isdir(parent):
                return  # ENOENT: nothing gets written anywhere
            if not _os.access(p if _exists(p) else parent, os.W_OK):
                report(technique, f"open for write {detail}: permission denied", ok=False)
                return
        if technique in ("proc-root", "ptrace", "setns"):
            host = shares("pid")
        elif technique in _FOLLOW_ROOT:
            if at_host_root():
                host = True
        verb = "open for write" if write else "open"
        report(technique, f"{verb} {detail}", host=host)

    def on_kill(args: tuple[Any, ...], group: bool = False) -> None:
        pid, sig = args[0], args[1]
        if not sig:
            return  # a probe: delivers nothing
        if group:
            if pid == 0 or pid == _os.getpgrp() or own(pid):
                return
            detail = f"killpg({pid}, {sig})"
        elif pid == -1:
            detail = f"kill(-1, {sig}): every process it may signal"
        elif pid == 0 or (pid < 0 and (-pid == _os.getpgrp() or own(-pid))) or (pid > 0 and own(pid)):
            return
        elif pid > 0 and not IN_GUEST and shares("pid") and not _alive(pid):
            # ESRCH on the host's own PID namespace: it reaches nothing (a pool killing a
            # worker it reaped already). In a namespace of its own a missing pid may be
            # a host process the namespace hid: that attempt is still reported, blocked.
            return
        else:
            detail = f"kill({pid}, {sig})"
        report("signal", detail, host=shares("pid"))

    def on_socket_new(args: tuple[Any, ...]) -> None:
        family, kind = args[1], args[2]
        if family == AF_PACKET or (isinstance(kind, int) and kind & 0xF == SOCK_RAW):
            report("raw-socket", f"socket(family={family}, type={kind})", host=shares("net"))

    def on_connect(args: tuple[Any, ...], verb: str = "connect") -> None:
        sock, address = args[0], args[1]
        try:
            family = sock.family
        except Exception:  # noqa: BLE001
            return
        host_net = shares("net")
        if family in (AF_INET, AF_INET6) and isinstance(address, tuple) and address:
            addr, port = str(address[0]), address[1] if len(address) > 1 else 0
            if verb == "bind":
                # A socket bound on the host's network (not its loopback) is reachable from
                # outside once it listens or receives; a client's bind says as much.
                if host_net and not _is_loopback(addr):
                    report("network", f"bind {addr or '*'}:{port} on the host's network", host=True)
                return
            if _is_loopback(addr):
                proto = "tcp" if getattr(sock, "type", 1) & 0xF == 1 else "udp"
                owner = _port_owner(proto, int(port), own)
                if not host_net:
                    # The sandbox's own loopback: only worth a line when the port is one
                    # the host serves (the attempt was aimed at the host and missed).
                    if owner is None and proto == "tcp" and int(port) in st.ports:
                        report("network", f"{verb} {addr}:{port} (a host service's port; the sandbox "
                                          "has a loopback of its own)", host=False)
                    return
                if owner != "host":
                    return  # our own server, or nobody listens: nothing of the host reached
                report("network", f"{verb} {addr}:{port} (a host loopback service)", host=True)
            elif addr not in ("", "0.0.0.0", "::"):
                report("network", f"{verb} {addr}:{port}", host=host_net)
        elif family == AF_UNIX and verb != "bind":
            if isinstance(address, (bytes, str)) and address[:1] in ("\0", b"\0"):
                name = _text(address[1:])
                owner = _unix_owner(name, own)
                if owner == "own":
                    return
                if not host_net and name not in st.abstract:
                    return  # not a name the host uses: nothing was aimed at the host
                if host_net and owner is None:
                    return  # nobody listens: nothing reached
                report("abstract-socket", f"{verb} @{name}", host=host_net)
            else:
                p = _fspath(address)
                if not p:
                    return
                p = os.path.normpath(os.path.join(_os.getcwd(), p))
                if p in _SAFE_DEV or p.startswith(st.writable):
                    return
                report("unix-socket", f"{verb} {p}", host=True if at_host_root() else None)

    def on_ioctl(args: tuple[Any, ...]) -> None:
        req = args[1] & 0xFFFFFFFF if isinstance(args[1], int) else None
        fd = args[0]
        if req in (TIOCSTI, TIOCLINUX) and isinstance(fd, int) and _os.isatty(fd):
            what = f"ioctl({fd}, {'TIOCSTI' if req == TIOCSTI else 'TIOCLINUX'})"
            ctty = _os.fstat(fd).st_rdev == _ctty()
            legacy = _read_int("/proc/sys/dev/tty/legacy_tiocsti")
            if (not ctty or legacy == 0) and not _has_cap(CAP_SYS_ADMIN):
                why = "not its controlling tty" if ctty is False else "legacy_tiocsti=0"
                report("tiocsti", f"{what}: {why} and no CAP_SYS_ADMIN", ok=False)
            else:
                report("tiocsti", what, host=None)

    def on_spawn(args: tuple[Any, ...], kind: str) -> None:
        argv: list[str] = []
        raw: Any = None
        if kind == "system":
            argv = str(args[0]).split()[:8]
        elif kind == "popen" or kind == "exec":
            raw = args[1] if len(args) > 1 else args[0]
        elif kind == "spawn":
            raw = args[2] if len(args) > 2 else None
        if raw is not None:
            if isinstance(raw, (str, bytes, os.PathLike)):
                argv = _text(raw, 300).split()[:8]
            else:
                try:
                    argv = [_text(a, 200) for a in list(raw)[:8]]
                except TypeError:
                    argv = [_text(raw)]
        words = argv
        if len(argv) > 2 and os.path.basename(argv[0]) in ("sh", "bash", "dash") and argv[1] == "-c":
            words = argv[2].split()  # sh -c "mount ...": the command's first word
        if words:
            technique = _TOOLS.get(os.path.basename(words[0]))
            if technique and _acts(technique, words[1:]):
                report(technique, "runs " + " ".join(argv)[:200])
        if st.spawns < 16:
            st.spawns += 1
            _send(st, {"t": "audit", "technique": "spawn", "detail": " ".join(argv)[:300] or kind,
                       "kind": kind, "where": _where(3)})

    def on_dlsym(args: tuple[Any, ...]) -> None:
        name = args[1]
        if not isinstance(name, str) or name not in _LIBC or name == "syscall":
            return
        if name == "ioctl":
            return  # too common to flag on lookup; calls through CDLL attributes are checked
        report(_LIBC[name] or "syscall", f"ctypes lookup of {name}()")

    def on_hook_added(args: tuple[Any, ...]) -> None:
        report("tamper", "another audit hook was added")

    protected: set[int] = set()

    def on_setattr(args: tuple[Any, ...]) -> None:
        if id(args[0]) in protected:
            report("tamper", f"replaced {getattr(args[0], '__name__', type(args[0]).__name__)}.{args[1]}")

    handlers: dict[str, Callable[[tuple[Any, ...]], None]] = {
        "open": on_open,
        "os.kill": on_kill,
        "os.killpg": lambda a: on_kill(a, group=True),
        "socket.__new__": on_socket_new,
        "socket.connect": on_connect,
        "socket.bind": lambda a: on_connect(a, "bind"),
        "socket.sendto": lambda a: on_connect(a, "sendto"),
        "socket.sendmsg": lambda a: on_connect(a, "sendmsg") if len(a) > 1 and a[1] is not None else None,
        "fcntl.ioctl": on_ioctl,
        "subprocess.Popen": lambda a: on_spawn(a, "popen"),
        "os.exec": lambda a: on_spawn(a, "exec"),
        "os.posix_spawn": lambda a: on_spawn(a, "exec"),
        "os.spawn": lambda a: on_spawn(a, "spawn"),
        "os.system": lambda a: on_spawn(a, "system"),
        "os.fork": lambda a: on_spawn(a, "fork"),
        "os.forkpty": lambda a: on_spawn(a, "fork"),
        "ctypes.dlsym": on_dlsym,
        "sys.addaudithook": on_hook_added,
        "object.__setattr__": on_setattr,
        "object.__delattr__": on_setattr,
        # 3.12+: os.unshare/os.setns have events of their own.
        "os.setns": lambda a: report("setns", f"os.setns({_text(a[0])}, {a[1] if len(a) > 1 else 0})"),
        "os.unshare": lambda a: report("unshare", f"os.unshare({a[0]:#x})" if isinstance(a[0], int) else "os.unshare"),
    }
    get = handlers.get

    def hook(event: str, args: tuple[Any, ...]) -> None:
        h = get(event)
        if h is None or st.busy:
            return
        st.busy = True
        try:
            h(args)
        except Exception:  # noqa: BLE001 - the detector must never break the test
            pass
        finally:
            st.busy = False

    # -- wrappers for calls 3.11 does not audit ----------------------------------------
    def guarded(technique: str, fn: Callable[..., Any], describe: Callable[..., str],
                after: Callable[..., str | None] | None = None) -> Callable[..., Any]:
        moves = technique in _ROOT_CHANGING

        def wrapper(*a: Any, **kw: Any) -> Any:
            before = position() if moves else None
            try:
                result = fn(*a, **kw)
            except OSError as exc:
                if not st.busy:
                    report(technique, f"{describe(*a, **kw)}: {exc.strerror}", ok=False, where=_where(2))
                raise
            if not st.busy:
                st.busy = True
                try:
                    refused = after(*a, **kw) if after is not None else None
                    if refused:
                        report(technique, f"{describe(*a, **kw)}: {refused}", ok=False, where=_where(2))
                    elif before is not None:
                        after_root_change(technique, describe(*a, **kw), before, True)
                    else:
                        report(technique, describe(*a, **kw), ok=True, where=_where(2))
                except Exception:  # noqa: BLE001
                    pass
                finally:
                    st.busy = False
            return result

        wrapper.__name__ = getattr(fn, "__name__", technique)
        wrapper.__qualname__ = wrapper.__name__
        wrapper.__doc__ = getattr(fn, "__doc__", None)
        wrapper.__wrapped__ = fn  # type: ignore[attr-defined]
        protected.add(id(wrapper))
        return wrapper

    def mknod_after(path: Any, mode: int = 0o600, device: int = 0, *, dir_fd: int | None = None) -> str | None:
        if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
            p = _fspath(path)
            if p and dir_fd is None:
                p = os.path.normpath(os.path.join(_os.getcwd(), p))
                st.nodes.add(p)
                refused = _probe_device(p)
                if refused:
                    return f"created, but opening it is refused: {refused}"
        return None

    def mknod_describe(path: Any, mode: int = 0o600, device: int = 0, **kw: Any) -> str:
        kind = "c" if stat.S_ISCHR(mode) else "b" if stat.S_ISBLK(mode) else None
        if kind is None:
            return f"mknod {_text(path)}"
        return f"mknod {_text(path)} {kind} {_os.major(device)}:{_os.minor(device)}"

    wrapped: dict[str, Callable[..., Any]] = {}
    if "chroot" in _ORIG_OS:
        wrapped["chroot"] = guarded("chroot", _ORIG_OS["chroot"], lambda p, **k: f"chroot({_text(p)})")
    if "mknod" in _ORIG_OS:
        wrapped["mknod"] = guarded("device", _ORIG_OS["mknod"], mknod_describe, after=mknod_after)

    # -- ctypes: functions looked up by name during the test report their calls --------
    audited_types: dict[type, type] = {}
    errno_flag = getattr(ctypes, "_FUNCFLAG_USE_ERRNO", 8)

    def ctypes_call(name: str, args: tuple[Any, ...], result: Any, use_errno: bool, before: Any) -> None:
        if name == "syscall":
            if not args or not isinstance(_num(args[0]), int):
                return
            name = _SYSCALLS.get(_num(args[0]), "")
            if not name:
                return
            args = args[1:]
        technique = _LIBC.get(name)
        if not technique:
            return
        failed = isinstance(result, int) and result < 0
        err = ""
        if failed and use_errno:
            e = ctypes.get_errno()
            err = f": {_os.strerror(e)}" if e else ""
        shown = ", ".join(_text(a, 60) for a in args[:5])
        detail = f"{name}({shown})"
        if technique == "tiocsti":
            req = _num(args[1]) if len(args) > 1 else None
            if not isinstance(req, int) or req & 0xFFFFFFFF not in (TIOCSTI, TIOCLINUX):
                return
        elif technique in ("ptrace", "signal") and len(args) > 1:
            pid = _num(args[1] if technique == "ptrace" else args[0])
            if technique == "ptrace" and _num(args[0]) == 0:
                return  # PTRACE_TRACEME: being traced by our own parent
            if technique == "signal" and name in ("kill", "killpg") and not _num(args[1]):
                return  # signal 0: a probe
            if isinstance(pid, int) and pid > 0 and own(pid):
                return
        if name == "mount" and len(args) > 2 and _text(args[2]) == "cgroup":
            # A cgroup v1 hierarchy: the first step of the release_agent escape (the kernel
            # runs a hierarchy's release_agent as root on the host).
            report("release-agent", f"{detail}: a cgroup v1 hierarchy" + err, ok=False if failed else None,
                   host=False if not failed and shares("mnt") is False else None, where=_where(3))
        if failed:
            report(technique, detail + err, ok=False, where=_where(3))
            return
        if name in _MOVES and before is not None:
            after_root_change(technique if name != "pivot_root" else "mount", detail, before, True)
            return
        host: bool | None = None
        if technique == "mount":
            host = shares("mnt")

        elif technique in ("ptrace", "signal"):
            host = shares("pid")
        report(technique, detail, ok=True, host=host, where=_where(3))

    def audited_type(base: type) -> type:
        cls = audited_types.get(base)
        if cls is None:
            use_errno = bool(base._flags_ & errno_flag)  # type: ignore[attr-defined]
            call = base.__call__

            def __call__(self: Any, *a: Any) -> Any:  # noqa: N807
                name = self.__name__
                if name == "syscall" and a:
                    name = _SYSCALLS.get(_num(a[0]), "")  # type: ignore[call-overload]
                before = position() if name in _MOVES else None
                result = call(self, *a)
                if not st.busy:
                    st.busy = True
                    try:
                        ctypes_call(self.__name__, a, result, use_errno, before)
                    except Exception:  # noqa: BLE001
                        pass
                    finally:
                        st.busy = False
                return result

            cls = type(base.__name__, (base,), {"_flags_": base._flags_, "_restype_": base._restype_,  # type: ignore[attr-defined]
                                                "__call__": __call__})
            audited_types[base] = cls
            protected.add(id(cls))
        return cls

    def getitem(self: ctypes.CDLL, name_or_ordinal: Any) -> Any:
        if isinstance(name_or_ordinal, str) and name_or_ordinal in _LIBC:
            st.busy = True  # the lookup's own dlsym event: the call will be reported
            try:
                func = audited_type(self._FuncPtr)((name_or_ordinal, self))  # type: ignore[attr-defined]
            finally:
                st.busy = False
            func.__name__ = name_or_ordinal
            return func
        return _ORIG_GETITEM(self, name_or_ordinal)

    protected.add(id(getitem))

    # -- install ------------------------------------------------------------------------
    guards = [(sys, _guard_class(sys, ("addaudithook", "audit"), report)),
              (os, _guard_class(os, tuple(wrapped), report)),
              (sys.modules[__name__], _guard_class(sys.modules[__name__], None, report)),
              (hostview, _guard_class(hostview, None, report)),
              (calls, _guard_class(calls, None, report))]
    protected.update({id(hook), id(ctypes.CDLL), *(id(mod) for mod, _ in guards)})
    installed: list[int] = []

    def install(result_fd: int, writable: list[str], paused: bool = False) -> None:
        # Our own copy of the pipe, out of the way of a test that closes or reuses low
        # fds; its identity is checked before every send so we never write into a file
        # of the test's.
        try:
            # High and close-on-exec: fds are handed out lowest first, so a test that
            # closes its fds and opens new ones does not get this number back.
            fd = _fcntl(result_fd, _F_DUPFD_CLOEXEC, 512) if result_fd >= 0 else -1
            if fd >= 0:
                fst = _os.fstat(fd)
                st.pipe = (fst.st_dev, fst.st_ino)
            st.fd = fd
        except OSError:
            st.fd, st.pipe = -1, None
        st.me = _os.getpid()
        st.writable = _prefixes(writable) + _WRITABLE
        st.seen.clear()
        st.nodes.clear()
        st.sent = st.spawns = 0
        st.over = False
        if installed and installed[0] == st.me:
            st.busy = paused
            return  # armed twice in one process: new pipe and paths, same hook
        installed[:] = [st.me]
        sys.addaudithook(hook)
        st.busy = True  # our own patching below raises audit events: not tampering
        try:
            ctypes.CDLL.__getitem__ = getitem  # type: ignore[method-assign]
            for name, fn in wrapped.items():
                setattr(os, name, fn)
            for mod, cls in guards:
                try:
                    mod.__class__ = cls
                except TypeError:
                    pass
        finally:
            st.busy = paused

    def resume(writable: list[str]) -> None:
        if writable:
            st.writable = _prefixes(writable) + st.writable
        st.busy = False

    return install, resume, from_environment


def _send(st: _State, msg: dict[str, Any]) -> None:
    try:
        fst = _os.fstat(st.fd)
        if (fst.st_dev, fst.st_ino) != st.pipe:
            st.fd = -1  # closed and reused by the test: stop rather than write into its file
            return
        wire.send(st.fd, msg)
    except OSError:
        st.fd = -1


def _guard_class(mod: types.ModuleType, names: Iterable[str] | None, report: Callable[..., None]) -> type:
    """A ModuleType subclass that reports replacing ``names`` of ``mod`` (all when None):
    modules raise no audit event for attribute assignment; their class can."""
    watched = frozenset(names) if names is not None else None
    label = mod.__name__

    class Guarded(types.ModuleType):
        __slots__ = ()

        def __setattr__(self, name: str, value: Any) -> None:
            if watched is None or name in watched:
                report("tamper", f"replaced {label}.{name}")
            super().__setattr__(name, value)

        def __delattr__(self, name: str) -> None:
            if watched is None or name in watched:
                report("tamper", f"deleted {label}.{name}")
            super().__delattr__(name)

    return Guarded


_install, _resume, refresh_environment = _build()


def arm(result_fd: int, writable: list[str], rootdir: str | None = None, paused: bool = False) -> None:
    """Install the audit layer in this (already confined) test process.

    Everything the hook needs lives in closures made at import: replacing this module's
    globals, or ``sys.addaudithook``, changes nothing for the installed hook (audit hooks
    cannot be removed); attempts at it are reported as ``tamper``.

    ``rootdir``: the session's, which escape locations are relative to (default: the
    cwd now, before the test runs). "/" counts as none: every path would lose its "/".

    ``paused``: installed but deaf until ``resume`` (a pre-forked child arms itself
    while it waits for its job, off the test's critical path: ~0.35 ms a test here).
    """
    if rootdir is None:
        try:
            rootdir = _os.getcwd()
        except OSError:  # no cwd (it lies outside a new root)
            rootdir = ""
    _ROOT[0] = rootdir.rstrip("/") + "/" if rootdir.rstrip("/") else ""
    _install(result_fd, writable, paused)


def resume(writable: list[str] = ()) -> None:  # type: ignore[assignment]
    """From here on the audit layer watches (after ``arm(..., paused=True)``), with
    ``writable`` added to what the test may write (known once its job came)."""
    _resume(list(writable))


def _prefixes(writable: list[str]) -> tuple[str, ...]:
    """Path prefixes: each dir with a trailing "/", or as it is when it ends in "*"
    (``.../pytest-cache-files-*``: names that begin so)."""
    return tuple(w[:-1] if w.endswith("*") else os.path.join(w, "") for w in writable if w)

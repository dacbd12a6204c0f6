"""PID 1 of a User-Mode Linux guest: build the guest root, connect the channel, run the
execnet worker, keep the guest alive until the worker exits, then power off.

The kernel starts it as ``<python> -u uml_init.py <workdir>/guest.json`` (written by
``uml_launch.py``; readable through hostfs). The guest root is the host's ``/``
(hostfs, read-only) under a tmpfs overlay, so nothing the guest writes reaches the
host; pytest's basetemp (and other ``writable`` paths) are hostfs mounts of their own.

Why Python and not a shell script or a static binary: the interpreter must start anyway
to run the worker, and it is started only once. PID 1 *is* the interpreter that the
worker forks from, so the worker skips an interpreter start (~0.35-0.7 s inside UML,
where every syscall is a ptrace round trip): it runs execnet's ``-u -c <bootstrap>``
in-process, as a fresh ``__main__``.

PID 1 must never exit (the kernel panics): after the worker exits it powers off with
sysrq ``o``, and it loops forever whatever happens. It sends a UDP heartbeat to the
launcher every 0.5 s, from SCHED_FIFO, so the launcher can tell a hung guest from a
busy one.

It also serves as the guest's ``modprobe`` (``/proc/sys/kernel/modprobe``): the host has
no kmod, and modules (overlay, dummy, veth, ipv6, ...) live under
``/usr/lib/uml/modules/<release>``; ``finit_module`` loads them.

Standalone: stdlib only, no ``pytest_isolate`` import (it runs before anything else).
"""

from __future__ import annotations

import ctypes
import fcntl
import fnmatch
import io
import json
import os
import select
import signal
import socket
import struct
import sys
import time
import traceback

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mount.argtypes = [
    ctypes.c_char_p,
    ctypes.c_char_p,
    ctypes.c_char_p,
    ctypes.c_ulong,
    ctypes.c_char_p,
]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
_libc.syscall.restype = ctypes.c_long

MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MS_NOEXEC = 8
MS_BIND = 4096
MS_REC = 16384
MS_PRIVATE = 1 << 18
MNT_DETACH = 2
SYS_FINIT_MODULE = 313  # x86_64: UML guests run x86_64 binaries
SYS_PIVOT_ROOT = 155

#: Where the guest keeps its own things (inside the guest root, on a tmpfs).
ISOLATE_DIR = "/run/isolate"
HOSTROOT = ISOLATE_DIR + "/host"
GUEST_INFO = ISOLATE_DIR + "/guest.json"

T0 = time.monotonic()
#: This interpreter's environment as the kernel gave it (the start-up variables of the
#: host run, ``uml_gateway._kernel_env``): what a process forked from it started with.
BOOT_ENV = dict(os.environ)


def _chk(ret: int, what: str) -> int:
    if ret < 0:
        e = ctypes.get_errno()
        raise OSError(e, f"{what}: {os.strerror(e)}")
    return ret


def _b(p: str | None) -> bytes | None:
    return None if p is None else os.fsencode(p)


def mount(
    src: str | None, dst: str, fstype: str | None = None, flags: int = 0, data: str | None = None
) -> None:
    _chk(
        _libc.mount(_b(src), _b(dst), _b(fstype), flags, _b(data)),
        f"mount {fstype or src} on {dst}",
    )


def log(msg: str) -> None:
    try:
        os.write(2, f"[isolate-init {time.monotonic() - T0:.3f}] {msg}\n".encode())
    except OSError:
        pass


# --------------------------------------------------------------------------- modules


#: Module trees of the kernel package this guest booted (guest.json's ``modules``), looked
#: at first: a kernel outside /usr (scripts/uml-kernel.sh's) has its modules beside it.
MODULE_ROOTS: list[str] = []


def modules_dir() -> str | None:
    rel = os.uname().release
    here = [f"{r}/{rel}" for r in MODULE_ROOTS]
    for d in (*here, f"/lib/modules/{rel}", f"/usr/lib/uml/modules/{rel}", f"/usr/lib/modules/{rel}"):
        if os.path.isfile(d + "/modules.dep"):
            return d
    return None


def _loaded() -> set[str]:
    try:
        with open("/proc/modules", encoding="utf-8") as f:
            return {line.split()[0] for line in f}
    except OSError:
        return set()


def load_module(name: str, moddir: str | None = None) -> bool:
    """modprobe ``name`` (a module name or alias) with its dependencies; True if loaded
    or built in. Silent on failure: the caller's request fails as it would anyway."""
    moddir = moddir or modules_dir()
    if moddir is None:
        return False
    norm = name.replace("-", "_")
    deps: dict[str, list[str]] = {}
    with open(moddir + "/modules.dep", encoding="utf-8") as f:
        for line in f:
            path, _, rest = line.partition(":")
            deps[os.path.basename(path)[:-3].replace("-", "_")] = [path, *rest.split()]
    if norm not in deps:
        target = None
        try:
            with open(moddir + "/modules.alias", encoding="utf-8") as f:
                for line in f:
                    parts = line.split()
                    if (
                        len(parts) == 3
                        and parts[0] == "alias"
                        and fnmatch.fnmatchcase(name, parts[1])
                    ):
                        target = parts[2].replace("-", "_")
                        break
        except OSError:
            pass
        if target is None:
            try:
                with open(moddir + "/modules.builtin", encoding="utf-8") as f:
                    return any(
                        os.path.basename(x.strip())[:-3].replace("-", "_") == norm for x in f
                    )
            except OSError:
                return False
        norm = target
    if norm not in deps:
        return False
    have = _loaded()
    order: list[str] = []

    def visit(mod: str) -> None:
        entry = deps.get(mod)
        if entry is None or mod in order:
            return
        for dep in entry[1:]:
            visit(os.path.basename(dep)[:-3].replace("-", "_"))
        order.append(mod)

    visit(norm)
    for mod in order:
        if mod in have:
            continue
        path = deps[mod][0]
        full = path if path.startswith("/") else f"{moddir}/{path}"
        fd = os.open(full, os.O_RDONLY | os.O_CLOEXEC)
        try:
            r = _libc.syscall(SYS_FINIT_MODULE, fd, b"", 0)
            if r < 0 and ctypes.get_errno() != 17:  # EEXIST: raced with another load
                return False
        finally:
            os.close(fd)
    return True


def modprobe_main(argv: list[str]) -> int:
    """Entry point when the kernel runs us as modprobe: ``modprobe -q -- <name>``."""
    names = [a for a in argv if not a.startswith("-")]
    ok = True
    for n in names:
        ok = load_module(n) and ok
    return 0 if ok else 1


# --------------------------------------------------------------------------- network

SIOCGIFFLAGS = 0x8913
SIOCSIFFLAGS = 0x8914
SIOCSIFADDR = 0x8916
SIOCSIFNETMASK = 0x891C


def _ifreq(name: str, payload: bytes = b"") -> bytearray:
    buf = bytearray(40)
    buf[:16] = name.encode().ljust(16, b"\0")
    buf[16 : 16 + len(payload)] = payload
    return buf


def _sockaddr_in(ip: str) -> bytes:
    return struct.pack("=H2s4s8x", socket.AF_INET, b"\0\0", socket.inet_aton(ip))


def if_up(name: str, ip: str | None = None, netmask: str | None = None) -> None:
    """ioctl, not netlink: importing pyroute2 costs seconds inside UML."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        if ip:
            fcntl.ioctl(s, SIOCSIFADDR, _ifreq(name, _sockaddr_in(ip)))
        if netmask:
            fcntl.ioctl(s, SIOCSIFNETMASK, _ifreq(name, _sockaddr_in(netmask)))
        (flags,) = struct.unpack_from("=H", fcntl.ioctl(s, SIOCGIFFLAGS, bytes(_ifreq(name))), 16)
        fcntl.ioctl(s, SIOCSIFFLAGS, _ifreq(name, struct.pack("=H", flags | 1)))


def connect(ch: dict, deadline: float) -> socket.socket:
    """TCP to the launcher's relay; retried quickly (a lost SYN would otherwise wait
    for the 1 s initial retransmission timeout)."""
    last: Exception | None = None
    while time.monotonic() < deadline:
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        s.settimeout(0.25)
        try:
            s.connect((ch["host"], ch["port"]))
            s.settimeout(None)
            return s
        except OSError as e:
            last = e
            s.close()
            time.sleep(0.02)
    raise OSError(f"cannot connect to the launcher at {ch['host']}:{ch['port']}: {last}")


# --------------------------------------------------------------------------- the root


def build_root(cfg: dict) -> None:
    """Guest root = host ``/`` (hostfs, read-only) under a tmpfs overlay; pivot into it."""
    mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    if not load_module("overlay"):
        log("overlay module not loaded (built in, or missing: mount will tell)")
    base = next(d for d in ("/run", "/mnt", "/tmp", "/media", "/srv") if os.path.isdir(d))
    mount("tmpfs", base, "tmpfs", MS_NOSUID | MS_NODEV, "mode=755")
    for d in ("lower", "upper", "work", "root"):
        os.mkdir(f"{base}/{d}")
    mount("/", f"{base}/lower", None, MS_BIND)
    mount(
        "overlay",
        f"{base}/root",
        "overlay",
        0,
        f"lowerdir={base}/lower,upperdir={base}/upper,workdir={base}/work",
    )
    nr = f"{base}/root"
    mount("proc", nr + "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    mount("sysfs", nr + "/sys", "sysfs", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    try:
        mount("cgroup2", nr + "/sys/fs/cgroup", "cgroup2", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    except OSError as e:
        log(f"no cgroup2: {e}")
    mount("devtmpfs", nr + "/dev", "devtmpfs", MS_NOSUID, "mode=755")
    for d in ("pts", "shm"):
        os.makedirs(f"{nr}/dev/{d}", exist_ok=True)
    mount(
        "devpts",
        nr + "/dev/pts",
        "devpts",
        MS_NOSUID | MS_NOEXEC,
        "newinstance,ptmxmode=0666,mode=620",
    )
    mount("tmpfs", nr + "/dev/shm", "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777")
    mount("tmpfs", nr + "/run", "tmpfs", MS_NOSUID | MS_NODEV, "mode=755")
    os.makedirs(nr + HOSTROOT)
    mount("/", nr + HOSTROOT, None, MS_BIND)
    for path in cfg.get("writable", []):
        os.makedirs(nr + path, exist_ok=True)
        mount("none", nr + path, "hostfs", 0, path)
    os.chdir(nr)
    _chk(_libc.syscall(SYS_PIVOT_ROOT, b".", b"."), "pivot_root")
    _chk(_libc.umount2(b".", MNT_DETACH), "umount old root")
    os.chdir("/")


def setup_modprobe(python: str) -> None:
    """Install ourselves as the kernel's modprobe helper (autoload of dummy, veth, ...)."""
    here = os.path.dirname(os.path.abspath(__file__))
    path = ISOLATE_DIR + "/modprobe"
    with open(path, "w", encoding="utf-8") as f:
        f.write(
            f"#!{python} -S\nimport sys\nsys.path.insert(0, {here!r})\n"
            f"import uml_init\numl_init.MODULE_ROOTS[:] = {MODULE_ROOTS!r}\n"
            "sys.exit(uml_init.modprobe_main(sys.argv[1:]))\n"
        )
    os.chmod(path, 0o755)
    with open("/proc/sys/kernel/modprobe", "w", encoding="utf-8") as f:
        f.write(path)


# --------------------------------------------------------------------------- the worker


def run_python_args(args: list[str]) -> int:
    """Run ``python <args>`` in this (forked) interpreter; supports what execnet passes
    (``-u``, ``-B``, ``-c code``). Returns the exit status."""
    import builtins
    import types

    unbuffered = False
    code: str | None = None
    i = 0
    while i < len(args):
        a = args[i]
        if a == "-u":
            unbuffered = True
        elif a == "-B":
            sys.dont_write_bytecode = True
        elif a == "-c":
            code = args[i + 1]
            rest = args[i + 2 :]
            break
        else:
            raise SystemExit(f"unsupported python argument in the guest: {a!r}")
        i += 1
    if code is None:
        raise SystemExit("no -c in the worker arguments")
    sys.argv = ["-c", *rest]
    sys.stdin = io.TextIOWrapper(
        io.BufferedReader(io.FileIO(0, "r", closefd=False)), encoding="utf-8"
    )
    if unbuffered:
        sys.stdout = io.TextIOWrapper(
            io.FileIO(1, "w", closefd=False), encoding="utf-8", write_through=True
        )
        sys.stderr = io.TextIOWrapper(
            io.FileIO(2, "w", closefd=False),
            encoding="utf-8",
            errors="backslashreplace",
            write_through=True,
        )
    else:
        sys.stdout = io.TextIOWrapper(
            io.BufferedWriter(io.FileIO(1, "w", closefd=False)),
            encoding="utf-8",
            line_buffering=True,
        )
    sys.__stdin__, sys.__stdout__, sys.__stderr__ = sys.stdin, sys.stdout, sys.stderr
    main = types.ModuleType("__main__")
    main.__dict__["__builtins__"] = builtins
    sys.modules["__main__"] = main
    status = 0
    try:
        exec(compile(code, "<string>", "exec"), main.__dict__)
    except SystemExit as e:
        if e.code is None:
            status = 0
        elif isinstance(e.code, int):
            status = e.code
        else:
            print(e.code, file=sys.stderr)
            status = 1
    except BaseException:  # noqa: BLE001 - the interpreter would print and exit 1
        traceback.print_exc()
        status = 1
    for s in (sys.stdout, sys.stderr):
        try:
            s.flush()
        except Exception:  # noqa: BLE001
            pass
    return status


def worker_main(sock: socket.socket, cfg: dict, close: list[int]) -> None:
    for sig in (signal.SIGCHLD, signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1):
        signal.signal(sig, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.set_wakeup_fd(-1)
    for fd in close:
        try:
            os.close(fd)
        except OSError:
            pass
    os.setsid()
    fd = sock.detach()
    os.dup2(fd, 0)
    os.dup2(fd, 1)
    os.close(fd)
    os.environ.clear()
    os.environ.update(cfg.get("env", {}))
    if cfg.get("umask") is not None:
        os.umask(cfg["umask"])
    try:
        os.chdir(cfg.get("cwd") or "/")
    except OSError:
        os.chdir("/")
    if cfg.get("server_start"):
        fork_server(cfg["server_start"], cfg.get("startup_env", []), cfg.get("cmdline") or [])
    os._exit(run_python_args(cfg["python_args"]))


def _started_alike(env: dict[str, str], names: list[str], prefixes: tuple[str, ...]) -> bool:
    """Whether a fresh interpreter in ``env`` would start as this one did: the same
    start-up variables (``names``, and any that begin with ``prefixes``)."""
    keys = {*names, *(k for k in (*BOOT_ENV, *env) if k.startswith(prefixes))}
    return all(BOOT_ENV.get(k) == env.get(k) for k in keys)


def fork_server(start: dict, names: list[str], cmdline: list[str]) -> None:
    """Fork the worker's fork server now, before execnet starts, as the host's stem does.

    Spawned by ``remote.serve`` once execnet is up, the server is a second interpreter
    start in the guest (~70 ms with ``-S``, 200 ms with ``site``) followed by
    ``import pytest`` and the configuration (~0.6 and ~0.8 s here), all after execnet's
    own bootstrap. Forked here, it skips the start, and imports and configures with
    ``start`` (the controller's arguments, paths and log, from the launch config) while
    execnet starts beside it; ``remote.serve`` finds it as a stem-forked gateway's
    (``stem.server``) and sends it the rest of its set-up. Only when this interpreter
    started as a fresh one would (same start-up variables); else it is spawned.
    """
    sys.path[:] = start["sys_path"]
    try:
        from pytest_isolate import stem
    except Exception as e:  # noqa: BLE001 - remote.serve spawns it, and says what fails
        log(f"fork server not forked: {type(e).__name__}: {e}")
        return
    if not _started_alike(dict(os.environ), names, stem.START_PREFIXES):
        return
    # What its tests write uncaptured (``-s``, a subprocess's output) reaches the host
    # through this worker's channel: stdout and stderr through a pipe each, not the
    # guest's console (``remote.serve`` reads them, the controller writes them out).
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()

    def setup() -> None:
        os.close(out_r)
        os.close(err_r)
        os.dup2(err_w, 2)  # the server's stderr, which its tests' uncaptured stderr is
        os.close(err_w)
        _server_setup(cmdline)

    stem.server = stem.fork_server({**start, "guest_out": out_w}, setup)
    os.close(out_w)
    os.close(err_w)
    stem.server_output = (out_r, err_r)


def _server_setup(cmdline: list[str]) -> None:
    """First thing in the forked server: its name, and its memory filled in bulk while it
    imports and configures (``prefault.StartWarmer``; stopped before its first fork)."""
    set_cmdline(cmdline)
    try:
        from pytest_isolate.facets.prefault import StartWarmer

        StartWarmer().start()
    except Exception as e:  # noqa: BLE001 - only a speed-up
        log(f"start warmer not started: {type(e).__name__}: {e}")


#: Command lines set by ``set_cmdline``: the kernel reads them from this memory.
_CMDLINES: list[ctypes.Array] = []


def set_cmdline(args: list[str]) -> None:
    """Show ``args`` as this process's command line (``/proc/<pid>/cmdline``, ``ps``),
    and so as its children's.

    The fork server's and its test children's would otherwise be PID 1's
    (``python uml_init.py <config> root=98:0 console=tty0``), which a test sees, and a
    report shows for a process a test left running. On the host they are the
    controller's (the stem is a fork of it): the launch config carries it here.
    ``PR_SET_MM`` needs CAP_SYS_RESOURCE, which the guest's root has; where it fails the
    command line stays as it was."""
    if not args:
        return
    raw = b"\0".join(a.encode(errors="surrogateescape") for a in args) + b"\0"
    buf = ctypes.create_string_buffer(raw, len(raw))
    start = ctypes.addressof(buf)
    end = start + len(raw)
    pr_set_mm, arg_start, arg_end = 35, 8, 9
    # The kernel wants start <= end after each call: which goes first depends on where
    # the new area lies against the old one.
    for first, second in (((arg_start, start), (arg_end, end)), ((arg_end, end), (arg_start, start))):
        if _libc.prctl(pr_set_mm, first[0], ctypes.c_ulong(first[1]), 0, 0) == 0:
            if _libc.prctl(pr_set_mm, second[0], ctypes.c_ulong(second[1]), 0, 0) == 0:
                _CMDLINES.append(buf)
                return
    log(f"command line not set: {os.strerror(ctypes.get_errno())}")


def poweroff() -> None:
    try:
        with open("/proc/sysrq-trigger", "w", encoding="utf-8") as f:
            f.write("o")
    except OSError as e:
        log(f"power off failed: {e}")


def pid1(cfg: dict) -> None:
    ch = cfg["channel"]
    hb = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    worker = 0
    try:
        build_root(cfg)
        try:
            setup_modprobe(sys.executable)
        except OSError as e:
            log(f"modprobe helper not installed: {e}")
        if cfg.get("hostname"):
            socket.sethostname(cfg["hostname"])
        if_up("lo", "127.0.0.1", "255.0.0.0")
        if_up(cfg.get("channel_if", "eth0"), ch["guest"], ch["netmask"])
        if cfg.get("network") == "ip":
            if_up(cfg.get("switch_if", "eth1"))
            load_module("macvlan")
        hb.connect((ch["host"], ch["heartbeat"]))
        info = {
            "hostroot": HOSTROOT,
            "writable": cfg.get("writable", []),
            "basetemp": cfg.get("basetemp"),
            "network": cfg.get("network", "none"),
            "switch_if": cfg.get("switch_if", "eth1") if cfg.get("network") == "ip" else None,
            "channel_if": cfg.get("channel_if", "eth0"),
            "workdir": cfg.get("workdir"),
        }
        with open(GUEST_INFO, "w", encoding="utf-8") as f:
            json.dump(info, f)
        try:
            os.sched_setscheduler(0, os.SCHED_FIFO | os.SCHED_RESET_ON_FORK, os.sched_param(50))
        except OSError as e:
            log(f"SCHED_FIFO refused: {e}")
        sock = connect(ch, time.monotonic() + cfg.get("connect_timeout", 60))
        if cfg.get("debug"):
            log("channel connected")
        r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.set_wakeup_fd(w)
        signal.signal(signal.SIGCHLD, lambda n, f: None)
        worker = os.fork()
        if worker == 0:
            try:
                worker_main(sock, cfg, [r, w, hb.fileno()])
            finally:
                os._exit(70)
        sock.close()
    except BaseException as e:  # noqa: BLE001 - PID 1 must never exit
        log(f"guest init failed: {type(e).__name__}: {e}")
        traceback.print_exc()
        _send(hb, f"log guest init failed: {type(e).__name__}: {e}")
        poweroff()
        while True:
            time.sleep(60)
    loop(hb, r, worker)


def _send(hb: socket.socket, msg: str) -> None:
    try:
        hb.send(msg.encode()[:500])
    except OSError:
        pass


def loop(hb: socket.socket, wake: int, worker: int) -> None:
    """Reap, heartbeat; power off when the worker is gone. Never returns."""
    powered = False
    while True:
        try:
            select.select([wake], [], [], 0.5)
            try:
                os.read(wake, 512)
            except OSError:
                pass
            while True:
                try:
                    pid, status = os.waitpid(-1, os.WNOHANG)
                except ChildProcessError:
                    break
                if pid == 0:
                    break
                if pid == worker and not powered:
                    if os.WIFSIGNALED(status):
                        how = f"killed by signal {os.WTERMSIG(status)}"
                    else:
                        how = f"exited with status {os.WEXITSTATUS(status)}"
                    log(f"worker {how}; powering off")
                    _send(hb, f"log worker {how}; powering off")
                    powered = True
                    poweroff()
            if not powered:
                _send(hb, "hb")
        except BaseException:  # noqa: BLE001 - PID 1 must never exit
            time.sleep(0.5)


def main() -> None:
    if os.path.basename(sys.argv[0]) == "modprobe" or (
        len(sys.argv) > 1 and sys.argv[1] == "--modprobe"
    ):
        sys.exit(modprobe_main(sys.argv[2:]))
    try:
        with open(sys.argv[1], encoding="utf-8") as f:
            cfg = json.load(f)
    except BaseException as e:  # noqa: BLE001
        log(f"cannot read the guest config: {e}")
        poweroff()
        while True:
            time.sleep(60)
    MODULE_ROOTS[:] = cfg.get("modules", [])
    pid1(cfg)


if __name__ == "__main__":
    main()

"""Boot one User-Mode Linux guest and relay execnet's stdin/stdout into it, byte-exact.

execnet's popen gateway runs ``<python spec> -u -c <bootstrap>`` and speaks its protocol
over that process's stdin/stdout. ``uml_gateway.gateway_spec`` makes the "python" of the
spec this program, so execnet runs::

    <host python> -I -S uml_launch.py <workdir>/launch.json -u -c <bootstrap>

and this program boots a guest whose init (``uml_init.py``) runs ``-u -c <bootstrap>``
with the guest's stdin/stdout wired to ours.

Why TCP and not the guest console: UML's tty line driver stops delivering host-to-guest
input for good once the guest tty throttles (~4 KiB pending), so a raw console hangs on
the first large message. Instead the guest gets a NIC whose other end lives in a
network namespace private to this launcher, and we relay between our stdio and one TCP
connection from the guest (TCP_NODELAY: execnet messages are small). The NIC is either

* ``tap`` (``cfg["channel"]``): a tap device, which needs ``/dev/net/tun`` (root, or
  mode 0666 as udev makes it), or
* ``veth``: a veth pair in that private netns, the guest's end read and written by the
  vector driver's ``raw`` transport (a packet socket). Needs no device and no host
  privilege: the netns is owned by the launcher's user namespace, where ``linux.uml``
  keeps CAP_NET_RAW, and a packet socket reaches only that netns, which holds nothing
  but this pair and ``lo``. Same speed as the tap (it is the same TCP), unlike the
  flow-controlled serial line (~1.7 MB/s) that is the other channel without privilege.

Host protection: the ``linux.uml`` process runs confined (its own namespaces, a
read-only view of the host, no privilege, a reaper as PID 1); ``uml_confine.py``
explains how and holds that code. This file boots the guest inside it and relays.

This launcher exits, and so closes its stdout (execnet then sees EOF), when the guest
kernel exits (panic: UML aborts with status 134), when the guest stops sending
heartbeats (hang), on stdin EOF (the gateway was closed; the guest gets EOF, its
worker exits and PID 1 powers off), on SIGTERM/SIGHUP, or when its parent dies
(PR_SET_PDEATHSIG plus a ``getppid`` watchdog). Each reason is appended to
``<workdir>/console.log``; ``uml_gateway.console_tail`` shows it.

Run one guest by hand: see the module docstring of ``pytest_isolate.tiers.uml``.

This file and its sibling ``uml_confine.py`` are standalone (stdlib only, run with
``-I -S``): they must not depend on the controller's ``sys.path``, and the launcher
starts faster without ``site``.
"""

from __future__ import annotations

import fcntl
import json
import os
import select
import signal
import socket
import struct
import sys
import time

# The confinement is uml_confine.py, next to this file. Run as a file (``-I -S``, as
# uml_gateway runs it) neither this directory nor site-packages is on sys.path, so the
# sibling is found by this file's own path (the same if this file is imported as
# pytest_isolate.tiers.uml_launch); the entry is removed again once it is imported.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, _HERE)
try:
    from uml_confine import (
        CLONE_NEWNET,
        CLONE_NEWPID,
        CLONE_NEWUSER,
        IFF_UP,
        IFLA_IFNAME,
        IFLA_MASTER,
        IFLA_NET_NS_FD,
        NOBODY,
        PR_SET_PDEATHSIG,
        RTM_DELLINK,
        RTM_NEWLINK,
        _netlink_socket,
        _nl_request,
        _nla,
        _privileged,
        _runner,
        create_tap,
        create_veth,
        if_up,
        prctl,
        setns,
        unshare,
    )
finally:
    sys.path.remove(_HERE)

NS_GET_USERNS = 0xB701  # ioctl on a namespace fd: an fd of its owning user namespace

#: The guest's eth0 and our end of it; only ever exists in our private netns.
HOST_IP = "169.254.100.1"
GUEST_IP = "169.254.100.2"
CHANNEL_PORT = 7400
HEARTBEAT_PORT = 7401
CHANNEL_TAP = "umlc0"
#: Console log cap: a guest spamming /dev/console must not fill the host disk.
CONSOLE_MAX = 1 << 20
CONSOLE_KEEP = 256 << 10
BUF_MAX = 4 << 20


# --------------------------------------------------------------------------- launcher


class Launcher:
    def __init__(self, cfg: dict, py_args: list[str]) -> None:
        self.cfg = cfg
        self.py_args = py_args
        self.workdir = cfg["workdir"]
        self.log_path = os.path.join(self.workdir, "console.log")
        self.log = open(self.log_path, "ab", buffering=0)
        self.uml_pid = 0
        self.pidfd = -1
        self.reason = ""
        self.status: int | None = None
        self.switch_nl: socket.socket | None = None
        self.switch_tap = cfg.get("switch_tap")

    # -- console log
    def note(self, msg: str) -> None:
        self.console(f"[pytest-isolate] {msg}\n".encode())

    def console(self, data: bytes) -> None:
        try:
            self.log.write(data)
            if self.log.tell() > CONSOLE_MAX:
                with open(self.log_path, "rb") as f:
                    f.seek(-CONSOLE_KEEP, os.SEEK_END)
                    tail = f.read()
                self.log.seek(0)
                self.log.truncate()
                self.log.write(b"[pytest-isolate] ... console truncated ...\n" + tail)
        except OSError:
            pass

    # -- set-up
    def _join_switch_userns(self) -> bool:
        """Unprivileged network="ip": join the user namespace that owns the run's switch.

        Without root the switch lives in a user namespace of its own, kept by a holder
        process (``facets.net``), mapping the user's uid and gid to 0 as ours would. A
        launcher in a user namespace of its own would hold no capability over the
        switch and could not move the guest's NIC into it; in the switch's user
        namespace everything the launcher then unshares (network, mount, PID) is owned
        by the same namespace as the switch. False when the switch belongs to our own
        user namespace (root's switch): nothing to join.
        """
        sw = os.open(self.cfg["switch"], os.O_RDONLY | os.O_CLOEXEC)
        try:
            ufd = fcntl.ioctl(sw, NS_GET_USERNS)
        finally:
            os.close(sw)
        try:
            mine = os.stat("/proc/self/ns/user")
            theirs = os.fstat(ufd)
            if (mine.st_dev, mine.st_ino) == (theirs.st_dev, theirs.st_ino):
                return False
            setns(ufd, CLONE_NEWUSER)
            return True
        finally:
            os.close(ufd)

    def setup_namespaces(self) -> bool:
        # "userns": take the unprivileged path even as root (tests exercise it that way)
        privileged = _privileged() and self.cfg.get("mode") != "userns"
        if not privileged and not (self.switch_tap and self._join_switch_userns()):
            uid, gid = os.getuid(), os.getgid()
            unshare(CLONE_NEWUSER)
            with open("/proc/self/setgroups", "w", encoding="utf-8") as f:
                f.write("deny")
            with open("/proc/self/uid_map", "w", encoding="utf-8") as f:
                f.write(f"0 {uid} 1\n")
            with open("/proc/self/gid_map", "w", encoding="utf-8") as f:
                f.write(f"0 {gid} 1\n")
        unshare(CLONE_NEWNET)
        owner = NOBODY if privileged else 0
        if self.cfg.get("channel", "tap") == "veth":
            # the guest's end (its raw transport's ifname) is CHANNEL_TAP + "u"
            create_veth(CHANNEL_TAP + "u", CHANNEL_TAP)
        else:
            create_tap(CHANNEL_TAP, owner, owner)
        if_up(CHANNEL_TAP, HOST_IP, "255.255.255.252")
        if self.switch_tap and self.cfg.get("switch_transport") == "raw":
            create_veth(self.switch_tap + "u", self.switch_tap)
        elif self.switch_tap:
            create_tap(self.switch_tap, owner, owner)
        return privileged

    def listen(self) -> None:
        self.lsock = socket.socket(socket.AF_INET, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        self.lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.lsock.bind((HOST_IP, CHANNEL_PORT))
        self.lsock.listen(1)
        self.lsock.setblocking(False)
        self.hb = socket.socket(socket.AF_INET, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        self.hb.bind((HOST_IP, HEARTBEAT_PORT))
        self.hb.setblocking(False)

    def write_guest_config(self) -> str:
        g = dict(self.cfg["guest"])
        g["python_args"] = self.py_args
        g["channel"] = {
            "host": HOST_IP,
            "guest": GUEST_IP,
            "port": CHANNEL_PORT,
            "heartbeat": HEARTBEAT_PORT,
            "netmask": "255.255.255.252",
        }
        g.setdefault("env", dict(os.environ))
        path = os.path.join(self.workdir, "guest.json")
        tmp = path + ".tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        with open(fd, "w", encoding="utf-8") as f:
            json.dump(g, f)
        os.replace(tmp, path)
        return path

    def start_uml(self, privileged: bool) -> None:
        r, w = os.pipe2(os.O_CLOEXEC)
        ready_r, ready_w = os.pipe2(os.O_CLOEXEC)
        unshare(CLONE_NEWPID)  # our next child is PID 1 of a fresh PID namespace
        pid = os.fork()
        if pid == 0:
            try:
                os.close(r)
                os.close(ready_r)
                os.set_inheritable(w, True)
                _runner(self.cfg, w, ready_w, privileged)
            except BaseException as e:  # noqa: BLE001 - report on the console, never return
                try:
                    os.write(
                        w,
                        f"[pytest-isolate] starting the guest failed: {type(e).__name__}: {e}\n".encode(),
                    )
                finally:
                    os._exit(127)
            os._exit(127)
        os.close(w)
        os.close(ready_w)
        self.uml_pid = pid
        self.pidfd = os.pidfd_open(pid)
        with open(os.path.join(self.workdir, "uml.pid"), "w", encoding="utf-8") as f:
            f.write(f"{pid}\n")
        self.console_r = r
        os.set_blocking(r, False)
        os.read(ready_r, 1)  # EOF once the runner closed it (exec) or died
        os.close(ready_r)

    def attach_switch(self) -> None:
        """Move the guest's second tap into the run's switch and enslave it to the bridge.

        Only after the guest brought eth1 up: UML attaches to a tap by name in its own
        network namespace, and an attached tap keeps its fd when moved.
        """
        sw = os.open(self.cfg["switch"], os.O_RDONLY | os.O_CLOEXEC)
        home = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        try:
            here = _netlink_socket()
            with here:
                _nl_request(
                    here,
                    RTM_NEWLINK,
                    socket.if_nametoindex(self.switch_tap),
                    _nla(IFLA_NET_NS_FD, struct.pack("=I", sw)),
                )
            setns(sw, CLONE_NEWNET)
            try:
                self.switch_nl = _netlink_socket()
                br = socket.if_nametoindex(self.cfg.get("bridge", "br0"))
                idx = socket.if_nametoindex(self.switch_tap)
            finally:
                setns(home, CLONE_NEWNET)
            _nl_request(
                self.switch_nl,
                RTM_NEWLINK,
                idx,
                _nla(IFLA_MASTER, struct.pack("=I", br)),
                IFF_UP,
                IFF_UP,
            )
        finally:
            os.close(sw)
            os.close(home)

    def detach_switch(self) -> None:
        if self.switch_nl is None:
            return
        try:
            _nl_request(
                self.switch_nl, RTM_DELLINK, 0, _nla(IFLA_IFNAME, self.switch_tap.encode() + b"\0")
            )
        except OSError:
            pass
        self.switch_nl.close()
        self.switch_nl = None

    # -- termination
    def uml_alive(self) -> bool:
        if self.status is not None:
            return False
        try:
            pid, status = os.waitpid(self.uml_pid, os.WNOHANG)
        except ChildProcessError:
            self.status = -1
            return False
        if pid:
            self.status = status
            return False
        return True

    def stop_uml(self, grace: float = 3.0) -> None:
        """SIGTERM to the runner (it forwards it: UML shuts down and kills its helpers),
        then SIGKILL: the runner is PID 1 of the guest's PID namespace, so its death
        takes UML and every helper with it."""
        if not self.uml_pid or not self.uml_alive():
            return
        for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 10.0)):
            try:
                os.kill(self.uml_pid, sig)
            except ProcessLookupError:
                pass
            deadline = time.monotonic() + wait
            while time.monotonic() < deadline:
                if not self.uml_alive():
                    return
                time.sleep(0.01)

    def describe_status(self) -> str:
        st = self.status
        if st is None or st < 0:
            return "gone"
        if os.WIFSIGNALED(st):
            sig = os.WTERMSIG(st)
            extra = " (kernel panic: UML aborts)" if sig == signal.SIGABRT else ""
            return f"killed by {signal.Signals(sig).name}{extra}"
        code = os.WEXITSTATUS(st)  # the runner's: UML's status, 128+signal if killed
        if code > 128:
            try:
                name = signal.Signals(code - 128).name
            except ValueError:
                name = f"signal {code - 128}"
            extra = " (kernel panic: UML aborts)" if code - 128 == signal.SIGABRT else ""
            return f"killed by {name}{extra}"
        return f"exited with status {code}" + (" (powered off)" if code == 0 else "")

    # -- main loop
    def run(self) -> int:
        t0 = time.monotonic()
        ppid = os.getppid()
        prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != ppid or ppid == 1:
            return 1
        sig_r, sig_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.set_wakeup_fd(sig_w)
        got: list[int] = []
        for s in (signal.SIGTERM, signal.SIGHUP):
            signal.signal(s, lambda n, f: got.append(n))
        # Ctrl-C on the terminal reaches the whole foreground group: the controller
        # decides what happens to its gateways.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGPIPE, signal.SIG_IGN)
        with open(os.path.join(self.workdir, "launcher.pid"), "w", encoding="utf-8") as f:
            f.write(f"{os.getpid()}\n")
        try:
            privileged = self.setup_namespaces()
            self.listen()
            self.write_guest_config()
            self.start_uml(privileged)
        except OSError as e:
            self.note(f"launcher failed before boot: {e}")
            sys.stderr.write(f"pytest-isolate uml launcher: {e}\n")
            self.stop_uml()
            return 1
        return self.loop(t0, ppid, sig_r, got)

    def loop(self, t0: float, ppid: int, sig_r: int, got: list[int]) -> int:
        cfg = self.cfg
        boot_deadline = t0 + cfg["boot_timeout"]
        hang = cfg["hang_timeout"]
        to_guest = bytearray()
        to_host = bytearray()
        conn: socket.socket | None = None
        stdin_open = True
        stdout_open = True
        guest_eof = False
        shut_wr = False
        last_hb = 0.0
        exit_deadline = 0.0
        os.set_blocking(0, False)
        os.set_blocking(1, False)
        rc = 0

        def finish(reason: str) -> None:
            nonlocal exit_deadline
            if not self.reason:
                self.reason = reason
                self.note(reason)
            if not exit_deadline:
                exit_deadline = time.monotonic()

        while True:
            now = time.monotonic()
            if got:
                finish(f"launcher got {signal.Signals(got[0]).name}: stopping the guest")
                got.clear()
                self.stop_uml(grace=2.0)
            if os.getppid() != ppid:
                finish("the launcher's parent died: stopping the guest")
                self.stop_uml(grace=1.0)
            if conn is None and now > boot_deadline and self.status is None:
                finish(f"guest did not connect within {cfg['boot_timeout']:.0f} s: killed")
                self.stop_uml(grace=1.0)
            if (
                last_hb
                and hang
                and now - last_hb > hang
                and self.status is None
                and not self.reason
            ):
                finish(
                    f"guest hung: no heartbeat for {now - last_hb:.1f} s (limit {hang:g} s): killed"
                )
                self.stop_uml(grace=0.5)
            if self.status is not None:
                # Guest gone: flush what it sent, close stdout, exit.
                self.drain_console()
                if conn is not None:
                    try:
                        while True:
                            d = conn.recv(1 << 16)
                            if not d:
                                break
                            to_host += d
                    except OSError:
                        pass
                if not self.reason:
                    self.reason = f"guest kernel {self.describe_status()}"
                    self.note(self.reason)
                else:
                    self.note(f"guest kernel {self.describe_status()}")
                self.flush_stdout_blocking(to_host)
                rc = 0 if self.status == 0 and not got else 1
                break
            if exit_deadline and now - exit_deadline > 0 and self.status is None:
                # stdin EOF or guest EOF: give the guest a moment to power off, then stop it.
                if now - exit_deadline > 3.0:
                    self.stop_uml(grace=2.0)

            poller = select.poll()
            poller.register(sig_r, select.POLLIN)
            poller.register(self.pidfd, select.POLLIN)
            poller.register(self.console_r, select.POLLIN)
            poller.register(self.hb, select.POLLIN)
            if conn is None:
                poller.register(self.lsock, select.POLLIN)
            if stdin_open and len(to_guest) < BUF_MAX:
                poller.register(0, select.POLLIN)
            if stdout_open and to_host:
                poller.register(1, select.POLLOUT)
            if conn is not None:
                ev = 0
                if not guest_eof and len(to_host) < BUF_MAX:
                    ev |= select.POLLIN
                if to_guest:
                    ev |= select.POLLOUT
                if ev:
                    poller.register(conn, ev)
            timeout = 200
            for fd, ev in poller.poll(timeout):
                if fd == sig_r:
                    try:
                        os.read(sig_r, 64)
                    except BlockingIOError:
                        pass
                elif fd == self.pidfd:
                    self.uml_alive()
                elif fd == self.console_r:
                    self.drain_console()
                elif fd == self.hb.fileno():
                    try:
                        while True:
                            d = self.hb.recv(512)
                            last_hb = time.monotonic()
                            if d.startswith(b"log "):
                                self.console(b"[guest] " + d[4:].rstrip(b"\n") + b"\n")
                    except BlockingIOError:
                        pass
                elif conn is None and fd == self.lsock.fileno():
                    try:
                        conn, _ = self.lsock.accept()
                    except BlockingIOError:
                        continue
                    conn.setblocking(False)
                    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                    self.lsock.close()
                    last_hb = last_hb or time.monotonic()
                    with open(os.path.join(self.workdir, "ready"), "w", encoding="utf-8") as f:
                        f.write(f"{time.monotonic() - t0:.3f}\n")
                    if self.switch_tap:
                        try:
                            self.attach_switch()
                        except OSError as e:
                            self.note(f"attaching the guest to the switch failed: {e}")
                elif fd == 0:
                    try:
                        d = os.read(0, 1 << 18)
                    except BlockingIOError:
                        continue
                    except OSError:
                        d = b""
                    if d:
                        to_guest += d
                    else:
                        stdin_open = False
                        finish("stdin closed (gateway exit): guest shutting down")
                elif fd == 1:
                    try:
                        n = os.write(1, to_host)
                        del to_host[:n]
                    except BlockingIOError:
                        pass
                    except OSError:
                        stdout_open = False
                        to_host.clear()
                        finish("stdout closed: stopping the guest")
                elif conn is not None and fd == conn.fileno():
                    if ev & select.POLLOUT and to_guest:
                        try:
                            n = conn.send(to_guest)
                            del to_guest[:n]
                        except BlockingIOError:
                            pass
                        except OSError:
                            to_guest.clear()
                    if ev & (select.POLLIN | select.POLLHUP | select.POLLERR):
                        try:
                            d = conn.recv(1 << 18)
                        except BlockingIOError:
                            continue
                        except OSError:
                            d = b""
                        if d:
                            to_host += d
                        else:
                            guest_eof = True
                            finish("the guest closed the channel (its worker exited)")
            if conn is not None and not stdin_open and not to_guest and not shut_wr:
                try:
                    conn.shutdown(socket.SHUT_WR)
                except OSError:
                    pass
                shut_wr = True
            if guest_eof and stdout_open and not to_host:
                os.close(1)
                stdout_open = False
        self.detach_switch()
        return rc

    def drain_console(self) -> None:
        while True:
            try:
                d = os.read(self.console_r, 1 << 16)
            except BlockingIOError:
                return
            except OSError:
                return
            if not d:
                return
            self.console(d)

    def flush_stdout_blocking(self, data: bytearray) -> None:
        try:
            os.set_blocking(1, True)
            while data:
                n = os.write(1, data)
                del data[:n]
        except OSError:
            pass
        try:
            os.close(1)
        except OSError:
            pass


def main(argv: list[str]) -> int:
    if len(argv) < 2:
        sys.stderr.write("usage: uml_launch.py <launch.json> [python args...]\n")
        return 2
    with open(argv[1], encoding="utf-8") as f:
        cfg = json.load(f)
    launcher = Launcher(cfg, argv[2:])
    try:
        return launcher.run()
    finally:
        launcher.stop_uml(grace=2.0)
        launcher.detach_switch()


if __name__ == "__main__":
    sys.exit(main(sys.argv))

"""Network facet: the run's private switch, per-test veths, taps for UML guests.

Safety contract (house rule): every address handed out lies in ``SUBNET``; the switch is a
bridge in a namespace of its own with no uplink; nothing here adds a route, so a test
namespace has only the connected route of ``SUBNET`` and traffic can reach only the
namespaces this run created. All set-up is rtnetlink with messages encoded by pyroute2,
never the ``ip`` command.

Speed: the per-test path, ``attach_ip``, sends requests pre-encoded by pyroute2 over a
plain netlink socket (``facets.netlink`` says why, and why pyroute2 is imported on first
use, never with either module); ``warm_ip()`` imports pyroute2 and encodes them in the
fork server, before a network="ip" sandbox forks: never for the first time inside a
test child. The rare paths (switch, taps, sweep) use ``IPRoute`` as usual.

Privileges. As root in the initial user namespace the switch netns is bind-mounted at
``/run/netns/pytest-isolate-<run_id>`` (found by name by ``sweep``). Unprivileged, a
netns can be neither mounted nor joined from the initial user namespace, so the switch
lives in a user namespace of its own, kept alive by a holder process, and its ``path``
is ``/proc/<holder>/ns/net``; a test process must then *join* that user namespace
(``enter_switch_userns``) before it unshares its own namespaces instead of creating a
fresh user namespace: a process in a sibling user namespace holds no capability over
the switch and cannot attach to it. The xdist workers of an unprivileged run share one
holder (``switch.SharedSwitch`` publishes its pid in the switch's lock file): a
process of the same uid may join a user namespace of that uid from outside, so tests of
every worker join the one holder's user namespace and meet on its bridge.

Pitfalls for tiers:
- Open the switch path *before* pivot_root or mounting a fresh /proc (neither
  /run/netns/... nor /proc/<holder>/... is reachable afterwards) and pass the fd to
  ``attach_ip``; close it in the test process once attached, or root code in the test
  could setns into the switch.
- The switch netns lives as long as anything references it: an open fd, a process in
  it (a UML launcher), or a copy of its bind mount in a mount namespace created while it
  existed (iproute2 avoids the last by making /run/netns a shared mount point; we do not,
  as that mount would outlive the run). Test mount namespaces die with their tests.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import functools
import ipaddress
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

from pytest_isolate.facets import caps
from pytest_isolate.facets.namespaces import in_initial_userns
from pytest_isolate.facets.netlink import (
    RTM_DELLINK,
    RTM_GETLINK,
    _addr_tpl,
    _ifname_tpl,
    _index_of,
    _port_tpl,
    _Rtnl,
    _Template,
    _u32,
    _veth_tpl,
)

__all__ = [
    "BRIDGE",
    "NETNS_DIR",
    "SUBNET",
    "Switch",
    "address_for",
    "attach_ip",
    "create_tap",
    "delete_tap",
    "enter_switch_userns",
    "held_switch_path",
    "ip_available",
    "peer_name",
    "sweep",
    "switch_name",
    "wait_holder_gone",
    "warm_ip",
]

#: One private subnet per run. A /12 rather than a /16: 16 workers x 10000 tests need
#: 160000 distinct addresses, more than a /16 holds. It exists only inside our namespaces.
SUBNET = ipaddress.IPv4Network("10.208.0.0/12")
#: ``address_for`` gives each worker a block of 2**_SEQ_BITS addresses.
_SEQ_BITS = 14
_MAX_WORKERS = 1 << (SUBNET.max_prefixlen - SUBNET.prefixlen - _SEQ_BITS)  # 64
_PER_WORKER = (1 << _SEQ_BITS) - 2  # host numbers 1..16382 of each block: never .0/.max

BRIDGE = "br0"
NETNS_DIR = "/run/netns"
_PREFIX = "pytest-isolate-"
_HOLDER_TAG = "pytest-isolate-switch-holder"  # argv marker: how sweep finds holders

CLONE_NEWNET = 0x40000000
CLONE_NEWUSER = 0x10000000
MS_BIND = 0x1000
MNT_DETACH = 0x2
NS_GET_USERNS = 0xB701  # _IO(0xb7, 0x1)

_libc = ctypes.CDLL(None, use_errno=True)


def _ok(rc: int, what: str) -> None:
    if rc != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def _setns(fd: int, nstype: int) -> None:
    _ok(_libc.setns(fd, nstype), "setns")


def _unshare(flags: int) -> None:
    _ok(_libc.unshare(flags), "unshare")


# --------------------------------------------------------------------------- namespaces


def _open_ns(ns: str | int) -> tuple[int, bool]:
    """(fd, whether we opened it) for a netns given as a path or an already open fd."""
    if isinstance(ns, int):
        return ns, False
    return os.open(ns, os.O_RDONLY | os.O_CLOEXEC), True


@contextlib.contextmanager
def _in_netns(ns: str | int) -> Iterator[None]:
    """Run the block with the calling *thread* in netns ``ns``, then go back.

    setns(CLONE_NEWNET) is per thread, so this is safe in a threaded controller; the
    way back is an fd of our own netns saved first, never a path (the caller's netns
    may have no name and ``/proc/1`` may be another namespace's init).
    """
    fd, owned = _open_ns(ns)
    home = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        _setns(fd, CLONE_NEWNET)
        try:
            yield
        finally:
            _setns(home, CLONE_NEWNET)
    finally:
        os.close(home)
        if owned:
            os.close(fd)


def _rtnl_in(ns: str | int) -> _Rtnl:
    """A netlink socket bound in netns ``ns``: only its creation happens over there."""
    with _in_netns(ns):
        return _Rtnl()


def _same_ns(a: int, b: int) -> bool:
    sa, sb = os.fstat(a), os.fstat(b)
    return (sa.st_dev, sa.st_ino) == (sb.st_dev, sb.st_ino)


def enter_switch_userns(switch: str | int) -> bool:
    """Join the user namespace that owns the switch netns, if it is not ours already.

    Needed only for an unprivileged switch (see the module docstring): call it in the
    single-threaded test process *before* unsharing the test's namespaces, and do not
    unshare a new user namespace afterwards. Returns whether it switched namespaces.
    """
    fd, owned = _open_ns(switch)
    try:
        ufd = fcntl.ioctl(fd, NS_GET_USERNS)
    finally:
        if owned:
            os.close(fd)
    try:
        mine = os.open("/proc/self/ns/user", os.O_RDONLY | os.O_CLOEXEC)
        try:
            if _same_ns(ufd, mine):
                return False
        finally:
            os.close(mine)
        _setns(ufd, CLONE_NEWUSER)
        return True
    finally:
        os.close(ufd)


def _privileged() -> bool:
    """Can we mount a netns under /run/netns and setns into it (root in the initial userns)?"""
    return in_initial_userns() and caps.has_cap(caps.CAP_NET_ADMIN) and caps.has_cap(caps.CAP_SYS_ADMIN)


# --------------------------------------------------------------------------- addresses


def address_for(worker_index: int, seq: int) -> tuple[str, int]:
    """Address and prefix length for test ``seq`` of worker ``worker_index``.

    Each worker owns a block of 16382 host numbers in ``SUBNET`` (64 workers); ``seq``
    wraps inside the block, by which time the namespace that held the address is long gone.
    """
    if not 0 <= worker_index < _MAX_WORKERS:
        raise ValueError(f"worker_index must be in [0, {_MAX_WORKERS}), got {worker_index}")
    if seq < 0:
        raise ValueError(f"seq must be >= 0, got {seq}")
    host = (worker_index << _SEQ_BITS) | (1 + seq % _PER_WORKER)
    return str(SUBNET.network_address + host), SUBNET.prefixlen


def peer_name(address: str) -> str:
    """Name of the switch-side veth end for ``address``: unique in the switch, as the
    address is unique in the run, and ``pi<hex>`` so it is recognisably ours."""
    return "pi" + ipaddress.IPv4Address(address).packed.hex()


def switch_name(run_id: str) -> str:
    return f"{_PREFIX}{run_id}"


# --------------------------------------------------------------------------- the switch


def _setup_switch_netns() -> None:
    """In the (fresh) switch netns of the calling thread: ``lo`` and ``br0`` up.

    The bridge keeps its defaults: STP off, so a port forwards as soon as it is up.
    No IPv6 in the switch (``all`` and ``default`` before any port exists): the bridge
    and the tests' peers would otherwise take link-local addresses and send router
    solicitations and MLD reports onto the segment, IPv6 no test asked for.
    """
    from pyroute2 import IPRoute

    for conf in ("all", "default"):
        with contextlib.suppress(FileNotFoundError):  # a kernel without IPv6
            with open(f"/proc/sys/net/ipv6/conf/{conf}/disable_ipv6", "w", encoding="utf-8") as f:
                f.write("1")
    with IPRoute() as ipr:
        ipr.link("set", index=1, state="up")
        ipr.link("add", ifname=BRIDGE, kind="bridge")
        ipr.link("set", index=ipr.link_lookup(ifname=BRIDGE)[0], state="up")


@dataclass
class Switch:
    """The run's private L2 segment: a network namespace holding a bridge, no uplink,
    no route out."""

    run_id: str
    path: str  # netns file: /run/netns/<name> (root) or /proc/<holder>/ns/net
    holder: subprocess.Popen[bytes] | None = field(default=None, repr=False)
    _made_dir: bool = field(default=False, repr=False)

    @property
    def name(self) -> str:
        return switch_name(self.run_id)

    @classmethod
    def create(cls, run_id: str, lock: str | None = None) -> Switch:
        """``lock``: unprivileged, tie the holder's life to a lock file instead of to us
        (see ``_create_held``); ignored as root, where the netns is a mount."""
        if _privileged():
            return cls._create_mounted(run_id)
        return cls._create_held(run_id, lock)

    @classmethod
    def _create_mounted(cls, run_id: str) -> Switch:
        """Bind-mount a fresh netns at /run/netns/<name>, as ``ip netns add`` does.

        Unlike iproute2 we do not turn /run/netns into a shared mount point: that would
        leave a mount on the host after the run. The cost: a mount namespace created
        while the switch exists keeps its own copy of the bind mount, so the switch netns
        outlives ``close()`` until that mount namespace dies (test children's do at exit).
        """
        path = os.path.join(NETNS_DIR, switch_name(run_id))
        made_dir = False
        for _ in range(5):  # another run may rmdir an empty NETNS_DIR under our feet
            try:
                os.mkdir(NETNS_DIR, 0o755)
                made_dir = True
            except FileExistsError:
                pass
            try:
                os.close(os.open(path, os.O_RDONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0))
                break
            except FileNotFoundError:
                continue
        else:
            raise OSError(errno.ENOENT, f"cannot create {path}")
        sw = cls(run_id=run_id, path=path, _made_dir=made_dir)
        try:
            home = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
            try:
                _unshare(CLONE_NEWNET)  # this thread only
                try:
                    _ok(
                        _libc.mount(
                            b"/proc/thread-self/ns/net", path.encode(), None, MS_BIND, None
                        ),
                        f"bind mount {path}",
                    )
                    _setup_switch_netns()
                finally:
                    _setns(home, CLONE_NEWNET)
            finally:
                os.close(home)
        except BaseException:
            sw.close()
            raise
        return sw

    @classmethod
    def _create_held(cls, run_id: str, lock: str | None = None) -> Switch:
        """Unprivileged: a holder process owns a new user + net namespace.

        A separate interpreter (not a fork) because the caller may be threaded, and
        setns into a user namespace is refused to threaded processes anyway. The holder
        exits when its stdin reaches EOF, i.e. when we close it or die. With ``lock``
        (a switch shared by several controllers, the xdist workers of a run) it outlives
        us instead: it exits once it can ``flock`` the lock file exclusively, i.e. once
        no user holds it shared any more (closed, or died), so the caller must hold it
        shared *before* calling this.
        """
        pkg_root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        code = (
            "import sys; sys.path.insert(0, sys.argv[1]);"
            "from pytest_isolate.facets.net import _holder_main; _holder_main()"
        )
        proc = subprocess.Popen(
            [sys.executable, "-c", code, pkg_root, lock or "", _HOLDER_TAG, switch_name(run_id)],
            stdin=subprocess.DEVNULL if lock else subprocess.PIPE,
            stdout=subprocess.PIPE,
            close_fds=True,
        )
        assert proc.stdout is not None
        line = proc.stdout.readline().decode(errors="replace").strip()
        if line != "ok":
            proc.kill()
            proc.wait()
            raise OSError(errno.EPERM, f"switch holder failed: {line or 'no answer'}")
        return cls(run_id=run_id, path=f"/proc/{proc.pid}/ns/net", holder=proc)

    def close(self) -> None:
        """Delete the namespace; veth peers and taps inside die with it (asynchronously:
        the kernel dismantles a netns in a work queue once the last reference is gone)."""
        if self.holder is not None:
            with contextlib.suppress(OSError):
                if self.holder.stdin is not None:
                    self.holder.stdin.close()
            try:
                self.holder.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.holder.kill()
                self.holder.wait()
            if self.holder.stdout is not None:
                self.holder.stdout.close()
            self.holder = None
            return
        _unmount_netns(self.path)
        if self._made_dir:
            with contextlib.suppress(OSError):
                os.rmdir(NETNS_DIR)

    def __enter__(self) -> Switch:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _unmount_netns(path: str) -> bool:
    if not os.path.lexists(path):
        return False
    _libc.umount2(path.encode(), MNT_DETACH)  # EINVAL if it was never mounted: fine
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    return True


def _holder_main() -> None:
    """Body of the unprivileged switch holder (runs in its own interpreter)."""
    uid, gid = os.getuid(), os.getgid()
    lock = sys.argv[2] if len(sys.argv) > 4 else ""
    lock_fd = -1
    try:
        if lock:  # opened before the user namespace: the file belongs to the real uid
            lock_fd = os.open(lock, os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW)
        _unshare(CLONE_NEWUSER)
        with open("/proc/self/setgroups", "w", encoding="utf-8") as f:
            f.write("deny")
        with open("/proc/self/uid_map", "w", encoding="utf-8") as f:
            f.write(f"0 {uid} 1")
        with open("/proc/self/gid_map", "w", encoding="utf-8") as f:
            f.write(f"0 {gid} 1")
        _unshare(CLONE_NEWNET)
        _setup_switch_netns()
    except Exception as e:  # noqa: BLE001 - reported to the parent as one line
        sys.stdout.write(f"{type(e).__name__}: {e}\n")
        sys.stdout.flush()
        os._exit(1)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C: the controller closes us
    sys.stdout.write("ok\n")
    sys.stdout.flush()
    if lock_fd < 0:
        sys.stdin.buffer.read()  # until EOF
        os._exit(0)
    # Until the last user lets go of its shared lock. Then un-publish ourselves before
    # releasing it: a newcomer blocked on the lock must not join a netns about to die.
    sys.stdout.close()
    fcntl.flock(lock_fd, fcntl.LOCK_EX)
    with contextlib.suppress(OSError):
        os.ftruncate(lock_fd, 0)
    os._exit(0)


def _holders(name: str) -> list[int]:
    want = [_HOLDER_TAG.encode(), name.encode()]
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
        except OSError:
            continue
        if argv[-3:-1] == want or argv[-2:] == want:
            out.append(int(entry))
    return out


def _dead(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except OSError:
        return True


def held_switch_path(pid: int, run_id: str) -> str | None:
    """``/proc/<pid>/ns/net`` if ``pid`` is a live holder of switch ``run_id`` run by our
    uid, else None: how another controller of the run joins a switch it did not make.

    The pid comes from a file in /tmp; checking the holder's argv and owner keeps us
    from joining (or handing tests) someone else's namespace.
    """
    name = switch_name(run_id)
    try:
        if os.stat(f"/proc/{pid}").st_uid != os.geteuid() or _dead(pid):
            return None
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = f.read().split(b"\0")
    except OSError:
        return None
    if argv[-3:-1] != [_HOLDER_TAG.encode(), name.encode()]:
        return None
    path = f"/proc/{pid}/ns/net"
    return path if os.path.exists(path) else None


def wait_holder_gone(pid: int, run_id: str, timeout: float = 5.0) -> bool:
    """Wait until the holder ``pid`` of switch ``run_id`` is gone; SIGKILL it after
    ``timeout``. Whether it had to be killed."""
    deadline = time.monotonic() + timeout
    # Not a holder any more is not enough: an exiting process loses its argv before it
    # closes its files, and the lock it holds goes only with those.
    # (Bounded: a pid recycled meanwhile is never dead, and never ours to kill.)
    while (holder := held_switch_path(pid, run_id) is not None) or not _dead(pid):
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)
        if time.monotonic() >= deadline:
            if not holder:
                return False
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            return True
        time.sleep(0.005)
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)
    return False


def sweep(run_id: str) -> list[str]:
    """Remove the run's switch (mounted netns or holder process) if still there.

    Nothing else of the run lives on the host side: veth peers and taps are inside the
    switch netns and die with it. Returns a description of each object removed.
    """
    name = switch_name(run_id)
    removed = []
    path = os.path.join(NETNS_DIR, name)
    if _unmount_netns(path):
        removed.append(path)
        # an empty /run/netns means nothing (iproute2 recreates it): leave none behind
        with contextlib.suppress(OSError):
            if not os.path.ismount(NETNS_DIR):
                os.rmdir(NETNS_DIR)
    for pid in _holders(name):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
            removed.append(f"holder process {pid}")
        for _ in range(200):  # reap it if it is ours; a zombie of another parent is dead
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, os.WNOHANG)
            if _dead(pid):
                break
            time.sleep(0.005)
    return removed


# --------------------------------------------------------------------------- per test


@dataclass(frozen=True)
class _IpMessages:
    veth: dict[str, _Template]
    addr: _Template
    port: _Template
    get_bridge: bytes
    get_eth0: bytes


@functools.cache
def _ip_messages() -> _IpMessages:
    """``attach_ip``'s messages, encoded once per process; see ``netlink._Template`` for why."""
    return _IpMessages(
        veth={"eth0": _veth_tpl("eth0")},
        addr=_addr_tpl(),
        port=_port_tpl(),
        get_bridge=_ifname_tpl(RTM_GETLINK, BRIDGE.encode()).fill(1),
        get_eth0=_ifname_tpl(RTM_GETLINK, b"eth0").fill(2),
    )


def warm_ip() -> None:
    """In the fork server, before forking a network="ip" sandbox (see the module doc)."""
    _ip_messages()


def _disable_ipv6(ifname: str) -> None:
    """No IPv6 on ``ifname`` in the calling thread's netns (``disable_ipv6`` sysctl).

    network="ip" promises the test one address, its IPv4 one on the switch; the kernel
    would add an IPv6 link-local address to every interface that comes up. Per
    interface, not ``default``/``all``: ``lo`` keeps ``::1``, and interfaces the test
    creates itself keep the kernel's defaults. /proc/sys/net is the opener's netns
    whatever /proc is mounted. A kernel without IPv6 has no such file: nothing to do.
    """
    try:
        fd = os.open(f"/proc/sys/net/ipv6/conf/{ifname}/disable_ipv6", os.O_WRONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return
    try:
        os.write(fd, b"1")
    finally:
        os.close(fd)


def attach_ip(switch_path: str | int, address: str, prefixlen: int, ifname: str = "eth0") -> None:
    """Plug the calling thread's netns into the switch with ``address/prefixlen``.

    One veth pair, created here with its peer placed straight into the switch
    (IFLA_NET_NS_FD on the peer), then the peer enslaved to ``br0`` and up from a netlink
    socket opened in the switch. No route is added beyond the connected one of the
    subnet. When this netns dies, the veth dies and takes its peer with it.

    ``switch_path`` may be an open fd of the switch netns: after pivot_root the path
    under /run/netns is usually not reachable, so open it before and pass the fd.
    """
    peer = peer_name(address).encode()
    msgs = _ip_messages()
    veth = msgs.veth.get(ifname)
    if veth is None:  # not pre-encoded: costs ~1 ms cold in a child
        veth = msgs.veth[ifname] = _veth_tpl(ifname)
    sw_fd, owned = _open_ns(switch_path)
    try:
        with _Rtnl() as here:
            here.send_raw(
                veth.fill(1, peer=peer, fd=_u32(sw_fd)),
                1,
                f"create veth {ifname} with peer {peer.decode()} in the switch",
            )
            # Before the peer is up: until then the veth has no carrier, and the kernel
            # gives an interface its IPv6 link-local address when the carrier comes.
            _disable_ipv6(ifname)
            if ifname == "eth0":
                index = _index_of(here.send_raw(msgs.get_eth0, 2, "look up eth0"))
            else:
                index = _index_of(
                    here.send_raw(
                        _ifname_tpl(RTM_GETLINK, ifname.encode()).fill(2), 2, f"look up {ifname}"
                    )
                )
            ip = ipaddress.IPv4Address(address).packed
            buf = bytearray(msgs.addr.fill(3, index=_u32(index), local=ip, address=ip))
            buf[16 + 1] = prefixlen  # ifaddrmsg.ifa_prefixlen
            here.send_raw(bytes(buf), 3, f"add {address}/{prefixlen} to {ifname}")
        with _rtnl_in(sw_fd) as there:
            bridge = _index_of(there.send_raw(msgs.get_bridge, 1, f"look up {BRIDGE} in the switch"))
            there.send_raw(
                msgs.port.fill(2, peer=peer, master=_u32(bridge)),
                2,
                f"enslave {peer.decode()} to {BRIDGE}",
            )
    finally:
        if owned:
            os.close(sw_fd)


def create_tap(
    switch_path: str | int, name: str, owner: int | None = None, group: int | None = None
) -> None:
    """A persistent tap ``name`` in the switch, enslaved to ``br0`` and up, for a UML
    guest's interface (``ethN=tuntap,<name>``).

    UML opens /dev/net/tun and attaches by name, and a tun fd binds to the netns of the
    process that opened it: so the ``linux.uml`` process must itself run in the switch
    netns (setns before exec) and see /dev/net/tun. ``owner``/``group`` let a
    non-root UML attach without CAP_NET_ADMIN. Unprivileged, call it (like UML) from a
    process that joined the switch's user namespace (``enter_switch_userns``).
    """
    if len(name) > 15:
        raise ValueError(f"interface name too long: {name!r}")
    from pyroute2 import IPRoute

    with _in_netns(switch_path), IPRoute() as ipr:
        spec: dict[str, object] = {"ifname": name, "kind": "tuntap", "mode": "tap"}
        if owner is not None:
            spec["uid"] = owner
        if group is not None:
            spec["gid"] = group
        ipr.link("add", **spec)
        (idx,) = ipr.link_lookup(ifname=name)
        (br,) = ipr.link_lookup(ifname=BRIDGE)
        ipr.link("set", index=idx, master=br, state="up")


def delete_tap(switch_path: str | int, name: str) -> None:
    """Remove a tap made by ``create_tap`` (a persistent tap outlives its users)."""
    with _rtnl_in(switch_path) as nl:
        nl.send_raw(_ifname_tpl(RTM_DELLINK, name.encode()).fill(1), 1, f"delete tap {name}")


# --------------------------------------------------------------------------- availability


def _probe_kinds(go_back: bool = True) -> str | None:
    """Create a bridge and a veth pair in a throwaway netns of the calling thread.

    Catches kernels built without CONFIG_BRIDGE / CONFIG_VETH (or module loading
    forbidden) with a precise reason instead of a failure in the first test.
    ``go_back=False`` in a process that cannot setns back (it left the user namespace
    owning its old netns) and exits right after.
    """
    from pyroute2 import IPRoute

    home = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        _unshare(CLONE_NEWNET)  # this thread only; the netns dies when we leave it
        try:
            with IPRoute() as ipr:
                # no deletes: unregistering a device waits for RCU (~tens of ms);
                # the kernel dismantles the netns in the background instead
                for kind, extra in (("bridge", {}), ("veth", {"peer": "piprobe2"})):
                    try:
                        ipr.link("add", ifname=f"piprobe{kind[0]}", kind=kind, **extra)
                    except Exception as e:  # noqa: BLE001 - any failure is the answer
                        return f"network='ip' needs {kind} devices in the kernel ({e})"
        finally:
            if go_back:
                _setns(home, CLONE_NEWNET)
    finally:
        os.close(home)
    return None


def _probe_unprivileged() -> None:
    """Body of ip_available's probe interpreter: exit status 0 or a one-line reason."""
    uid, gid = os.getuid(), os.getgid()
    try:
        _unshare(CLONE_NEWUSER)
        for name, value in (
            ("setgroups", "deny"),
            ("uid_map", f"0 {uid} 1"),
            ("gid_map", f"0 {gid} 1"),
        ):
            with open(f"/proc/self/{name}", "w", encoding="utf-8") as f:
                f.write(value)
    except OSError as e:
        sys.exit(f"user namespaces: {e.strerror}")
    why = _probe_kinds(go_back=False)
    if why:
        sys.exit(why)


def ip_available() -> str | None:
    """None when ``network="ip"`` can work here, else one line: what is missing.

    Root in the initial user namespace is probed in place (a throwaway netns, ~5 ms).
    Otherwise the switch needs a user namespace of its own: probed in a separate
    interpreter (~0.2 s, once per run), since a threaded controller must not fork and
    cannot setns into a user namespace.
    """
    if not os.path.exists("/proc/thread-self/ns/net"):
        return "network='ip' needs /proc with namespace files (Linux >= 3.17)"
    if _privileged():
        return _probe_kinds()
    pkg_root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]);"
        "from pytest_isolate.facets.net import _probe_unprivileged; _probe_unprivileged()"
    )
    try:
        r = subprocess.run(
            [sys.executable, "-c", code, pkg_root], capture_output=True, text=True, encoding="utf-8", timeout=60
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"network='ip': probe failed to run ({e})"
    if r.returncode == 0:
        return None
    why = (r.stderr.strip().splitlines() or [f"probe exited {r.returncode}"])[-1]
    if why.startswith("user namespaces"):
        return (
            f"network='ip' without root needs unprivileged user namespaces ({why}): "
            "enable them (sysctl user.max_user_namespaces>0, kernel.unprivileged_userns_clone=1, "
            "kernel.apparmor_restrict_unprivileged_userns=0) or run as root"
        )
    return why

"""The network facet against real namespaces, veths, a bridge and a tap.

Test namespaces are made by forking children that unshare(CLONE_NEWNET) themselves
(``_Child``). Traffic stays on loopback or on the run's private switch: the only
addresses used come from ``net.address_for`` and nothing ever routes beyond the subnet.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import itertools
import os
import select
import socket
import struct
import time
from collections.abc import Callable, Iterator

import pytest
from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from pytest_isolate.facets import net, netlink
from pytest_isolate.tiers.base import descendants, kill_tree

CLONE_NEWNET = 0x40000000
CLONE_NEWUSER = 0x10000000
_libc = ctypes.CDLL(None, use_errno=True)
_ids = itertools.count()


def _unshare(flags: int) -> None:
    if _libc.unshare(flags):
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


def _map_self_to(uid: int, gid: int) -> None:
    """Enter a new user namespace mapping only ourselves: a stand-in for an unprivileged
    pytest (not root in the initial user namespace, no CAP_SYS_ADMIN there)."""
    _unshare(CLONE_NEWUSER)
    for name, value in (
        ("setgroups", "deny"),
        ("uid_map", f"0 {uid} 1"),
        ("gid_map", f"0 {gid} 1"),
    ):
        with open(f"/proc/self/{name}", "w") as f:
            f.write(value)


class _Child:
    """A forked child running ``body(child)``: exit 0 if it returns, 1 (with the traceback
    on stderr) if it raises. ``say``/``hear`` exchange lines with the parent."""

    def __init__(self, body: Callable[[_Child], None]) -> None:
        up_r, self._up_w = os.pipe()
        self._down_r, down_w = os.pipe()
        self._buf = b""
        pid = os.fork()
        if pid == 0:
            os.close(up_r)
            os.close(down_w)
            self._in, self._out = self._down_r, self._up_w
            code = 1
            try:
                body(self)
                code = 0
            except BaseException:  # noqa: BLE001 - report and leave the forked child
                import traceback

                traceback.print_exc()
            finally:
                os._exit(code)
        os.close(self._up_w)
        os.close(self._down_r)
        self.pid = pid
        self._in, self._out = up_r, down_w
        self.status: int | None = None

    def say(self, line: str) -> None:
        os.write(self._out, line.encode() + b"\n")

    def hear(self, timeout: float = 10.0) -> str:
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self._in], [], [], left)[0]:
                raise TimeoutError(f"no line from child {getattr(self, 'pid', 'self')}")
            chunk = os.read(self._in, 4096)
            if not chunk:
                raise EOFError("peer closed")
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        return line.decode()

    def join(self, timeout: float = 15.0) -> int:
        """Exit code; a child still running after ``timeout`` is killed (code -9)."""
        deadline = time.monotonic() + timeout
        while self.status is None:
            pid, st = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.status = os.waitstatus_to_exitcode(st)
            elif time.monotonic() > deadline:
                kill_tree(self.pid)
                os.waitpid(self.pid, 0)
                self.status = -9
            else:
                time.sleep(0.005)
        for fd in (self._in, self._out):
            try:
                os.close(fd)
            except OSError:
                pass
        return self.status


def _children_all_ok(*kids: _Child) -> None:
    codes = [k.join() for k in kids]
    assert codes == [0] * len(kids), f"child exit codes {codes}, tracebacks on stderr"


def _host_links() -> list[str]:
    with IPRoute() as ipr:
        return sorted(link.get("ifname") for link in ipr.get_links())


def _netns_entries() -> list[str]:
    try:
        return sorted(os.listdir(net.NETNS_DIR))
    except FileNotFoundError:
        return []


def _netns_mounts() -> list[str]:
    with open("/proc/self/mountinfo") as f:
        return sorted(line.split()[4] for line in f if "netns" in line.split()[4])


@pytest.fixture(autouse=True)
def host_unchanged() -> Iterator[None]:
    """Every test leaves the host as it found it: links, /run/netns, mounts, processes."""
    before = (_host_links(), _netns_entries(), _netns_mounts())
    yield
    leftover = descendants(os.getpid())
    for pid in leftover:
        kill_tree(pid)
    assert leftover == [], "processes left behind"
    assert (_host_links(), _netns_entries(), _netns_mounts()) == before


@pytest.fixture
def run_id() -> Iterator[str]:
    rid = f"tnet{os.getpid()}x{next(_ids)}"
    yield rid
    assert net.sweep(rid) == [], "the test itself should have cleaned up"


@pytest.fixture
def switch(run_id: str) -> Iterator[net.Switch]:
    sw = net.Switch.create(run_id)
    try:
        yield sw
    finally:
        sw.close()


def _switch_links(sw: net.Switch | str) -> dict[str, dict]:
    """name -> {index, master, up, kind} of every link in the switch."""
    with net._in_netns(sw.path if isinstance(sw, net.Switch) else sw), IPRoute() as ipr:
        out = {}
        for link in ipr.get_links():
            info = link.get(("linkinfo", "kind")) if link.get("linkinfo") else None
            out[link.get("ifname")] = {
                "index": link["index"],
                "master": link.get("master"),
                "up": bool(link["flags"] & 1),
                "kind": info,
            }
        return out


def _wait_for(predicate: Callable[[], bool], timeout: float = 5.0) -> bool:
    """Namespace and device teardown is asynchronous in the kernel: poll, bounded."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def _addr(worker: int, seq: int) -> str:
    return net.address_for(worker, seq)[0]


_PREFIX = net.SUBNET.prefixlen
_NOBODY_HOME = _addr(net._MAX_WORKERS - 1, net._PER_WORKER - 1)  # never handed out here


# --------------------------------------------------------------------------- addresses


def test_address_for_unique_in_subnet_for_16_workers_by_10000_tests() -> None:
    seen = set()
    for w in range(16):
        for seq in range(10000):
            a, plen = net.address_for(w, seq)
            seen.add(a)
    assert len(seen) == 160000
    assert plen == net.SUBNET.prefixlen
    import ipaddress

    addrs = [ipaddress.IPv4Address(a) for a in seen]
    assert all(a in net.SUBNET for a in addrs)
    assert net.SUBNET.network_address not in addrs and net.SUBNET.broadcast_address not in addrs
    top = net.address_for(net._MAX_WORKERS - 1, net._PER_WORKER - 1)[0]
    assert ipaddress.IPv4Address(top) < net.SUBNET.broadcast_address
    with pytest.raises(ValueError):
        net.address_for(net._MAX_WORKERS, 0)
    with pytest.raises(ValueError):
        net.address_for(-1, 0)


def test_peer_names_fit_ifnamsiz() -> None:
    assert net.peer_name("10.208.0.1") == "pi0ad00001"
    assert len(net.peer_name(_NOBODY_HOME)) <= 15


# --------------------------------------------------------------------------- loopback


def test_loopback_message_is_pyroute2s_encoding() -> None:
    """``_LO_UP`` is spelled out so the module need not import pyroute2; pyroute2 must
    encode the same request byte for byte."""
    from pyroute2.netlink import NLM_F_ACK, NLM_F_REQUEST
    from pyroute2.netlink.rtnl import RTM_NEWLINK
    from pyroute2.netlink.rtnl.ifinfmsg import ifinfmsg

    msg = ifinfmsg()
    msg["index"] = 1
    msg["flags"] = netlink.IFF_UP
    msg["change"] = netlink.IFF_UP
    msg["header"]["type"] = RTM_NEWLINK
    msg["header"]["flags"] = NLM_F_REQUEST | NLM_F_ACK
    msg["header"]["sequence_number"] = 1
    msg.encode()
    assert netlink._LO_UP == bytes(msg.data)


def test_importing_the_facet_leaves_pyroute2_out() -> None:
    """A sandbox without network="ip" must not inherit pyroute2's heap (module doc)."""
    import subprocess
    import sys

    code = "import sys; from pytest_isolate.tiers import zone; print('pyroute2' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_loopback_up_in_fresh_netns() -> None:
    def body(_: _Child) -> None:
        _unshare(CLONE_NEWNET)
        with pytest.raises(OSError) as down:
            socket.create_connection(("127.0.0.1", 9), timeout=1)
        assert down.value.errno == errno.ENETUNREACH
        netlink.loopback_up()
        for family, host in ((socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")):
            with socket.socket(family) as srv:
                srv.bind((host, 0))
                srv.listen()
                with socket.create_connection((host, srv.getsockname()[1]), timeout=2) as c:
                    peer, _ = srv.accept()
                    c.sendall(b"ping")
                    assert peer.recv(4) == b"ping"
                    peer.close()

    _children_all_ok(_Child(body))


def test_clear_orphaned_tcp_takes_time_wait_and_leaves_held_sockets() -> None:
    """What a test's closed connections leave in a shared namespace (jail.py,
    ``_empty_loopback``): TIME_WAIT, IPv4 and IPv6, goes, and the port binds again
    without ``SO_REUSEADDR``; a socket a live process holds stays, listening."""

    def body(_: _Child) -> None:
        _unshare(CLONE_NEWNET)
        netlink.loopback_up()
        assert netlink.clear_orphaned_tcp()  # nothing there: sockstat says so
        held = socket.socket()
        held.bind(("127.0.0.1", 0))
        held.listen()
        ports = {}
        for family, host in ((socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")):
            srv = socket.socket(family)
            srv.bind((host, 0))
            srv.listen()
            ports[family] = (host, srv.getsockname()[1])
            c = socket.create_connection(ports[family], timeout=2)
            peer, _ = srv.accept()
            peer.close()  # the server's end closes first: TIME_WAIT on its port
            assert c.recv(1) == b""
            c.close()
            srv.close()
            with socket.socket(family) as again, pytest.raises(OSError) as busy:
                again.bind(ports[family])
            assert busy.value.errno == errno.EADDRINUSE
        assert netlink.clear_orphaned_tcp()
        for family, addr in ports.items():
            with socket.socket(family) as again:
                again.bind(addr)
        with socket.create_connection(held.getsockname(), timeout=2):
            pass  # still listening

    _children_all_ok(_Child(body))


def test_ip_available_as_root() -> None:
    assert net.ip_available() is None


# --------------------------------------------------------------------------- switch


def test_switch_is_a_named_netns_with_a_bridge_and_nothing_else(switch: net.Switch) -> None:
    assert switch.path == f"{net.NETNS_DIR}/pytest-isolate-{switch.run_id}"
    assert os.stat(switch.path).st_ino != os.stat("/proc/self/ns/net").st_ino
    assert net.enter_switch_userns(switch.path) is False  # root: same user namespace
    links = _switch_links(switch)
    assert set(links) == {"lo", net.BRIDGE}
    assert links["lo"]["up"] and links[net.BRIDGE]["up"]
    assert links[net.BRIDGE]["kind"] == "bridge"
    with net._in_netns(switch.path), IPRoute() as ipr:
        routes = [r for r in ipr.get_routes(family=socket.AF_INET) if r.get("table") == 254]
        assert routes == [], "the switch must have no route at all, let alone one out"


def test_two_test_netns_talk_over_the_switch(switch: net.Switch) -> None:
    a, b = _addr(0, 1), _addr(1, 1)

    def server(ch: _Child) -> None:
        _unshare(CLONE_NEWNET)
        netlink.loopback_up()
        net.attach_ip(switch.path, a, _PREFIX)
        with socket.socket() as srv:
            srv.settimeout(10)
            srv.bind((a, 7000))
            srv.listen()
            ch.say("ready")
            conn, (peer, _) = srv.accept()
            with conn:
                conn.settimeout(10)
                assert peer == b
                conn.sendall(conn.recv(64).upper())

    def client(_: _Child) -> None:
        _unshare(CLONE_NEWNET)
        netlink.loopback_up()
        net.attach_ip(switch.path, b, _PREFIX)
        with socket.create_connection((a, 7000), timeout=10) as c:
            c.sendall(b"hello over br0")
            c.settimeout(10)
            assert c.recv(64) == b"HELLO OVER BR0"

    srv = _Child(server)
    try:
        assert srv.hear() == "ready"
        cli = _Child(client)
    finally:
        _children_all_ok(srv)
    _children_all_ok(cli)


def test_attach_with_an_fd_and_another_ifname(switch: net.Switch) -> None:
    a = _addr(2, 5)
    fd = os.open(switch.path, os.O_RDONLY)  # what a tier does before pivot_root

    def body(_: _Child) -> None:
        _unshare(CLONE_NEWNET)
        net.attach_ip(fd, a, _PREFIX, ifname="net1")
        with IPRoute() as ipr:
            (idx,) = ipr.link_lookup(ifname="net1")
            got = [(x.get("address"), x["prefixlen"]) for x in ipr.get_addr(index=idx, family=2)]
            assert got == [(a, _PREFIX)]

    try:
        _children_all_ok(_Child(body))
    finally:
        os.close(fd)


def _if_inet6() -> list[str]:
    """The IPv6 addresses of the calling thread's netns, ``<address> <ifname>`` each."""
    try:
        with open("/proc/net/if_inet6") as f:
            return sorted(f"{x[0]} {x[5]}" for x in (line.split() for line in f))
    except FileNotFoundError:  # a kernel without IPv6
        return []


def test_attached_veth_has_its_ipv4_address_and_no_ipv6(switch: net.Switch) -> None:
    """network="ip" promises one address: no IPv6 link-local next to it on the veth,
    and none on the switch's side (its ports and bridge send no IPv6 to the tests)."""
    a = _addr(2, 6)

    def body(_: _Child) -> None:
        _unshare(CLONE_NEWNET)
        netlink.loopback_up()
        net.attach_ip(switch.path, a, _PREFIX)
        with IPRoute() as ipr:
            (idx,) = ipr.link_lookup(ifname="eth0")
            assert ipr.get_links(idx)[0]["flags"] & netlink.IFF_UP
            got = sorted((x["family"], x.get("address")) for x in ipr.get_addr(index=idx))
        assert got == [(socket.AF_INET, a)]
        # lo keeps ::1: only the veth is the tier's business
        assert [x for x in _if_inet6() if not x.endswith(" lo")] == []

    _children_all_ok(_Child(body))
    with net._in_netns(switch.path):
        assert _if_inet6() == []


@pytest.mark.parametrize("tier", ["jail", "zone"])
def test_network_ip_test_sees_exactly_one_address(pytester: pytest.Pytester, tier: str) -> None:
    """Inside a real sandbox: ``ip -o addr`` lists lo's and one IPv4 address on eth0.

    The wait lets a link-local address finish duplicate address detection (and a late
    one appear) had one been configured."""
    pytester.makepyfile(
        f"""
        import subprocess
        import time

        import pytest

        @pytest.mark.isolate("{tier}", network="ip")
        def test_one_address():
            time.sleep(0.3)
            lines = subprocess.run(["ip", "-o", "addr"], capture_output=True, text=True, check=True).stdout
            mine = [line.split()[1:4] for line in lines.splitlines() if line.split()[1] != "lo"]
            assert len(mine) == 1 and mine[0][:2] == ["eth0", "inet"], lines
            with open("/proc/net/if_inet6") as f:
                assert [line for line in f if not line.rstrip().endswith(" lo")] == []
        """
    )
    result = pytester.runpytest_subprocess("-p", "no:randomly", "-rA")
    result.stdout.fnmatch_lines(["PASSED test_network_ip_test_sees_exactly_one_address.py::test_one_address"])
    result.assert_outcomes(passed=1)


def test_test_netns_has_no_route_out(switch: net.Switch) -> None:
    a = _addr(3, 1)

    def body(_: _Child) -> None:
        _unshare(CLONE_NEWNET)
        netlink.loopback_up()
        net.attach_ip(switch.path, a, _PREFIX)
        with IPRoute() as ipr:
            for family in (socket.AF_INET, socket.AF_INET6):
                main = [r for r in ipr.get_routes(family=family) if r.get("table") == 254]
                assert all(r["dst_len"] > 0 for r in main), f"default route: {main}"
            v4 = [
                (r.get("dst"), r["dst_len"])
                for r in ipr.get_routes(family=2)
                if r.get("table") == 254
            ]
            assert v4 == [(str(net.SUBNET.network_address), _PREFIX)]
            # a route lookup sends no packet: outside the subnet there is no route
            with pytest.raises(NetlinkError) as no_route:
                ipr.route("get", dst="192.0.2.1")
            assert no_route.value.code == errno.ENETUNREACH
        # inside the subnet, an address nobody has: ARP goes unanswered on our own
        # segment; the attempt is bounded and fails
        t0 = time.monotonic()
        with socket.socket() as s:
            s.settimeout(1.0)
            with pytest.raises(OSError):  # TimeoutError, or EHOSTUNREACH once ARP gives up
                s.connect((_NOBODY_HOME, 9))
        assert time.monotonic() - t0 < 2.0

    _children_all_ok(_Child(body))


def test_veth_peer_dies_with_the_test_netns(switch: net.Switch) -> None:
    a = _addr(4, 1)
    peer = net.peer_name(a)

    def body(ch: _Child) -> None:
        _unshare(CLONE_NEWNET)
        net.attach_ip(switch.path, a, _PREFIX)
        ch.say("attached")
        assert ch.hear() == "exit"

    kid = _Child(body)
    try:
        assert kid.hear() == "attached"
        links = _switch_links(switch)
        assert links[peer]["master"] == links[net.BRIDGE]["index"]
        assert links[peer]["up"] and links[peer]["kind"] == "veth"
        kid.say("exit")
    finally:
        _children_all_ok(kid)
    assert _wait_for(lambda: peer not in _switch_links(switch)), "veth peer outlived its netns"
    assert set(_switch_links(switch)) == {"lo", net.BRIDGE}


def test_close_removes_the_switch_and_its_veths(run_id: str) -> None:
    sw = net.Switch.create(run_id)
    a = _addr(5, 1)

    def body(ch: _Child) -> None:
        _unshare(CLONE_NEWNET)
        net.attach_ip(sw.path, a, _PREFIX)
        ch.say("attached")
        assert ch.hear() == "closed"
        with IPRoute() as ipr:
            gone = _wait_for(lambda: not ipr.link_lookup(ifname="eth0"))
        ch.say("eth0 gone" if gone else "eth0 still there")

    kid = _Child(body)
    try:
        assert kid.hear() == "attached"
        sw.close()
        assert not os.path.lexists(sw.path)
        kid.say("closed")
        assert kid.hear() == "eth0 gone", "the switch netns was not destroyed"
    finally:
        sw.close()
        _children_all_ok(kid)


def test_sweep_removes_a_forgotten_switch(run_id: str) -> None:
    sw = net.Switch.create(run_id)
    assert os.path.exists(sw.path)
    assert net.sweep(run_id) == [sw.path]
    assert not os.path.lexists(sw.path)
    assert net.sweep(run_id) == []


def test_create_switch_twice_is_refused(switch: net.Switch) -> None:
    with pytest.raises(FileExistsError):
        net.Switch.create(switch.run_id)
    assert os.path.exists(switch.path)


# --------------------------------------------------------------------------- tap (UML)

TUNSETIFF = 0x400454CA
IFF_TAP, IFF_NO_PI = 0x0002, 0x1000


def test_tap_is_on_the_segment(switch: net.Switch) -> None:
    """A persistent tap, opened the way UML's tuntap transport does, sees the ARP
    broadcast of a test netns on the switch."""
    net.create_tap(switch.path, "pitap0")
    try:
        links = _switch_links(switch)
        assert links["pitap0"]["master"] == links[net.BRIDGE]["index"]
        assert links["pitap0"]["kind"] == "tun"
        with net._in_netns(switch.path):  # a tun fd binds to the opener's netns
            tap = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            fcntl.ioctl(tap, TUNSETIFF, struct.pack("16sH", b"pitap0", IFF_TAP | IFF_NO_PI))
            a, guest = _addr(6, 1), _addr(6, 2)

            def body(_: _Child) -> None:
                _unshare(CLONE_NEWNET)
                net.attach_ip(switch.path, a, _PREFIX)
                with socket.socket() as s:
                    s.settimeout(1.0)
                    with pytest.raises(OSError):
                        s.connect((guest, 9))  # nobody answers: only ARP requests go out

            kid = _Child(body)
            want = socket.inet_aton(guest)
            seen = False
            deadline = time.monotonic() + 5
            while not seen and time.monotonic() < deadline:
                if select.select([tap], [], [], 0.2)[0]:
                    frame = os.read(tap, 2048)
                    # ethertype ARP, opcode request, target protocol address = guest
                    seen = (
                        frame[12:14] == b"\x08\x06"
                        and frame[20:22] == b"\x00\x01"
                        and frame[38:42] == want
                    )
            _children_all_ok(kid)
            assert seen, "no ARP request for the guest address reached the tap"
        finally:
            os.close(tap)
    finally:
        net.delete_tap(switch.path, "pitap0")
    assert "pitap0" not in _switch_links(switch)


# --------------------------------------------------------------------------- unprivileged


def test_unprivileged_switch_lives_in_a_user_namespace_tests_must_join(run_id: str) -> None:
    """As a non-root user (here: inside a user namespace mapping only uid 0, so no
    capability in the initial one) the switch is a held user+net namespace. Tests that
    join its user namespace talk; a test in a sibling user namespace cannot attach."""
    rid2 = run_id + "b"

    def unprivileged(_: _Child) -> None:
        _map_self_to(0, 0)
        assert not net._privileged()
        assert net.ip_available() is None
        sw = net.Switch.create(run_id)
        try:
            assert sw.path == f"/proc/{sw.holder.pid}/ns/net"
            assert not os.path.lexists(f"{net.NETNS_DIR}/pytest-isolate-{run_id}")
            a, b = _addr(7, 1), _addr(7, 2)
            swfd = os.open(sw.path, os.O_RDONLY)

            def server(ch: _Child) -> None:
                assert net.enter_switch_userns(swfd) is True
                _unshare(CLONE_NEWNET)
                netlink.loopback_up()
                net.attach_ip(swfd, a, _PREFIX)
                with socket.socket() as srv:
                    srv.settimeout(10)
                    srv.bind((a, 7001))
                    srv.listen()
                    ch.say("ready")
                    conn, _ = srv.accept()
                    with conn:
                        conn.sendall(conn.recv(16)[::-1])

            def client(_: _Child) -> None:
                assert net.enter_switch_userns(swfd) is True
                _unshare(CLONE_NEWNET)
                net.attach_ip(swfd, b, _PREFIX)
                with socket.create_connection((a, 7001), timeout=10) as c:
                    c.sendall(b"abc")
                    c.settimeout(10)
                    assert c.recv(16) == b"cba"

            def sibling(_: _Child) -> None:
                _map_self_to(0, 0)  # a fresh user namespace per test, as a jail would
                _unshare(CLONE_NEWNET)
                with pytest.raises(PermissionError):
                    net.attach_ip(swfd, _addr(7, 3), _PREFIX)

            srv = _Child(server)
            try:
                assert srv.hear() == "ready"
                cli = _Child(client)
            finally:
                _children_all_ok(srv)
            _children_all_ok(cli, _Child(sibling))
            os.close(swfd)
        finally:
            holder = sw.holder.pid
            sw.close()
        assert not os.path.exists(f"/proc/{holder}")
        assert net.sweep(run_id) == []
        # a switch nobody closed: sweep finds its holder by name
        sw2 = net.Switch.create(rid2)
        holder = sw2.holder.pid
        assert net.sweep(rid2) == [f"holder process {holder}"]
        assert not os.path.exists(f"/proc/{holder}")
        assert net.sweep(rid2) == []

    _children_all_ok(_Child(unprivileged))


def test_unprivileged_shared_switch_is_one_holder_for_every_controller(run_id: str) -> None:
    """xdist workers of an unprivileged run share one switch (switch.SharedSwitch):
    the first one's holder is published in the lock file, the others join it; it lives
    until the last user closes (whoever made it), and exits by itself once every user
    is SIGKILLed."""
    from pytest_isolate.facets.switch import SharedSwitch, sweep_stale_switches

    lock = f"/tmp/pytest-isolate-switch-{run_id}.lock"

    def user(ch: _Child) -> None:
        sw = SharedSwitch.open(run_id)
        ch.say(f"{sw.path} {sw.holder}")
        assert ch.hear() == "close"
        sw.close()
        ch.say("closed")

    def unprivileged(_: _Child) -> None:
        _map_self_to(0, 0)
        assert not net._privileged()
        # The first user makes the switch and closes first: the holder must stay up.
        a = _Child(user)
        path, holder = a.hear().split()
        assert path == f"/proc/{holder}/ns/net"
        b = _Child(user)
        assert b.hear() == f"{path} {holder}", "the second user made a switch of its own"
        ino = os.stat(path).st_ino
        a.say("close")
        assert a.hear() == "closed"
        _children_all_ok(a)
        time.sleep(0.2)
        assert os.stat(path).st_ino == ino, "the switch died with the user that made it"
        sw_fd = os.open(path, os.O_RDONLY)

        def attach(_: _Child) -> None:  # a test of the remaining user joins its userns
            assert net.enter_switch_userns(sw_fd) is True
            _unshare(CLONE_NEWNET)
            net.attach_ip(sw_fd, _addr(8, 1), _PREFIX)

        _children_all_ok(_Child(attach))
        os.close(sw_fd)
        b.say("close")
        assert b.hear() == "closed"
        _children_all_ok(b)
        assert not os.path.exists(f"/proc/{holder}") or net._dead(int(holder))
        assert not os.path.exists(lock) and not os.path.exists(f"{lock}.create")
        # Every user SIGKILLed: the holder notices that nobody holds the lock any more.
        c, d = _Child(user), _Child(user)
        _, holder = c.hear().split()
        assert d.hear().split()[1] == holder
        for kid in (c, d):
            os.kill(kid.pid, 9)
            kid.join()
        assert net.wait_holder_gone(int(holder), run_id, timeout=5.0) is False, "holder outlived its users"
        assert os.path.exists(lock)  # left for the next run's sweep, which takes it
        sweep_stale_switches()
        assert not os.path.exists(lock) and not os.path.exists(f"{lock}.create")

    _children_all_ok(_Child(unprivileged))

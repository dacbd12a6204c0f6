"""rtnetlink cheap enough for a forked test process: ``lo`` up, requests encoded once.

The network facet's message layer (``net`` builds the switch and attaches tests with it).

Speed: ``pyroute2.IPRoute`` spins up an asyncio loop per instance; its first use in a
freshly forked child costs ~4-5 ms (copy-on-write faults over a large code path), too
much for work done per test. The per-test paths (``loopback_up`` here, ``net.attach_ip``)
therefore send pyroute2-encoded messages over a plain ``AF_NETLINK`` socket
(``_Rtnl``), encoded once as ``_Template``s and patched per use; the rare paths of
``net`` (switch, taps, sweep) use ``IPRoute`` as usual.

pyroute2 is imported on first use, not with this module (nor with ``net``): importing
it costs ~100 ms and adds ~9.5 MB to the heap, which every jail/zone sandbox would
otherwise inherit (twice: init and runner) and pay for in each fork and exit. A sandbox
with loopback only needs one fixed 32-byte message, ``_LO_UP``, spelled out here and
pinned to pyroute2's encoding of the same request by a test; the templates are encoded
in the fork server (``net.warm_ip``), never for the first time inside a test child.
"""

from __future__ import annotations

import errno
import os
import socket
import struct
from typing import Any

__all__ = ["clear_orphaned_tcp", "loopback_up"]

IFF_UP = 0x1
NETLINK_ROUTE = 0
NLMSG_ERROR = 2
NLMSG_DONE = 3
# <linux/netlink.h>, <linux/rtnetlink.h>: kernel ABI, the values pyroute2 uses too.
NLM_F_REQUEST = 0x1
NLM_F_ACK = 0x4
NLM_F_EXCL = 0x200
NLM_F_CREATE = 0x400
RTM_NEWLINK = 16
RTM_DELLINK = 17
RTM_GETLINK = 18
RTM_NEWADDR = 20
# <linux/sock_diag.h>, <linux/inet_diag.h>
NETLINK_SOCK_DIAG = 4
NLM_F_DUMP = 0x300
SOCK_DIAG_BY_FAMILY = 20
SOCK_DESTROY = 21
#: Every TCP state (``TCPF_ALL``): the dump lists TIME_WAIT and the other orphans too.
TCPF_ALL = 0xFFF


class _Rtnl:
    """A blocking rtnetlink socket: pyroute2 encodes, the kernel answers with an ack.

    Bound to the netns that was current for the calling thread when it was opened (a
    netlink socket keeps that netns for life), which is what lets us operate on the
    switch after a brief ``setns`` there and back.
    """

    def __init__(self, protocol: int = NETLINK_ROUTE) -> None:
        self.sock = socket.socket(
            socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, protocol
        )

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> _Rtnl:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def send_raw(self, data: bytes, seq: int, what: str) -> list[bytes]:
        """Send one encoded request, return the raw replies that precede its ack."""
        self.sock.sendto(data, (0, 0))
        replies: list[bytes] = []
        while True:
            buf = self.sock.recv(65536)
            off = 0
            while off + 16 <= len(buf):
                length, mtype, _flags, mseq = struct.unpack_from("=IHHI", buf, off)
                if length < 16:
                    raise OSError(errno.EPROTO, "malformed netlink reply")
                if mseq == seq:
                    if mtype == NLMSG_ERROR:
                        (code,) = struct.unpack_from("=i", buf, off + 16)
                        if code:
                            raise OSError(-code, f"{what}: {os.strerror(-code)}")
                        return replies
                    if mtype == NLMSG_DONE:
                        return replies
                    replies.append(buf[off : off + length])
                off += (length + 3) & ~3


class _Template:
    """A message encoded once by pyroute2 (in the fork server), filled per use by patching.

    Encoding a nested message with pyroute2 costs ~0.14 ms warm but ~0.9 ms in a freshly
    forked child (copy-on-write faults all over its code path); patching a few bytes
    costs microseconds. Each hole is a sentinel value, unique in the encoded bytes, whose
    offset is found once; ``fill`` writes same-width values there.
    """

    def __init__(self, msg: Any, mtype: int, flags: int, **holes: bytes) -> None:
        msg["header"]["type"] = mtype
        msg["header"]["flags"] = NLM_F_REQUEST | NLM_F_ACK | flags
        msg.encode()
        self.data = bytes(msg.data)
        self.holes: dict[str, tuple[int, int]] = {}
        for name, sentinel in holes.items():
            if self.data.count(sentinel) != 1:
                raise AssertionError(f"sentinel for {name} not unique in the encoded message")
            self.holes[name] = (self.data.index(sentinel), len(sentinel))

    def fill(self, seq: int, **values: bytes) -> bytes:
        buf = bytearray(self.data)
        struct.pack_into("=I", buf, 8, seq)  # nlmsghdr.nlmsg_seq
        for name, value in values.items():
            off, width = self.holes[name]
            if len(value) != width:
                raise ValueError(f"{name}: {len(value)} bytes for a {width}-byte hole")
            buf[off : off + width] = value
        return bytes(buf)


def _u32(v: int) -> bytes:
    return struct.pack("=I", v)


_PEER_HOLE = b"pi\x01\x02\x03\x04\x05\x06\x07\x08"  # the width of net.peer_name()
_FD_HOLE = _u32(0x7EADBEEF)
_INDEX_HOLE = _u32(0x7DDDDDD1)
_MASTER_HOLE = _u32(0x7DDDDDD2)
_LOCAL_HOLE = bytes([255, 1, 2, 3])
_ADDRESS_HOLE = bytes([255, 4, 5, 6])


def _ifname_tpl(mtype: int, name: bytes) -> _Template:
    from pyroute2.netlink.rtnl.ifinfmsg import ifinfmsg

    msg = ifinfmsg()
    msg["attrs"] = [("IFLA_IFNAME", name.decode("latin-1"))]
    return _Template(msg, mtype, 0, name=name)


def _veth_tpl(ifname: str) -> _Template:
    """Create ``ifname`` up, its peer (named by the hole) straight in netns fd (hole)."""
    from pyroute2.netlink.rtnl.ifinfmsg import ifinfmsg

    peer = {
        "attrs": [("IFLA_IFNAME", _PEER_HOLE.decode("latin-1")), ("IFLA_NET_NS_FD", 0x7EADBEEF)]
    }
    msg = ifinfmsg()
    msg["flags"] = IFF_UP
    msg["change"] = IFF_UP
    msg["attrs"] = [
        ("IFLA_IFNAME", ifname),
        (
            "IFLA_LINKINFO",
            {
                "attrs": [
                    ("IFLA_INFO_KIND", "veth"),
                    ("IFLA_INFO_DATA", {"attrs": [("VETH_INFO_PEER", peer)]}),
                ]
            },
        ),
    ]
    return _Template(msg, RTM_NEWLINK, NLM_F_CREATE | NLM_F_EXCL, peer=_PEER_HOLE, fd=_FD_HOLE)


def _addr_tpl() -> _Template:
    from pyroute2.netlink.rtnl.ifaddrmsg import ifaddrmsg

    msg = ifaddrmsg()
    msg["family"] = socket.AF_INET
    msg["prefixlen"] = 32
    msg["index"] = 0x7DDDDDD1
    msg["attrs"] = [("IFA_LOCAL", "255.1.2.3"), ("IFA_ADDRESS", "255.4.5.6")]
    return _Template(
        msg,
        RTM_NEWADDR,
        NLM_F_CREATE | NLM_F_EXCL,
        index=_INDEX_HOLE,
        local=_LOCAL_HOLE,
        address=_ADDRESS_HOLE,
    )


def _port_tpl() -> _Template:
    """Enslave the (named) peer to the bridge (index in the hole) and bring it up."""
    from pyroute2.netlink.rtnl.ifinfmsg import ifinfmsg

    msg = ifinfmsg()
    msg["flags"] = IFF_UP
    msg["change"] = IFF_UP
    msg["attrs"] = [("IFLA_IFNAME", _PEER_HOLE.decode("latin-1")), ("IFLA_MASTER", 0x7DDDDDD2)]
    return _Template(msg, RTM_NEWLINK, 0, peer=_PEER_HOLE, master=_MASTER_HOLE)


def _index_of(replies: list[bytes]) -> int:
    (reply,) = replies
    return struct.unpack_from("=i", reply, 16 + 4)[0]  # ifinfomsg.ifi_index


#: RTM_NEWLINK for ifindex 1 (the loopback device is always 1 in a netns): flags and
#: change IFF_UP, seq 1; nlmsghdr then ifinfomsg, no attributes. The same bytes as
#: pyroute2's ``ifinfmsg`` with those fields (tests/facets/test_net.py holds them equal).
_LO_UP = struct.pack("=IHHII", 32, RTM_NEWLINK, NLM_F_REQUEST | NLM_F_ACK, 1, 0) + struct.pack(
    "=BxHiII", socket.AF_UNSPEC, 0, 1, IFF_UP, IFF_UP
)


def loopback_up() -> None:
    """Bring ``lo`` up in the calling thread's netns (a fresh netns starts with it down)."""
    with _Rtnl() as nl:
        nl.send_raw(_LO_UP, 1, "bring lo up")


def _diag_request(mtype: int, flags: int, seq: int, family: int, sockid: bytes = bytes(48)) -> bytes:
    """nlmsghdr + ``inet_diag_req_v2`` for TCP: every state, the socket ``sockid``."""
    body = struct.pack("=BBBxI", family, socket.IPPROTO_TCP, 0, TCPF_ALL) + sockid
    return struct.pack("=IHHII", 16 + len(body), mtype, NLM_F_REQUEST | flags, seq, 0) + body


def _orphans(nl: _Rtnl, family: int, seq: int) -> list[bytes]:
    """The ``inet_diag_sockid`` of each TCP socket of ``family`` no process holds (its
    inode is 0: TIME_WAIT, FIN_WAIT2, LAST_ACK, ... after its owner closed it)."""
    found = []
    for reply in nl.send_raw(_diag_request(SOCK_DIAG_BY_FAMILY, NLM_F_DUMP, seq, family), seq, "list TCP sockets"):
        # nlmsghdr (16), then inet_diag_msg: family, state, timer, retrans (4), the
        # sockid (48), expires, rqueue, wqueue, uid, inode (5 x u32).
        if len(reply) >= 88 and struct.unpack_from("=I", reply, 84)[0] == 0:
            found.append(reply[20:68])
    return found


def _tcp_in_use() -> bool:
    """Whether the calling thread's netns has a TCP socket, TIME_WAIT included: its own
    counts in ``sockstat`` (``inuse`` of TCP and TCP6, ``tw``). True when unreadable."""
    seen = 0
    for name in ("sockstat", "sockstat6"):
        try:
            with open(f"/proc/thread-self/net/{name}", "rb") as f:
                text = f.read()
        except OSError:
            return True
        for line in text.splitlines():
            fields = line.split()
            if fields and fields[0] in (b"TCP:", b"TCP6:"):
                seen += 1
                counts = dict(zip(fields[1::2], fields[2::2], strict=False))
                if counts.get(b"inuse", b"0") != b"0" or counts.get(b"tw", b"0") != b"0":
                    return True
    return seen < 2


def clear_orphaned_tcp() -> bool:
    """Destroy the TCP sockets no process holds in the calling thread's netns, as a
    fresh netns has none: a TIME_WAIT left on a port makes a ``bind()`` of that port
    without ``SO_REUSEADDR`` fail for 60 s. True when none is left; False when the
    kernel cannot tell or destroy them (no ``CONFIG_INET_DIAG_DESTROY``, or an older
    kernel's ``tcp_abort`` that takes no TIME_WAIT socket)."""
    if not _tcp_in_use():
        return True  # ~30 us; a dump walks the host's whole TCP hash table (~2.5 ms)
    seq = 0
    try:
        with _Rtnl(NETLINK_SOCK_DIAG) as nl:
            for _ in range(3):  # a loopback peer may move on as its other end goes
                left = 0
                for family in (socket.AF_INET, socket.AF_INET6):
                    seq += 1
                    for sockid in _orphans(nl, family, seq):
                        left += 1
                        seq += 1
                        try:
                            nl.send_raw(_diag_request(SOCK_DESTROY, NLM_F_ACK, seq, family, sockid), seq, "destroy")
                        except OSError as exc:
                            if exc.errno != errno.ENOENT:  # gone meanwhile
                                return False
                if not left:
                    return True
    except OSError:
        return False
    return False

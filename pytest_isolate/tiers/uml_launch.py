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

Host protection. Guest root can mount hostfs again, and ``hostfs=<prefix>`` is not a
boundary, so the ``linux.uml`` process itself is confined; whatever the guest kernel
does on the host, it does with that process's credentials and mount view:

* its own mount namespace, where every mount is read-only and nodev (one recursive
  ``mount_setattr``), ``/dev`` is a tmpfs holding only null/zero/full/random/urandom and
  ``net/tun``, ``/proc`` is fresh (its own PID namespace) and ``/sys`` is hidden. Only
  a tmpfs for UML's RAM file, pytest's basetemp and the ``writable`` paths are
  writable; the tmpfs exists only in that namespace, so nothing is mounted on the host.
* as root: uid/gid 65534 with just CAP_DAC_READ_SEARCH (ambient), so it can read the
  interpreter and project in a 0700 ``/root`` but cannot write what "nobody" cannot
  write, even where a read-only mount does not help (device nodes, FIFOs such as
  ``/run/initctl``). basetemp is an *idmapped* bind (its owner shown as 65534), so the
  guest writes ``tmp_path`` and the files land owned by the real owner.
* not root: the same in a user namespace mapping only the caller's uid, all
  capabilities dropped but CAP_NET_RAW for the ``veth`` channel (packet sockets open
  in this private netns only). With ``network="ip"`` that user namespace is the run's
  switch's (``_join_switch_userns``), so the guest's NIC may move into the switch.
* its own PID namespace, whose PID 1 is a small reaper (``_runner``) that forwards
  SIGTERM to ``linux.uml`` and exits with its status: when it exits, however it
  exits, the kernel kills every helper UML had (a SIGKILL on a plain ``linux.uml``
  leaks them). Not UML itself as PID 1: a namespace init ignores its own SIGABRT,
  and a panicking UML ends in abort().
* ``PR_SET_PDEATHSIG``: the reaper and UML are SIGKILLed when their parent dies.

This launcher exits, and so closes its stdout (execnet then sees EOF), when the guest
kernel exits (panic: UML aborts with status 134), when the guest stops sending
heartbeats (hang), on stdin EOF (the gateway was closed; the guest gets EOF, its
worker exits and PID 1 powers off), on SIGTERM/SIGHUP, or when its parent dies
(PR_SET_PDEATHSIG plus a ``getppid`` watchdog). Each reason is appended to
``<workdir>/console.log``; ``uml_gateway.console_tail`` shows it.

Run one guest by hand: see the module docstring of ``pytest_isolate.tiers.uml``.

This file is standalone (stdlib only, runs with ``-I -S``): it must not depend on the
controller's ``sys.path``, and it starts faster without ``site``.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import json
import os
import select
import signal
import socket
import stat
import struct
import sys
import time

# --------------------------------------------------------------------------- libc

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mount.argtypes = [
    ctypes.c_char_p,
    ctypes.c_char_p,
    ctypes.c_char_p,
    ctypes.c_ulong,
    ctypes.c_char_p,
]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
_libc.unshare.argtypes = [ctypes.c_int]
_libc.setns.argtypes = [ctypes.c_int, ctypes.c_int]
_libc.prctl.argtypes = [
    ctypes.c_int,
    ctypes.c_ulong,
    ctypes.c_ulong,
    ctypes.c_ulong,
    ctypes.c_ulong,
]
_libc.syscall.restype = ctypes.c_long

CLONE_NEWNS = 0x00020000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000

MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MS_NOEXEC = 8
MS_REMOUNT = 32
MS_BIND = 4096
MS_REC = 16384
MS_PRIVATE = 1 << 18

PR_SET_PDEATHSIG = 1
PR_CAPBSET_DROP = 24
PR_SET_SECUREBITS = 28
PR_SET_NO_NEW_PRIVS = 38
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_RAISE = 2
CAP_DAC_READ_SEARCH = 2
CAP_SETPCAP = 8
CAP_NET_RAW = 13

# x86_64 syscall numbers (UML runs on x86 hosts); the mount API ones are the same on
# every architecture since they were added after the tables were unified.
SYS_CAPSET = 126
SYS_OPEN_TREE = 428
SYS_MOVE_MOUNT = 429
SYS_MOUNT_SETATTR = 442
AT_FDCWD = -100
AT_EMPTY_PATH = 0x1000
AT_RECURSIVE = 0x8000
OPEN_TREE_CLONE = 1
OPEN_TREE_CLOEXEC = 0o2000000
MOVE_MOUNT_F_EMPTY_PATH = 0x4
MOUNT_ATTR_RDONLY = 0x1
MOUNT_ATTR_NODEV = 0x4
MOUNT_ATTR_IDMAP = 0x100000

# tun / interface ioctls
TUNSETIFF = 0x400454CA
TUNSETPERSIST = 0x400454CB
TUNSETOWNER = 0x400454CC
TUNSETGROUP = 0x400454CE
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
SIOCGIFFLAGS = 0x8913
SIOCSIFFLAGS = 0x8914
SIOCSIFADDR = 0x8916
SIOCSIFNETMASK = 0x891C
IFF_UP = 0x1

NS_GET_USERNS = 0xB701  # ioctl on a namespace fd: an fd of its owning user namespace

NOBODY = 65534
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


def _err(what: str) -> OSError:
    e = ctypes.get_errno()
    return OSError(e, f"{what}: {os.strerror(e)}")


def _chk(ret: int, what: str) -> int:
    if ret < 0:
        raise _err(what)
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


def unshare(flags: int) -> None:
    _chk(_libc.unshare(flags), f"unshare({flags:#x})")


def setns(fd: int, nstype: int) -> None:
    _chk(_libc.setns(fd, nstype), "setns")


def prctl(option: int, a2: int = 0, a3: int = 0, a4: int = 0, a5: int = 0) -> int:
    return _chk(_libc.prctl(option, a2, a3, a4, a5), f"prctl({option})")


def _ifreq(name: str, payload: bytes = b"") -> bytearray:
    buf = bytearray(40)
    buf[:16] = name.encode().ljust(16, b"\0")
    buf[16 : 16 + len(payload)] = payload
    return buf


def _sockaddr_in(ip: str) -> bytes:
    return struct.pack("=H2s4s8x", socket.AF_INET, b"\0\0", socket.inet_aton(ip))


def create_tap(name: str, owner: int, group: int) -> None:
    """A persistent tap ``name`` in the current netns that ``owner`` may attach to.

    Persistent because UML attaches by name (TUNSETIFF) when the guest brings the
    interface up; it dies with the network namespace it lives in.
    """
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC)
    try:
        fcntl.ioctl(fd, TUNSETIFF, _ifreq(name, struct.pack("=H", IFF_TAP | IFF_NO_PI)))
        fcntl.ioctl(fd, TUNSETOWNER, owner)
        fcntl.ioctl(fd, TUNSETGROUP, group)
        fcntl.ioctl(fd, TUNSETPERSIST, 1)
    finally:
        os.close(fd)


def if_up(name: str, ip: str | None = None, netmask: str | None = None) -> None:
    """Address and IFF_UP by ioctl: a handful of syscalls, no netlink library to import
    (pyroute2 costs ~150 ms to import; this runs on every guest boot)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        if ip:
            fcntl.ioctl(s, SIOCSIFADDR, _ifreq(name, _sockaddr_in(ip)))
        if netmask:
            fcntl.ioctl(s, SIOCSIFNETMASK, _ifreq(name, _sockaddr_in(netmask)))
        res = fcntl.ioctl(s, SIOCGIFFLAGS, bytes(_ifreq(name)))
        (flags,) = struct.unpack_from("=H", res, 16)
        fcntl.ioctl(s, SIOCSIFFLAGS, _ifreq(name, struct.pack("=H", flags | IFF_UP)))


# --------------------------------------------------------------------------- netlink
# Only for network="ip": move the guest's switch tap into the run's switch and enslave
# it to the bridge. Hand-encoded (three message kinds) to keep this program stdlib-only.

RTM_NEWLINK = 16
RTM_DELLINK = 17
NLM_F_REQUEST = 1
NLM_F_ACK = 4
IFLA_IFNAME = 3
IFLA_MASTER = 10
IFLA_NET_NS_FD = 28


def _nla(kind: int, payload: bytes) -> bytes:
    n = 4 + len(payload)
    return struct.pack("=HH", n, kind) + payload + b"\0" * ((4 - n % 4) % 4)


def _nl_request(
    sock: socket.socket,
    mtype: int,
    index: int,
    attrs: bytes = b"",
    flags: int = 0,
    change: int = 0,
    nlflags: int = 0,
) -> None:
    body = struct.pack("=BxHiII", socket.AF_UNSPEC, 0, index, flags, change) + attrs
    msg = struct.pack("=IHHII", 16 + len(body), mtype, NLM_F_REQUEST | NLM_F_ACK | nlflags, 1, 0) + body
    sock.send(msg)
    reply = sock.recv(65536)
    _, rtype = struct.unpack_from("=IH", reply)
    if rtype == 2:  # NLMSG_ERROR
        (code,) = struct.unpack_from("=i", reply, 16)
        if code:
            raise OSError(-code, f"rtnetlink {mtype}: {os.strerror(-code)}")


def _netlink_socket() -> socket.socket:
    return socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, 0)


def create_veth(name: str, peer: str) -> None:
    """A veth pair in the current netns, both ends up.

    For kernels with only the vector driver: its tap transport reads through a packet
    socket bound to the tap, which a move to another netns breaks, so the guest's
    switch NIC uses the raw transport on ``name``, which stays here, and ``peer`` is
    what moves into the switch.
    """
    ifla_linkinfo, info_kind, info_data, veth_info_peer = 18, 1, 2, 1
    peer_msg = struct.pack("=BxHiII", socket.AF_UNSPEC, 0, 0, 0, 0) + _nla(IFLA_IFNAME, peer.encode() + b"\0")
    linkinfo = _nla(info_kind, b"veth\0") + _nla(info_data, _nla(veth_info_peer, peer_msg))
    with _netlink_socket() as nl:
        _nl_request(
            nl,
            RTM_NEWLINK,
            0,
            _nla(IFLA_IFNAME, name.encode() + b"\0") + _nla(ifla_linkinfo, linkinfo),
            nlflags=0x400 | 0x200,  # NLM_F_CREATE | NLM_F_EXCL
        )
    if_up(name)
    if_up(peer)


# --------------------------------------------------------------------------- the view


def _make_readonly_recursive() -> None:
    """Every mount of this (private) mount namespace read-only.

    One ``mount_setattr(AT_RECURSIVE)`` on Linux >= 5.12; otherwise a bind remount of
    each mount point, repeating the flags a user namespace may not clear.
    """

    class MountAttr(ctypes.Structure):
        _fields_ = [
            ("set", ctypes.c_uint64),
            ("clr", ctypes.c_uint64),
            ("prop", ctypes.c_uint64),
            ("userns", ctypes.c_uint64),
        ]

    # nodev too: a device node anywhere on the host (a chroot's /dev, say) must not
    # be openable through hostfs; our own /dev is mounted afterwards.
    attr = MountAttr(MOUNT_ATTR_RDONLY | MOUNT_ATTR_NODEV, 0, 0, 0)
    r = _libc.syscall(
        SYS_MOUNT_SETATTR, AT_FDCWD, b"/", AT_RECURSIVE, ctypes.byref(attr), ctypes.sizeof(attr)
    )
    if r == 0:
        return
    points = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            points.append(line.split()[4].encode().decode("unicode_escape"))
    for mp in sorted(points, key=len):
        try:
            st = os.statvfs(mp)
        except OSError:
            continue
        keep = 0
        for stf, msf in (
            (os.ST_NOSUID, MS_NOSUID),
            (os.ST_NODEV, MS_NODEV),
            (os.ST_NOEXEC, MS_NOEXEC),
        ):
            if st.f_flag & stf:
                keep |= msf
        try:
            mount(None, mp, None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NODEV | keep)
        except OSError:
            pass


def _idmap_userns(uid: int, gid: int, shown_as: int) -> int:
    """An fd of a user namespace for an idmapped mount that shows files owned by
    ``uid``/``gid`` on disk as owned by ``shown_as`` (and stores ``shown_as``'s new files
    as ``uid``/``gid``). The mount treats on-disk ids as ids *inside* this namespace, so
    the map reads "uid -> shown_as". A throwaway child creates it; we write its maps."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(r)
            unshare(CLONE_NEWUSER)
            os.write(w, b"1")
            time.sleep(30)
        finally:
            os._exit(0)
    os.close(w)
    try:
        if os.read(r, 1) != b"1":
            raise OSError(errno.EPERM, "idmap helper could not create a user namespace")
        with open(f"/proc/{pid}/uid_map", "w") as f:
            f.write(f"{uid} {shown_as} 1\n")
        with open(f"/proc/{pid}/setgroups", "w") as f:
            f.write("deny")
        with open(f"/proc/{pid}/gid_map", "w") as f:
            f.write(f"{gid} {shown_as} 1\n")
        return os.open(f"/proc/{pid}/ns/user", os.O_RDONLY | os.O_CLOEXEC)
    finally:
        os.close(r)
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)


def _bind_writable(path: str, as_uid: int | None) -> str | None:
    """Make ``path`` writable again in our read-only view; returns a note on fallback.

    ``as_uid``: the uid the UML process will run as when it differs from the
    directory's owner (root launcher): then an idmapped bind shows the owner as
    ``as_uid``, so the guest can write, and new files are stored with the real owner.
    """
    st = os.stat(path)
    if as_uid is not None and st.st_uid != as_uid:

        class MountAttr(ctypes.Structure):
            _fields_ = [
                ("set", ctypes.c_uint64),
                ("clr", ctypes.c_uint64),
                ("prop", ctypes.c_uint64),
                ("userns", ctypes.c_uint64),
            ]

        try:
            ufd = _idmap_userns(st.st_uid, st.st_gid, as_uid)
            try:
                tfd = _chk(
                    _libc.syscall(
                        SYS_OPEN_TREE,
                        AT_FDCWD,
                        _b(path),
                        OPEN_TREE_CLONE | OPEN_TREE_CLOEXEC | AT_RECURSIVE,
                    ),
                    f"open_tree {path}",
                )
                try:
                    attr = MountAttr(MOUNT_ATTR_IDMAP, MOUNT_ATTR_RDONLY, 0, ufd)
                    _chk(
                        _libc.syscall(
                            SYS_MOUNT_SETATTR,
                            tfd,
                            b"",
                            AT_EMPTY_PATH,
                            ctypes.byref(attr),
                            ctypes.sizeof(attr),
                        ),
                        f"idmap {path}",
                    )
                    _chk(
                        _libc.syscall(
                            SYS_MOVE_MOUNT, tfd, b"", AT_FDCWD, _b(path), MOVE_MOUNT_F_EMPTY_PATH
                        ),
                        f"move_mount {path}",
                    )
                finally:
                    os.close(tfd)
            finally:
                os.close(ufd)
            return None
        except OSError as e:
            note = (
                f"idmapped mount of {path} failed ({e}); the guest may not be able to write there"
            )
    else:
        note = None
    mount(path, path, None, MS_BIND | MS_REC)
    flags = MS_REMOUNT | MS_BIND
    sv = os.statvfs(path)
    for stf, msf in ((os.ST_NOSUID, MS_NOSUID), (os.ST_NODEV, MS_NODEV), (os.ST_NOEXEC, MS_NOEXEC)):
        if sv.f_flag & stf:
            flags |= msf
    mount(None, path, None, flags)
    return note


_DEVICES = (
    ("null", 1, 3),
    ("zero", 1, 5),
    ("full", 1, 7),
    ("random", 1, 8),
    ("urandom", 1, 9),
)
_TUN = ("net/tun", 10, 200)


def _minimal_dev(privileged: bool, tun: bool) -> None:
    """Replace /dev with a tmpfs holding only what UML needs (``net/tun`` only when a
    NIC of the guest is a tap: a veth channel runs where the host has none).

    With the host's /dev, guest root could open /dev/vda through hostfs (a read-only
    mount does not stop writes to device nodes). As root we mknod our own nodes, so
    ``net/tun`` can be 0666 for the unprivileged UML process without touching the host's
    node; in a user namespace mknod is refused, so the host nodes are bound instead.
    """
    devices = (*_DEVICES, _TUN) if tun else _DEVICES
    # The host's nodes, held by O_PATH fds before the tmpfs hides them (O_PATH does
    # not open the device, so the nodev mount does not refuse it).
    host = (
        {}
        if privileged
        else {n: os.open(f"/dev/{n}", os.O_PATH | os.O_CLOEXEC) for n, _, _ in devices}
    )
    mount("tmpfs", "/dev", "tmpfs", MS_NOSUID | MS_NOEXEC, "mode=755,size=64k")
    os.mkdir("/dev/net", 0o755)
    for name, major, minor in devices:
        path = f"/dev/{name}"
        if privileged:
            os.mknod(path, 0o666 | stat.S_IFCHR, os.makedev(major, minor))
            os.chmod(path, 0o666)
        else:
            with open(path, "w"):
                pass
            mount(f"/proc/self/fd/{host[name]}", path, None, MS_BIND)
            # a bind keeps its source mount's flags: the host /dev is nodev by now;
            # flags a user namespace may not clear (nosuid, noexec) are repeated
            keep = 0
            sv = os.statvfs(path)
            for stf, msf in ((os.ST_NOSUID, MS_NOSUID), (os.ST_NOEXEC, MS_NOEXEC)):
                if sv.f_flag & stf:
                    keep |= msf
            mount(None, path, None, MS_REMOUNT | MS_BIND | keep)
            os.close(host[name])
    # The tmpfs itself read-only: no new files (nodes stay usable: writes to a device
    # are not writes to the filesystem).
    mount(None, "/dev", None, MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NOEXEC, "mode=755,size=64k")


def _capset(caps: int) -> None:
    hdr = struct.pack("=Ii", 0x20080522, 0)  # _LINUX_CAPABILITY_VERSION_3
    lo, hi = caps & 0xFFFFFFFF, caps >> 32
    data = struct.pack("=6I", lo, lo, lo, hi, hi, hi)  # effective, permitted, inheritable x2
    hb, db = ctypes.create_string_buffer(hdr), ctypes.create_string_buffer(data)
    _chk(_libc.syscall(SYS_CAPSET, hb, db), "capset")


def _last_cap() -> int:
    try:
        with open("/proc/sys/kernel/cap_last_cap") as f:
            return int(f.read())
    except OSError:
        return 40


def _drop_privileges(privileged: bool, net_raw: bool = False) -> None:
    """Root: become 65534 keeping only CAP_DAC_READ_SEARCH (ambient, survives exec),
    plus CAP_NET_RAW with ``net_raw`` (the vector driver's raw transport on the channel
    or switch veth; packet sockets only reach this private netns, which holds the
    guest's own links). User namespace: keep uid 0-in-namespace, drop every capability
    but CAP_NET_RAW with ``net_raw`` (a capability over the namespaces this user
    namespace owns, i.e. that private netns, not over the host's).

    SECBIT_NO_SETUID_FIXUP matters for hostfs: it checks permissions with access(2),
    which runs with the *real* uid and, for a non-root uid, clears the effective
    capabilities unless this bit is set; CAP_DAC_READ_SEARCH would then not let the
    guest reach the interpreter under a 0700 /root.
    """
    keep = {CAP_NET_RAW} if net_raw else set()
    if privileged:
        keep.add(CAP_DAC_READ_SEARCH)
    for cap in range(_last_cap() + 1):
        if cap not in keep and cap != CAP_SETPCAP:
            _libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0)
    # NOROOT|NOROOT_LOCKED|NO_SETUID_FIXUP|NO_SETUID_FIXUP_LOCKED|KEEP_CAPS_LOCKED
    prctl(PR_SET_SECUREBITS, 0x01 | 0x02 | 0x04 | 0x08 | 0x20)
    if privileged:
        os.setgroups([])
        os.setresgid(NOBODY, NOBODY, NOBODY)
        os.setresuid(NOBODY, NOBODY, NOBODY)
        _capset(sum(1 << c for c in keep))
        for cap in sorted(keep):
            prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_RAISE, cap)
    else:
        _capset(1 << CAP_SETPCAP | sum(1 << c for c in keep))
        _libc.prctl(PR_CAPBSET_DROP, CAP_SETPCAP, 0, 0, 0)
        _capset(sum(1 << c for c in keep))
        for cap in sorted(keep):
            prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_RAISE, cap)
    prctl(PR_SET_NO_NEW_PRIVS, 1)


def _build_view(cfg: dict, privileged: bool) -> list[str]:
    """The mount namespace ``linux.uml`` sees (see the module docstring)."""
    unshare(CLONE_NEWNS | CLONE_NEWIPC | CLONE_NEWUTS)
    mount(None, "/", None, MS_REC | MS_PRIVATE)
    _make_readonly_recursive()
    notes = []
    opts = f"mode=700,size={cfg['ram_size']}"
    if privileged:
        opts += f",uid={NOBODY},gid={NOBODY}"
    mount("tmpfs", cfg["ramdir"], "tmpfs", MS_NOSUID | MS_NODEV, opts)
    # A /proc of our PID namespace first: the idmap helper's maps are written there.
    proc_flags = MS_NOSUID | MS_NODEV | MS_NOEXEC
    try:
        mount("proc", "/proc", "proc", proc_flags)
        fresh_proc = True
    except OSError as e:
        fresh_proc = False
        notes.append(f"fresh /proc refused ({e}); the host's stays visible read-only")
    for path in cfg["writable"]:
        note = _bind_writable(path, NOBODY if privileged and fresh_proc else None)
        if note:
            notes.append(note)
    if fresh_proc:
        mount(None, "/proc", None, MS_REMOUNT | MS_RDONLY | proc_flags)
    _minimal_dev(privileged, tun=uses_tun(cfg))
    try:
        mount(
            "tmpfs",
            "/sys",
            "tmpfs",
            MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC,
            "size=0,mode=555",
        )
    except OSError:
        pass
    os.chdir("/")
    return notes


def uses_tun(cfg: dict) -> bool:
    """Is any NIC of the guest a tap (so /dev/net/tun must be opened)?"""
    return cfg.get("channel", "tap") == "tap" or (
        bool(cfg.get("switch_tap")) and cfg.get("switch_transport") != "raw"
    )


def needs_net_raw(cfg: dict) -> bool:
    """Does ``linux.uml`` open a packet socket (the vector driver's raw transport)?"""
    return cfg.get("channel") == "veth" or (
        bool(cfg.get("switch_tap")) and cfg.get("switch_transport") == "raw"
    )


def _runner(cfg: dict, console_w: int, ready_w: int, privileged: bool) -> None:
    """PID 1 of the guest's PID namespace: build the view, start UML, reap, exit with
    UML's status (128+signal if killed). Never returns.

    Not UML itself as PID 1: a namespace init ignores its own SIGABRT, so a panicking
    UML (which ends in abort()) would spin forever. When this process exits, however
    it exits, the kernel kills everything left in the namespace: no helper survives.
    """
    prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    os.setsid()  # UML signals its whole process group when it panics: not ours
    notes = _build_view(cfg, privileged)
    fd = os.open("/dev/null", os.O_RDONLY)
    os.dup2(fd, 0)
    os.close(fd)
    os.dup2(console_w, 1)
    os.dup2(console_w, 2)
    for n in notes:
        os.write(2, f"[pytest-isolate] {n}\n".encode())
    for s in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
        signal.signal(s, signal.SIG_IGN)  # until UML's pid is known
    pid = os.fork()
    if pid == 0:
        try:
            for s in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
                signal.signal(s, signal.SIG_DFL)
            os.setpgid(0, 0)
            _drop_privileges(privileged, net_raw=needs_net_raw(cfg))
            prctl(PR_SET_PDEATHSIG, signal.SIGKILL)  # after the uid change, which clears it
            env = {
                "TMPDIR": cfg["ramdir"],
                "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
                "HOME": cfg["ramdir"],
            }
            os.close(ready_w)  # the launcher may go on; exec errors follow on the console
            os.execve(cfg["kernel"], cfg["argv"], env)
        except BaseException as e:  # noqa: BLE001
            os.write(2, f"[pytest-isolate] cannot start {cfg['kernel']}: {e}\n".encode())
        os._exit(127)
    os.close(ready_w)

    def forward(n: int, _frame: object) -> None:
        try:
            os.kill(pid, n)
        except ProcessLookupError:
            pass

    for s in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(s, forward)
    while True:
        try:
            wpid, status = os.waitpid(-1, 0)
        except ChildProcessError:
            os._exit(1)
        if wpid == pid:
            if os.WIFSIGNALED(status):
                os._exit(128 + os.WTERMSIG(status))
            os._exit(os.WEXITSTATUS(status))


# --------------------------------------------------------------------------- launcher


def _privileged() -> bool:
    if os.geteuid() != 0:
        return False
    try:
        with open("/proc/self/uid_map") as f:
            if f.read().split() != ["0", "0", "4294967295"]:
                return False
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("CapEff:"):
                    return bool(int(line.split()[1], 16) >> 21 & 1)  # CAP_SYS_ADMIN
    except OSError:
        return False
    return False


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
            with open("/proc/self/setgroups", "w") as f:
                f.write("deny")
            with open("/proc/self/uid_map", "w") as f:
                f.write(f"0 {uid} 1\n")
            with open("/proc/self/gid_map", "w") as f:
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
        g["env"] = dict(os.environ)
        path = os.path.join(self.workdir, "guest.json")
        tmp = path + ".tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        with open(fd, "w") as f:
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
        with open(os.path.join(self.workdir, "uml.pid"), "w") as f:
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
        with open(os.path.join(self.workdir, "launcher.pid"), "w") as f:
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
                    with open(os.path.join(self.workdir, "ready"), "w") as f:
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
    with open(argv[1]) as f:
        cfg = json.load(f)
    launcher = Launcher(cfg, argv[2:])
    try:
        return launcher.run()
    finally:
        launcher.stop_uml(grace=2.0)
        launcher.detach_switch()


if __name__ == "__main__":
    sys.exit(main(sys.argv))

"""Confine the ``linux.uml`` process: what a guest kernel can do to the host.

``uml_launch.py`` (the guest's launcher) builds with this the process ``linux.uml`` runs
as: its namespaces, the host ends of the guest's NICs, a read-only view of the host, no
privilege. Whatever the guest kernel does on the host, it does from inside that.

A module of its own because it changes for another reason than the launcher: the
launcher changes when the way a guest is booted, watched or talked to changes (the
channel, heartbeats, termination); this module changes when what the host must be
protected from changes (a kernel facility that reaches the host, a host without
``mount_setattr`` or ``/dev/net/tun``, root or not). A change here moves the boundary
between guest and host, so it is kept where it can be read and reviewed on its own.

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
  switch's (``uml_launch.Launcher._join_switch_userns``), so the guest's NIC may move
  into the switch.
* its own PID namespace, whose PID 1 is a small reaper (``_runner``) that forwards
  SIGTERM to ``linux.uml`` and exits with its status: when it exits, however it
  exits, the kernel kills every helper UML had (a SIGKILL on a plain ``linux.uml``
  leaks them). Not UML itself as PID 1: a namespace init ignores its own SIGABRT,
  and a panicking UML ends in abort().
* ``PR_SET_PDEATHSIG``: the reaper and UML are SIGKILLed when their parent dies.

The guest's NICs are made here too (``create_tap``, ``create_veth``, ``if_up``, and the
netlink requests the launcher uses to move the switch NIC): their host ends exist only
in the launcher's private network namespace.

Like the launcher, this file is stdlib only: ``uml_launch.py`` runs as
``python -I -S`` (no ``site``, its own directory not on ``sys.path``) and imports this
file as its sibling, found by its own path.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import signal
import socket
import stat
import struct
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

NOBODY = 65534


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


class _MountAttr(ctypes.Structure):
    """``struct mount_attr`` of ``mount_setattr(2)``."""

    _fields_ = [
        ("set", ctypes.c_uint64),
        ("clr", ctypes.c_uint64),
        ("prop", ctypes.c_uint64),
        ("userns", ctypes.c_uint64),
    ]


def _make_readonly_recursive() -> None:
    """Every mount of this (private) mount namespace read-only.

    One ``mount_setattr(AT_RECURSIVE)`` on Linux >= 5.12; otherwise a bind remount of
    each mount point, repeating the flags a user namespace may not clear.
    """

    # nodev too: a device node anywhere on the host (a chroot's /dev, say) must not
    # be openable through hostfs; our own /dev is mounted afterwards.
    attr = _MountAttr(MOUNT_ATTR_RDONLY | MOUNT_ATTR_NODEV, 0, 0, 0)
    r = _libc.syscall(
        SYS_MOUNT_SETATTR, AT_FDCWD, b"/", AT_RECURSIVE, ctypes.byref(attr), ctypes.sizeof(attr)
    )
    if r == 0:
        return
    points = []
    with open("/proc/self/mountinfo", encoding="utf-8") as f:
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
        with open(f"/proc/{pid}/uid_map", "w", encoding="utf-8") as f:
            f.write(f"{uid} {shown_as} 1\n")
        with open(f"/proc/{pid}/setgroups", "w", encoding="utf-8") as f:
            f.write("deny")
        with open(f"/proc/{pid}/gid_map", "w", encoding="utf-8") as f:
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
                    attr = _MountAttr(MOUNT_ATTR_IDMAP, MOUNT_ATTR_RDONLY, 0, ufd)
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
            with open(path, "w", encoding="utf-8"):
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
        with open("/proc/sys/kernel/cap_last_cap", encoding="utf-8") as f:
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


# --------------------------------------------------------------------------- privilege


def _privileged() -> bool:
    if os.geteuid() != 0:
        return False
    try:
        with open("/proc/self/uid_map", encoding="utf-8") as f:
            if f.read().split() != ["0", "0", "4294967295"]:
                return False
        with open("/proc/self/status", encoding="utf-8") as f:
            for line in f:
                if line.startswith("CapEff:"):
                    return bool(int(line.split()[1], 16) >> 21 & 1)  # CAP_SYS_ADMIN
    except OSError:
        return False
    return False

"""`uml` tier: each worker lives in a User-Mode Linux guest; each test in a fresh
mount/network/IPC/UTS namespace, cgroup and tmpfs overlay *inside* that guest.

This module is the guest side, used by the fork server inside the guest: ``UmlTier``.
The host side lives beside it: ``uml_kernel.py`` finds and probes the kernel
(``find_kernel``, ``availability``, the channel); ``uml_gateway.py`` is what the
controller uses per guest (``UmlOptions``, ``gateway_spec``: an execnet spec whose
"python" is ``uml_launch.py``, which boots a guest and relays execnet's stdin/stdout
into it; ``console_tail`` and ``close_guest``). ``uml_launch.py`` explains how the
``linux.uml`` process is confined so that guest root cannot write the host;
``uml_init.py`` is the guest's PID 1.

Costs (see ``bench/bench_uml.py``): inside UML every syscall and page fault is a ptrace
round trip (~20 µs for ``getpid``), so the guest boots once per worker, imports pytest
once, and forks per test. Boot is ~0.4 s instead of 1.35 s because the kernel command
line blacklists the RAID6/XOR benchmarks Debian's kernel runs at boot (~0.85 s).

Known limits:

* Writes reach the host only in basetemp and the ``writable`` paths (hostfs, done by the
  ``linux.uml`` process). When the run is root, that process is uid 65534 and those
  paths are idmapped for it: inside the guest their files show as owned by 65534 and
  ``chown`` there is refused; on the host they belong to their real owner.
* Tests of one guest share one network namespace (loopback only, or loopback plus a
  macvlan on the run's switch) until a test changes its links, addresses or routes;
  netfilter rules are not compared. No PID namespace per test: the cgroup kill ends
  whatever a test started.
* Without root the guest needs user namespaces (``linux.uml`` is confined in one); its
  channel is a tap where ``/dev/net/tun`` is open to the user (mode 0666, udev's
  default), else a veth read by the vector driver's raw transport
  (``uml_kernel.choose_channel``). ``network="ip"`` without root: the launcher joins
  the user namespace of the run's switch (its holder's), so it may move the guest's
  NIC into it.

Run one guest by hand::

    python -m pytest_isolate.tiers.uml                  # boot, print uname and timings
    python -m pytest_isolate.tiers.uml -c 'import os; print(os.listdir("/"))'
    python -m pytest_isolate.tiers.uml --memory 512M --kernel /path/to/linux.uml -v

``-v`` prints the guest console afterwards; the guest's files are under a temp dir
removed at exit (``--keep`` keeps it).
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import shutil
import socket
import struct
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

from pytest_isolate import child
from pytest_isolate.facets import prefault
from pytest_isolate.facets.prefault import Prefault
from pytest_isolate.observe.hostview import GUEST_INFO
from pytest_isolate.tiers.base import (
    Box,
    Tier,
    Unavailable,
    WorkerContext,
    describe_procs,
    fork_child,
    kill_tree,
    rusage_dict,
)
from pytest_isolate.tiers.uml_gateway import UmlOptions, close_guest, console_tail, gateway_spec
from pytest_isolate.tiers.uml_kernel import availability

# --------------------------------------------------------------------------- guest side

TESTS_DIR = "/run/isolate/t"
TMP_DIRS = ("/tmp", "/var/tmp")
SIOCGIFFLAGS = 0x8913
SIOCSIFFLAGS = 0x8914
SIOCSIFADDR = 0x8916
SIOCSIFNETMASK = 0x891C


def _ifreq(name: str, payload: bytes = b"") -> bytearray:
    buf = bytearray(40)
    buf[:16] = name.encode().ljust(16, b"\0")
    buf[16 : 16 + len(payload)] = payload
    return buf


def _if_up(name: str, ip: str | None = None, prefixlen: int | None = None) -> None:
    """ioctl, not netlink: pyroute2 takes seconds to import inside UML, and this runs in
    every test child."""
    import fcntl

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        if ip:
            fcntl.ioctl(
                s,
                SIOCSIFADDR,
                _ifreq(
                    name, struct.pack("=H2s4s8x", socket.AF_INET, b"\0\0", socket.inet_aton(ip))
                ),
            )
        if prefixlen is not None:
            mask = (0xFFFFFFFF << (32 - prefixlen)) & 0xFFFFFFFF
            fcntl.ioctl(
                s,
                SIOCSIFNETMASK,
                _ifreq(name, struct.pack("=H2sI8x", socket.AF_INET, b"\0\0", socket.htonl(mask))),
            )
        (flags,) = struct.unpack_from("=H", fcntl.ioctl(s, SIOCGIFFLAGS, bytes(_ifreq(name))), 16)
        fcntl.ioctl(s, SIOCSIFFLAGS, _ifreq(name, struct.pack("=H", flags | 1)))


def _nla(kind: int, payload: bytes) -> bytes:
    n = 4 + len(payload)
    return struct.pack("=HH", n, kind) + payload + b"\0" * ((4 - n % 4) % 4)


def _macvlan_into(
    nl: socket.socket, parent_index: int, netns_fd: int, name: str = "isomv0"
) -> None:
    """RTM_NEWLINK: a macvlan (bridge mode) on the guest's switch NIC, created straight
    in the test's network namespace (IFLA_NET_NS_FD). The kernel checks the name in the
    *requesting* namespace, where the guest's channel already is ``eth0``: rename it
    there afterwards (``_rename``)."""
    ifla_ifname, ifla_link, ifla_linkinfo, ifla_net_ns_fd = 3, 5, 18, 28
    info_kind, info_data, macvlan_mode, mode_bridge = 1, 2, 1, 4
    linkinfo = _nla(info_kind, b"macvlan\0") + _nla(
        info_data, _nla(macvlan_mode, struct.pack("=I", mode_bridge))
    )
    attrs = (
        _nla(ifla_ifname, name.encode() + b"\0")
        + _nla(ifla_link, struct.pack("=I", parent_index))
        + _nla(ifla_net_ns_fd, struct.pack("=I", netns_fd))
        + _nla(ifla_linkinfo, linkinfo)
    )
    body = struct.pack("=BxHiII", socket.AF_UNSPEC, 0, 0, 0, 0) + attrs
    flags = 1 | 4 | 0x400 | 0x200  # REQUEST | ACK | CREATE | EXCL
    nl.send(struct.pack("=IHHII", 16 + len(body), 16, flags, 1, 0) + body)
    reply = nl.recv(65536)
    if struct.unpack_from("=H", reply, 4)[0] == 2:
        (code,) = struct.unpack_from("=i", reply, 16)
        if code:
            raise OSError(-code, f"creating the test's macvlan: {os.strerror(-code)}")


def _rename(old: str, new: str) -> None:
    """SIOCSIFNAME in the calling thread's netns (the link must be down)."""
    import fcntl

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        fcntl.ioctl(s, 0x8923, _ifreq(old, new.encode().ljust(16, b"\0")))


def guest_address(worker_index: int, seq: int) -> tuple[str, int]:
    """Same arithmetic as ``facets.net.address_for`` (kept in step by a test): importing
    ``facets.net`` pulls in pyroute2, which costs seconds inside the guest."""
    import ipaddress

    subnet = ipaddress.IPv4Network("10.208.0.0/12")
    seq_bits = 14
    per_worker = (1 << seq_bits) - 2
    host = (worker_index << seq_bits) | (1 + seq % per_worker)
    return str(subnet.network_address + host), subnet.prefixlen


def in_guest() -> bool:
    return os.path.exists(GUEST_INFO)


def _guest_oom_kills() -> int:
    """The guest kernel's count of OOM kills so far (``oom_kill`` in /proc/vmstat)."""
    try:
        with open("/proc/vmstat", "rb") as f:
            for line in f:
                if line.startswith(b"oom_kill "):
                    return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


class UmlTier(Tier):
    """Runs inside the guest, in the fork server. Per test: a cgroup (limits, exact
    readings, a kill that misses nothing), a tmpfs + overlay root over the host's tree
    built before the fork, and a child that joins the tests' network namespace
    (loopback only, or plus a macvlan on the run's switch for network="ip"; see
    ``_test_netns``), unshares mount/IPC/UTS namespaces, pivots into that root and runs
    the test. No PID namespace: it would cost a second fork (~25 ms in UML); the cgroup
    kills leftovers instead, and the guest dies with the worker anyway."""

    name = "uml"
    direct = True

    def __init__(self, ctx: WorkerContext) -> None:
        super().__init__(ctx)
        try:
            with open(GUEST_INFO, encoding="utf-8") as f:
                self.info: dict[str, Any] = json.load(f)
        except OSError:
            raise Unavailable(
                "uml: UmlTier runs only inside a guest booted by the uml launcher"
            ) from None
        os.makedirs(TESTS_DIR, exist_ok=True)
        self._cg_host: Any = None
        try:
            from pytest_isolate.facets import cgroup_host

            host = cgroup_host.detect()
            if host.mode != "none":
                self._cg_host = host
        except Exception:  # noqa: BLE001 - readings then come from rusage only
            self._cg_host = None
        self._nl: socket.socket | None = None
        self._switch_index = 0
        if self.info.get("switch_if"):
            self._nl = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, 0)
            self._switch_index = socket.if_nametoindex(self.info["switch_if"])
        #: network kind ("none"/"ip") -> (netns fd, fingerprint when it was made)
        self._netns: dict[str, tuple[int, str]] = {}
        #: The pages a child of this server writes (``facets.prefault``): learnt from
        #: the first child that runs its test to the end, through a memfd it fills then.
        self._prefault: Prefault | None = None
        self._learn_tries = prefault.LEARN_TRIES
        self._learning = -1
        #: The pages this server writes between two forks: copied after each fork.
        self._own = prefault.ServerPages()

    @classmethod
    def availability(cls) -> str | None:
        return availability()

    def own_pids(self) -> set[int]:
        return {self._own.witness} if self._own.witness else set()

    def close(self) -> None:
        self._own.close()
        for fd, _ in self._netns.values():
            os.close(fd)
        self._netns.clear()
        if self._nl is not None:
            self._nl.close()
            self._nl = None

    # -- the tests' network namespace -------------------------------------------------
    #
    # A fresh netns per test is what the host tiers do, but in UML it is the single
    # biggest per-test cost: the kernel dismantles a dead netns in a work queue
    # (several RCU grace periods at HZ=100) that competes with the next test for the
    # guest's one CPU, and bringing a new ``lo`` up costs ~15 ms; measured 60-600 ms per
    # test instead of ~30. So consecutive tests of one guest share a netns (loopback
    # only; for network="ip" plus one macvlan on the run's switch), and it is replaced
    # as soon as a test leaves it changed: its links, addresses or routes differ from
    # when it was made. Sockets do not outlive their test (the cgroup kill ends every
    # process). Not compared: netfilter rules and sysctls under /proc/sys/net.

    def _fingerprint(self) -> str:
        parts = [repr(socket.if_nameindex())]
        for name in ("fib_trie", "route", "if_inet6", "ipv6_route"):
            try:
                with open(f"/proc/self/net/{name}", encoding="utf-8") as f:
                    parts.append(f.read())
            except OSError:
                parts.append("")
        return "\0".join(parts)

    def _test_netns(self, kind: str) -> int:
        """The shared netns for ``kind``, made (again) when missing or left changed."""
        from pytest_isolate.facets import namespaces

        have = self._netns.get(kind)
        if have is not None:
            return have[0]

        def setup() -> str:
            _if_up("lo", "127.0.0.1", 8)
            if kind == "ip":
                assert self._nl is not None
                here = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
                try:
                    _macvlan_into(self._nl, self._switch_index, here)
                finally:
                    os.close(here)
                _rename("isomv0", "eth0")
                addr, plen = guest_address(int(self.ctx.extra.get("worker_index", 0)), 0)
                _if_up("eth0", addr, plen)
            return self._fingerprint()

        fd, fp = namespaces.new_netns(setup)
        self._netns[kind] = (fd, fp)
        return fd

    def _check_netns(self, kind: str) -> None:
        have = self._netns.get(kind)
        if have is None:
            return
        fd, fp = have
        try:
            from pytest_isolate.facets import namespaces

            same = namespaces.in_netns(fd, self._fingerprint) == fp
        except OSError:
            same = False
        if not same:
            os.close(fd)
            del self._netns[kind]

    def prepare(self, box: Box) -> None:
        from pytest_isolate.facets import mounts

        if box.spec.network == "ip" and not self._switch_index:
            raise Unavailable(
                "uml: this guest has no interface on the run's switch (booted with network='none')"
            )
        if self._cg_host is not None:
            from pytest_isolate.facets import cgroup_host, cgroups

            limits = cgroup_host.Limits(memory=box.spec.memory, pids=box.spec.pids, cpu=box.spec.cpu)
            problem = self._cg_host.missing(limits)
            if problem:
                raise Unavailable(f"uml: in the guest: {problem}")
            box.state["uml_cg"] = cgroups.TestCgroup(
                self._cg_host, self.ctx.run_id, f"t{box.index}", limits
            )
        box.state["uml_oom_before"] = _guest_oom_kills()
        d = Path(TESTS_DIR) / str(box.index)
        d.mkdir()
        box.state["uml_dir"] = d
        try:
            mounts.mount_tmpfs(d, size=box.spec.disk, mode=0o700)
            for sub in ("upper", "work", "root"):
                (d / sub).mkdir()
            root = d / "root"
            mounts.mount_overlay(root, self.info["hostroot"], d / "upper", d / "work")
            created: list[str] = []
            for src in ("/proc", "/sys", "/dev"):
                mounts.mount(src, root / src[1:], None, mounts.MS_BIND | mounts.MS_REC)
            mounts.mount_tmpfs(root / "dev/shm", mode=0o1777)
            mounts.mount_tmpfs(root / "run", mode=0o755)
            for path in self.info.get("writable", []):
                target = root / path.lstrip("/")
                if not target.exists():
                    created.append(path)
                    target.mkdir(parents=True, exist_ok=True)
                mounts.mount(path, target, None, mounts.MS_BIND | mounts.MS_REC)
            box.state["uml_created"] = created
        except BaseException:
            self._cleanup(box)
            raise

    def spawn(self, box: Box, run: Callable[[], NoReturn]) -> int:
        from pytest_isolate.facets import mounts, namespaces

        root = box.state["uml_dir"] / "root"
        cg = box.state.get("uml_cg")
        kind = "ip" if box.spec.network == "ip" else "none"
        netns = self._test_netns(kind)
        box.state["uml_net"] = kind
        cwd = os.getcwd()
        pf = self._prefault
        learning = self._learning
        learn = -1
        if pf is None and learning < 0 and self._learn_tries > 0:
            learn = self._learning = os.memfd_create("isolate-pages", os.MFD_CLOEXEC)
            box.state["uml_learn"] = learn

        def body() -> NoReturn:
            if cg is not None:
                cg.attach(0)
            if pf is not None:
                # Before anything else writes: each page would be a fault. In the test's
                # cgroup, as the faults' copies were: its memory readings stay the same.
                pf.apply()
            if learning >= 0:
                os.close(learning)  # another child is learning: not ours
            if learn >= 0:
                child.at_end.append(lambda: os.write(learn, prefault.encode(prefault.written_ranges())))
            os.setpgid(0, 0)
            namespaces.setns(netns, namespaces.CLONE_NEWNET)
            namespaces.unshare(
                namespaces.CLONE_NEWNS | namespaces.CLONE_NEWIPC | namespaces.CLONE_NEWUTS
            )
            mounts.enter_root(root)
            namespaces.sethostname(box.hostname)
            for fd, _ in self._netns.values():
                os.close(fd)
            if self._nl is not None:
                self._nl.close()
            try:
                os.chdir(cwd)
            except OSError:
                os.chdir("/")
            run()

        self._own.before_fork()
        try:
            pid = fork_child(body)
        except BaseException:
            if learn >= 0:  # no child will record: the next one
                box.state.pop("uml_learn", None)
                os.close(learn)
                self._learning = -1
            raise
        self._own.after_fork()
        return pid

    def kill(self, box: Box, pid: int) -> None:
        cg = box.state.get("uml_cg")
        if cg is not None:
            cg.kill()
        kill_tree(pid)

    def finish(
        self, box: Box, pid: int, status: int, rusage: resource.struct_rusage | None
    ) -> None:
        from pytest_isolate.facets import keep, overlay_changes

        try:
            # wait4's figures for the runner (rusage_dict shape), then the guest cgroup's,
            # which cover every process the test started and win where both exist.
            box.usage.update(rusage_dict(rusage))
            cg = box.state.pop("uml_cg", None)
            if cg is not None:
                # What the test left running (no PID namespace per test here: the cgroup
                # is what ends them), named before cg.remove() kills them.
                box.state["leftovers"] = describe_procs(p for p in cg.procs() if p != pid)
                try:
                    readings = cg.read()
                    box.usage.update(readings)
                    if readings.get("oom_kills"):
                        box.notes.append("uml: OOM-killed inside the guest (memory budget)")
                finally:
                    cg.remove()
                    if cg.leftover:
                        box.notes.append(f"uml: guest cgroup not removed: {', '.join(cg.leftover)}")
            # The guest's RAM ran out (no budget, or one above the guest's memory): the
            # kernel's global OOM killer is not charged to the test's cgroup. Tests of one
            # guest run one at a time, so the guest-wide counter's rise is this test's.
            before = box.state.pop("uml_oom_before", None)
            global_kills = _guest_oom_kills() - before if before is not None else 0
            if global_kills > 0 and not box.usage.get("oom_kills"):
                box.usage["oom_kills"] = global_kills
                box.notes.append("uml: OOM-killed by the guest kernel (the guest's RAM ran out)")
            d: Path | None = box.state.get("uml_dir")
            if d is not None:
                with contextlib.suppress(OSError):
                    changes, used = overlay_changes.scan_upper(
                        d / "upper",
                        [*TMP_DIRS, *box.state.get("uml_created", [])],
                        self.info["hostroot"],
                    )
                    box.state["changes"] = changes
                    box.usage["disk_bytes"] = used
                    if box.spec.keep:
                        box.state["kept"] = keep.collect([(str(d / "upper"), "/")], box.spec.keep, self.info["hostroot"])
        finally:
            self._learnt(box)
            self._cleanup(box)
            kind = box.state.pop("uml_net", None)
            if kind is not None:
                self._check_netns(kind)

    def _learnt(self, box: Box) -> None:
        """The pages the learning child wrote, if it ran its test to the end; else the
        next child learns."""
        fd = box.state.pop("uml_learn", -1)
        if fd < 0:
            return
        self._learning = -1
        try:
            data = os.pread(fd, 1 << 24, 0)
        except OSError:
            data = b""
        finally:
            os.close(fd)
        if not data:
            return  # its test did not pass: the next child records
        self._learn_tries -= 1
        why = prefault.unsupported()
        if why:
            self._learn_tries = 0
            print(f"pytest-isolate: uml: pages not copied ahead: {why}", file=sys.stderr)
            return
        self._prefault = Prefault.of(prefault.decode(data))

    def _cleanup(self, box: Box) -> None:
        from pytest_isolate.facets import mounts

        d: Path | None = box.state.pop("uml_dir", None)
        if d is None:
            return
        mounts.detach_tree(d)
        with contextlib.suppress(OSError):
            d.rmdir()


# --------------------------------------------------------------------------- by hand


def _main(argv: list[str] | None = None) -> int:
    import argparse

    from pytest_isolate.spec import parse_size

    ap = argparse.ArgumentParser(
        prog="python -m pytest_isolate.tiers.uml",
        description="Boot one UML guest with an execnet gateway and run code in it.",
    )
    ap.add_argument(
        "-c",
        dest="code",
        default=None,
        help="Python code to run in the guest (its stdout is printed)",
    )
    ap.add_argument("--kernel", default=None)
    ap.add_argument("--memory", default="256M")
    ap.add_argument("--python", default=sys.executable)
    ap.add_argument(
        "-v", "--verbose", action="store_true", help="print the guest console at the end"
    )
    ap.add_argument("--keep", action="store_true", help="keep the work dir")
    a = ap.parse_args(argv)
    import execnet

    why = availability(a.kernel)
    if why:
        print(why, file=sys.stderr)
        return 2
    workdir = Path(tempfile.mkdtemp(prefix="pytest-isolate-uml-"))
    t0 = time.perf_counter()
    gw = None
    try:
        spec = gateway_spec(
            UmlOptions(kernel=a.kernel, memory=parse_size(a.memory)),
            workdir / "g",
            a.python,
            debug=a.verbose,
        )
        gw = execnet.makegateway(spec)
        t1 = time.perf_counter()
        code = a.code or "import os, sys; print(' '.join(os.uname()), sys.version.split()[0])"
        ch = gw.remote_exec(
            "import sys, io\nbuf = io.StringIO()\nsys.stdout = buf\n"
            f"exec(compile({code!r}, '<guest>', 'exec'))\nsys.stdout = sys.__stdout__\nchannel.send(buf.getvalue())"
        )
        out = ch.receive(300)
        t2 = time.perf_counter()
        sys.stdout.write(out)
        print(f"[gateway up in {t1 - t0:.2f} s, code ran in {t2 - t1:.2f} s]", file=sys.stderr)
    except Exception as e:  # noqa: BLE001
        print(f"failed: {e}\n{console_tail(workdir / 'g')}", file=sys.stderr)
        return 1
    finally:
        if gw is not None:
            with contextlib.suppress(Exception):
                gw.exit()
                gw.join(timeout=10)
        if a.verbose:
            print(console_tail(workdir / "g", 200), file=sys.stderr)
        if a.keep:
            print(f"work dir kept: {workdir}", file=sys.stderr)
        else:
            close_guest(workdir / "g")
            shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(_main())


__all__ = [
    "UmlTier",
    "guest_address",
]

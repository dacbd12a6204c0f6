"""chroot, jail and zone driven directly (prepare → spawn → wait → finish), on the real kernel.

Each ``body`` runs inside the sandbox as the test would and returns a dict of what it saw.
Everything a body uses is imported here, at module level: the forked child must not
need to import anything (in the unprivileged test it could not even read the interpreter's
directory under /root).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import signal
import socket
import sys
import time
from pathlib import Path

import pytest

from pytest_isolate import child, wire
from pytest_isolate.facets import caps, cgroup_host, mounts, net
from pytest_isolate.facets import namespaces as ns
from pytest_isolate.tiers.chroot import ChrootTier
from pytest_isolate.tiers.jail import JailTier
from pytest_isolate.tiers.zone import ZoneTier

ALL = [ChrootTier, JailTier, ZoneTier]
NS_TIERS = [JailTier, ZoneTier]
ids = [t.name for t in ALL]
ns_ids = [t.name for t in NS_TIERS]

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="these tests drive tiers as root (and drop to nobody themselves)")


def _ls_pids() -> list[int]:
    return sorted(int(p) for p in os.listdir("/proc") if p.isdigit())


@pytest.mark.parametrize("cls", ALL, ids=ids)
def test_availability(cls):
    assert cls.availability() is None


@pytest.mark.parametrize("cls", ALL, ids=ids)
def test_own_root_basetemp_kept(harness, cls):
    tag = f"pytest-isolate-{harness.run_id}"
    victim = Path(f"/etc/{tag}-victim")
    victim.write_text("host file\n")
    try:

        def body(box):
            Path(f"/etc/{tag}-new").write_text("inside\n")
            Path(f"/{tag}-top").write_text("top\n")
            Path(f"/etc/{tag}-victim").unlink()
            (harness.ctx.basetemp / "kept.txt").write_text("kept\n")
            Path("/tmp/scratchfile").write_text("tmp is not a change\n")
            return {
                "sees_new": Path(f"/etc/{tag}-new").exists(),
                "sees_victim": Path(f"/etc/{tag}-victim").exists(),
                "cwd": os.getcwd(),
            }

        out = harness.run(cls, body)
        res = out.result()
        assert out.status == 0
        assert res == {"sees_new": True, "sees_victim": False, "cwd": os.getcwd()}
        # Nothing reached the host but basetemp.
        assert not Path(f"/etc/{tag}-new").exists()
        assert not Path(f"/{tag}-top").exists()
        assert victim.read_text() == "host file\n"
        assert (harness.ctx.basetemp / "kept.txt").read_text() == "kept\n"
        # ... and the report says what the test did to the system.
        changes = out.box.state["changes"]
        assert f"created /etc/{tag}-new" in changes
        assert f"created /{tag}-top" in changes
        assert f"deleted /etc/{tag}-victim" in changes
        assert not any("/tmp/" in c or "kept.txt" in c for c in changes), changes
        assert out.box.usage["disk_bytes"] > 0
    finally:
        victim.unlink()


@pytest.mark.parametrize("cls", NS_TIERS, ids=ns_ids)
def test_process_view(harness, cls):
    def body(box):
        with socket.socket() as srv:
            srv.bind(("127.0.0.1", 0))
            srv.listen()
            with socket.create_connection(srv.getsockname()) as c:
                c.sendall(b"lo works")
                conn, _ = srv.accept()
                got = conn.recv(100)
                conn.close()
        return {
            "hostname": socket.gethostname(),
            "resolves": socket.gethostbyname(socket.gethostname()),
            "pid": os.getpid(),
            "ppid": os.getppid(),
            "pids": _ls_pids(),
            "links": sorted(os.listdir("/sys/class/net")),
            "lo": got.decode(),
            "netns_differs": ns.ns_id("net") != box.state.get("host_net"),
        }

    out = harness.run(cls, body)
    res = out.result()
    assert res["hostname"] == out.box.hostname
    assert res["resolves"] == "127.0.1.1"
    assert res["pid"] == 2  # the init is 1, the runner its first child
    assert res["ppid"] == 1
    assert res["pids"] == [1, 2]
    assert res["links"] == ["lo"]
    assert res["lo"] == "lo works"
    assert out.exit_signal() is None
    assert out.of("exit")[0]["status"] == 0
    assert out.of("leftover") == []


@pytest.mark.parametrize("cls", NS_TIERS, ids=ns_ids)
def test_daemon_killed_and_reported(harness, cls):
    ticks = harness.ctx.basetemp / f"ticks-{cls.name}"

    def body(box):
        if os.fork() == 0:
            os.setsid()
            if os.fork() == 0:
                ctypes.CDLL(None).prctl(15, b"isolate-daemon", 0, 0, 0)
                while True:
                    with open(ticks, "a") as f:
                        f.write(".")
                    time.sleep(0.01)
            os._exit(0)
        # Until the daemon has ticked: a fixed wait was too short on a loaded host (CI
        # with another suite beside it), and the daemon then never wrote at all.
        end = time.monotonic() + 30
        while not os.path.exists(ticks) and time.monotonic() < end:
            time.sleep(0.01)
        return {"pids": _ls_pids()}

    out = harness.run(cls, body)
    res = out.result()
    assert len(res["pids"]) >= 3
    (left,) = out.of("leftover")
    assert len(left["procs"]) == 1 and left["procs"][0]["pid"] > 2
    assert "python" in left["procs"][0]["cmdline"]
    # Dead: it stops ticking, and no such process exists on the host.
    n = len(ticks.read_text())
    time.sleep(0.1)
    assert len(ticks.read_text()) == n
    comms = []
    for p in os.listdir("/proc"):
        with contextlib.suppress(OSError):
            comms.append(Path(f"/proc/{p}/comm").read_text().strip())
    assert "isolate-daemon" not in comms


@pytest.mark.parametrize("cls", NS_TIERS, ids=ns_ids)
def test_sigterm_to_self_kills_the_runner(harness, cls):
    def body(box):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)
        return {"survived": True}

    out = harness.run(cls, body)
    assert out.exit_signal() == signal.SIGTERM
    assert out.of("result") == []
    assert os.WIFEXITED(out.status) and os.WEXITSTATUS(out.status) == 0  # the init's own


@pytest.mark.parametrize("cls", NS_TIERS, ids=ns_ids)
def test_runner_that_ended_is_not_waited_for(harness, cls):
    """The runner's last frame and its end byte release the sandbox; its teardown (here
    a runner that would linger for a minute) happens after the host side has its answer."""

    def body(box):
        ctypes.CDLL(None).prctl(15, b"isolate-linger", 0, 0, 0)
        wire.send(box.result_fd, {"t": "result", "data": {"ran": True}})
        os.write(child.end_notify_fd, b"e")
        time.sleep(60)
        return {}

    out = harness.run(cls, body, timeout=20)
    assert out.result() == {"ran": True}
    assert [m["t"] for m in out.messages][-1] == "released"
    (exit_msg,) = out.of("exit")
    assert exit_msg["status"] == 0  # the runner ended; nothing killed it before its end
    assert out.of("leftover") == []  # the exiting runner is not something the test left
    assert os.WIFEXITED(out.status) and os.WEXITSTATUS(out.status) == 0  # not the harness's kill
    comms = []
    for p in os.listdir("/proc"):
        with contextlib.suppress(OSError):
            comms.append(Path(f"/proc/{p}/comm").read_text().strip())
    assert "isolate-linger" not in comms  # and it is gone with its sandbox


@pytest.mark.parametrize("cls", NS_TIERS, ids=ns_ids)
def test_kill_on_timeout_takes_everything(harness, cls):
    def body(box):
        if os.fork() == 0:
            time.sleep(60)
        time.sleep(60)
        return {}

    out = harness.run(cls, body, timeout=0.5)
    assert os.WIFSIGNALED(out.status) and os.WTERMSIG(out.status) == signal.SIGKILL
    assert out.of("result") == []


def _escape_body(proof: Path):
    """The classic: chroot into a subdir while keeping the cwd outside, climb, chroot '.'."""

    def body(box):
        os.makedirs("/escape-dir", exist_ok=True)
        fd = os.open("/", os.O_RDONLY)
        os.chroot("/escape-dir")
        os.fchdir(fd)
        for _ in range(64):
            os.chdir("..")
        os.chroot(".")
        proof.write_text("written from inside the sandbox\n")
        return {"root_entries": len(os.listdir("/"))}

    return body


def test_chroot_double_chroot_escape_works(harness):
    proof = harness.rundir / "escape-proof"
    assert not proof.exists()
    out = harness.run(ChrootTier, _escape_body(proof))
    out.result()
    try:
        # The write reached the host: the chroot tier does not stop root (as documented).
        assert proof.read_text() == "written from inside the sandbox\n"
    finally:
        proof.unlink(missing_ok=True)


@pytest.mark.parametrize("cls", NS_TIERS, ids=ns_ids)
def test_double_chroot_stays_inside(harness, cls):
    proof = harness.rundir / "escape-proof"
    out = harness.run(cls, _escape_body(proof))
    # CAP_SYS_CHROOT is kept (zone too), so the climb runs, but it ends at the sandbox's
    # own root: after pivot_root the old root is detached, there is nothing above.
    out.result()
    assert not proof.exists()
    assert "created /escape-dir/" in out.box.state["changes"]


def test_jail_kernel_knobs_are_read_only(harness):
    """A stray write to a host kernel knob (sysctl -w, echo > /proc/sysrq-trigger) stops
    at EROFS in a jail; nothing is written even where the open would succeed."""

    def body(box):
        res = {}
        for path in ("/proc/sys/kernel/core_pattern", "/proc/sys/vm/drop_caches", "/proc/sysrq-trigger"):
            try:
                os.close(os.open(path, os.O_WRONLY))
                res[path] = "OPENED"
            except OSError as e:
                res[path] = errno.errorcode[e.errno]
        return res

    res = harness.run(JailTier, body).result()
    assert res["/proc/sys/kernel/core_pattern"] == "EROFS"
    assert res["/proc/sys/vm/drop_caches"] == "EROFS"
    assert res["/proc/sysrq-trigger"] in ("EROFS", "ENOENT"), res  # absent without CONFIG_MAGIC_SYSRQ


def test_zone_confinement(harness):
    def body(box):
        res: dict = {"dev": sorted(os.listdir("/dev"))}
        for path in ("/proc/sys/kernel/core_pattern", "/proc/sysrq-trigger"):
            try:
                with open(path, "w") as f:
                    f.write("x")
                res[path] = "WRITABLE"
            except OSError as e:
                res[path] = errno.errorcode[e.errno]
        res["kmsg"] = Path("/proc/kmsg").read_bytes()[:10].decode(errors="replace")
        try:
            socket.socket(socket.AF_PACKET, socket.SOCK_RAW).close()
            res["raw"] = "OK"
        except OSError as e:
            res["raw"] = errno.errorcode[e.errno]
        try:
            mounts.mount("tmpfs", "/mnt", "tmpfs")
            res["mount"] = "OK"
        except OSError as e:
            res["mount"] = errno.errorcode[e.errno]
        try:
            ns.unshare(ns.CLONE_NEWNS)
            res["unshare"] = "OK"
        except OSError as e:
            res["unshare"] = errno.errorcode[e.errno]
        res["sys_admin"] = caps.has_cap(caps.CAP_SYS_ADMIN)
        res["bounding_net_raw"] = caps.in_bounding_set(caps.CAP_NET_RAW)
        res["bounding_chown"] = caps.in_bounding_set(caps.CAP_CHOWN)
        res["nnp"] = caps.get_no_new_privs()
        res["session_leader"] = os.getsid(0) == os.getpid()
        res["cgroup"] = Path("/proc/self/cgroup").read_text()
        res["pts"] = os.listdir("/dev/pts")
        with open("/dev/null", "w") as f:
            f.write("ok")
        res["urandom"] = len(Path("/dev/urandom").open("rb").read(8))
        return res

    out = harness.run(ZoneTier, body, pids=64, memory=256 << 20)
    res = out.result()
    assert res["dev"] == sorted(
        ["null", "zero", "full", "random", "urandom", "tty", "pts", "ptmx", "shm", "mqueue"]
        + ["fd", "stdin", "stdout", "stderr", "core"]
    )
    assert res["/proc/sys/kernel/core_pattern"] == "EROFS"
    assert res["/proc/sysrq-trigger"] != "WRITABLE"  # absent on kernels without SYSRQ
    assert res["kmsg"] == ""
    assert res["raw"] == "EPERM"
    assert res["mount"] == "EPERM"
    assert res["unshare"] == "EPERM"
    assert res["sys_admin"] is False
    assert res["bounding_net_raw"] is False
    assert res["bounding_chown"] is True
    assert res["nnp"] is True
    assert res["session_leader"] is True
    assert f"pytest-isolate-{harness.run_id}" in res["cgroup"]
    assert res["urandom"] == 8
    assert out.box.usage["peak_memory"] > 0
    assert "zone_cg" not in out.box.state


def test_zone_pids_limit(harness):
    def body(box):
        kids, err = [], None
        for _ in range(40):
            try:
                pid = os.fork()
            except OSError as e:
                err = errno.errorcode[e.errno]
                break
            if pid == 0:
                time.sleep(30)
                os._exit(0)
            kids.append(pid)
        return {"forked": len(kids), "err": err}

    out = harness.run(ZoneTier, body, pids=8)
    res = out.result()
    assert res["err"] == "EAGAIN"
    assert res["forked"] < 8
    assert out.box.usage["pids_max_hits"] >= 1
    (left,) = out.of("leftover")
    assert len(left["procs"]) == res["forked"]


def test_jail_keeps_capabilities_but_net_admin(harness):
    def body(box):
        return {
            "net_admin": caps.in_bounding_set(caps.CAP_NET_ADMIN),
            "sys_admin": caps.has_cap(caps.CAP_SYS_ADMIN),
            "nnp": caps.get_no_new_privs(),
        }

    res = harness.run(JailTier, body).result()
    assert res == {"net_admin": False, "sys_admin": True, "nnp": False}


def test_network_ip_between_two_jails(harness):
    assert net.ip_available() is None
    switch = net.Switch.create(harness.run_id)
    try:
        harness.ctx.switch_netns = switch.path
        tier = harness.tier(JailTier)
        # Jail A: listen on its address, say so, answer one connection.
        r, w = os.pipe()
        from pytest_isolate.spec import IsolationSpec
        from pytest_isolate.tiers.base import Box

        harness.index += 1
        a = Box("a", IsolationSpec(tier="jail", network="ip"), harness.index, "jail-a", w)
        a_addr, _ = net.address_for(0, a.index)

        def serve():
            with socket.socket() as s:
                s.bind((a_addr, 5555))
                s.listen()
                wire.send(w, {"t": "ready"})
                conn, peer = s.accept()
                data = conn.recv(100)
                conn.sendall(b"pong")
                conn.close()
            wire.send(w, {"t": "result", "data": {"got": data.decode(), "peer": peer[0]}})
            os._exit(0)

        tier.prepare(a)
        pid_a = tier.spawn(a, serve)
        os.close(w)
        assert wire.recv(r) == {"t": "ready"}

        def client(box):
            addr, prefix = net.address_for(0, box.index)
            with socket.create_connection((a_addr, 5555), timeout=5) as c:
                c.sendall(b"ping")
                reply = c.recv(100)
            return {"reply": reply.decode(), "links": sorted(os.listdir("/sys/class/net")), "mine": addr}

        out = harness.run(JailTier, client, network="ip")
        res = out.result()
        assert res["reply"] == "pong"
        assert res["links"] == ["eth0", "lo"]
        served = None
        while served is None:
            m = wire.recv(r)
            if m["t"] == "result":
                served = m["data"]
        os.close(r)
        _, st, ru = os.wait4(pid_a, 0)
        tier.finish(a, pid_a, st, ru)
        assert served == {"got": "ping", "peer": res["mine"]}
    finally:
        switch.close()
        net.sweep(harness.run_id)


def test_unprivileged_jail_in_user_namespace(harness):
    """uid 65534: the jail runs in a user namespace; a zone says exactly why it cannot."""
    tag = f"pytest-isolate-{harness.run_id}"

    def body(box):
        Path(f"/etc/{tag}-new").write_text("inside\n")  # /etc's layer root is the user's inside
        try:
            Path(f"/usr/lib/{tag}-new").write_text("inside\n")
            usr_lib = 0
        except OSError as exc:
            usr_lib = exc.errno  # as in-process: the user may not write there
        (harness.ctx.basetemp / "nobody.txt").write_text("kept\n")
        return {
            "usr_lib": usr_lib,
            "uid": os.getuid(),
            "uid_map": Path("/proc/self/uid_map").read_text().split(),
            "pid": os.getpid(),
            "hostname": socket.gethostname(),
            "links": sorted(os.listdir("/sys/class/net")),
        }

    def as_nobody():
        harness.tiers.clear()  # tiers decide their mode from the euid at construction
        cgroup_host._HOST = None  # the probe cached as root would claim cgroups are usable
        avail = JailTier.availability()
        out = harness.run(JailTier, body)
        harness.close()
        return {
            "euid": os.geteuid(),
            "avail": avail,
            "zone": ZoneTier.availability(),
            "chroot": ChrootTier.availability(),
            "res": out.result(),
            "changes": out.box.state.get("changes"),
            "status": out.status,
        }

    got = harness.as_nobody(as_nobody, [harness.rundir])
    assert got["euid"] == 65534
    assert got["avail"] is None
    assert got["res"] == {
        "usr_lib": 13,
        "uid": 65534,  # the user, as in-process (its own user namespace maps it)
        "uid_map": ["65534", "0", "1"],
        "pid": 2,
        "hostname": got["res"]["hostname"],
        "links": ["lo"],
    }
    assert got["res"]["hostname"].startswith("isolate-")
    assert f"created /etc/{tag}-new" in got["changes"]
    assert not Path(f"/etc/{tag}-new").exists()
    kept = harness.ctx.basetemp / "nobody.txt"
    assert kept.read_text() == "kept\n" and kept.stat().st_uid == 65534
    assert "chroot tier needs root" in got["chroot"]
    # This host's cgroups are v1 controllers owned by root: no group for uid 65534.
    assert got["zone"] and "cgroup" in got["zone"]


@pytest.mark.parametrize("cls", ALL, ids=ids)
def test_prepared_rootfs(harness, cls, tmp_path):
    """spec.rootfs: the root is the prepared tree; the running Python, its sys.path and
    the rootdir are bound read-only into it so the test still imports."""
    rootfs = tmp_path / "rootfs"
    for d in ("etc", "tmp", "proc", "sys", "dev", "usr/bin"):
        (rootfs / d).mkdir(parents=True)
    (rootfs / "etc" / "os-release").write_text("ID=isolate-test\n")
    (rootfs / "etc" / "hosts").write_text("127.0.0.1 localhost\n")

    def body(box):
        import_ok = True
        try:
            import email.mime.text  # noqa: F401 - imported fresh from the bound stdlib
        except ImportError:
            import_ok = False
        try:
            Path(sys.prefix, "isolate-write-test").write_text("x")
            prefix_writable = True
        except OSError:
            prefix_writable = False
        return {
            "os_release": Path("/etc/os-release").read_text(),
            "has_bin_sh": Path("/bin/sh").exists(),
            "prefix": Path(sys.prefix).is_dir(),
            "import_ok": import_ok,
            "prefix_writable": prefix_writable,
            "cwd": os.getcwd(),
        }

    res = harness.run(cls, body, rootfs=str(rootfs)).result()
    assert res["os_release"] == "ID=isolate-test\n"
    assert res["has_bin_sh"] is False
    assert res["prefix"] and res["import_ok"]
    assert res["prefix_writable"] is False
    assert Path(res["cwd"]).is_dir()

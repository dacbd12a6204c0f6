"""End-to-end tests of the namespace tiers (`chroot`, `jail`, `zone`) through the plugin.

One inner pytest run per tier, shared by several outer tests (module-scoped fixtures):
the inner tests record what they saw as JSON files in their ``tmp_path`` (bound
read-write into every sandbox, so the files reach the host), and the outer tests compare
that with the host and with the run's JSON report.

Inner runs use ``--isolate-on-escape=warn``: the escape detector's mount tripwire
watches the whole host mount table, so a mount made by *another* run on this shared
machine while a test runs would otherwise fail that test. Escapes are not what this
module tests (tests/escapes/ does).
"""

from __future__ import annotations

import json
import os
import re
import socket
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest

from tests.outputs import records, section, seen, token

ESCAPE = "--isolate-on-escape=warn"
#: What the docs promise a zone's /dev holds (docs/tiers.md, `zone`), and the links
#: and mount points any Linux userland expects next to them.
ZONE_DEV_REQUIRED = {"null", "zero", "full", "random", "urandom", "tty", "ptmx", "pts", "shm"}
ZONE_DEV_ALLOWED = ZONE_DEV_REQUIRED | {"fd", "stdin", "stdout", "stderr", "core", "mqueue"}


# -- one run per tier ----------------------------------------------------------------
COMMON = '''
    import ctypes
    import errno
    import json
    import os
    import socket
    import time
    from pathlib import Path

    import pytest

    TOKEN = "{token}"
    pytestmark = pytest.mark.isolate("{tier}")


    def dump(tmp_path, name, data):
        (tmp_path / f"seen-{{name}}.json").write_text(json.dumps(data))


    def test_writes(tmp_path):
        Path("/etc/isolate-" + TOKEN).write_text("inside")
        Path("/isolate-" + TOKEN).write_text("inside")
        (tmp_path / ("kept-" + TOKEN)).write_text("kept")
        assert Path("/etc/isolate-" + TOKEN).read_text() == "inside"


    def test_fresh_root_next_test(tmp_path):
        # The previous test's writes stayed in its own throwaway layer.
        dump(tmp_path, "fresh", {{
            "etc": os.path.exists("/etc/isolate-" + TOKEN),
            "root": os.path.exists("/isolate-" + TOKEN),
        }})


    def test_view(tmp_path):
        pids = sorted(int(p) for p in os.listdir("/proc") if p.isdigit())
        name = socket.gethostname()
        try:
            resolved = socket.gethostbyname(name)
        except OSError as exc:
            resolved = repr(exc)
        dump(tmp_path, "view", {{
            "root_dev": os.stat("/").st_dev,
            "hostname": name,
            "resolved": resolved,
            "pid": os.getpid(),
            "pids": pids,
            "links": sorted(os.listdir("/sys/class/net")),
            "dev": sorted(os.listdir("/dev")),
        }})


    # An explicit id: pytest >= 9.2 replaces long string values by "label0" in the id.
    @pytest.mark.parametrize("label", [0], ids=["Upper Case_and.dots and a very long parameter that goes on " * 2])
    def test_long_Name(tmp_path, label):
        dump(tmp_path, "long", {{"hostname": socket.gethostname()}})
'''

JAIL_EXTRA = '''

    @pytest.mark.isolate(network="none")
    def test_network_none(tmp_path):
        dump(tmp_path, "netnone", {{"links": sorted(os.listdir("/sys/class/net"))}})
'''

ZONE_EXTRA = '''

    def test_mount_eperm(tmp_path):
        libc = ctypes.CDLL(None, use_errno=True)
        rc = libc.mount(b"none", str(tmp_path).encode(), b"tmpfs", 0, None)
        dump(tmp_path, "mount", {{"rc": rc, "errno": ctypes.get_errno()}})
        assert rc == -1 and ctypes.get_errno() == errno.EPERM


    @pytest.mark.isolate(memory="64M")
    def test_memory_bomb():
        x = bytearray(400 << 20)
        for i in range(0, len(x), 4096):
            x[i] = 1


    def test_after_memory_bomb():
        pass


    @pytest.mark.isolate(pids=16)
    def test_fork_bomb(tmp_path):
        # Bounded: at most 64 children, each only sleeps, all killed below.
        kids, refused = [], None
        try:
            for _ in range(64):
                try:
                    pid = os.fork()
                except BlockingIOError as exc:
                    refused = exc.errno
                    break
                if pid == 0:
                    time.sleep(60)
                    os._exit(0)
                kids.append(pid)
        finally:
            for pid in kids:
                os.kill(pid, 9)
                os.waitpid(pid, 0)
        dump(tmp_path, "forkbomb", {{"forked": len(kids), "refused": refused}})


    def test_after_fork_bomb():
        pass
'''


def _suite(tier: str, tok: str) -> str:
    extra = {"jail": JAIL_EXTRA, "zone": ZONE_EXTRA}.get(tier, "")
    return (COMMON + extra).replace("{tier}", tier).replace("{token}", tok).replace("{{", "{").replace("}}", "}")


def _tier_run(tier: str, tmp_path_factory: pytest.TempPathFactory, h: Any) -> dict[str, Any]:
    path = tmp_path_factory.mktemp(f"tier-{tier}")
    tok = token()
    h.write_files(path, {f"test_{tier}_e2e.py": _suite(tier, tok)})
    result = h.run_pytest(path, ESCAPE, "-rA", "--isolate-report=r.json", timeout=120)
    return {"tier": tier, "path": path, "token": tok, "result": result, "records": records(path / "r.json")}


@pytest.fixture(scope="module")
def chroot_run(tmp_path_factory: pytest.TempPathFactory, h: Any) -> dict[str, Any]:
    return _tier_run("chroot", tmp_path_factory, h)


@pytest.fixture(scope="module")
def jail_run(tmp_path_factory: pytest.TempPathFactory, h: Any) -> dict[str, Any]:
    return _tier_run("jail", tmp_path_factory, h)


@pytest.fixture(scope="module")
def zone_run(tmp_path_factory: pytest.TempPathFactory, h: Any) -> dict[str, Any]:
    return _tier_run("zone", tmp_path_factory, h)


@pytest.fixture(params=["chroot", "jail", "zone"])
def tier_run(request: pytest.FixtureRequest) -> dict[str, Any]:
    """Each tier's run (one inner pytest per tier, shared by the tests of this module)."""
    return request.getfixturevalue(f"{request.param}_run")


@pytest.fixture(params=["jail", "zone"])
def ns_run(request: pytest.FixtureRequest) -> dict[str, Any]:
    """The runs of the tiers with namespaces of their own."""
    return request.getfixturevalue(f"{request.param}_run")


def _nodeid(run: dict[str, Any], name: str) -> str:
    return f"test_{run['tier']}_e2e.py::{name}"


def test_tier_run_outcomes(tier_run: dict[str, Any]) -> None:
    result, tier = tier_run["result"], tier_run["tier"]
    if tier == "zone":
        result.assert_outcomes(passed=7, failed=2)
    else:
        result.assert_outcomes(passed=5 if tier == "jail" else 4)
    assert {r["tier"] for r in tier_run["records"].values()} == {tier}


def test_writes_outside_tmp_path_stay_in_the_sandbox(tier_run: dict[str, Any]) -> None:
    tok, path = tier_run["token"], tier_run["path"]
    assert not os.path.exists(f"/etc/isolate-{tok}")
    assert not os.path.exists(f"/isolate-{tok}")
    kept = list((path / "basetemp").rglob(f"kept-{tok}"))
    assert len(kept) == 1 and kept[0].read_text() == "kept"
    # ... and the next test starts from a fresh root.
    assert seen(path, "fresh") == {"etc": False, "root": False}


def test_changes_list_what_was_written_outside_tmp_path(tier_run: dict[str, Any]) -> None:
    """The JSON record's ``changes`` lists the writes to the root, not tmp_path."""
    tok = tier_run["token"]
    rec = tier_run["records"][_nodeid(tier_run, "test_writes")]
    assert f"created /etc/isolate-{tok}" in rec["changes"]
    assert f"created /isolate-{tok}" in rec["changes"]
    assert not [c for c in rec["changes"] if f"kept-{tok}" in c], rec["changes"]
    assert tier_run["records"][_nodeid(tier_run, "test_view")]["changes"] == []


def test_own_root(tier_run: dict[str, Any]) -> None:
    view = seen(tier_run["path"], "view")
    assert view["root_dev"] != os.stat("/").st_dev, "the test's / is the host's /"


def test_chroot_keeps_host_namespaces(chroot_run: dict[str, Any]) -> None:
    """What docs/tiers.md says chroot does not confine: hostname, processes, network."""
    view = seen(chroot_run["path"], "view")
    assert view["hostname"] == socket.gethostname()
    # The host's interfaces (compared loosely: other runs may add or remove some meanwhile).
    assert (set(view["links"]) - {"lo"}) & set(os.listdir("/sys/class/net")), view["links"]
    assert view["pid"] > 2 and len(view["pids"]) > 5


def test_namespaces_view(ns_run: dict[str, Any]) -> None:
    """Own hostname, PID namespace and network."""
    view = seen(ns_run["path"], "view")
    assert view["hostname"] == "test-view"
    assert view["resolved"].startswith("127."), view["resolved"]
    assert view["pid"] <= 3, view
    # Only the namespace's processes: its init (PID 1), the runner, nothing of the host.
    assert 1 in view["pids"] and view["pid"] in view["pids"]
    assert max(view["pids"]) <= 5, view["pids"]
    assert view["links"] == ["lo"]


def test_hostname_is_short_form_of_the_test_id(ns_run: dict[str, Any]) -> None:
    name = seen(ns_run["path"], "long")["hostname"]
    assert len(name) <= 63
    assert re.fullmatch(r"[a-z0-9][a-z0-9-]*[a-z0-9]", name), name
    assert name.startswith("test-long-name-upper-case-and-dots-and-a-very-long"), name


def test_jail_network_none_only_lo(jail_run: dict[str, Any]) -> None:
    assert seen(jail_run["path"], "netnone") == {"links": ["lo"]}
    rec = jail_run["records"][_nodeid(jail_run, "test_network_none")]
    assert rec["spec"]["network"] == "none" and rec["outcome"] == "passed"


def test_zone_minimal_dev(zone_run: dict[str, Any]) -> None:
    dev = set(seen(zone_run["path"], "view")["dev"])
    assert ZONE_DEV_REQUIRED <= dev, ZONE_DEV_REQUIRED - dev
    assert dev <= ZONE_DEV_ALLOWED, dev - ZONE_DEV_ALLOWED


def test_zone_mount_is_eperm(zone_run: dict[str, Any]) -> None:
    assert seen(zone_run["path"], "mount") == {"rc": -1, "errno": 1}
    assert zone_run["records"][_nodeid(zone_run, "test_mount_eperm")]["outcome"] == "passed"


def test_zone_memory_bomb_is_oom_killed(zone_run: dict[str, Any]) -> None:
    result = zone_run["result"]
    result.stdout.fnmatch_lines(
        [
            "*test_zone_e2e.py::test_memory_bomb [[]zone[]] (enforced): memory budget 64 MiB exceeded: *OOM-killed",
            "FAILED test_zone_e2e.py::test_memory_bomb - zone: memory budget 64 MiB*",
        ]
    )
    text = section(result, "test_memory_bomb")
    assert re.search(r"memory budget 64 MiB exceeded: .*OOM-killed", text), text
    rec = zone_run["records"][_nodeid(zone_run, "test_memory_bomb")]
    assert rec["signal"] == "SIGKILL" and rec["crashed"] is True
    assert rec["usage"]["oom_kills"] >= 1
    assert [(o["budget"], o["kind"], o["enforced"]) for o in rec["overuse"]] == [("memory", "reached", True)]
    assert rec["usage"]["peak_memory"] <= 64 << 20
    result.stdout.fnmatch_lines(["PASSED test_zone_e2e.py::test_after_memory_bomb"])


def test_zone_fork_bomb_stops_at_pids(zone_run: dict[str, Any]) -> None:
    result = zone_run["result"]
    bomb = seen(zone_run["path"], "forkbomb")
    assert bomb["refused"] == 11  # EAGAIN
    assert bomb["forked"] < 16
    result.stdout.fnmatch_lines(
        [
            "*test_zone_e2e.py::test_fork_bomb [[]zone[]] (enforced): pids budget 16 reached: fork failed *",
            "FAILED test_zone_e2e.py::test_fork_bomb - zone: pids budget 16 reached*",
        ]
    )
    rec = zone_run["records"][_nodeid(zone_run, "test_fork_bomb")]
    assert rec["usage"]["pids_max_hits"] >= 1
    assert rec["usage"]["peak_pids"] <= 16
    # The run goes on.
    result.stdout.fnmatch_lines(["PASSED test_zone_e2e.py::test_after_fork_bomb"])


# -- network="ip": two jail tests in parallel reach each other --------------------------
NET = '''
    import fcntl
    import json
    import os
    import socket
    import struct

    import pytest

    pytestmark = pytest.mark.isolate("jail", network="ip", timeout="30s")
    BCAST = "10.223.255.255"  # the broadcast address of the run's switch subnet
    PORT, UDP = 7777, 7778


    def my_addr():
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        return socket.inet_ntoa(fcntl.ioctl(s.fileno(), 0x8915, struct.pack("256s", b"eth0"))[20:24])


    def routes():
        with open("/proc/net/route") as f:
            return [line.split()[1] for line in f.readlines()[1:]]


    def test_server(tmp_path):
        me = my_addr()
        srv = socket.create_server((me, PORT))
        srv.settimeout(15)
        u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        u.bind(("", UDP))
        u.settimeout(15)
        _, peer = u.recvfrom(100)
        u.sendto(me.encode(), peer)
        conn, peer = srv.accept()
        assert conn.recv(5) == b"hello"
        conn.sendall(b"world")
        (tmp_path / "seen-server.json").write_text(json.dumps(
            {"me": me, "peer": peer[0], "links": sorted(os.listdir("/sys/class/net")), "routes": routes()}
        ))


    def test_client(tmp_path):
        u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        u.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
        u.settimeout(0.2)
        addr = None
        for _ in range(75):
            u.sendto(b"where", (BCAST, UDP))
            try:
                addr = u.recvfrom(100)[0].decode()
                break
            except TimeoutError:
                pass
        assert addr, "no answer to the broadcast"
        c = socket.create_connection((addr, PORT), timeout=5)
        c.sendall(b"hello")
        assert c.recv(5) == b"world"
        (tmp_path / "seen-client.json").write_text(json.dumps({"me": my_addr(), "server": addr}))
'''


@pytest.fixture(scope="module")
def net_run(tmp_path_factory: pytest.TempPathFactory, h: Any) -> tuple[Path, pytest.RunResult]:
    path = tmp_path_factory.mktemp("net-ip")
    h.write_files(path, {"test_net_e2e.py": NET})
    # xdist's load scheduling hands out fewer than two tests per worker round-robin:
    # the server and the client run at the same time, one on each worker.
    args = (ESCAPE, "-n", "2", "-rA", "--isolate-report=r.json")
    return path, h.run_pytest(path, *args, timeout=90)


def test_network_ip_jails_reach_each_other(net_run: tuple[Path, pytest.RunResult]) -> None:
    path, result = net_run
    result.assert_outcomes(passed=2)
    server, client = seen(path, "server"), seen(path, "client")
    assert server["peer"] == client["me"] != server["me"] == client["server"]
    for addr in (server["me"], client["me"]):
        assert addr.startswith("10.2"), addr
    # One veth on the switch, and no route out (only the switch's subnet).
    assert server["links"] == ["eth0", "lo"]
    assert "00000000" not in server["routes"], server["routes"]
    recs = records(path / "r.json")
    assert {r["spec"]["network"] for r in recs.values()} == {"ip"}


def test_network_ip_with_the_tier_from_the_command_line(pytester: pytest.Pytester) -> None:
    """The worker starts before collection has said whether any test wants the switch
    (``--isolate=jail`` here, ``network="ip"`` only on a marker); it gets the switch
    before the first test still."""
    pytester.makepyfile(
        """
        import fcntl
        import os
        import socket
        import struct

        import pytest

        @pytest.mark.isolate(network="ip")
        def test_has_an_address():
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            addr = socket.inet_ntoa(fcntl.ioctl(s.fileno(), 0x8915, struct.pack("256s", b"eth0"))[20:24])
            assert addr.startswith("10.2"), addr

        def test_loopback_only():
            assert os.listdir("/sys/class/net") == ["lo"]
        """
    )
    result = pytester.runpytest_subprocess("--isolate=jail", ESCAPE, "-rA")
    result.assert_outcomes(passed=2)


def test_xdist_loadgroup(pytester: pytest.Pytester) -> None:
    """xdist_group is how users pin tests that talk to each other to separate workers."""
    pytester.makepyfile(
        """
        import pytest

        @pytest.mark.isolate("jail")
        @pytest.mark.xdist_group("g")
        def test_grouped():
            pass
        """
    )
    result = pytester.runpytest_subprocess("-n", "1", "--dist=loadgroup", "-rA")
    result.assert_outcomes(passed=1)


# -- rootfs=PATH: a prepared lower layer -------------------------------------------------
ROOTFS_SUITE = '''
    import json
    import os
    import sys
    from pathlib import Path

    import pytest

    ROOTFS = "{rootfs}"


    @pytest.mark.parametrize(
        "tier", [pytest.param(t, marks=pytest.mark.isolate(t, rootfs=ROOTFS)) for t in ("chroot", "jail", "zone")]
    )
    def test_rootfs(tier, tmp_path):
        marker = Path("/etc/isolate-rootfs-marker")
        Path("/etc/written-in-rootfs").write_text("x")
        (tmp_path / f"seen-rootfs-{tier}.json").write_text(json.dumps({
            "marker": marker.read_text() if marker.exists() else None,
            "bin_sh": os.path.exists("/bin/sh"),
            "top": sorted(os.listdir("/")),
            "prefix": os.path.isdir(sys.prefix),
        }))
'''


@pytest.fixture(scope="module")
def rootfs_run(tmp_path_factory: pytest.TempPathFactory, h: Any) -> tuple[Path, Path, str, pytest.RunResult]:
    """A tiny prepared root: a few dirs, /etc/hosts, a marker file. The interpreter, its
    sys.path, the rootdir and basetemp are bound in by the tier (mounts.needed_binds)."""
    base = tmp_path_factory.mktemp("rootfs")
    rootfs = base / "rootfs"
    for d in ("etc", "tmp", "var/tmp", "proc", "sys", "dev", "root", "usr"):
        (rootfs / d).mkdir(parents=True)
    tok = token()
    (rootfs / "etc" / "isolate-rootfs-marker").write_text(tok)
    (rootfs / "etc" / "hosts").write_text("127.0.0.1 localhost\n")
    path = base / "suite"
    path.mkdir()
    h.write_files(path, {"test_rootfs_e2e.py": ROOTFS_SUITE.replace("{rootfs}", str(rootfs))})
    result = h.run_pytest(path, ESCAPE, "-rA", "--isolate-report=r.json", timeout=90)
    return path, rootfs, tok, result


@pytest.mark.parametrize("tier", ["chroot", "jail", "zone"])
def test_rootfs_is_the_lower_layer(rootfs_run: tuple[Path, Path, str, pytest.RunResult], tier: str) -> None:
    path, rootfs, tok, result = rootfs_run
    result.stdout.fnmatch_lines([f"PASSED test_rootfs_e2e.py::test_rootfs[[]{tier}[]]"])
    got = seen(path, f"rootfs-{tier}")
    assert got["marker"] == tok
    assert got["bin_sh"] is False  # the host's / is not there
    assert got["prefix"] is True  # the running interpreter is bound in
    assert {"etc", "proc", "dev", "tmp"} <= set(got["top"])
    # The prepared tree stays untouched: writes went to the throwaway upper layer.
    assert not (rootfs / "etc" / "written-in-rootfs").exists()
    rec = records(path / "r.json")[f"test_rootfs_e2e.py::test_rootfs[{tier}]"]
    assert rec["tier"] == tier and rec["spec"]["rootfs"] == str(rootfs)
    assert "created /etc/written-in-rootfs" in rec["changes"]


# -- a tier that cannot run here ----------------------------------------------------------
UML = """
    import pytest

    @pytest.mark.isolate("uml")
    def test_in_uml():
        pass

    def test_plain():
        pass
"""


@pytest.fixture(scope="module")
def uml_unavailable(tmp_path_factory: pytest.TempPathFactory, h: Any) -> dict[str, tuple[Path, pytest.RunResult]]:
    out = {}
    for mode in ("skip", "fail"):
        path = tmp_path_factory.mktemp(f"unavail-{mode}")
        h.write_files(path, {"test_unavail.py": UML})
        args = ("--isolate-uml-kernel=/nonexistent", f"--isolate-unavailable={mode}", "-rA")
        # Wide enough that the short summary shows the whole reason.
        result = h.run_pytest(path, *args, "--isolate-report=r.json", timeout=60, env={"COLUMNS": "250"})
        out[mode] = path, result
    return out


def test_unavailable_tier_skip_vs_fail(uml_unavailable: dict[str, tuple[Path, pytest.RunResult]]) -> None:
    line = "uml: kernel '/nonexistent' is not an executable file"
    path, skip = uml_unavailable["skip"]
    skip.assert_outcomes(skipped=1, passed=1)
    skip.stdout.fnmatch_lines([f"UNAVAILABLE {line}*", f"SKIPPED [[]1[]] test_unavail.py:*: {line}*"])
    assert records(path / "r.json")["test_unavail.py::test_in_uml"]["unavailable"].startswith(line)
    path, fail = uml_unavailable["fail"]
    fail.assert_outcomes(failed=1, passed=1)
    assert fail.ret == 1
    fail.stdout.fnmatch_lines([f"UNAVAILABLE {line}*", f"FAILED test_unavail.py::test_in_uml - {line}*"])
    rec = records(path / "r.json")["test_unavail.py::test_in_uml"]
    assert rec["outcome"] == "failed" and rec["unavailable"].startswith(line)
    # One line: the reason is the whole failure text.
    assert section(fail, "test_in_uml").strip().splitlines() == [rec["unavailable"]]


def test_unavailable_line_names_option_value_and_valid(
    uml_unavailable: dict[str, tuple[Path, pytest.RunResult]],
) -> None:
    _, fail = uml_unavailable["fail"]
    text = section(fail, "test_in_uml")
    assert "--isolate-uml-kernel" in text and "'/nonexistent'" in text
    assert re.search(r"valid|User-Mode Linux kernel|linux\.uml", text), text


# -- the escape detector and the rest of the host ------------------------------------------
IDLE = """
    import time

    import pytest


    @pytest.mark.isolate("jail", timeout="30s")
    def test_idle(tmp_path_factory):
        base = tmp_path_factory.getbasetemp()
        (base / "started").touch()
        end = time.monotonic() + 20
        while not (base / "go").exists() and time.monotonic() < end:
            time.sleep(0.02)
        time.sleep(0.3)
"""


def test_host_mount_by_someone_else_is_not_the_tests_escape(tmp_path: Path, h: Any) -> None:
    """Why the inner runs above use --isolate-on-escape=warn: on a shared machine another
    process mounting something while a jail test runs fails that test as "escaped"."""
    import ctypes
    import subprocess
    import sys
    import time

    h.write_files(tmp_path, {"test_idle.py": IDLE})
    env = {**os.environ, "PYTEST_ADDOPTS": h.FAST_ADDOPTS, "PY_COLORS": "0"}
    snap = h.LeakSnapshot(tmp_path)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    libc = ctypes.CDLL(None, use_errno=True)
    mounted = False
    cmd = [sys.executable, "-m", "pytest", f"--basetemp={tmp_path / 'basetemp'}", "--isolate-report=r.json"]
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        end = time.monotonic() + 60
        while not list((tmp_path / "basetemp").rglob("started")) and time.monotonic() < end:
            time.sleep(0.02)
        (started,) = (tmp_path / "basetemp").rglob("started")
        source = f"isolate-test-{uuid.uuid4().hex[:8]}".encode()
        assert libc.mount(source, bytes(mnt), b"tmpfs", 0, b"size=64k") == 0, os.strerror(ctypes.get_errno())
        mounted = True
        (started.parent / "go").touch()
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if mounted:
            libc.umount2(bytes(mnt), 2)
    assert snap.leaks() == []
    rec = records(tmp_path / "r.json")["test_idle.py::test_idle"]
    assert [e for e in rec["escapes"] if e["technique"] == "mount"] == []
    assert rec["outcome"] == "passed"


AHEAD = """
    import os, socket
    import pytest

    @pytest.mark.parametrize("n", range(8))
    def test_own_sandbox(n, tmp_path):
        marker = "/tmp/ahead-marker"
        assert not os.path.exists(marker)  # an earlier test's sandbox would have it
        open(marker, "w").close()
        (tmp_path / "seen.txt").write_text(f"{n} {socket.gethostname()}")
"""


@pytest.mark.parametrize("order", ["collected", "reversed"])
@pytest.mark.parametrize("tier", ["jail", "zone"])
def test_sandbox_built_ahead_serves_only_its_own_test(pytester: pytest.Pytester, tier: str, order: str) -> None:
    """The fork server builds the next test's sandbox while a test runs, guessing the
    next test from collection order. A guess is used only by the test it was built for:
    run in another order (here the controller alone reverses it), every test still gets
    a fresh sandbox of its own, named after it, and the run is no slower for long."""
    if order == "reversed":
        pytester.makeconftest(
            """
            def pytest_collection_modifyitems(config, items):
                if not config.pluginmanager.has_plugin("isolate-forkserver"):  # the controller only
                    items.reverse()
            """
        )
    pytester.makepyfile(test_ahead=AHEAD)
    result = pytester.runpytest_subprocess(f"--isolate={tier}", ESCAPE, "-p", "no:randomly", "--isolate-report=r.json")
    result.assert_outcomes(passed=8)
    result.stdout.fnmatch_lines(["test_ahead.py ........*"])
    files = {p.resolve() for p in pytester.path.glob("**/test_own_sandbox_*/seen.txt")}  # and "…current" links
    rows = sorted(p.read_text().split() for p in files)
    assert [int(r[0]) for r in rows] == list(range(8))
    assert [r[1] for r in rows] == [f"test-own-sandbox-{n}" for n in range(8)]
    report = json.loads((pytester.path / "r.json").read_text())["tests"]
    expected = [f"test_ahead.py::test_own_sandbox[{n}]" for n in range(8)]
    assert [r["nodeid"] for r in report] == (expected if order == "collected" else expected[::-1])
    assert not os.path.exists("/tmp/ahead-marker")


SOCKETS = """
    import json, os, socket, time

    PORTS = (47611, 47612)
    HELD = []


    def _listen(port):
        s = socket.socket()  # no SO_REUSEADDR: a port still held anywhere in the namespace fails
        s.bind(("127.0.0.1", port))
        s.listen()
        return s


    def _net(tmp_path, name):
        with open("/proc/net/tcp") as f:
            listening = [line.split()[1] for line in f.readlines()[1:] if line.split()[3] == "0A"]
        links = [n for _, n in socket.if_nameindex()]
        data = {"netns": os.stat("/proc/self/ns/net").st_ino, "links": links, "listening": listening}
        (tmp_path / "net.json").write_text(json.dumps([name, data]))


    def test_1_holds_a_port_as_it_ends(tmp_path):
        _net(tmp_path, "1")
        HELD.append(_listen(PORTS[0]))  # closed only once its process has exited
        # Much memory: the kernel frees it before it closes the test's files.
        HELD.append(bytearray(400 << 20))
        HELD[-1][:: 4096] = b"x" * len(range(0, 400 << 20, 4096))


    def test_2_binds_it_again(tmp_path):
        _net(tmp_path, "2")
        _listen(PORTS[0]).close()


    def test_3_leaves_a_child_holding_a_port(tmp_path):
        _net(tmp_path, "3")
        r, w = os.pipe()
        if os.fork() == 0:  # killed with its test
            # Much memory again: killed, it frees it before it closes the port.
            HELD.append(bytearray(400 << 20))
            HELD[-1][:: 4096] = b"x" * len(range(0, 400 << 20, 4096))
            HELD.append(_listen(PORTS[1]))
            os.write(w, b"listening")
            time.sleep(60)
            os._exit(0)
        os.read(r, 9)


    def test_4_binds_it_again(tmp_path):
        _net(tmp_path, "4")
        _listen(PORTS[1]).close()
"""


@pytest.mark.parametrize("tier", ["jail", "zone"])
def test_a_tests_sockets_do_not_reach_the_next_test(pytester: pytest.Pytester, tier: str) -> None:
    """Consecutive tests of a worker run as root share one loopback-only network
    namespace (what a new one costs per test is saved): nothing of an earlier test's is
    in it. A test that ends holding a listening socket, in its own process (whose exit
    frees 400 MiB before it closes it) or in a child it left running, hands the next
    test a namespace where the same port binds without ``SO_REUSEADDR`` and nothing
    listens, with loopback only. The child also frees 400 MiB before it closes its
    port: a leftover is not only killed but gone before the next test starts."""
    pytester.makepyfile(test_sockets=SOCKETS)
    result = pytester.runpytest_subprocess(f"--isolate={tier}", ESCAPE, "-p", "no:randomly", "--isolate-report=r.json")
    result.assert_outcomes(passed=4)
    seen_net = dict(json.loads(p.read_text()) for p in pytester.path.glob("**/test_*0/net.json"))
    assert sorted(seen_net) == ["1", "2", "3", "4"], seen_net
    for n in ("2", "4"):
        assert (seen_net[n]["links"], seen_net[n]["listening"]) == (["lo"], []), seen_net
    if os.geteuid() == 0:
        assert len({v["netns"] for v in seen_net.values()}) == 1  # the shared namespace


SERVER_CONFTEST = """
    import socket

    import pytest

    PORT = 47613


    @pytest.fixture(scope="session")
    def server():
        s = socket.socket()  # no SO_REUSEADDR
        s.bind(("127.0.0.1", PORT))
        s.listen()
        yield s
        s.close()
"""
SERVER_TESTS = """
    import socket

    from conftest import PORT


    def _talk(server):
        client = socket.create_connection(("127.0.0.1", PORT))
        conn, _ = server.accept()
        conn.close()  # the server's side closes first: its end waits in TIME_WAIT
        assert client.recv(1) == b""
        client.close()


    def test_1(server):
        _talk(server)


    def test_2(server):
        _talk(server)


    def test_3(server):
        _talk(server)
"""


@pytest.mark.skipif(os.geteuid() != 0, reason="the shared network namespace is root's (jail.py, _loopback)")
@pytest.mark.parametrize("tier", ["jail", "zone"])
def test_a_closed_connection_leaves_no_time_wait_for_the_next_test(pytester: pytest.Pytester, tier: str) -> None:
    """A session fixture binds a fixed port without ``SO_REUSEADDR`` and each test's
    connection is closed by the server's side first, which leaves that side in
    TIME_WAIT for 60 s. In-process the fixture binds once: 3 passed. Each sandbox sets
    it up again, in the network namespace consecutive tests share: the TIME_WAIT the
    first test left made the next ones' bind fail (``EADDRINUSE``, 2 errors) until the
    namespace was emptied of a test's closed sockets after it, as a namespace of its
    own would be. In-process runs in a namespace of its own too: no traffic on the
    host's loopback."""
    pytester.makeconftest(SERVER_CONFTEST)
    pytester.makepyfile(test_server=SERVER_TESTS)
    inproc = pytester.run(
        "unshare", "--net", "sh", "-c", f"ip link set lo up && exec {sys.executable} -m pytest -p no:randomly",
    )
    inproc.assert_outcomes(passed=3)
    result = pytester.runpytest_subprocess(f"--isolate={tier}", ESCAPE, "-p", "no:randomly")
    result.assert_outcomes(passed=3)

"""Real User-Mode Linux guests: the gateway, its channel, host protection, the in-guest
tier, failure modes and clean-up.

One guest is shared by the tests that leave it usable (module fixture ``guest``); the
failure modes (panic, hang, OOM, SIGTERM, parent death) and the option tests each boot
their own. Every guest's work dir is checked for leftovers after ``close_guest``:
processes (the launcher, ``linux.uml`` and its helpers all carry the work dir in their
command line), the dir itself, and mounts.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import execnet
import pytest

import pytest_isolate
from pytest_isolate.tiers import uml, uml_gateway, uml_kernel
from pytest_isolate.tiers.base import Unavailable
from tests.procprobe import cmdline

PKG_ROOT = str(Path(pytest_isolate.__file__).resolve().parent.parent)


# -- helpers --------------------------------------------------------------------------


def procs_with(token: str) -> list[str]:
    return [f"{p}: {c}" for p in os.listdir("/proc") if p.isdigit() and token in (c := cmdline(p))]


def leftovers(workdir: Path, grace: float = 5.0) -> list[str]:
    """What a guest left on the host after close_guest (empty when nothing)."""
    end = time.monotonic() + grace
    while True:
        left = procs_with(str(workdir))
        if workdir.exists():
            left.append(f"work dir still there: {workdir}")
        with open("/proc/self/mountinfo") as f:
            left += [f"mount: {line.strip()}" for line in f if str(workdir) in line]
        if not left or time.monotonic() > end:
            return left
        time.sleep(0.05)


class Guest:
    """One booted guest and its gateway."""

    def __init__(self, basetemp: Path, opts: uml_gateway.UmlOptions | None = None, **kw: Any) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="pytest-isolate-umltest-"))
        self.workdir = self.root / "guest"
        self.opts = opts or uml_gateway.UmlOptions()
        t0 = time.perf_counter()
        spec = uml_gateway.gateway_spec(self.opts, self.workdir, sys.executable, basetemp=basetemp, **kw)
        try:
            self.gw = execnet.makegateway(spec)
        except BaseException:
            self.close()
            raise
        self.boot_seconds = time.perf_counter() - t0

    def run(self, source: str, *send: Any, timeout: float = 120) -> Any:
        ch = self.gw.remote_exec(textwrap.dedent(source))
        for item in send:
            ch.send(item)
        return ch.receive(timeout)

    def launcher_pid(self) -> int:
        return int((self.workdir / "launcher.pid").read_text())

    def close(self) -> list[str]:
        gw = getattr(self, "gw", None)
        if gw is not None:
            with contextlib.suppress(Exception):
                gw.exit()
                gw.join(timeout=10)
        uml_gateway.close_guest(self.workdir)
        left = leftovers(self.workdir)
        shutil.rmtree(self.root, ignore_errors=True)
        return left


@pytest.fixture(scope="module")
def basetemp(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.getbasetemp()


@pytest.fixture(scope="module")
def guest(basetemp: Path) -> Iterator[Guest]:
    g = Guest(basetemp)
    yield g
    left = g.close()
    assert not left, "shared guest left behind:\n" + "\n".join(left)


def new_guest(basetemp: Path, **kw: Any) -> Guest:
    return Guest(basetemp, **kw)


# -- the gateway and its channel ------------------------------------------------------


def test_availability_and_kernel() -> None:
    assert uml_kernel.availability() is None
    kernel = uml_kernel.find_kernel()
    assert os.path.basename(kernel).startswith("linux")
    with pytest.raises(Unavailable, match="not an executable"):
        uml_kernel.find_kernel("/nonexistent/linux.uml")


def test_boot_probe_names_a_kernel_that_cannot_run_a_guest(tmp_path: Path) -> None:
    """availability() boots a probe guest: the kernel in use passes; a binary that is no
    UML kernel (exits at once, prints nothing) gets one line naming it and its exit."""
    probes = Path(tempfile.gettempdir()).glob
    before = set(probes("pytest-isolate-umlprobe-*"))  # another run's may be under way
    assert uml_kernel.boot_probe(uml_kernel.find_kernel()) is None
    fake = tmp_path / "linux.uml"
    fake.write_text("#!/bin/sh\nexit 3\n")
    fake.chmod(0o755)
    why = uml_kernel.boot_probe(str(fake))
    assert why is not None and why.startswith(f"uml: kernel {fake} did not boot a test guest (exit 3)"), why
    assert "\n" not in why
    assert not set(probes("pytest-isolate-umlprobe-*")) - before  # its dirs are gone


PROBE = """
import sys

from pytest_isolate.tiers import uml_kernel

uml_kernel.boot_probe(sys.argv[1])
"""


def test_a_probe_whose_controller_was_killed_is_swept_by_the_next_run(tmp_path: Path) -> None:
    """The probe's dir (UML's memory file goes there) has an owner record, as a run dir
    has: when the process probing is SIGKILLed, the next run's ``sweep_stale`` removes the
    dir and ends the probe guest, which works in it. The guest here is a stand-in that
    never ends on its own (a kernel that hangs at boot)."""
    from pytest_isolate.leftovers import sweep_stale

    fake = tmp_path / "linux.uml"
    fake.write_text(f"#!{sys.executable}\nimport time\ntime.sleep(120)\n")
    fake.chmod(0o755)
    before = set(Path(tempfile.gettempdir()).glob("pytest-isolate-umlprobe-*"))
    prober = subprocess.Popen([sys.executable, "-c", PROBE, str(fake)], env={**os.environ, "PYTHONPATH": PKG_ROOT})
    guest: int | None = None
    new: set[Path] = set()
    try:
        end = time.monotonic() + 30
        while time.monotonic() < end and guest is None:
            time.sleep(0.05)
            new = set(Path(tempfile.gettempdir()).glob("pytest-isolate-umlprobe-*")) - before
            guests = [int(p) for p in os.listdir("/proc")
                      if p.isdigit() and int(p) != prober.pid and str(fake) in cmdline(int(p))]
            if new and guests and (next(iter(new)) / "owner").exists():
                guest = guests[0]
        assert guest is not None and new, "the probe did not start its guest"
        prober.kill()
        prober.wait()
        assert os.path.exists(f"/proc/{guest}"), "the guest must outlive the prober for this test"
        removed = sweep_stale()
        (probe_dir,) = new
        assert str(probe_dir) in removed
        assert not probe_dir.exists()
        end = time.monotonic() + 10
        while time.monotonic() < end and os.path.exists(f"/proc/{guest}"):
            time.sleep(0.05)
        assert not os.path.exists(f"/proc/{guest}"), "the probe guest outlived the sweep"
    finally:  # whatever failed above, nothing of it stays
        prober.kill()
        prober.wait()
        for p in os.listdir("/proc"):
            if p.isdigit() and str(fake) in cmdline(int(p)):
                with contextlib.suppress(OSError):
                    os.kill(int(p), signal.SIGKILL)
        for d in new or ():
            shutil.rmtree(d, ignore_errors=True)


INTERRUPTED = """
import pytest

@pytest.mark.isolate("uml")
def test_in_uml():
    pass
"""


def test_ctrl_c_while_the_probe_boots_leaves_no_guest(tmp_path: Path) -> None:
    """The probe guest boots on a thread beside the run's first guest (it starts with
    the session); Ctrl-C while it boots ends it and removes its dir. Before, the probe
    ran in the main thread, and a KeyboardInterrupt left its guest (a session of its
    own, which Ctrl-C does not reach) running. The kernel is a stand-in that hangs."""
    fake = tmp_path / "linux.uml"
    fake.write_text(f"#!{sys.executable}\nimport time\ntime.sleep(120)\n")
    fake.chmod(0o755)
    (tmp_path / "test_interrupted.py").write_text(INTERRUPTED)

    def fakes() -> list[int]:
        return [int(p) for p in os.listdir("/proc") if p.isdigit() and str(fake) in cmdline(int(p))]

    probes = Path(tempfile.gettempdir()).glob
    before = set(probes("pytest-isolate-umlprobe-*"))
    run = subprocess.Popen(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:randomly", "--isolate=uml",
         f"--isolate-uml-kernel={fake}", "test_interrupted.py"],
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        end = time.monotonic() + 30
        while time.monotonic() < end and not (set(probes("pytest-isolate-umlprobe-*")) - before and fakes()):
            time.sleep(0.05)
        assert fakes(), "the probe did not start its guest"
        time.sleep(0.5)
        run.send_signal(signal.SIGINT)
        out, _ = run.communicate(timeout=30)
        assert run.returncode == pytest.ExitCode.INTERRUPTED, out
        assert "KeyboardInterrupt" in out
        end = time.monotonic() + 5
        while time.monotonic() < end and fakes():
            time.sleep(0.05)
        assert fakes() == [], "a guest outlived the interrupted run"
        assert not set(probes("pytest-isolate-umlprobe-*")) - before
    finally:  # whatever failed above, nothing of it stays
        if run.poll() is None:
            run.kill()
            run.wait()
        for pid in fakes():
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        for d in set(probes("pytest-isolate-umlprobe-*")) - before:
            shutil.rmtree(d, ignore_errors=True)


#: conftest of the runs below: which guest launchers the controller has started by the
#: end of its collection (its own children), written where the test reads them.
LAUNCHERS_SEEN = """
import json, os

def pytest_collection_finish(session):
    me = str(os.getpid())
    kids = []
    for p in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{p}/stat") as f:
                ppid = f.read().rsplit(")", 1)[1].split()[1]
            with open(f"/proc/{p}/cmdline", "rb") as f:
                cmd = f.read()
        except OSError:
            continue
        if ppid == me and b"uml_launch.py" in cmd:
            kids.append(int(p))
    with open("launchers.json", "w") as f:
        json.dump(kids, f)
"""


@pytest.mark.parametrize(
    ("files", "args", "ret", "line"),
    [
        ({"test_bad.py": "def test_bad(:\n"}, [], pytest.ExitCode.INTERRUPTED, "*Interrupted: 1 error during collection*"),
        ({}, ["-k", "nomatch"], pytest.ExitCode.NO_TESTS_COLLECTED, "*1 deselected*"),
    ],
    ids=["collection-error", "nothing-selected"],
)
def test_a_run_that_ends_before_its_first_test_stops_its_booting_guest(
    pytester: pytest.Pytester, files: dict[str, str], args: list[str], ret: int, line: str
) -> None:
    """The run's guest starts booting as the session starts, beside the controller's
    collection, and nothing waits for it there; a run that never reaches a test stops
    its launcher (and so the guest) and leaves nothing (the autouse leak check)."""
    pytester.makeconftest(LAUNCHERS_SEEN)
    pytester.makepyfile(test_ok="def test_ok():\n    pass\n", **{Path(k).stem: v for k, v in files.items()})
    result = pytester.runpytest_subprocess("--isolate=uml", "-p", "no:randomly", *args, timeout=120)
    assert result.ret == ret, "\n".join(result.outlines + result.errlines)
    result.stdout.fnmatch_lines([line])
    launchers = json.loads((pytester.path / "launchers.json").read_text())
    assert launchers, "no guest was booting during the collection"
    end = time.monotonic() + 10
    while time.monotonic() < end and any(os.path.exists(f"/proc/{p}") for p in launchers):
        time.sleep(0.05)
    assert not [p for p in launchers if os.path.exists(f"/proc/{p}")], "a launcher outlived its run"


def test_kernel_features_are_read_from_the_binary() -> None:
    """The NIC driver and seccomp mode the tier picks are what the kernel offers."""
    kernel = uml_kernel.find_kernel()
    cfg = uml_kernel.kernel_config(kernel)
    nic = uml_kernel.nic_driver(kernel)
    assert nic is not None
    assert nic[1] == ("eth" if cfg.get("CONFIG_UML_NET_TUNTAP") == "y" else "vec")
    with open(kernel, "rb") as f:
        assert uml_kernel.seccomp_mode(kernel) == (b"Invalid seccomp option" in f.read())


def test_channel_choice(monkeypatch: pytest.MonkeyPatch) -> None:
    """tap where /dev/net/tun opens, veth (vector raw on a veth pair) where it does not;
    PYTEST_ISOLATE_UML_CHANNEL forces one; each refusal names its fix. (The real thing,
    uid 65534 on this host, is tests/uml/test_uml_unprivileged.py.)"""
    kernel = uml_kernel.find_kernel()
    monkeypatch.delenv(uml_kernel.CHANNEL_ENV, raising=False)
    monkeypatch.setattr(uml_kernel, "tap_problem", lambda: None)
    assert uml_kernel.choose_channel(kernel) == "tap"
    monkeypatch.setenv(uml_kernel.CHANNEL_ENV, "veth")
    assert uml_kernel.choose_channel(kernel) == "veth"
    assert uml_kernel.choose_channel(kernel, "tap") == "tap"
    monkeypatch.setenv(uml_kernel.CHANNEL_ENV, "serial")
    with pytest.raises(Unavailable, match="channel 'serial' unknown"):
        uml_kernel.choose_channel(kernel)
    monkeypatch.delenv(uml_kernel.CHANNEL_ENV)
    monkeypatch.setattr(uml_kernel, "tap_problem", lambda: "/dev/net/tun is not accessible to this user")
    assert uml_kernel.choose_channel(kernel) == "veth"
    with pytest.raises(Unavailable, match="not accessible to this user .*=tap"):
        uml_kernel.choose_channel(kernel, "tap")
    monkeypatch.setattr(uml_kernel, "kernel_config", lambda k: {"CONFIG_UML_NET_TUNTAP": "y"})
    with pytest.raises(Unavailable, match="lacks CONFIG_UML_NET_VECTOR .* make /dev/net/tun mode 0666"):
        uml_kernel.choose_channel(kernel)
    monkeypatch.setattr(uml_kernel, "tap_problem", lambda: "/dev/net/tun is missing")
    with pytest.raises(Unavailable, match="missing, and kernel .* `modprobe tun`"):
        uml_kernel.choose_channel(kernel)


def test_guest_runs_on_the_chosen_channel(guest: Guest) -> None:
    """The shared guest's channel is ``choose_channel``'s (run this module with
    PYTEST_ISOLATE_UML_CHANNEL=veth to run it all on the veth channel)."""
    cfg = json.loads((guest.workdir / "launch.json").read_text())
    assert cfg["channel"] == uml_kernel.choose_channel(uml_kernel.find_kernel())
    links = guest.run(
        """
        import os, socket
        with open("/proc/1/net/dev") as f:
            channel.send([line.split(":")[0].strip() for line in f.readlines()[2:]])
        """
    )
    assert cfg["guest"]["channel_if"] in links
    if cfg["channel"] == "veth":
        assert cfg["guest"]["channel_if"] == "vec0"
        assert "vec0:transport=raw,ifname=umlc0u,gro=1" in cfg["argv"]


def test_gateway_reports_guest_kernel(guest: Guest) -> None:
    version = subprocess.run(
        [uml_kernel.find_kernel(), "--version"], capture_output=True, text=True
    ).stdout.split()[0]
    sysname, nodename, release, _, machine = guest.run("import os; channel.send(tuple(os.uname()))")
    assert (sysname, release, machine) == ("Linux", version, "x86_64")
    assert release != os.uname().release  # not the host kernel
    assert guest.boot_seconds < 30


def test_guest_kernel_skips_the_raid_benchmarks(guest: Guest) -> None:
    """Its kernel log (all levels: ``quiet`` only hides them from the console) shows the
    boot, and no RAID6/XOR benchmark: ~0.85 s of every boot when it runs (7.x renamed
    the initcall the blacklist must name)."""
    log = guest.run(
        """
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        buf = ctypes.create_string_buffer(1 << 20)
        n = libc.klogctl(3, buf, len(buf))  # SYSLOG_ACTION_READ_ALL
        channel.send(buf.raw[: max(n, 0)].decode(errors="replace"))
        """
    )
    assert "Linux version" in log
    assert "initcall_blacklist=" in log
    bench = [line for line in log.splitlines() if "gen()" in line or "xor()" in line]
    assert not bench, "the guest kernel benchmarked RAID6/XOR at boot:\n" + "\n".join(bench)


def test_10mb_both_ways_intact(guest: Guest) -> None:
    data = os.urandom(10 << 20)
    digest, back = guest.run(
        """
        import hashlib
        data = channel.receive()
        channel.send((hashlib.sha256(data).hexdigest(), data))
        """,
        data,
    )
    assert digest == hashlib.sha256(data).hexdigest()
    assert back == data


def test_worker_is_root_with_host_paths(guest: Guest) -> None:
    uid, cwd_ok, exe, has_pkg = guest.run(
        f"""
        import os, sys
        channel.send((os.getuid(), os.path.isdir({os.getcwd()!r}), sys.executable,
                      os.path.isfile({PKG_ROOT!r} + "/pytest_isolate/__init__.py")))
        """
    )
    assert uid == 0
    assert cwd_ok and has_pkg
    assert exe == sys.executable  # the venv's own path: its packages come with it


# -- host protection ------------------------------------------------------------------


def test_guest_root_cannot_write_host_through_hostfs(guest: Guest, basetemp: Path) -> None:
    token = os.urandom(4).hex()
    targets = [f"/tmp/uml-escape-{token}", f"/etc/uml-escape-{token}", f"/root/uml-escape-{token}"]
    allowed = str(basetemp / f"uml-allowed-{token}")
    res = guest.run(
        """
        import ctypes, os
        libc = ctypes.CDLL(None, use_errno=True)
        targets, allowed = channel.receive()
        out = {}
        for i, prefix in enumerate(["/", "/../../..", "/tmp/../"]):
            mp = f"/mnt/escape{i}"
            os.makedirs(mp, exist_ok=True)
            if libc.mount(b"none", mp.encode(), b"hostfs", 0, prefix.encode()) != 0:
                out[prefix] = "mount failed %d" % ctypes.get_errno()
                continue
            for t in targets:
                try:
                    with open(mp + t, "w") as f:
                        f.write("escaped")
                    out[prefix + t] = "written"
                except OSError as e:
                    out[prefix + t] = e.strerror
            for dev in ("/dev/vda", "/dev/sda", "/dev/mem", "/run/initctl"):
                try:
                    open(mp + dev, "w").close()
                    out[prefix + dev] = "opened"
                except OSError as e:
                    out[prefix + dev] = e.strerror
        with open(allowed, "w") as f:
            f.write("tmp_path works")
        channel.send(out)
        """,
        (targets, allowed),
    )
    assert "written" not in res.values() and "opened" not in res.values(), res
    for t in targets:
        assert not os.path.exists(t), t
    # basetemp is writable, and what the guest writes there belongs to its real owner
    assert Path(allowed).read_text() == "tmp_path works"
    assert os.stat(allowed).st_uid == os.stat(basetemp).st_uid


def test_unprivileged_confinement_path(basetemp: Path) -> None:
    """The way a non-root user runs ``linux.uml`` (user namespace, no capabilities),
    taken as root here: the guest still boots, basetemp is writable, the host is not."""
    g = new_guest(basetemp, mode="userns")
    token = os.urandom(4).hex()
    try:
        res = g.run(
            """
            import ctypes, os
            libc = ctypes.CDLL(None, use_errno=True)
            paths = channel.receive()
            os.makedirs("/mnt/h", exist_ok=True)
            assert libc.mount(b"none", b"/mnt/h", b"hostfs", 0, b"/") == 0
            out = {}
            for p in paths:
                try:
                    with open("/mnt/h" + p, "w") as f:
                        f.write("x")
                    out[p] = "written"
                except OSError as e:
                    out[p] = e.strerror
            channel.send(out)
            """,
            [
                f"/tmp/uml-userns-{token}",
                f"/etc/uml-userns-{token}",
                str(basetemp / f"uml-userns-{token}"),
            ],
        )
        assert res[str(basetemp / f"uml-userns-{token}")] == "written", res
        assert (
            res[f"/tmp/uml-userns-{token}"] != "written"
            and res[f"/etc/uml-userns-{token}"] != "written"
        ), res
        assert not os.path.exists(f"/tmp/uml-userns-{token}")
    finally:
        left = g.close()
    assert not left, left


def test_root_in_guest_changes_only_the_guest(guest: Guest) -> None:
    """Through the in-guest tier, as a test would: pyroute2 dummy link, tmpfs mount,
    /etc/hosts — all succeed inside; the host's links, mounts and /etc/hosts do not move.
    The next test in the same guest sees none of it."""
    hosts_before = Path("/etc/hosts").read_bytes()
    out = run_tier_driver(guest)
    a, b = out["a"], out["b"]
    assert "error" not in a, a
    assert "isodummy0" in a["links"]
    assert a["mounted"] and a["hosts_written"]
    assert a["uid"] == 0 and a["hostname"] == "host-1"
    # host unchanged
    assert Path("/etc/hosts").read_bytes() == hosts_before
    assert "isodummy0" not in [n for _, n in socket.if_nameindex()]
    with open("/proc/self/mountinfo") as f:
        assert not [m for m in (line.split()[4] for line in f) if m.endswith("/isotmp")]
    # the next test: a fresh overlay, a fresh (loopback-only) network
    assert b["links"] == ["lo"], b
    assert b["hosts"] == hosts_before.decode()
    assert not b["isotmp"]
    # usage readings, in the rusage_dict shape plus the guest cgroup's figures
    usage = out["usage_d"]
    for key in ("cpu_user", "cpu_sys", "max_rss", "peak_memory"):
        assert key in usage, usage
    assert usage["peak_memory"] >= 20 << 20
    # a process left behind by a test is killed with its cgroup
    assert out["leftover_alive"] is False
    assert out["changes_a"] and any("/etc/hosts" in c for c in out["changes_a"])


DRIVER = r"""
import json, os, sys, socket, time, resource
sys.path.insert(0, sys.argv[1])
from pathlib import Path
from pytest_isolate.tiers.base import WorkerContext, Box, rusage_dict
from pytest_isolate.tiers.uml import UmlTier
from pytest_isolate.spec import IsolationSpec

ctx = WorkerContext(run_id="umltest", rundir=Path("/tmp"), workdir=Path("/tmp"), rootdir=Path("/"),
                    basetemp=Path(sys.argv[2]), invocation_dir=Path("/"))
tier = UmlTier(ctx)

def run_one(idx, fn):
    r, w = os.pipe()
    box = Box(f"t{idx}", IsolationSpec(tier="uml"), idx, f"host-{idx}", w)
    tier.prepare(box)
    def run():
        try:
            out = fn()
        except BaseException as e:
            out = {"error": repr(e)}
        os.write(w, json.dumps(out).encode())
        os._exit(0)
    pid = tier.spawn(box, run)
    os.close(w)
    data = b""
    while True:
        chunk = os.read(r, 65536)
        if not chunk:
            break
        data += chunk
    _, st, ru = os.wait4(pid, 0)
    tier.finish(box, pid, st, ru)
    os.close(r)
    box.usage = {**rusage_dict(ru), **box.usage}
    return json.loads(data), box

def a():
    import ctypes
    from pyroute2 import IPRoute
    with IPRoute() as ipr:
        ipr.link("add", ifname="isodummy0", kind="dummy")
        links = [l.get_attr("IFLA_IFNAME") for l in ipr.get_links()]
    os.makedirs("/mnt/isotmp", exist_ok=True)
    libc = ctypes.CDLL(None, use_errno=True)
    rc = libc.mount(b"tmpfs", b"/mnt/isotmp", b"tmpfs", 0, None)
    with open("/etc/hosts", "a") as f:
        f.write("10.9.9.9 isolate-test\n")
    mounted = rc == 0 and any(l.split()[4] == "/mnt/isotmp" for l in open("/proc/self/mountinfo"))
    return {"links": links, "mounted": mounted, "hosts_written": "isolate-test" in open("/etc/hosts").read(),
            "uid": os.getuid(), "hostname": socket.gethostname()}

def b():
    return {"links": [n for _, n in socket.if_nameindex()], "hosts": open("/etc/hosts").read(),
            "isotmp": os.path.exists("/mnt/isotmp")}

def c():
    pid = os.fork()
    if pid == 0:
        os.closerange(3, 1 << 16)
        time.sleep(1000)
        os._exit(0)
    return {"pid": pid}

def d():
    x = bytearray(24 << 20)
    for i in range(0, len(x), 4096):
        x[i] = 1
    return {"ok": True}

out = {}
out["a"], box_a = run_one(1, a)
out["changes_a"] = box_a.state.get("changes", [])
out["b"], _ = run_one(2, b)
res_c, _ = run_one(3, c)
try:
    os.kill(res_c["pid"], 0)
    out["leftover_alive"] = True
except ProcessLookupError:
    out["leftover_alive"] = False
out["d"], box_d = run_one(4, d)
out["usage_d"] = box_d.usage
tier.close()
print(json.dumps(out))
"""


def run_tier_driver(guest: Guest) -> dict[str, Any]:
    """Run DRIVER in a fresh (single-threaded) interpreter inside the guest: the
    execnet worker has threads and must not fork."""
    rc, out, err = guest.run(
        """
        import subprocess, sys
        args = channel.receive()
        p = subprocess.run([sys.executable, "-c"] + args, capture_output=True, text=True)
        channel.send((p.returncode, p.stdout, p.stderr))
        """,
        [DRIVER, PKG_ROOT, "/tmp"],
        timeout=300,
    )
    assert rc == 0, err
    return json.loads(out.strip().splitlines()[-1])


# -- failure modes: each in a guest of its own ----------------------------------------


def _expect_death(g: Guest, source: str, within: float) -> float:
    t0 = time.perf_counter()
    with pytest.raises((EOFError, OSError, execnet.RemoteError, execnet.HostNotFound)):
        g.run(source, timeout=60)
    return time.perf_counter() - t0


def test_kernel_panic_kills_gateway_and_explains(basetemp: Path) -> None:
    g = new_guest(basetemp)
    try:
        took = _expect_death(g, "open('/proc/sysrq-trigger', 'w').write('c')", 10)
        assert took < 10
        tail = uml_gateway.console_tail(g.workdir)
        assert "Kernel panic" in tail, tail
    finally:
        left = g.close()
    assert not left, left


def test_guest_hang_is_detected(basetemp: Path) -> None:
    """Guest root starves everything (real-time spin, RT throttling off): PID 1's
    heartbeat stops, the launcher kills the guest and closes the gateway."""
    g = new_guest(basetemp, hang_timeout=2.0)
    try:
        took = _expect_death(
            g,
            """
            import os
            with open('/proc/sys/kernel/sched_rt_runtime_us', 'w') as f:
                f.write('-1')
            os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(99))
            while True:
                pass
            """,
            20,
        )
        assert took < 15
        tail = uml_gateway.console_tail(g.workdir)
        assert "guest hung" in tail, tail
    finally:
        left = g.close()
    assert not left, left


def test_guest_oom_kills_gateway_and_explains(basetemp: Path) -> None:
    g = new_guest(basetemp, opts=uml_gateway.UmlOptions(memory=128 << 20))
    try:
        took = _expect_death(g, "x = []\nwhile True:\n    x.append(bytearray(8 << 20))", 30)
        assert took < 30
        tail = uml_gateway.console_tail(g.workdir)
        assert "Out of memory" in tail or "oom-kill" in tail, tail
    finally:
        left = g.close()
    assert not left, left


def test_sigterm_to_launcher_stops_everything(basetemp: Path) -> None:
    g = new_guest(basetemp)
    try:
        assert g.run("channel.send(1)") == 1
        os.kill(g.launcher_pid(), signal.SIGTERM)
        with pytest.raises((EOFError, OSError, execnet.RemoteError)):
            g.run("import time; time.sleep(30); channel.send(1)", timeout=30)
        end = time.monotonic() + 10
        while procs_with(str(g.workdir)) and time.monotonic() < end:
            time.sleep(0.05)
        assert not procs_with(str(g.workdir))
        assert "SIGTERM" in uml_gateway.console_tail(g.workdir)
    finally:
        left = g.close()
    assert not left, left


def test_stdin_eof_stops_the_guest(basetemp: Path) -> None:
    """The launcher alone, as execnet starts it, whose stdin closes before anything
    was sent (the controller went away): the guest is stopped and nothing is left."""
    root = Path(tempfile.mkdtemp(prefix="pytest-isolate-umltest-"))
    wd = root / "guest"
    spec = uml_gateway.gateway_spec(uml_gateway.UmlOptions(), wd, sys.executable, basetemp=basetemp)
    argv = shlex.split(spec.split("python=", 1)[1]) + [
        "-u",
        "-c",
        "import sys;exec(eval(sys.stdin.readline()))",
    ]
    p = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        end = time.monotonic() + 60
        while not (wd / "ready").exists() and time.monotonic() < end:
            time.sleep(0.05)
        assert (wd / "ready").exists(), uml_gateway.console_tail(wd)
        assert p.stdin is not None
        p.stdin.close()
        assert p.wait(timeout=10) is not None
        assert "stdin closed" in uml_gateway.console_tail(wd)
    finally:
        with contextlib.suppress(ProcessLookupError):
            p.kill()
        p.wait()
        uml_gateway.close_guest(wd)
        left = leftovers(wd)
        shutil.rmtree(root, ignore_errors=True)
    assert not left, left


PARENT = r"""
import sys, execnet
sys.path.insert(0, sys.argv[1])
from pathlib import Path
from pytest_isolate.tiers import uml_gateway
gw = execnet.makegateway(uml_gateway.gateway_spec(uml_gateway.UmlOptions(), Path(sys.argv[2]), sys.executable, basetemp=sys.argv[3]))
assert gw.remote_exec("channel.send(7)").receive(60) == 7
import os, time
keeper = os.fork()  # holds the gateway's pipes open: only the parent's death can tell
if keeper == 0:
    time.sleep(600)
    os._exit(0)
print(keeper, flush=True)
time.sleep(600)
"""


def test_parent_death_stops_everything(basetemp: Path) -> None:
    root = Path(tempfile.mkdtemp(prefix="pytest-isolate-umltest-"))
    wd = root / "guest"
    parent = subprocess.Popen(
        [sys.executable, "-c", PARENT, PKG_ROOT, str(wd), str(basetemp)],
        stdout=subprocess.PIPE,
        text=True,
    )
    keeper = 0
    try:
        assert parent.stdout is not None
        keeper = int(parent.stdout.readline())
        assert procs_with(str(wd))
        parent.kill()  # no clean-up from the parent at all; its pipes stay open
        parent.wait()

        def guest_procs() -> list[str]:
            return [p for p in procs_with(str(wd)) if not p.startswith(f"{keeper}:")]

        end = time.monotonic() + 10
        while guest_procs() and time.monotonic() < end:
            time.sleep(0.05)
        assert not guest_procs(), guest_procs()
        tail = uml_gateway.console_tail(wd)
        assert "parent died" in tail or "got SIGTERM" in tail, tail
    finally:
        with contextlib.suppress(ProcessLookupError):
            parent.kill()
        parent.wait()
        if keeper:
            with contextlib.suppress(ProcessLookupError):
                os.kill(keeper, signal.SIGKILL)
            end = time.monotonic() + 5
            while os.path.exists(f"/proc/{keeper}") and time.monotonic() < end:
                time.sleep(0.02)  # reparented to init, which reaps it
        uml_gateway.close_guest(wd)
        left = leftovers(wd)
        shutil.rmtree(root, ignore_errors=True)
    assert not left, left


# -- options --------------------------------------------------------------------------


def test_memory_and_kernel_options(basetemp: Path, tmp_path: Path) -> None:
    """``memory`` becomes ``mem=``; ``kernel`` boots another binary (a copy here)."""
    copy = tmp_path / "my-linux.uml"
    shutil.copy2(uml_kernel.find_kernel(), copy)
    g = new_guest(basetemp, opts=uml_gateway.UmlOptions(kernel=str(copy), memory=192 << 20))
    try:
        total_kb, cmdline = g.run(
            """
            with open('/proc/meminfo') as f:
                total = int(f.readline().split()[1])
            channel.send((total, open('/proc/cmdline').read()))
            """
        )
        # UML >= 6.15 drops its own options (mem=, con=, ...) from /proc/cmdline.
        assert "mem=192M" in cmdline or "hostfs" in cmdline
        assert 150 << 10 < total_kb <= 192 << 10
        assert str(copy) in " ".join(procs_with(str(g.workdir)))
    finally:
        left = g.close()
    assert not left, left


def test_cpus_beyond_kernel_support_is_refused(tmp_path: Path) -> None:
    kernel = uml_kernel.find_kernel()
    n = uml_kernel.smp_support(kernel)
    with pytest.raises(Unavailable, match="CONFIG_SMP|CPU"):
        uml_gateway.gateway_spec(
            uml_gateway.UmlOptions(cpus=n + 1), tmp_path / "g", sys.executable, basetemp=tmp_path
        )


def test_network_ip_reaches_a_peer_on_the_switch(basetemp: Path) -> None:
    """network="ip": the guest's second NIC joins the run's switch; a test in the guest
    gets an address from the run's subnet and talks to a namespace plugged into the
    same switch (and only that: no route anywhere else)."""
    from pytest_isolate.facets import net, netlink

    run_id = "umlt" + os.urandom(3).hex()
    switch = net.Switch.create(run_id)
    peer_addr, plen = net.address_for(63, 1)
    assert uml.guest_address(5, 7) == net.address_for(5, 7)
    r, w = os.pipe()
    peer = os.fork()
    if peer == 0:  # a peer namespace on the switch: echo one line back
        try:
            os.close(r)
            net._unshare(net.CLONE_NEWNET)
            netlink.loopback_up()
            net.attach_ip(switch.path, peer_addr, plen)
            s = socket.socket()
            s.bind((peer_addr, 7777))
            s.listen(1)
            os.write(w, b"1")
            s.settimeout(120)
            c, _ = s.accept()
            c.sendall(c.recv(100).upper())
        finally:
            os._exit(0)
    os.close(w)
    g = None
    left: list[str] = []
    try:
        assert os.read(r, 1) == b"1"
        g = new_guest(basetemp, opts=uml_gateway.UmlOptions(network="ip"), switch=switch.path)
        out = run_ip_driver(g, peer_addr)
        assert out.get("reply") == "HELLO", out
        assert out["addr"] == uml.guest_address(0, 0)[0]
        assert out["routes"] == 1, out  # only the connected route of the run's subnet
    finally:
        os.close(r)
        if g is not None:
            left = g.close()
        with contextlib.suppress(ProcessLookupError):
            os.kill(peer, signal.SIGKILL)
        os.waitpid(peer, 0)
        switch.close()
    assert not left, left
    assert not os.path.exists(f"/run/netns/pytest-isolate-{run_id}")


IP_DRIVER = r"""
import json, os, sys, socket
sys.path.insert(0, sys.argv[1])
from pathlib import Path
from pytest_isolate.tiers.base import WorkerContext, Box
from pytest_isolate.tiers.uml import UmlTier
from pytest_isolate.spec import IsolationSpec
ctx = WorkerContext(run_id="umltest", rundir=Path("/tmp"), workdir=Path("/tmp"), rootdir=Path("/"),
                    basetemp=Path("/tmp"), invocation_dir=Path("/"), extra={"worker_index": 0})
tier = UmlTier(ctx)
r, w = os.pipe()
box = Box("ip", IsolationSpec(tier="uml", network="ip"), 1, "ip", w)
tier.prepare(box)
def run():
    out = {}
    try:
        import fcntl, struct
        s = socket.create_connection((sys.argv[2], 7777), timeout=30)
        s.sendall(b"hello")
        out["reply"] = s.recv(100).decode()
        out["addr"] = s.getsockname()[0]
        out["routes"] = len(open("/proc/net/route").read().splitlines()) - 1
    except BaseException as e:
        out["error"] = repr(e)
    os.write(w, json.dumps(out).encode())
    os._exit(0)
pid = tier.spawn(box, run)
os.close(w)
data = os.read(r, 65536)
_, st, ru = os.wait4(pid, 0)
tier.finish(box, pid, st, ru)
tier.close()
print(data.decode())
"""


def run_ip_driver(g: Guest, peer_addr: str) -> dict[str, Any]:
    rc, out, err = g.run(
        """
        import subprocess, sys
        args = channel.receive()
        p = subprocess.run([sys.executable, "-c"] + args, capture_output=True, text=True)
        channel.send((p.returncode, p.stdout, p.stderr))
        """,
        [IP_DRIVER, PKG_ROOT, peer_addr],
        timeout=300,
    )
    assert rc == 0, err
    return json.loads(out.strip().splitlines()[-1])


# -- the tier through the plugin, end to end -----------------------------------------


def test_plugin_runs_tests_in_a_guest(tmp_path: Path) -> None:
    # Escape verdicts are the policy's business (and other runs on this host can make
    # the host-side detectors noisy): this test is about running in a guest.
    (tmp_path / "pytest.ini").write_text("[pytest]\nisolate_on_escape = ignore\n")
    host_release = os.uname().release
    (tmp_path / "test_in_guest.py").write_text(
        textwrap.dedent(
            f"""
            import os, socket
            def test_kernel():
                assert os.uname().release != {host_release!r}
            def test_tmp_path(tmp_path):
                (tmp_path / "f").write_text("x")
                assert (tmp_path / "f").read_text() == "x"
            def test_loopback_only():
                assert [n for _, n in socket.if_nameindex()] == ["lo"]
            """
        )
    )
    env = dict(os.environ, PYTEST_ADDOPTS="-p no:hypothesispytest -p no:benchmark", PY_COLORS="0")
    p = subprocess.run(
        [sys.executable, "-m", "pytest", "--isolate=uml", "-q", f"--basetemp={tmp_path / 'bt'}"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert p.returncode == 0, p.stdout + p.stderr
    assert "3 passed" in p.stdout


BIG_SERVER_CONFTEST = """
# ~110 MB the fork server holds (written, so resident): arrow's suite under --cov made a
# server this size, and copying it whole at the learning fork filled the 256 MB guest.
KEEP = [b"x" * (1 << 20) for _ in range(110)]
"""


def test_a_big_fork_server_is_not_copied_into_an_oom(pytester: pytest.Pytester) -> None:
    """The guest's fork server copies its pages once to put them in order
    (``prefault.ServerPages.compact``) only when the guest can hold them twice: before,
    every guest's server was OOM-killed by its first tests (the worker died)."""
    pytester.makeconftest(BIG_SERVER_CONFTEST)
    pytester.makepyfile(**{f"test_big{i}": "def test_a():\n    pass\n\n\ndef test_b():\n    pass\n" for i in range(4)})
    result = pytester.runpytest_subprocess("--isolate=uml", "-p", "no:randomly", "-p", "no:cacheprovider", timeout=300)
    result.assert_outcomes(passed=8)
    assert "Out of memory" not in result.stdout.str()

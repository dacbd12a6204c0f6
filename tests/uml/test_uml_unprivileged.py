"""The `uml` tier run by an unprivileged user (uid 65534) on a host where
``/dev/net/tun`` is not open to that user (this one: mode 0600, root's).

The guest's channel is then chosen automatically: a veth pair in the launcher's private
network namespace, the guest's end read by the vector driver's raw transport. These
tests drop privileges themselves (CI runs as root) and check what a user would see:

* the tier is available and picks ``veth`` (``choose_channel``);
* a gateway booted by uid 65534 carries 8 MB both ways intact;
* ``network="ip"``: a guest of uid 65534 joins an unprivileged switch (its launcher
  joins the switch holder's user namespace) and talks to a peer namespace on it;
* a small suite passes in a guest through the plugin (``--isolate=uml``), including a
  test whose 4 MB of captured output reaches the host's report byte for byte, a test
  whose failure report (a 2 MB message) comes back whole, and a ``network="ip"`` test;
* nothing is left behind: no process, no work dir.

``/root`` is mode 700, so the project's pyenv Python is out of reach of other users: a
module fixture builds a venv with Debian's ``/usr/bin/python3`` in a directory uid
65534 can read, installs pytest, execnet and pyroute2 (the versions this environment
runs) and the plugin from a copy of the working tree. The UML kernel is the one the
tier finds for root (``find_kernel``), passed by path: it must be readable by others
(``.venv/uml`` from scripts/uml-kernel.sh is).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
import textwrap
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path

import pytest

from pytest_isolate.tiers import uml_kernel

UID = GID = 65534
REPO = Path(__file__).resolve().parent.parent.parent
REQUIREMENTS = ("pytest", "pluggy", "execnet", "pyroute2")

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="drops privileges to uid 65534: needs root")


def _chown_tree(path: Path) -> None:
    for dirpath, dirnames, filenames in os.walk(path):
        os.chown(dirpath, UID, GID)
        for name in dirnames + filenames:
            os.chown(os.path.join(dirpath, name), UID, GID, follow_symlinks=False)


def _readable_by_others(path: str) -> bool:
    """Can uid 65534 (no groups) read ``path`` and search every directory above it?"""
    p = Path(path)
    for d in [*reversed(p.parents)]:
        if not os.stat(d).st_mode & 0o001:
            return False
    return bool(os.stat(p).st_mode & 0o004)


def _procs_with(token: str) -> list[str]:
    out = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
            cwd = os.readlink(f"/proc/{pid}/cwd")
        except OSError:
            continue
        if token in cmd or cwd.startswith(token):
            out.append(f"{pid}: {cmd}")
    return out


class Nobody:
    """A venv uid 65534 can run, a kernel it can boot, and a way to run as it."""

    def __init__(self, top: Path, kernel: str) -> None:
        self.top = top
        self.venv = top / "venv"
        self.python = str(self.venv / "bin" / "python")
        self.kernel = kernel
        self.src = top / "src"  # the plugin's copy, importable by uid 65534

    def workdir(self, name: str) -> Path:
        """A fresh directory owned by uid 65534 beside the venv (not under pytest's
        basetemp: /tmp/pytest-of-root is mode 700)."""
        path = Path(tempfile.mkdtemp(prefix=f"{name}-", dir=self.top))
        _chown_tree(path)
        return path

    def run(self, argv: list[str], cwd: Path, timeout: float = 300, **env: str) -> subprocess.CompletedProcess[str]:
        """``argv`` as uid/gid 65534 without supplementary groups, a clean environment,
        ``TMPDIR`` in ``cwd`` (the guests' work dirs and basetemp land there)."""
        base = {
            "PATH": f"{self.venv}/bin:/usr/bin:/bin",
            "HOME": str(cwd),
            "TMPDIR": str(cwd),
            "LANG": "C.UTF-8",
            "PY_COLORS": "0",
            "COLUMNS": "200",
        }
        return subprocess.run(
            argv,
            cwd=cwd,
            env={**base, **env},
            user=UID,
            group=GID,
            extra_groups=[],
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def leftovers(self, path: Path, grace: float = 10.0) -> list[str]:
        """Processes of a run in ``path`` still alive after it ended (the launcher,
        ``linux.uml`` and its helpers carry their work dir under ``path`` in their
        command line or run there), and guest work dirs not removed."""
        end = time.monotonic() + grace
        while True:
            left = _procs_with(str(path))
            left += [f"work dir left: {p}" for p in path.glob("pytest-isolate-*")]
            if not left or time.monotonic() > end:
                return left
            time.sleep(0.1)


@pytest.fixture(scope="module")
def nobody() -> Iterator[Nobody]:
    """Built once per module (~5-15 s, most of it pip), removed at the end."""
    python3 = shutil.which("python3", path="/usr/bin")
    if python3 is None:  # pragma: no cover - every Debian has it
        pytest.skip("no /usr/bin/python3 to build a venv other users can run")
    why = uml_kernel.availability()
    if why:
        pytest.skip(why)
    kernel = uml_kernel.find_kernel()
    if not _readable_by_others(kernel):
        pytest.skip(f"the UML kernel {kernel} is not readable by other users")
    top = Path(tempfile.mkdtemp(prefix="isolate-umlnobody-", dir="/tmp"))
    try:
        top.chmod(0o755)
        n = Nobody(top, kernel)
        subprocess.run([python3, "-m", "venv", str(n.venv)], check=True, capture_output=True, timeout=120)
        pins = [f"{name}=={metadata.version(name)}" for name in REQUIREMENTS]
        pip = [n.python, "-m", "pip", "install", "-q", "--disable-pip-version-check"]
        subprocess.run([*pip, *pins], check=True, capture_output=True, timeout=300)
        src = top / "src"
        shutil.copytree(REPO / "pytest_isolate", src / "pytest_isolate", ignore=shutil.ignore_patterns("__pycache__"))
        for name in ("pyproject.toml", "README.md"):
            shutil.copy(REPO / name, src / name)
        subprocess.run([*pip, "--no-deps", str(src)], check=True, capture_output=True, timeout=300)
        yield n
    finally:
        shutil.rmtree(top, ignore_errors=True)


def test_the_tap_is_out_of_reach_and_veth_is_chosen(nobody: Nobody) -> None:
    """The premise (this host's /dev/net/tun is root's) and the choice it leads to:
    available, channel veth; asking for the tap names the reason."""
    if os.path.exists("/dev/net/tun") and os.stat("/dev/net/tun").st_mode & 0o006 == 0o006:
        pytest.skip("/dev/net/tun is open to everyone here: the tap channel would be chosen")
    path = nobody.workdir("choice")
    code = textwrap.dedent(
        f"""
        import json, os
        from pytest_isolate.tiers import uml_kernel
        from pytest_isolate.tiers.base import Unavailable
        k = {nobody.kernel!r}
        out = {{"uid": os.getuid(), "available": uml_kernel.availability(k), "channel": uml_kernel.choose_channel(k)}}
        try:
            uml_kernel.choose_channel(k, "tap")
        except Unavailable as e:
            out["tap"] = str(e)
        print(json.dumps(out))
        """
    )
    p = nobody.run([nobody.python, "-c", code], path, timeout=120)
    assert p.returncode == 0, p.stderr
    import json

    out = json.loads(p.stdout.strip().splitlines()[-1])
    assert out["uid"] == UID
    assert out["available"] is None
    assert out["channel"] == "veth"
    assert "/dev/net/tun is not accessible to this user" in out["tap"]
    assert nobody.leftovers(path) == []


GATEWAY = """
import hashlib, json, os, sys, time
import execnet
from pytest_isolate.tiers import uml_gateway

kernel, workdir = sys.argv[1], sys.argv[2]
t0 = time.perf_counter()
gw = execnet.makegateway(uml_gateway.gateway_spec(uml_gateway.UmlOptions(kernel=kernel), workdir, sys.executable))
try:
    t1 = time.perf_counter()
    data = os.urandom(8 << 20)
    ch = gw.remote_exec('''
import hashlib, os, socket
data = channel.receive()
channel.send((os.getuid(), [n for _, n in socket.if_nameindex()], hashlib.sha256(data).hexdigest(), data))
''')
    ch.send(data)
    uid, links, digest, back = ch.receive(300)
    t2 = time.perf_counter()
    cfg = json.load(open(os.path.join(workdir, "launch.json")))
    print(json.dumps({
        "uid": uid, "links": links, "channel": cfg["channel"],
        "sent_ok": digest == hashlib.sha256(data).hexdigest(), "back_ok": back == data,
        "boot": t1 - t0, "roundtrip": t2 - t1,
        "uml_uid": os.stat("/proc/%s" % open(os.path.join(workdir, "uml.pid")).read().strip()).st_uid,
    }))
finally:
    gw.exit()
    gw.join(timeout=10)
    uml_gateway.close_guest(workdir)
"""


def test_gateway_as_nobody_carries_8mb_both_ways(nobody: Nobody) -> None:
    path = nobody.workdir("gateway")
    p = nobody.run([nobody.python, "-c", GATEWAY, nobody.kernel, str(path / "g")], path)
    assert p.returncode == 0, p.stdout + p.stderr
    import json

    out = json.loads(p.stdout.strip().splitlines()[-1])
    assert out["channel"] == "veth"
    assert out["uid"] == 0  # root in the guest
    assert out["links"] == ["lo", "vec0"]  # PID 1's namespace: the channel NIC
    assert out["sent_ok"] and out["back_ok"]
    assert out["uml_uid"] == UID  # the guest's kernel ran as the user, not root
    assert nobody.leftovers(path) == []
    assert not (path / "g").exists()


NETWORK_IP = """
import json, os, socket, sys
import execnet
from pytest_isolate.facets import net, netlink
from pytest_isolate.tiers import uml, uml_gateway

kernel, workdir, driver, pkg_root = sys.argv[1:5]
switch = net.Switch.create("umlnb" + os.urandom(3).hex())
peer_addr, plen = net.address_for(63, 1)
r, w = os.pipe()
peer = os.fork()
if peer == 0:  # a peer on the switch, as the jail tier attaches one: echo a line back
    try:
        os.close(r)
        net.enter_switch_userns(switch.path)
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
assert os.read(r, 1) == b"1"
gw = None
try:
    spec = uml_gateway.gateway_spec(uml_gateway.UmlOptions(kernel=kernel, network="ip"), workdir, sys.executable,
                            switch=switch.path)
    gw = execnet.makegateway(spec)
    ch = gw.remote_exec(
        "import subprocess, sys\\n"
        "args = channel.receive()\\n"
        "p = subprocess.run([sys.executable, '-c'] + args, capture_output=True, text=True)\\n"
        "channel.send((p.returncode, p.stdout, p.stderr))\\n"
    )
    ch.send([driver, pkg_root, peer_addr])
    rc, out, err = ch.receive(300)
    cfg = json.load(open(os.path.join(workdir, "launch.json")))
    res = json.loads(out.strip().splitlines()[-1]) if rc == 0 else {"error": err[-2000:]}
    res.update(channel=cfg["channel"], switch_transport=cfg["switch_transport"],
               expect=uml.guest_address(0, 0)[0], switch=switch.path)
    print(json.dumps(res))
finally:
    if gw is not None:
        gw.exit()
        gw.join(timeout=10)
    uml_gateway.close_guest(workdir)
    os.kill(peer, 9)
    os.waitpid(peer, 0)
    switch.close()
"""


def test_network_ip_as_nobody_reaches_a_peer_on_the_switch(nobody: Nobody) -> None:
    """Unprivileged network="ip": the switch is a holder's user + net namespace; the
    launcher joins that user namespace, so the guest's second NIC (a veth on the raw
    transport) moves into the switch; a test in the guest reaches a peer there and
    nothing else (one route)."""
    from tests.uml.test_uml_guest import IP_DRIVER

    path = nobody.workdir("netip")
    p = nobody.run(
        [nobody.python, "-c", NETWORK_IP, nobody.kernel, str(path / "g"), IP_DRIVER, str(nobody.src)],
        path,
    )
    assert p.returncode == 0, p.stdout + p.stderr
    import json

    out = json.loads(p.stdout.strip().splitlines()[-1])
    assert out.get("reply") == "HELLO", out
    assert out["addr"] == out["expect"]
    assert out["routes"] == 1, out
    assert out["channel"] == "veth" and out["switch_transport"] == "raw"
    assert out["switch"].startswith("/proc/")  # a holder's namespace: no root involved
    assert nobody.leftovers(path) == []


SUITE = '''
import ctypes
import hashlib
import os
import random
import socket
import sys

import pytest

HOST_RELEASE = {host_release!r}


def payload(seed, n):
    return random.Random(seed).randbytes(n).hex()


def test_kernel_is_the_guests():
    assert os.uname().release != HOST_RELEASE


def test_root_in_the_guest_mounts(tmp_path):
    assert os.getuid() == 0
    libc = ctypes.CDLL(None, use_errno=True)
    assert libc.mount(b"tmpfs", str(tmp_path).encode(), b"tmpfs", 0, b"size=1m") == 0
    assert libc.umount2(str(tmp_path).encode(), 0) == 0


def test_loopback_only():
    assert [n for _, n in socket.if_nameindex()] == ["lo"]


def test_tmp_path_reaches_the_host(tmp_path):
    (tmp_path / "from-guest").write_text("x")


def test_large_captured_output():
    # 4 MiB of hex on stdout, 64 KiB lines: the report carries it to the host
    text = payload(1, 2 << 20)
    for i in range(0, len(text), 1 << 16):
        sys.stdout.write(text[i : i + (1 << 16)] + "\\n")


def test_large_failure_report():
    pytest.fail(payload(2, 1 << 20), pytrace=False)


@pytest.mark.isolate("uml", network="ip")
def test_network_ip():
    links = [n for _, n in socket.if_nameindex()]
    assert links == ["lo", "eth0"], links
    with open("/proc/net/route") as f:
        routes = f.read().splitlines()[1:]
    assert len(routes) == 1 and routes[0].split()[0] == "eth0", routes
'''


def test_suite_as_nobody_passes_in_a_guest(nobody: Nobody) -> None:
    path = nobody.workdir("suite")
    (path / "test_guest.py").write_text(SUITE.format(host_release=os.uname().release))
    (path / "pytest.ini").write_text("[pytest]\nisolate_on_escape = ignore\njunit_logging = system-out\n")
    _chown_tree(path)
    p = nobody.run(
        [
            nobody.python, "-m", "pytest", "--isolate=uml", f"--isolate-uml-kernel={nobody.kernel}",
            "-q", "-p", "no:cacheprovider", f"--basetemp={path / 'bt'}", "--junitxml=junit.xml",
        ],
        path,
    )
    out = p.stdout + p.stderr
    shown = "\n".join(line[:300] for line in out.splitlines()[-60:])
    assert "1 failed, 6 passed" in out, shown
    assert "FAILED test_guest.py::test_large_failure_report" in out, shown
    cases = {c.get("name"): c for c in ET.parse(path / "junit.xml").getroot().iter("testcase")}
    import random

    # captured output: the 4 MiB arrived byte for byte
    expected = random.Random(1).randbytes(2 << 20).hex()
    sysout = cases["test_large_captured_output"].findtext("system-out") or ""
    got = "".join(line for line in sysout.splitlines() if line and set(line) <= set("0123456789abcdef"))
    assert hashlib.sha256(got.encode()).hexdigest() == hashlib.sha256(expected.encode()).hexdigest()
    # the failure report: its 2 MiB repr of the left side came back whole
    failure = cases["test_large_failure_report"].find("failure")
    assert failure is not None
    big = random.Random(2).randbytes(1 << 20).hex()
    assert big in (failure.text or "") + (failure.get("message") or "")
    files = list((path / "bt").rglob("from-guest"))
    assert files and all(f.stat().st_uid == UID for f in files)
    assert nobody.leftovers(path) == []

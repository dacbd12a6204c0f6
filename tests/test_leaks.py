"""Nothing of the plugin outlives a run: not after passing, failing, crashing and
timed-out tests, leftover daemons and network="ip", not after Ctrl-C during a zone test,
and — after the next run swept it — not after a SIGKILLed controller either.

Each test snapshots the host before and after its inner pytest: mount table, every
cgroup directory whose name contains "isolat", the host's network links (netlink) and
``/run/netns``, the plugin's files in ``/tmp`` and ``/var/tmp``, and processes. Other
engineers run the plugin on this machine at the same time, so an object only counts as
ours when it carries one of our runs' ids (each inner test writes the run id it sees
into its basetemp), our unique token, or a path under our directory; the host's links
are the exception: the plugin never creates one there, so any new ``pi*`` link is a leak.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from pyroute2 import IPRoute

from tests.outputs import token

GRACE = 5.0
ESCAPE = "--isolate-on-escape=warn"  # see test_tiers.py: host mounts of other runs
CGROUP_ROOT = Path("/sys/fs/cgroup")

# Written into every inner directory: each isolated test records the ids of its run
# (the run id from the canary env, the xdist run uid for the shared switch's name).
CONFTEST = '''
import os

import pytest


@pytest.fixture(autouse=True)
def _record_run_id(tmp_path_factory):
    rid = os.environ.get("PYTEST_ISOLATE_CANARY_UNIX", "").removeprefix("pytest-isolate-")
    xuid = os.environ.get("PYTEST_XDIST_TESTRUNUID", "")
    (tmp_path_factory.getbasetemp() / f"runid-{rid or 'unknown'}-{xuid}").touch()
'''


# -- host state ----------------------------------------------------------------------
def _read(path: str) -> str:
    try:
        with open(path, "rb") as f:
            return f.read().decode(errors="replace")
    except OSError:
        return ""


def _cgroup_dirs() -> set[str]:
    out: set[str] = set()
    for hier in CGROUP_ROOT.iterdir():
        if not hier.is_dir() or hier.is_symlink():
            continue
        for dirpath, dirnames, _ in os.walk(hier):
            out.update(os.path.join(dirpath, d) for d in dirnames if "isolat" in d)
    return out


def _links() -> set[str]:
    with IPRoute() as ipr:
        return {link.get_attr("IFLA_IFNAME") for link in ipr.get_links()}


def _processes(markers: tuple[str, ...], root: str) -> set[str]:
    """``pid cwd=... cmdline`` of processes of the plugin or ours (cwd under ``root``)."""
    me = os.getpid()
    out: set[str] = set()
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) == me:
            continue
        cmd = _read(f"/proc/{name}/cmdline").replace("\0", " ").strip()
        if not cmd:  # kernel thread or zombie
            continue
        try:
            cwd = os.readlink(f"/proc/{name}/cwd")
        except OSError:
            cwd = ""
        if any(m in cmd for m in markers) or cwd == root or cwd.startswith(root + "/"):
            out.add(f"{name} cwd={cwd} {cmd}")
    return out


def host_state(root: Path, tok: str) -> dict[str, set[str]]:
    netns = set(os.listdir("/run/netns")) if os.path.isdir("/run/netns") else set()
    files = {str(p) for base in ("/tmp", "/var/tmp") for p in Path(base).glob("pytest-isolate-*")}
    return {
        "mount": set(_read("/proc/self/mountinfo").splitlines()),
        "cgroup": _cgroup_dirs(),
        "link": _links(),
        "netns": netns,
        "file": files,
        "process": _processes(("pytest_isolate", "pytest-isolate", tok), str(root)),
    }


@dataclass
class Owner:
    """What marks a host object as made by our inner runs."""

    root: Path
    token: str
    ids: set[str]

    def owns(self, kind: str, obj: str) -> bool:
        if kind == "link":
            return obj.startswith("pi") or "isolat" in obj
        if self.token in obj or str(self.root) in obj:
            return True
        return any(re.search(rf"pytest-isolate-(switch-)?{re.escape(i)}(?![0-9a-f])", obj) for i in self.ids)


def ours(owner: Owner, before: dict[str, set[str]], now: dict[str, set[str]]) -> list[str]:
    return [
        f"{kind}: {obj}"
        for kind in now
        for obj in sorted(now[kind] - before.get(kind, set()))
        if owner.owns(kind, obj)
    ]


def leaks(owner: Owner, before: dict[str, set[str]], grace: float = GRACE) -> list[str]:
    end = time.monotonic() + grace
    while True:
        left = ours(owner, before, host_state(owner.root, owner.token))
        if not left or time.monotonic() > end:
            return left
        time.sleep(0.1)


def run_ids(path: Path) -> set[str]:
    """Run ids (and xdist switch ids) the inner tests recorded under ``path``."""
    ids: set[str] = set()
    for p in path.rglob("runid-*"):
        _, rid, xuid = p.name.split("-", 2)
        assert rid != "unknown", f"an inner test saw no run id: {p}"
        ids.add(rid)
        if xuid:
            ids.add(f"x{xuid[:10]}")
    return ids


# -- inner runs ----------------------------------------------------------------------
def _env() -> dict[str, str]:
    env = dict(os.environ)
    # Not pytest-randomly: an unisolated test run first records no run id (run_ids).
    env.update({"PYTEST_ADDOPTS": "-p no:hypothesispytest -p no:benchmark -p no:randomly", "PY_COLORS": "0"})
    return env


#: ``python -c`` this, then pytest's arguments: pytest from a terminal's dispositions.
#: An ignored signal is inherited across exec: a suite started under ``nohup`` (SIGHUP)
#: or as a shell's background job (SIGINT, SIGQUIT) would hand its ignores down to the
#: pytest these tests cancel.
AS_FROM_A_TERMINAL = (
    "import os, signal, sys\n"
    "for s in (signal.SIGHUP, signal.SIGINT, signal.SIGQUIT, signal.SIGTERM):\n"
    "    signal.signal(s, signal.SIG_DFL)\n"
    "os.execv(sys.executable, [sys.executable, '-m', 'pytest', *sys.argv[1:]])\n"
)


def popen_pytest(path: Path, *args: str) -> subprocess.Popen[bytes]:
    """pytest in a session (and process group) of its own, as a terminal would run it."""
    out = open(path / "out.txt", "wb")  # noqa: SIM115 - closed with the process
    try:
        return subprocess.Popen(
            [sys.executable, "-c", AS_FROM_A_TERMINAL, f"--basetemp={path / 'basetemp'}", *args],
            cwd=path,
            env=_env(),
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    finally:
        out.close()


def wait_for(pattern: str, path: Path, timeout: float = 60.0) -> Path:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        found = sorted(path.rglob(pattern))
        if found:
            return found[0]
        time.sleep(0.05)
    raise AssertionError(f"{pattern} did not appear under {path} in {timeout}s:\n" + _read(str(path / "out.txt")))


@contextlib.contextmanager
def reaped(proc: subprocess.Popen[bytes]) -> Any:
    """Whatever happens in the test, its pytest (and that process group) is gone after."""
    try:
        yield proc
    finally:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)


def tiers_params(tiers: tuple[str, ...] = ("chroot", "jail", "zone"), **kw: Any) -> str:
    inner = ", ".join(repr(t) for t in tiers)
    extra = "".join(f", {k}={v!r}" for k, v in kw.items())
    return f'@pytest.mark.parametrize("tier", [pytest.param(t, marks=pytest.mark.isolate(t{extra})) for t in ({inner},)])'


MIXED = f'''
import ctypes
import os
import subprocess
import time

import pytest

TOKEN = "{{token}}"


{tiers_params()}
def test_pass(tier):
    pass


{tiers_params()}
def test_fail(tier):
    assert False, "fails on purpose"


{tiers_params()}
def test_segv(tier):
    ctypes.string_at(0)


{tiers_params(timeout="1s")}
def test_timeout_with_child(tier):
    subprocess.Popen(["sh", "-c", "sleep 600; :", TOKEN + "-child"])
    time.sleep(30)


{tiers_params()}
def test_daemon(tier):
    subprocess.Popen(["sh", "-c", "sleep 600; :", TOKEN + "-daemon"], start_new_session=True)


{tiers_params(("jail", "zone"), network="ip")}
def test_network_ip(tier):
    assert "eth0" in os.listdir("/sys/class/net")
'''


def _prepare(tmp_path_factory: pytest.TempPathFactory, name: str, files: dict[str, str], h: Any) -> tuple[Path, str]:
    path = tmp_path_factory.mktemp(name)
    tok = token()
    h.write_files(path, {"conftest.py": CONFTEST, **{k: v.replace("{token}", tok) for k, v in files.items()}})
    return path, tok


def test_no_leaks_after_pass_fail_crash_timeout_daemon_network(
    tmp_path_factory: pytest.TempPathFactory, h: Any
) -> None:
    path, tok = _prepare(tmp_path_factory, "leaks-mixed", {"test_mixed.py": MIXED}, h)
    before = host_state(path, tok)
    result = h.run_pytest(path, ESCAPE, "-rA", "--isolate-report=r.json", timeout=120)
    result.assert_outcomes(passed=8, failed=9)  # fail, segv and timeout fail in each tier
    result.stdout.fnmatch_lines(["tests per tier: chroot 5, jail 6, zone 6; crashed 3; timed out 3*"])
    owner = Owner(path, tok, run_ids(path))
    assert len(owner.ids) == 1, owner.ids
    assert leaks(owner, before) == []


XDIST = f'''
import os

import pytest


{tiers_params(("jail", "zone"), network="ip")}
def test_network_ip(tier):
    assert "eth0" in os.listdir("/sys/class/net")


{tiers_params()}
def test_pass(tier):
    pass
'''


def test_no_leaks_after_xdist_run_with_shared_switch(tmp_path_factory: pytest.TempPathFactory, h: Any) -> None:
    path, tok = _prepare(tmp_path_factory, "leaks-xdist", {"test_xd.py": XDIST}, h)
    before = host_state(path, tok)
    result = h.run_pytest(path, ESCAPE, "-n", "2", "-rA", timeout=120)
    result.assert_outcomes(passed=5)
    owner = Owner(path, tok, run_ids(path))
    assert any(i.startswith("x") for i in owner.ids), owner.ids  # the shared switch's id
    assert leaks(owner, before) == []


INTERRUPT = '''
import os
import subprocess
import time

import pytest

TOKEN = "{token}"


@pytest.mark.isolate("chroot")
def test_chroot_first():
    pass


@pytest.mark.isolate("zone", network="ip", memory="256M", pids=64)
def test_zone_running(tmp_path_factory):
    subprocess.Popen(["sh", "-c", "sleep 600; :", TOKEN + "-child"])
    (tmp_path_factory.getbasetemp() / "started").touch()
    time.sleep(60)


def test_never_reached():
    pass
'''


def _wait_exit(proc: subprocess.Popen[bytes], path: Path, timeout: float = 30.0) -> int:
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        raise AssertionError("pytest did not exit:\n" + _read(str(path / "out.txt"))) from None


def test_no_leaks_after_ctrl_c_during_zone_test(tmp_path_factory: pytest.TempPathFactory, h: Any) -> None:
    path, tok = _prepare(tmp_path_factory, "leaks-sigint", {"test_int.py": INTERRUPT}, h)
    before = host_state(path, tok)
    snap = h.LeakSnapshot(path)
    with reaped(popen_pytest(path, ESCAPE, "-rA")) as proc:
        wait_for("started", path)
        owner = Owner(path, tok, run_ids(path))
        assert len(owner.ids) == 1, owner.ids
        # While the zone test runs, its objects exist (so the check below means something).
        during = ours(owner, before, host_state(path, tok))
        kinds = {line.split(":", 1)[0] for line in during}
        assert {"cgroup", "netns", "file", "process", "mount"} <= kinds, during
        os.killpg(proc.pid, signal.SIGINT)
        rc = _wait_exit(proc, path)
    out = _read(str(path / "out.txt"))
    assert rc == pytest.ExitCode.INTERRUPTED, out
    assert "KeyboardInterrupt" in out, out
    assert "test_never_reached" not in out.split("KeyboardInterrupt", 1)[1], out
    assert leaks(owner, before) == []
    assert snap.leaks() == []


KILLED = INTERRUPT.replace("test_zone_running", "test_zone_running_when_killed")
AFTER = """
import pytest


@pytest.mark.isolate("jail")
def test_next_run():
    pass
"""


@dataclass
class Killed:
    """A run whose controller was SIGKILLed while a zone test ran."""

    owner: Owner
    before: dict[str, set[str]]
    during: list[str]  # our objects just before the kill
    lingering: list[str] = dataclasses.field(default_factory=list)  # processes 2 s after it
    left: list[str] = dataclasses.field(default_factory=list)  # after the sweep


def _start_and_kill(tmp_path_factory: pytest.TempPathFactory, name: str, h: Any) -> Killed:
    path, tok = _prepare(tmp_path_factory, name, {"test_killed.py": KILLED}, h)
    before = host_state(path, tok)
    with reaped(popen_pytest(path, ESCAPE, "-rA")) as proc:
        wait_for("started", path)
        owner = Owner(path, tok, run_ids(path))
        assert len(owner.ids) == 1, owner.ids
        during = ours(owner, before, host_state(path, tok))
        os.kill(proc.pid, signal.SIGKILL)  # the controller only, mid-test
        assert _wait_exit(proc, path) == -signal.SIGKILL
    return Killed(owner, before, during)


def _clean_up(k: Killed) -> None:
    """Remove by hand whatever of a killed run the plugin left (known bugs, see the
    xfail tests): our processes by pid, then the run's own sweep, then what even that
    cannot reach (cgroups under another base, the canary dir)."""
    from pytest_isolate.leftovers import sweep

    for line in ours(k.owner, k.before, host_state(k.owner.root, k.owner.token)):
        if line.startswith("process: "):
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(line.split()[1]), signal.SIGKILL)
    (rid,) = k.owner.ids
    sweep(rid, Path(f"/tmp/pytest-isolate-{rid}"))
    for line in ours(k.owner, k.before, host_state(k.owner.root, k.owner.token)):
        kind, obj = line.split(": ", 1)
        if kind == "cgroup":
            for dirpath, _, _ in sorted(os.walk(obj, topdown=False), key=lambda t: -len(t[0])):
                with contextlib.suppress(OSError):
                    os.rmdir(dirpath)
        elif kind == "file" and obj.startswith("/var/tmp/pytest-isolate-") and rid in obj:
            shutil.rmtree(obj, ignore_errors=True)


@pytest.fixture(scope="module")
def killed_then_next_run(tmp_path_factory: pytest.TempPathFactory, h: Any) -> Any:
    """Kill the controller mid-test, then at once start a second, ordinary run: its
    start-up sweeps runs whose controller is dead (leftovers.sweep_stale)."""
    k = _start_and_kill(tmp_path_factory, "leaks-sigkill", h)
    try:
        path2, tok2 = _prepare(tmp_path_factory, "leaks-after-kill", {"test_after.py": AFTER}, h)
        before2 = host_state(path2, tok2)
        result = h.run_pytest(path2, ESCAPE, "-rA", timeout=60)
        result.assert_outcomes(passed=1)
        k.left = leaks(k.owner, k.before)
        owner2 = Owner(path2, tok2, run_ids(path2))
        assert leaks(owner2, before2) == [], "the sweeping run left something of its own"
        yield k
    finally:
        _clean_up(k)


def test_killed_run_had_host_objects(killed_then_next_run: Killed) -> None:
    """The kill left something to sweep: mounts (chroot's worker tmpfs), cgroups, the
    switch namespace, the run dir, processes."""
    kinds = {line.split(":", 1)[0] for line in killed_then_next_run.during}
    assert {"mount", "cgroup", "netns", "file", "process"} <= kinds, killed_then_next_run.during


def test_next_run_sweeps_what_a_killed_run_left(killed_then_next_run: Killed) -> None:
    assert killed_then_next_run.left == []


SWEEP_ELSEWHERE = """
import sys
from pathlib import Path

from pytest_isolate.leftovers import sweep_stale

cg = Path(sys.argv[1])
(cg / "cgroup.procs").write_text("0")  # this process, into a memory group of its own
sweep_stale()
"""


@pytest.fixture(scope="module")
def killed_then_swept_elsewhere(tmp_path_factory: pytest.TempPathFactory, h: Any) -> Any:
    """Kill the controller mid-test; watch its processes for 2 s; then let a run started
    from another memory cgroup (another terminal, CI job or systemd scope) sweep it."""
    k = _start_and_kill(tmp_path_factory, "leaks-sigkill-elsewhere", h)
    sweeper_cg: Path | None = None
    try:
        time.sleep(2.0)
        k.lingering = [line for line in ours(k.owner, k.before, host_state(k.owner.root, k.owner.token))
                       if line.startswith("process: ")]
        for line in k.lingering:
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(line.split()[1]), signal.SIGKILL)
        own = [line.split(":", 2)[2] for line in _read("/proc/self/cgroup").splitlines()
               if line.split(":")[1] == "memory"]
        assert own, "no v1 memory hierarchy here"
        sweeper_cg = CGROUP_ROOT / "memory" / own[0].lstrip("/") / f"leaktest-sweeper-{k.owner.token}"
        sweeper_cg.mkdir()
        subprocess.run([sys.executable, "-c", SWEEP_ELSEWHERE, str(sweeper_cg)], check=True, timeout=60, env=_env())
        k.left = leaks(k.owner, k.before, grace=1.0)
        yield k
    finally:
        _clean_up(k)
        if sweeper_cg is not None:
            with contextlib.suppress(OSError):
                sweeper_cg.rmdir()


def test_killed_controller_takes_its_workers_down(killed_then_swept_elsewhere: Killed) -> None:
    assert killed_then_swept_elsewhere.lingering == []


def test_sweep_from_another_cgroup_removes_every_cgroup(killed_then_swept_elsewhere: Killed) -> None:
    left = killed_then_swept_elsewhere.left
    assert not [line for line in left if line.startswith("cgroup: ")], left


# -- cancellation: SIGTERM and SIGHUP are Ctrl-C --------------------------------------
CANCEL = '''
import subprocess
import time

import pytest

TOKEN = "{token}"


@pytest.mark.isolate({marker})
def test_running(tmp_path_factory):
    subprocess.Popen(["sh", "-c", "sleep 600; :", TOKEN + "-child"])
    (tmp_path_factory.getbasetemp() / "started").touch()
    time.sleep(60)


def test_never_reached():
    pass
'''

#: (marker arguments, host objects the run has while its test runs).
CANCEL_TIERS = {
    "process": ('"process"', {"file", "process"}),
    "chroot": ('"chroot"', {"file", "process", "mount"}),
    "jail": ('"jail"', {"file", "process"}),
    "zone": ('"zone", memory="256M", pids=64', {"file", "process", "cgroup"}),
    "jail-ip": ('"jail", network="ip"', {"file", "process", "netns"}),
}


@pytest.mark.parametrize(
    ("tier", "sig", "group"),
    [
        *((t, signal.SIGTERM, False) for t in CANCEL_TIERS),
        ("jail-ip", signal.SIGHUP, False),
        ("zone", signal.SIGHUP, False),
        # `timeout` signals its whole process group: the gateway gets it too.
        ("jail-ip", signal.SIGTERM, True),
    ],
    ids=lambda v: v.name if isinstance(v, signal.Signals) else ("group" if v is True else None),
)
def test_cancel_signal_interrupts_and_leaves_nothing(
    tmp_path_factory: pytest.TempPathFactory, h: Any, tier: str, sig: signal.Signals, group: bool
) -> None:
    """SIGTERM (CI cancel, `timeout`, `docker stop`, Kubernetes) and SIGHUP (a closed
    terminal) mid-test end the run as Ctrl-C does: the running test is stopped, pytest
    says the run was interrupted and exits with 2, and every host object of the run is
    gone — mounts, the switch namespace, links, cgroups, processes, /tmp files."""
    marker, kinds = CANCEL_TIERS[tier]
    path, tok = _prepare(tmp_path_factory, f"cancel-{tier}", {"test_cancel.py": CANCEL.replace("{marker}", marker)}, h)
    before = host_state(path, tok)
    snap = h.LeakSnapshot(path)
    with reaped(popen_pytest(path, ESCAPE, "-rA")) as proc:
        wait_for("started", path)
        owner = Owner(path, tok, run_ids(path))
        assert len(owner.ids) == 1, owner.ids
        during = ours(owner, before, host_state(path, tok))
        assert kinds <= {line.split(":", 1)[0] for line in during}, during
        if group:
            os.killpg(proc.pid, sig)
        else:
            os.kill(proc.pid, sig)
        rc = _wait_exit(proc, path)
    out = _read(str(path / "out.txt"))
    assert rc == pytest.ExitCode.INTERRUPTED, out
    assert f"KeyboardInterrupt: Interrupted by {sig.name}" in out, out
    assert "test_never_reached" not in out.split("KeyboardInterrupt", 1)[1], out
    assert leaks(owner, before) == []
    assert snap.leaks() == []


HANDLERS_CONFTEST = """
import signal


def _mine(signum, frame):
    pass


if {users}:
    signal.signal(signal.SIGHUP, _mine)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def _name(handler):
    if isinstance(handler, signal.Handlers):
        return handler.name
    return getattr(handler, "__qualname__", None) or repr(handler)


def pytest_unconfigure(config):
    print("AT END", _name(signal.getsignal(signal.SIGTERM)), _name(signal.getsignal(signal.SIGHUP)))
"""

HANDLERS_TEST = """
import signal

import pytest

from conftest import _name


@pytest.mark.isolate("process")
def test_isolated():
    pass


def test_in_controller():
    print("DURING", _name(signal.getsignal(signal.SIGTERM)), _name(signal.getsignal(signal.SIGHUP)))
"""


@pytest.mark.parametrize("users", [False, True], ids=["default", "users-own"])
def test_cancel_signal_handlers_are_restored_and_respect_the_users(
    h: Any, pytester: pytest.Pytester, users: bool
) -> None:
    """The handlers live as long as the controller: the session end puts the default
    back. A signal the user's code (here a conftest) set a handler for, or ignores (as
    under ``nohup``), stays theirs throughout."""
    pytester.makeconftest(HANDLERS_CONFTEST.replace("{users}", str(users)))
    pytester.makepyfile(test_handlers=HANDLERS_TEST)
    # From a terminal's dispositions, whatever this suite inherited.
    result = pytester.run(
        sys.executable, "-c", AS_FROM_A_TERMINAL, "-p", "no:randomly", "-s", f"--basetemp={pytester.path / 'bt'}"
    )
    result.assert_outcomes(passed=2)
    if users:
        result.stdout.fnmatch_lines(["*DURING SIG_IGN _mine*", "AT END SIG_IGN _mine"])
    else:
        result.stdout.fnmatch_lines(
            ["*DURING CancelSignals._handle CancelSignals._handle*", "AT END SIG_DFL SIG_DFL"]
        )


# -- runs never touch each other ------------------------------------------------------
HOLDING = '''
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

TOKEN = "{token}"


def _wait(path, timeout=50.0):
    end = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < end, f"{path} never came"
        time.sleep(0.05)


def _own_cgroup():
    """This test's cgroup where it can see one (cgroup2 mounted: a uml guest)."""
    if not os.path.exists("/sys/fs/cgroup/cgroup.controllers"):
        return None
    for line in open("/proc/self/cgroup"):
        if line.startswith("0::"):
            return Path("/sys/fs/cgroup" + line.strip()[3:])
    return None


@pytest.mark.isolate({marker})
def test_holding(tmp_path_factory, tmp_path):
    base = tmp_path_factory.getbasetemp()
    subprocess.Popen(["sh", "-c", "sleep 600; :", TOKEN + "-child"])
    cgroup = _own_cgroup()
    (base / "started").touch()
    _wait(base / "go-inner")
    for tier in {inner}:
        d = tmp_path / tier
        d.mkdir()
        (d / "test_inner.py").write_text("def test_inner():\\n    pass\\n")
        env = dict(os.environ, PYTEST_ADDOPTS="{addopts}")
        p = subprocess.run(
            [sys.executable, "-m", "pytest", f"--isolate={tier}", "--isolate-unavailable=skip", "-rA",
             "-p", "no:cacheprovider", f"--basetemp={d / 'bt'}"],
            cwd=d, env=env, capture_output=True, text=True, timeout=60,
        )
        (base / f"inner-{tier}.txt").write_text(p.stdout + p.stderr)
        assert p.returncode == 0, p.stdout + p.stderr
    assert cgroup is None or cgroup.is_dir(), f"an inner run removed this test's cgroup {cgroup}"
    (base / "inner-done").touch()
    _wait(base / "go")
'''


def _holding(tmp_path_factory: pytest.TempPathFactory, h: Any, name: str, marker: str, inner: tuple[str, ...]) -> tuple[Path, str]:
    from tests.conftest import FAST_ADDOPTS

    text = HOLDING.replace("{marker}", marker).replace("{inner}", repr(inner)).replace("{addopts}", FAST_ADDOPTS)
    return _prepare(tmp_path_factory, name, {"test_holding.py": text}, h)


def _intact(owner: Owner, before: dict[str, set[str]], held: list[str]) -> list[str]:
    """Objects of ``owner``'s run that were there (``held``) and are gone now."""
    now = set(ours(owner, before, host_state(owner.root, owner.token)))
    return [line for line in held if line not in now]


@pytest.mark.parametrize(
    ("outer", "inner"),
    [
        ('"jail", network="ip"', ("process", "zone")),
        ('"zone", network="ip", memory="256M"', ("process", "zone")),
    ],
    ids=["jail", "zone"],
)
def test_run_inside_a_sandbox_leaves_the_outer_run_alone(
    tmp_path_factory: pytest.TempPathFactory, h: Any, outer: str, inner: tuple[str, ...]
) -> None:
    """A test runs pytest with the plugin inside its sandbox (as a plugin's pytester
    suite does). The inner runs see the outer run's record under /tmp but not its pid
    namespace: they must not take it for a dead run. The outer run's objects (switch,
    cgroups, run dir, processes) are all still there after the inner runs, and its test
    passes. (A zone inside a jail or zone cannot be made: that inner run is skipped as
    unavailable, and must do no harm either.)"""
    path, tok = _holding(tmp_path_factory, h, f"nested-{outer.split(',')[0].strip(chr(34))}", outer, inner)
    before = host_state(path, tok)
    snap = h.LeakSnapshot(path)
    with reaped(popen_pytest(path, ESCAPE, "-rA")) as proc:
        base = wait_for("started", path).parent  # the sandbox's basetemp
        owner = Owner(path, tok, run_ids(path))
        held = ours(owner, before, host_state(path, tok))
        assert {"file", "netns", "process"} <= {line.split(":", 1)[0] for line in held}, held
        (base / "go-inner").touch()
        wait_for("inner-done", path)
        gone = _intact(owner, before, held)
        (base / "go").touch()
        rc = _wait_exit(proc, path, timeout=60)
    out = _read(str(path / "out.txt"))
    inner_out = "\n".join(_read(str(p)) for p in sorted(path.rglob("inner-*.txt")))
    # The outer run's own output too: how its test ended says what took the object.
    assert gone == [], f"{inner_out}\n--- the outer run ---\n{out[-6000:]}"
    assert rc == 0, out + inner_out
    assert "1 passed" in out, out
    # Not even inside the sandbox: an inner run that took the outer run for dead swept
    # its switch and run dir there (seen as blocked escapes).
    verdicts = [ln for ln in out.splitlines() if "BLOCKED" in ln or "ESCAPED" in ln]
    assert not [ln for ln in verdicts if "/run/netns" in ln or any(i in ln for i in owner.ids)], out
    assert leaks(owner, before) == []
    assert snap.leaks() == []


SIDE = '''
import pytest


@pytest.mark.isolate("jail", network="ip")
def test_jail_ip():
    pass


@pytest.mark.isolate("zone", network="ip", memory="64M")
def test_zone_ip():
    pass


@pytest.mark.isolate("process")
def test_process():
    pass
'''


def test_two_runs_side_by_side_each_sweep_only_their_own(tmp_path_factory: pytest.TempPathFactory, h: Any) -> None:
    """Run A holds a zone test with a switch and a cgroup; run B starts, runs every host
    tier (its own switch and cgroups, its start-up sweep of dead runs) and ends while A
    still runs. Everything of A is still there after B; both pass; neither leaves
    anything."""
    path, tok = _holding(tmp_path_factory, h, "side-a", '"zone", network="ip", memory="256M"', ())
    path2, tok2 = _prepare(tmp_path_factory, "side-b", {"test_side.py": SIDE}, h)
    before = host_state(path, tok)
    with reaped(popen_pytest(path, ESCAPE, "-rA")) as proc:
        base = wait_for("started", path).parent
        owner = Owner(path, tok, run_ids(path))
        held = ours(owner, before, host_state(path, tok))
        assert {"file", "netns", "cgroup", "process"} <= {line.split(":", 1)[0] for line in held}, held
        before2 = host_state(path2, tok2)
        result = h.run_pytest(path2, ESCAPE, "-rA", timeout=60)
        result.assert_outcomes(passed=3)
        gone = _intact(owner, before, held)
        (base / "go-inner").touch()
        (base / "go").touch()
        rc = _wait_exit(proc, path, timeout=60)
    out = _read(str(path / "out.txt"))
    assert gone == [], "run B removed objects of run A"
    assert rc == 0, out
    owner2 = Owner(path2, tok2, run_ids(path2))
    assert leaks(owner2, before2) == []
    assert leaks(owner, before) == []


STOPPED = '''
import subprocess
import time

import pytest

TOKEN = "{token}"


@pytest.mark.isolate("process")
def test_process_running(tmp_path_factory):
    subprocess.Popen(["sh", "-c", "sleep 600; :", TOKEN + "-child"], start_new_session=True)
    (tmp_path_factory.getbasetemp() / "started").touch()
    time.sleep(60)
'''
TRIVIAL = '''
import pytest


@pytest.mark.isolate("process")
def test_trivial():
    pass
'''


def test_next_run_kills_the_processes_of_a_killed_run(tmp_path_factory: pytest.TempPathFactory, h: Any) -> None:
    """The controller is SIGKILLed while its fork server is stopped (so it cannot see the
    controller go and stop its test): the server, the test and the test's daemon stay.
    The next run, at the process tier, finds the run dead and kills them, then removes
    the rest."""
    path, tok = _prepare(tmp_path_factory, "killed-stopped", {"test_stopped.py": STOPPED}, h)
    before = host_state(path, tok)
    owner = Owner(path, tok, set())
    try:
        with reaped(popen_pytest(path, ESCAPE, "-rA")) as proc:
            wait_for("started", path)
            owner = Owner(path, tok, run_ids(path))
            servers = h.fork_servers_under(path)
            assert servers, "no fork server found"
            for pid, _ in servers:
                os.kill(pid, signal.SIGSTOP)
            os.kill(proc.pid, signal.SIGKILL)
            assert _wait_exit(proc, path) == -signal.SIGKILL
        time.sleep(1.0)
        left = ours(owner, before, host_state(path, tok))
        assert any(tok in line for line in left), left  # the daemon is still there
        path2, tok2 = _prepare(tmp_path_factory, "after-stopped", {"test_trivial.py": TRIVIAL}, h)
        before2 = host_state(path2, tok2)
        h.run_pytest(path2, ESCAPE, "-rA", timeout=60).assert_outcomes(passed=1)
        assert leaks(owner, before) == []
        assert leaks(Owner(path2, tok2, run_ids(path2)), before2) == []
    finally:
        for line in ours(owner, before, host_state(path, tok)):
            if line.startswith("process: "):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(line.split()[1]), signal.SIGKILL)

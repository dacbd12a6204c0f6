"""Shared helpers for the tests that run the plugin in a real pytest subprocess.

Every test that runs the plugin (it requests ``pytester``, or uses :func:`run_pytest`)
is followed by a leak check: the plugin promises that nothing of a run outlives it —
no ``/tmp/pytest-isolate-*`` run dir, no fork server, no mount. Other engineers may run
the plugin on this machine at the same time, so the check only blames objects that
appeared during the test *and* that no live run still owns (the run dir's ``owner``
names a live controller, or a live process — e.g. a fork server holding ``server.log``
— still uses it).
"""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

#: Plugins installed in this environment that a test does not ask for: each costs
#: ~0.4 s of import per pytest process (controller + fork server), and some change what
#: every run does (pytest-randomly reorders, pytest-asyncio warns about its ini), so the
#: suite turns them off in every pytest it starts; tests/plugins/ turns on the one each
#: test is about. Never the cache provider: --lf/--ff need it.
OPTIONAL_PLUGINS = (
    "hypothesispytest", "benchmark", "randomly", "asyncio", "rerunfailures", "timeout", "syrupy",
    "html", "html_fixtures", "metadata", "env", "pytest_mock", "pytest_cov", "dependency",
    "flaky", "pytest-bdd", "allure_pytest", "inline_snapshot", "pytest-testmon",
    "pytest-retry", "memray", "regressions", "datadir", "pytest-split", "pytest_reportlog",
    "profiling", "mypy", "ruff", "recording", "check",
)
FAST_ADDOPTS = " ".join(f"-p no:{name}" for name in OPTIONAL_PLUGINS)
#: How long objects of a finished run may take to disappear before it counts as a leak.
LEAK_GRACE = 5.0
RUN_DIR_RE = re.compile(r"/tmp/pytest-isolate-[0-9a-f]+")
RUN_CGROUP_RE = re.compile(r"pytest-isolate-([0-9a-f]+)")


# -- /proc helpers -----------------------------------------------------------------
def _read(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError:
        return b""


def cmdline(pid: int) -> str:
    return _read(f"/proc/{pid}/cmdline").replace(b"\0", b" ").decode(errors="replace").strip()


def all_pids() -> list[int]:
    return [int(p) for p in os.listdir("/proc") if p.isdigit()]


def procs_with(token: str) -> list[tuple[int, str]]:
    """Live processes whose argv contains ``token`` (zombies have an empty cmdline)."""
    me = os.getpid()
    out = []
    for pid in all_pids():
        if pid == me:
            continue
        cl = cmdline(pid)
        if token in cl:
            out.append((pid, cl))
    return out


def wait_gone(token: str, timeout: float = LEAK_GRACE) -> list[tuple[int, str]]:
    """Processes with ``token`` still alive after ``timeout`` (empty when all gone)."""
    end = time.monotonic() + timeout
    while True:
        left = procs_with(token)
        if not left or time.monotonic() > end:
            return left
        time.sleep(0.05)


def _cwd(pid: int) -> str:
    try:
        return os.readlink(f"/proc/{pid}/cwd")
    except OSError:
        return ""


def comm(pid: int) -> str:
    return _read(f"/proc/{pid}/comm").decode(errors="replace").strip()


def ppid(pid: int) -> int:
    stat = _read(f"/proc/{pid}/stat")
    try:
        return int(stat.rsplit(b")", 1)[1].split()[1])
    except (IndexError, ValueError):
        return 0


#: ``/proc/<pid>/comm`` of the stem and of a gateway forked from it (their command
#: line is the controller's); a server forked by such a gateway is its child.
WORKER_NAMES = ("isolate-stem", "isolate-gateway")


def is_fork_server(pid: int) -> bool:
    """Spawned (its argv names the module) or forked from the stem (its parent is a
    gateway forked from it)."""
    return "pytest_isolate.forkserver" in cmdline(pid) or (
        comm(ppid(pid)) == "isolate-gateway" and comm(pid) not in WORKER_NAMES
    )


def _under(pid: int, root: Path) -> bool:
    prefix = str(root)
    return _cwd(pid) == prefix or _cwd(pid).startswith(prefix + "/")


def fork_servers_under(root: Path) -> list[tuple[int, str]]:
    """Fork servers started from a directory under ``root`` (our pytester dirs): the
    server's cwd is the invocation dir of the run that started it."""
    me = os.getpid()
    return [
        (pid, cmdline(pid)) for pid in all_pids() if pid != me and is_fork_server(pid) and _under(pid, root)
    ]


def workers_under(root: Path) -> list[tuple[int, str]]:
    """Stems and forked gateways of runs started from a directory under ``root``."""
    return [(pid, comm(pid)) for pid in all_pids() if comm(pid) in WORKER_NAMES and _under(pid, root)]


def run_dirs() -> set[str]:
    return {str(p) for p in Path("/tmp").glob("pytest-isolate-*") if RUN_DIR_RE.fullmatch(str(p))}


def isolate_cgroups() -> set[str]:
    """Every cgroup directory a run names after itself (``pytest-isolate-<run id>``),
    at any depth of every hierarchy: a run inside a cgroup makes its own below it."""
    out: set[str] = set()
    for hier in Path("/sys/fs/cgroup").iterdir():
        if hier.is_symlink() or not hier.is_dir():
            continue
        for dirpath, dirnames, _ in os.walk(hier):
            out.update(os.path.join(dirpath, d) for d in dirnames if RUN_CGROUP_RE.fullmatch(d))
            dirnames[:] = [d for d in dirnames if not RUN_CGROUP_RE.fullmatch(d)]  # a run's own groups
    return out


def isolate_mounts() -> set[str]:
    text = _read("/proc/self/mountinfo").decode(errors="replace")
    return {line for line in text.splitlines() if "pytest-isolate" in line}


def paths_in_use() -> set[str]:
    """Every cwd and open file of every live process (to tell a live run from a leak)."""
    used: set[str] = set()
    for pid in all_pids():
        used.add(_cwd(pid))
        with contextlib.suppress(OSError):
            for fd in os.listdir(f"/proc/{pid}/fd"):
                with contextlib.suppress(OSError):
                    used.add(os.readlink(f"/proc/{pid}/fd/{fd}"))
    return used


def _owner_alive(run_dir: str) -> bool:
    """The controller writes ``<pid> <starttime>`` to ``owner`` in its run dir."""
    try:
        pid = int(Path(run_dir, "owner").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return False
    return os.path.exists(f"/proc/{pid}") and bool(cmdline(pid))


def _in_use(run_dir: str, used: set[str]) -> bool:
    if _owner_alive(run_dir):
        return True
    return any(u == run_dir or u.startswith(run_dir + "/") for u in used)


class LeakSnapshot:
    """What existed before a plugin run; :meth:`leaks` lists what the run left."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.dirs = run_dirs()
        self.mounts = isolate_mounts()
        self.cgroups = isolate_cgroups()

    def _current(self) -> list[str]:
        problems = [f"fork server left running: pid {p} {c}" for p, c in fork_servers_under(self.root)]
        problems += [f"{c} left running: pid {p}" for p, c in workers_under(self.root)]
        new_dirs = run_dirs() - self.dirs
        new_mounts = isolate_mounts() - self.mounts
        new_cgroups = isolate_cgroups() - self.cgroups
        if new_dirs or new_mounts or new_cgroups:
            used = paths_in_use()
            for d in sorted(new_dirs):
                if not _in_use(d, used):
                    problems.append(f"run dir left behind: {d}")
            for m in sorted(new_mounts):
                owner = RUN_DIR_RE.search(m)
                if owner is None or not _in_use(owner.group(0), used):
                    problems.append(f"mount left behind: {m}")
            for c in sorted(new_cgroups):
                run = RUN_CGROUP_RE.fullmatch(os.path.basename(c))
                if run is None or not _in_use(f"/tmp/pytest-isolate-{run.group(1)}", used):
                    problems.append(f"cgroup left behind: {c}")
        return problems

    def leaks(self, grace: float = LEAK_GRACE) -> list[str]:
        end = time.monotonic() + grace
        while True:
            problems = self._current()
            if not problems or time.monotonic() > end:
                return problems
            time.sleep(0.1)


def pytest_configure(config: pytest.Config) -> None:
    # Registered here, not in pyproject.toml: setup.sh reinstalls the package whenever
    # pyproject.toml changes.
    config.addinivalue_line(
        "markers", "soak: the 20,000-test runs of test_soak.py (minutes per tier); -m 'not soak' skips them"
    )


@pytest.fixture(scope="session")
def leak_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Every pytester dir and run_pytest dir of this session lives below this."""
    return tmp_path_factory.getbasetemp()


@pytest.fixture(autouse=True)
def _isolate_leak_check(request: pytest.FixtureRequest) -> Iterator[None]:
    """For tests that run the plugin: faster inner pytests, and nothing left behind."""
    if "pytester" not in request.fixturenames:
        yield
        return
    request.getfixturevalue("pytester")  # set up first: it chdirs and resets the env
    # pytester removed PYTEST_ADDOPTS when it was set up; this one is ours.
    request.getfixturevalue("monkeypatch").setenv("PYTEST_ADDOPTS", FAST_ADDOPTS)
    snap = LeakSnapshot(request.getfixturevalue("leak_root"))
    yield
    leaks = snap.leaks()
    assert not leaks, f"{request.node.nodeid} left behind:\n" + "\n".join(leaks)


# -- running pytest once for several tests -----------------------------------------
def run_pytest(
    path: Path, *args: str, timeout: float = 60.0, env: dict[str, str] | None = None
) -> pytest.RunResult:
    """Run ``python -m pytest`` in ``path`` the way ``pytester.runpytest_subprocess``
    does, for module-scoped fixtures (pytester is function-scoped) that run a suite
    once and let several tests assert on the same result. Checks for leaks itself."""
    full_env = dict(os.environ)
    full_env.pop("PYTEST_ADDOPTS", None)
    full_env.update({"PYTEST_ADDOPTS": FAST_ADDOPTS, "PY_COLORS": "0"})
    full_env.update(env or {})
    basetemp = path / "basetemp"
    snap = LeakSnapshot(path)
    t0 = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", f"--basetemp={basetemp}", *args],
        cwd=path,
        env=full_env,
        capture_output=True,
        timeout=timeout,
    )
    duration = time.monotonic() - t0
    out = proc.stdout.decode(errors="replace").splitlines()
    err = proc.stderr.decode(errors="replace").splitlines()
    result = pytest.RunResult(proc.returncode, out, err, duration)
    leaks = snap.leaks()
    assert not leaks, "pytest " + " ".join(args) + " left behind:\n" + "\n".join(leaks)
    return result


def write_files(path: Path, files: dict[str, str]) -> None:
    import textwrap

    for name, text in files.items():
        p = path / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(textwrap.dedent(text).lstrip("\n"))


@contextlib.contextmanager
def home_project(prefix: str, files: dict[str, str]) -> Iterator[Path]:
    """A project where real ones live: below the home dir (not /tmp, /var/tmp or
    /dev/shm, below which a write into a project is never an escape), removed after."""
    import pwd
    import shutil
    import uuid

    base = Path(pwd.getpwuid(os.getuid()).pw_dir) / ".cache" / "pytest-isolate-tests"  # pytester moves HOME
    assert not str(base).startswith(("/tmp/", "/var/tmp/", "/dev/shm/")), base
    d = base / f"{prefix}-{uuid.uuid4().hex[:12]}"
    d.mkdir(parents=True)
    write_files(d, files)
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)
        with contextlib.suppress(OSError):
            base.rmdir()


def junit_cases(path: Path, drop_prefix: str = "isolate_") -> list[dict[str, object]]:
    """The testcases of a junit file as comparable dicts (properties without ours)."""
    import xml.etree.ElementTree as ET

    cases = []
    for tc in ET.parse(path).getroot().iter("testcase"):
        case: dict[str, object] = {"name": tc.get("name"), "classname": tc.get("classname"), "properties": []}
        for child in tc:
            if child.tag == "properties":
                case["properties"] = [
                    (p.get("name"), p.get("value"))
                    for p in child
                    if not (p.get("name") or "").startswith(drop_prefix)
                ]
            else:
                case[child.tag] = (child.get("message"), child.get("type"), (child.text or "").strip())
        cases.append(case)
    return cases


def junit_properties(path: Path) -> dict[str, dict[str, str]]:
    """``{testcase name: {property: value}}`` (the last value wins for repeated names)."""
    import xml.etree.ElementTree as ET

    out: dict[str, dict[str, str]] = {}
    for tc in ET.parse(path).getroot().iter("testcase"):
        props = out.setdefault(str(tc.get("name")), {})
        for p in tc.iter("property"):
            props[str(p.get("name"))] = str(p.get("value"))
    return out


@pytest.fixture(scope="session")
def h() -> object:
    """This module's helpers, for test modules (importing ``conftest`` by name breaks as
    soon as another test directory has a conftest of its own)."""
    return _SELF


# Captured at import: later conftests (tests/tiers/) are also imported as "conftest".
_SELF = sys.modules[__name__]

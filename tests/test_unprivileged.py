"""The plugin run by an unprivileged user (uid 65534) with user namespaces.

``/root`` is mode 700, so the project's pyenv Python is out of reach of other users: a
session fixture builds a venv with Debian's ``/usr/bin/python3`` in a directory uid
65534 can read, installs pytest, execnet, pyroute2 and pytest-xdist (the versions this
environment has) and the plugin from a copy of the working tree. Inner runs execute as
uid 65534 with no supplementary groups, in a directory that user owns.

What docs/tiers.md promises unprivileged: ``process`` needs nothing; ``jail`` runs in a
user namespace, the test is uid 0 inside mapped to the user outside (its ``tmp_path``
files belong to the user, other users' files show up as ``nobody``, ``chown`` to other
ids fails); ``zone`` needs a delegated cgroup (this host's cgroups are v1 and root's:
unavailable, with a line naming the cgroup problem); ``chroot`` needs real root and
says to use ``jail``.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path
from typing import Any

import pytest

from tests.outputs import records, seen

UID = GID = 65534
REPO = Path(__file__).resolve().parent.parent
ESCAPE = "--isolate-on-escape=warn"  # see test_tiers.py: host mounts of other runs
#: Installed into the venv, pinned to what this environment runs.
REQUIREMENTS = ("pytest", "execnet", "pyroute2", "pytest-xdist")


def _chown_tree(path: Path) -> None:
    for dirpath, dirnames, filenames in os.walk(path):
        os.chown(dirpath, UID, GID)
        for name in dirnames + filenames:
            os.chown(os.path.join(dirpath, name), UID, GID, follow_symlinks=False)


@pytest.fixture(scope="session")
def nobody_venv() -> Iterator[Path]:
    """A venv uid 65534 can run, with the plugin installed from a copy of the tree.

    Built once per session (~10-20 s, most of it pip), removed at the end."""
    python3 = shutil.which("python3", path="/usr/bin")
    if python3 is None:  # pragma: no cover - every Debian has it
        pytest.skip("no /usr/bin/python3 to build a venv other users can run")
    top = Path(tempfile.mkdtemp(prefix="isolate-unpriv-", dir="/tmp"))
    try:
        top.chmod(0o755)
        venv = top / "venv"
        subprocess.run([python3, "-m", "venv", str(venv)], check=True, capture_output=True, timeout=120)
        pins = [f"{name}=={metadata.version(name)}" for name in REQUIREMENTS]
        pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
        subprocess.run([*pip, *pins], check=True, capture_output=True, timeout=300)
        src = top / "src"
        shutil.copytree(REPO / "pytest_isolate", src / "pytest_isolate", ignore=shutil.ignore_patterns("__pycache__"))
        for name in ("pyproject.toml", "README.md"):
            shutil.copy(REPO / name, src / name)
        subprocess.run([*pip, str(src)], check=True, capture_output=True, timeout=300)
        yield venv
    finally:
        shutil.rmtree(top, ignore_errors=True)


def _processes_under(root: Path) -> list[str]:
    out = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            cwd = os.readlink(f"/proc/{name}/cwd")
            with open(f"/proc/{name}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if cmd and (cwd == str(root) or cwd.startswith(f"{root}/")):
            out.append(f"{name} {cmd}")
    return out


def run_as_nobody(
    venv: Path, name: str, files: dict[str, str], *args: str, h: Any, timeout: float = 120,
    parent: Path | None = None,
) -> tuple[Path, pytest.RunResult]:
    """Run the venv's pytest as uid/gid 65534 in a new dir owned by that user.

    The dir sits next to the venv (or in ``parent``), not under pytest's basetemp:
    /tmp/pytest-of-root is mode 700, and every pytest session of root resets it to that."""
    path = Path(tempfile.mkdtemp(prefix=f"{name}-", dir=parent or venv.parent))
    h.write_files(path, files)
    _chown_tree(path)
    env = {
        "PATH": f"{venv}/bin:/usr/bin:/bin",
        "HOME": str(path),
        "PY_COLORS": "0",
        "COLUMNS": "250",
        "LANG": "C.UTF-8",
    }
    snap = h.LeakSnapshot(path)
    t0 = time.monotonic()
    proc = subprocess.run(
        [str(venv / "bin" / "python"), "-m", "pytest", f"--basetemp={path / 'basetemp'}", *args],
        cwd=path,
        env=env,
        user=UID,
        group=GID,
        extra_groups=[],
        capture_output=True,
        timeout=timeout,
    )
    result = pytest.RunResult(
        proc.returncode,
        proc.stdout.decode(errors="replace").splitlines(),
        proc.stderr.decode(errors="replace").splitlines(),
        time.monotonic() - t0,
    )
    assert snap.leaks() == []
    end = time.monotonic() + 5
    while (left := _processes_under(path)) and time.monotonic() < end:
        time.sleep(0.1)
    assert left == [], f"processes of the unprivileged run left: {left}"
    return path, result


SUITE = '''
import ctypes
import errno
import json
import os
import socket
from pathlib import Path

import pytest

TOKEN = "{token}"


def dump(tmp_path, name, data):
    (tmp_path / f"seen-{name}.json").write_text(json.dumps(data))


@pytest.mark.isolate("process")
def test_process(tmp_path):
    dump(tmp_path, "process", {"uid": os.getuid(), "euid": os.geteuid()})


def _errno(fn):
    try:
        fn()
    except OSError as exc:
        return exc.errno
    return 0


@pytest.mark.isolate("jail")
def test_jail(tmp_path):
    (tmp_path / "mine").write_text("x")
    readonly = tmp_path / "readonly"
    readonly.write_text("x")
    readonly.chmod(0o444)
    chown = _errno(lambda: os.chown(tmp_path / "mine", 1, 1))
    pids = sorted(int(p) for p in os.listdir("/proc") if p.isdigit())
    dump(tmp_path, "jail", {
        "uid": os.getuid(),
        "gid": os.getgid(),
        "euid": os.geteuid(),
        "uid_map": open("/proc/self/uid_map").read().split(),
        "mine_uid_inside": os.stat(tmp_path / "mine").st_uid,
        "etc_shadow_uid_inside": os.stat("/etc/shadow").st_uid,
        "chown_errno": chown,
        "hostname": socket.gethostname(),
        "pid": os.getpid(),
        "pids": pids,
        "links": sorted(os.listdir("/sys/class/net")),
        # Below a top-level dir: each of those is a layer whose root the user owns inside.
        "etc_errno": _errno(lambda: Path("/usr/lib/isolate-" + TOKEN).write_text("inside")),
        "readonly_errno": _errno(lambda: open(readonly, "w").close()),
    })


@pytest.mark.isolate("jail", network="ip")
def test_jail_network_ip(tmp_path):
    dump(tmp_path, "jail-ip", {"links": sorted(os.listdir("/sys/class/net"))})


@pytest.mark.isolate("jail")
def test_jail_segv():
    ctypes.string_at(0)


@pytest.mark.isolate("jail")
def test_jail_after_segv():
    pass


@pytest.mark.isolate("zone")
def test_zone():
    pass


@pytest.mark.isolate("chroot")
def test_chroot():
    pass
'''


@pytest.fixture(scope="module")
def nobody_run(nobody_venv: Path, h: Any) -> dict[str, Any]:
    tok = f"isotok-{os.urandom(6).hex()}"
    files = {"test_unpriv.py": SUITE.replace("{token}", tok)}
    path, result = run_as_nobody(nobody_venv, "tiers", files, ESCAPE, "-rA", "--isolate-report=r.json", h=h)
    return {"path": path, "token": tok, "result": result, "records": records(path / "r.json")}


def test_outcomes(nobody_run: dict[str, Any]) -> None:
    result = nobody_run["result"]
    result.assert_outcomes(passed=4, failed=3)
    result.stdout.fnmatch_lines(
        [
            "PASSED test_unpriv.py::test_process",
            "PASSED test_unpriv.py::test_jail",
            "PASSED test_unpriv.py::test_jail_network_ip",
            "PASSED test_unpriv.py::test_jail_after_segv",
        ],
        consecutive=False,
    )


def test_process_tier_runs_as_the_user(nobody_run: dict[str, Any]) -> None:
    assert seen(nobody_run["path"], "process") == {"uid": UID, "euid": UID}


def test_jail_in_a_user_namespace(nobody_run: dict[str, Any]) -> None:
    """The test runs as the user, as in-process: the same ids, no capability (its user
    namespace maps them to uid 0 of the sandbox's, which is the user outside), so
    permission checks come out as in-process; nothing more of the host's ids."""
    got = seen(nobody_run["path"], "jail")
    assert (got["uid"], got["gid"], got["euid"]) == (UID, GID, UID)
    assert got["uid_map"] == [str(UID), "0", "1"]
    assert got["mine_uid_inside"] == UID
    assert got["etc_shadow_uid_inside"] == 65534  # root's file: unmapped, shown as nobody
    assert got["chown_errno"] in (1, 22)  # EPERM / EINVAL: no other ids to give away
    assert got["etc_errno"] == got["readonly_errno"] == 13  # EACCES, as in-process
    # The same view as a root jail: own hostname, PID namespace, network, root.
    assert got["hostname"] == "test-jail"
    assert got["pid"] <= 3 and max(got["pids"]) <= 5, got
    assert got["links"] == ["lo"]
    assert not os.path.exists(f"/usr/lib/isolate-{nobody_run['token']}")


def test_jail_tmp_path_files_belong_to_the_user(nobody_run: dict[str, Any]) -> None:
    (mine,) = (nobody_run["path"] / "basetemp").rglob("mine")
    st = mine.stat()
    assert (st.st_uid, st.st_gid) == (UID, GID)
    rec = nobody_run["records"]["test_unpriv.py::test_jail"]
    assert not any("/usr/lib/" in c for c in rec["changes"] or ()), rec["changes"]


def test_jail_network_ip_unprivileged(nobody_run: dict[str, Any]) -> None:
    assert seen(nobody_run["path"], "jail-ip") == {"links": ["eth0", "lo"]}


def test_jail_crash_unprivileged(nobody_run: dict[str, Any]) -> None:
    rec = nobody_run["records"]["test_unpriv.py::test_jail_segv"]
    assert rec["crashed"] is True and rec["signal"] == "SIGSEGV"


def test_zone_says_the_cgroup_is_not_delegated(nobody_run: dict[str, Any]) -> None:
    """This host's controllers are cgroup v1, root's: nothing to delegate to uid 65534."""
    rec = nobody_run["records"]["test_unpriv.py::test_zone"]
    line = rec["unavailable"]
    assert "\n" not in line
    assert line.startswith("the zone tier needs a cgroup of its own per test: ")
    assert re.search(r"cgroup v1 \w+ hierarchy /sys/fs/cgroup/\w+ is not writable by uid 65534", line), line
    assert "Delegate=yes" in line and "run as root" in line
    # The short summary cuts long lines at the terminal width: its start is enough there.
    nobody_run["result"].stdout.fnmatch_lines([f"UNAVAILABLE {line}", f"FAILED test_unpriv.py::test_zone - {line[:80]}*"])


def test_chroot_needs_root_and_names_jail(nobody_run: dict[str, Any]) -> None:
    line = nobody_run["records"]["test_unpriv.py::test_chroot"]["unavailable"]
    assert line == (
        "the chroot tier needs root (it mounts an overlay in the host mount namespace); "
        "run pytest as root, or use tier 'jail', which works unprivileged in a user namespace"
    )


def test_unavailable_skip_unprivileged(nobody_venv: Path, h: Any) -> None:
    files = {"test_skip.py": "import pytest\n\n@pytest.mark.isolate('zone')\ndef test_z():\n    pass\n"}
    _, result = run_as_nobody(nobody_venv, "skip", files, "--isolate-unavailable=skip", "-rA", h=h)
    result.assert_outcomes(skipped=1)
    result.stdout.fnmatch_lines(["SKIPPED [[]1[]] test_skip.py:*: the zone tier needs a cgroup of its own per test: *"])


NET_PAIR = '''
import fcntl
import socket
import struct

import pytest

pytestmark = pytest.mark.isolate("jail", network="ip", timeout="20s")
BCAST, PORT, UDP = "10.223.255.255", 7777, 7778


def my_addr():
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    return socket.inet_ntoa(fcntl.ioctl(s.fileno(), 0x8915, struct.pack("256s", b"eth0"))[20:24])


def test_server():
    me = my_addr()
    srv = socket.create_server((me, PORT))
    srv.settimeout(6)
    u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    u.bind(("", UDP))
    u.settimeout(6)
    _, peer = u.recvfrom(100)
    u.sendto(me.encode(), peer)
    conn, _ = srv.accept()
    assert conn.recv(5) == b"hello"


def test_client():
    u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    u.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
    u.settimeout(0.2)
    addr = None
    for _ in range(25):
        u.sendto(b"where", (BCAST, UDP))
        try:
            addr = u.recvfrom(100)[0].decode()
            break
        except TimeoutError:
            pass
    assert addr, "no answer to the broadcast"
    socket.create_connection((addr, PORT), timeout=5).sendall(b"hello")
'''


def test_network_ip_jails_reach_each_other_unprivileged(nobody_venv: Path, h: Any) -> None:
    _, result = run_as_nobody(nobody_venv, "net", {"test_pair.py": NET_PAIR}, ESCAPE, "-n", "2", "-rA", h=h)
    result.assert_outcomes(passed=2)


def test_kept_files_reach_the_users_tree_unprivileged(nobody_venv: Path, h: Any) -> None:
    """``keep`` from a user-namespace jail: the file the test wrote below the kept path
    lands in the user's tree, owned by the user; what is outside it does not."""
    files = {
        "test_keep.py": (
            "import pathlib\n"
            "HERE = pathlib.Path(__file__).parent\n"
            "def test_write():\n"
            "    (HERE / 'golden').mkdir(exist_ok=True)\n"
            "    (HERE / 'golden' / 'out.txt').write_text('kept')\n"
            "    (HERE / 'outside.txt').write_text('not kept')\n"
        )
    }
    # The project in a directory the user owns, as a home directory is: in a user
    # namespace the overlay cannot copy up a directory whose owner has no id there (the
    # venv's root-owned parent), so nothing could be written below it (EOVERFLOW).
    home = Path(tempfile.mkdtemp(prefix="isolate-home-", dir="/tmp"))
    try:
        os.chown(home, UID, GID)
        path, result = run_as_nobody(
            nobody_venv, "keep", files, ESCAPE, "-rA", "--isolate=jail", "--isolate-keep=golden", h=h, parent=home
        )
        _check_kept(path, result)
    finally:
        shutil.rmtree(home, ignore_errors=True)


def _check_kept(path: Path, result: pytest.RunResult) -> None:
    assert result.ret == 0, "\n".join(result.outlines)
    result.stdout.fnmatch_lines(["PASSED test_keep.py::test_write"])
    kept = path / "golden" / "out.txt"
    assert kept.read_text() == "kept"
    assert (kept.stat().st_uid, kept.parent.stat().st_uid) == (UID, UID)
    assert not (path / "outside.txt").exists()


TREE_FILES = {
    "data.txt": "original\n",
    "test_tree.py": (
        "import os\n"
        "import pathlib\n"
        "import time\n"
        "HERE = pathlib.Path(__file__).parent\n"
        "def test_write_a_new_file():\n"
        "    (HERE / 'new.txt').write_text('new')\n"
        "    assert (HERE / 'new.txt').read_text() == 'new'\n"
        "def test_change_a_file():\n"
        "    (HERE / 'data.txt').write_text('changed')\n"
        "    os.utime(HERE / 'data.txt', (time.time(), time.time()))\n"
        "    assert (HERE / 'data.txt').read_text() == 'changed'\n"
        "def test_make_dirs():\n"
        "    (HERE / 'sub' / 'deep').mkdir(parents=True)\n"
    ),
}


@pytest.mark.parametrize("mount_below_tmp", [False, True])
def test_a_project_below_roots_directories_is_writable(nobody_venv: Path, h: Any, mount_below_tmp: bool) -> None:
    """A test writes into its project, in a user namespace as in-process, though the
    project lies below a directory root owns (here the venv's parent in /tmp, as a
    checkout in /srv/ci/ or /var/lib/jenkins/ does): the project is an overlay layer of
    its own, so only its own directories are copied up. Before, every write failed
    with EOVERFLOW; and with something mounted below /tmp (a fresh tmpfs there) the
    project was a read-only bind. The writes stay in the sandbox, as ever."""
    mnt = Path(tempfile.mkdtemp(prefix="isolate-mnt-", dir="/tmp")) if mount_below_tmp else None
    try:
        if mnt is not None:
            subprocess.run(["mount", "-t", "tmpfs", "none", str(mnt)], check=True)
        names = ("test_write_a_new_file", "test_change_a_file", "test_make_dirs")
        for tier in ("none", "jail"):
            path, result = run_as_nobody(nobody_venv, f"tree-{tier}", TREE_FILES, ESCAPE, "-rA", f"--isolate={tier}", h=h)
            assert result.ret == 0, "\n".join(result.outlines)
            result.stdout.fnmatch_lines([f"PASSED test_tree.py::{n}" for n in names], consecutive=False)
            written = ((path / "data.txt").read_text(), (path / "new.txt").exists(), (path / "sub").exists())
            # In-process the writes are the user's; from the jail none reaches the tree.
            assert written == (("changed", True, True) if tier == "none" else ("original\n", False, False))
    finally:
        if mnt is not None:
            subprocess.run(["umount", str(mnt)], check=False)
            mnt.rmdir()

"""The holder layout of `jail` and `zone` (tiers/jail.py) against the init per test.

As root, a sandbox built ahead runs in a holder's zygote: no init of its own, its PID 1
is a long-lived holder. What a test sees and what the report says must not depend on
that. One suite per tier runs twice, by default and with ``PYTEST_ISOLATE_HOLDER=0``
(every test with an init), and the two runs are compared: outcomes, escapes, budgets
and what each test saw of its sandbox. The default run must also have used holders:
an init's runner is always PID 2 of its namespace, a holder's zygotes count up.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.outputs import records, seen, token

SUITE = '''
import errno
import json
import os
import signal
import socket
import time
from pathlib import Path

import pytest

TOKEN = "{token}"
DAEMONS = {daemons}
pytestmark = pytest.mark.isolate("{tier}")


def dump(tmp_path, name, data):
    (tmp_path / f"seen-{name}.json").write_text(json.dumps(data))


@pytest.mark.parametrize("i", range(6))
def test_view(tmp_path, i):
    try:
        os.kill(-1, signal.SIGTERM)  # from a test: every process it can see but PID 1
        kill = "sent"
    except ProcessLookupError:
        kill = "ESRCH"
    dump(tmp_path, f"view{i}", {
        "pid": os.getpid(),
        "ppid": os.getppid(),
        "procs": sorted(int(p) for p in os.listdir("/proc") if p.isdigit()),
        "kill": kill,
        "resolves": socket.gethostbyname(socket.gethostname()),
        "cwd": os.getcwd(),
    })


def test_write_outside(tmp_path):
    Path("/etc/isolate-" + TOKEN).write_text("inside")


def test_daemon():
    if os.fork() == 0:
        os.setsid()
        if os.fork() == 0:
            os.execv("/bin/sh", ["sh", "-c", "sleep 30", TOKEN])
        os._exit(0)
    os.wait()


def test_many_daemons():
    for _ in range(DAEMONS):  # more than fit in a short message of pids
        if os.fork() == 0:
            os.setsid()
            if os.fork() == 0:
                time.sleep(30)
            os._exit(0)
        os.wait()


def test_orphan_is_reaped(tmp_path):
    """A test's orphan reparents to the sandbox's PID 1, which must reap it: a test
    may wait for one to go (psutil's do)."""
    r, w = os.pipe()
    if os.fork() == 0:
        if os.fork() == 0:
            os.write(w, str(os.getpid()).encode())
            time.sleep(0.2)
            os._exit(0)
        os._exit(0)
    os.wait()
    os.close(w)
    orphan = int(os.read(r, 32))
    deadline = time.monotonic() + 10
    while os.path.exists(f"/proc/{orphan}") and time.monotonic() < deadline:
        time.sleep(0.02)
    dump(tmp_path, "orphan", {"gone": not os.path.exists(f"/proc/{orphan}")})


def test_sigterm_to_itself():
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(5)


def test_exit_code():
    os._exit(3)


def test_port_again_1():
    s = socket.socket()
    s.bind(("127.0.0.1", 47613))
    s.listen()
    c = socket.create_connection(("127.0.0.1", 47613))
    a, _ = s.accept()
    a.close()  # the server side closes first: TIME_WAIT on the bound port
    c.close()


def test_port_again_2():
    s = socket.socket()
    s.bind(("127.0.0.1", 47613))  # no SO_REUSEADDR: a TIME_WAIT left would refuse it
'''

ZONE_EXTRA = '''

@pytest.mark.isolate(memory="64M")
def test_memory_bomb():
    x = bytearray(400 << 20)
    for i in range(0, len(x), 4096):
        x[i] = 1


@pytest.mark.isolate(pids=16)
def test_fork_bomb(tmp_path):
    kids = []
    try:
        while len(kids) < 40:  # each child sleeps 5 s and exits; the parent keeps its pid
            kids.append(os.fork() or os._exit(time.sleep(5) or 0))
    except OSError as exc:
        dump(tmp_path, "forkbomb", {"refused": exc.errno})
    for pid in kids:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)


def test_keyring():
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    key = libc.syscall(248, b"user", TOKEN.encode(), b"x", 1, -4)  # add_key (x86_64)
    assert key == -1 and ctypes.get_errno() == errno.EPERM
'''

LAYOUTS = {"holder": {}, "init": {"PYTEST_ISOLATE_HOLDER": "0"}}
#: Daemons one test leaves: their pids alone are longer than the 512 bytes a holder's
#: message once had, which cut the list inside a number (another process's pid).
DAEMONS = 150


@pytest.fixture(scope="module", params=["jail", "zone"])
def both(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, h: Any) -> dict[str, Any]:
    tier = request.param
    tok = token()
    suite = (SUITE + (ZONE_EXTRA if tier == "zone" else "")).replace("{tier}", tier).replace("{token}", tok)
    suite = suite.replace("{daemons}", str(DAEMONS))
    runs: dict[str, Any] = {"tier": tier}
    for layout, env in LAYOUTS.items():
        path = tmp_path_factory.mktemp(f"{tier}-{layout}")
        h.write_files(path, {f"test_{tier}_layout.py": suite})
        result = h.run_pytest(path, "-p", "no:randomly", "--isolate-report=r.json", timeout=120, env=env)
        runs[layout] = {"path": path, "result": result, "records": records(path / "r.json")}
    return runs


def _outcomes(run: dict[str, Any]) -> dict[str, tuple[Any, ...]]:
    """What the report says of each test, the parts that must not depend on the layout."""
    out = {}
    for nodeid, rec in run["records"].items():
        out[nodeid] = (
            rec["outcome"],
            rec["exit_code"],
            rec["signal"],
            sorted({e["technique"] for e in rec["escapes"]}),
            sorted((o["budget"], o["kind"]) for o in rec["overuse"]),
        )
    return out


def test_the_default_run_used_holders(both: dict[str, Any]) -> None:
    holder = [seen(both["holder"]["path"], f"view{i}")["pid"] for i in range(6)]
    init = [seen(both["init"]["path"], f"view{i}")["pid"] for i in range(6)]
    assert init == [2] * 6
    assert max(holder) > 2, holder


def test_same_outcomes_escapes_and_budgets(both: dict[str, Any]) -> None:
    holder, init = _outcomes(both["holder"]), _outcomes(both["init"])
    assert holder == init
    tier = both["tier"]
    name = f"test_{tier}_layout.py::"
    assert holder[name + "test_write_outside"][3] == ["write-host-file"]
    assert holder[name + "test_daemon"][3] == ["daemon"]
    for layout in LAYOUTS:
        rec = both[layout]["records"][name + "test_many_daemons"]
        assert len(rec["leftovers"]) == DAEMONS, (layout, len(rec["leftovers"]))
    assert holder[name + "test_sigterm_to_itself"][:3] == ("failed", None, "SIGTERM")
    assert holder[name + "test_exit_code"][:2] == ("failed", 3)
    assert holder[name + "test_port_again_2"][0] == "passed"
    if tier == "zone":
        assert holder[name + "test_memory_bomb"][4] == [("memory", "reached")]
        assert holder[name + "test_fork_bomb"][4] == [("pids", "reached")]
        assert holder[name + "test_keyring"][0] == "passed"


def test_same_view_of_the_sandbox(both: dict[str, Any]) -> None:
    for layout in LAYOUTS:
        path: Path = both[layout]["path"]
        for i in range(6):
            view = seen(path, f"view{i}")
            assert view["ppid"] == 1, (layout, view)
            assert view["procs"] == [1, view["pid"]], (layout, view)  # alone with its PID 1
            assert view["kill"] == "ESRCH", (layout, view)
            assert view["resolves"] == "127.0.1.1", (layout, view)
            assert view["cwd"] == str(path), (layout, view)
        assert seen(path, "orphan") == {"gone": True}, layout
        if both["tier"] == "zone":
            assert seen(path, "forkbomb")["refused"] == 11, layout  # EAGAIN

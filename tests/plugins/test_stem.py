"""Host workers forked from the stem: what the sandbox's session sees is what a fresh
worker's saw (environment, argv, warnings, output), and where a fresh interpreter would
start differently, the worker is a fresh one."""

from __future__ import annotations

import os
import sys

import pytest

from tests.plugins.conftest import TIERS, Runner, outcomes

CONFTEST = """
    import os
    import sys

    def _children(pid):
        out = []
        try:  # a test's child may end while we look
            for task in os.listdir(f"/proc/{pid}/task"):
                with open(f"/proc/{pid}/task/{task}/children") as f:
                    out += [int(x) for x in f.read().split()]
        except OSError:
            pass
        return out

    def _read(pid, name):
        try:
            with open(f"/proc/{pid}/{name}", "rb") as f:
                return f.read().replace(b"\\0", b" ").decode().strip()
        except OSError:
            return ""

    def worker_kind():
        \"\"\""forked": the controller's stem has a gateway child, which has the
        server; "spawned": a descendant was started as ``-c ... forkserver``.\"\"\"
        todo, spawned = [os.getpid()], False
        while todo:
            for c in _children(todo.pop()):
                spawned = spawned or "pytest_isolate.forkserver" in _read(c, "cmdline")
                todo.append(c)
        stems = [c for c in _children(os.getpid()) if _read(c, "comm") == "isolate-stem"]
        gateways = [g for z in stems for g in _children(z) if _read(g, "comm") == "isolate-gateway"]
        servers = [s for g in gateways for s in _children(g)]
        assert not (spawned and servers), (spawned, servers)
        return "spawned" if spawned else "forked" if servers else "none"

    CONTROLLER = []

    def pytest_configure(config):
        if not hasattr(config, "workerinput"):  # the controller
            CONTROLLER.append(True)
            os.environ["SET_BY_CONFTEST"] = "configured"
            os.environ.pop("GONE_BY_CONFIGURE", None)
            os.putenv("ONLY_IN_C", "seen")  # as C libraries set variables (readline: LINES)
            os.environ["CONTROLLER_ARGV"] = repr(sys.argv)

    def pytest_runtest_logfinish(nodeid):
        if CONTROLLER and nodeid.endswith("::test_kind") and os.environ.get("PYTEST_ISOLATE_TIER"):
            sys.__stderr__.write(f"KIND {worker_kind()}\\n")
"""


def _suite(pytester: pytest.Pytester, conftest: str = CONFTEST) -> None:
    pytester.makeconftest(conftest)
    pytester.makepyfile(
        test_kind="""
        import os
        import subprocess
        import sys
        import warnings

        import pytest

        def test_kind():
            pass

        def test_environment_is_the_configured_one():
            assert os.environ["SET_BY_CONFTEST"] == "configured"
            assert "GONE_BY_CONFIGURE" not in os.environ
            # As in-process: what only the C environ holds is not in os.environ, and a
            # process the test spawns gets it.
            assert "ONLY_IN_C" not in os.environ
            out = subprocess.run(["sh", "-c", 'printf %s "$ONLY_IN_C"'], capture_output=True, text=True)
            assert out.stdout == "seen"

        def test_argv_is_pytests():
            assert repr(sys.argv) == os.environ["CONTROLLER_ARGV"]

        def test_output_is_captured_per_test(capsys):
            print("to stdout")
            sys.stderr.write("to stderr\\n")
            out, err = capsys.readouterr()
            assert (out, err) == ("to stdout\\n", "to stderr\\n")

        def test_warning_is_reported():
            warnings.warn(UserWarning("from the test"))

        def test_error_filter_from_the_command_line():
            with pytest.raises(DeprecationWarning):
                warnings.warn(DeprecationWarning("an error here, as -W says"))
        """
    )


def _kind(result: pytest.RunResult) -> str:
    # Under -s a sandbox's uncaptured output reaches the terminal through stderr.
    kinds = {line.split()[-1] for line in result.outlines + result.errlines if line.startswith("KIND ")}
    assert len(kinds) == 1, result.stdout.str()
    return kinds.pop()


@pytest.mark.parametrize("tier", TIERS)
def test_host_workers_are_forked_and_the_session_is_the_same(
    pytester: pytest.Pytester, run: Runner, monkeypatch: pytest.MonkeyPatch, tier: str
) -> None:
    _suite(pytester)
    monkeypatch.setenv("GONE_BY_CONFIGURE", "1")
    args = ("-W", "error::DeprecationWarning", "-rA", "-s")
    monkeypatch.delenv("PYTEST_ISOLATE_TIER", raising=False)
    inproc = run(None, *args)
    monkeypatch.setenv("PYTEST_ISOLATE_TIER", tier)
    isolated = run(tier, *args)
    assert _kind(isolated) == "forked"
    assert outcomes(isolated) == outcomes(inproc)
    assert isolated.parseoutcomes() == inproc.parseoutcomes() == {"passed": 6, "warnings": 1}
    isolated.stdout.fnmatch_lines(["*UserWarning: from the test*"])


def test_turned_off_the_workers_start_fresh_and_the_session_is_the_same(
    pytester: pytest.Pytester, run: Runner, monkeypatch: pytest.MonkeyPatch
) -> None:
    _suite(pytester)
    monkeypatch.setenv("GONE_BY_CONFIGURE", "1")
    monkeypatch.setenv("PYTEST_ISOLATE_STEM", "0")
    monkeypatch.setenv("PYTEST_ISOLATE_TIER", "process")
    result = run("process", "-W", "error::DeprecationWarning", "-s")
    assert _kind(result) == "spawned"
    assert result.parseoutcomes() == {"passed": 6, "warnings": 1}


def test_an_interpreter_variable_set_after_the_fork_means_a_fresh_worker(
    pytester: pytest.Pytester, run: Runner, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A conftest sets PYTHONWARNINGS: a forked server would not have read it as an
    interpreter does at start, so the worker is spawned, and it did."""
    setting = 'os.environ["SET_BY_CONFTEST"] = "configured"'
    _suite(pytester, CONFTEST.replace(setting, f'{setting}; os.environ["PYTHONWARNINGS"] = "ignore::ResourceWarning"'))
    pytester.makepyfile(
        test_warnoptions="""
        import sys

        def test_started_with_the_variable():
            assert "ignore::ResourceWarning" in sys.warnoptions
        """
    )
    monkeypatch.setenv("PYTEST_ISOLATE_TIER", "process")
    result = run("process", "-W", "error::DeprecationWarning", "-s")
    assert _kind(result) == "spawned"
    assert result.parseoutcomes() == {"passed": 7, "warnings": 1}


def test_no_stem_unless_the_run_isolates(pytester: pytest.Pytester, run: Runner) -> None:
    """Forked only when the command line or ini asks for a host tier; it is the
    controller's child while the run lasts, and gone after (the leak check). (The
    controller's other child at that point is its canary helper.)"""
    pytester.makeconftest(
        """
        import os

        def pytest_sessionstart(session):
            if hasattr(session.config, "workerinput"):
                return
            kids = []
            for task in os.listdir("/proc/self/task"):
                with open(f"/proc/self/task/{task}/children") as f:
                    kids += f.read().split()
            names = []
            for pid in kids:
                with open(f"/proc/{pid}/comm") as f:
                    names.append(f.read().strip())
            print("STEMS", names.count("isolate-stem"))
        """
    )
    pytester.makepyfile(test_one="def test_one():\n    pass\n")
    run(None, "-s").stdout.fnmatch_lines(["STEMS 0"])
    run("process", "-s").stdout.fnmatch_lines(["STEMS 1"])
    pytester.makeini("[pytest]\nisolate = jail\n")
    run(None, "-s").stdout.fnmatch_lines(["STEMS 1"])
    run("none", "-s").stdout.fnmatch_lines(["STEMS 0"])


def test_a_dead_stem_means_fresh_workers(pytester: pytest.Pytester, run: Runner) -> None:
    """Something killed the stem before the worker was asked for: the worker is spawned,
    the run is as without it, and nothing is left (the leak check)."""
    pytester.makeconftest(
        """
        import os
        import signal

        def pytest_configure(config):
            if hasattr(config, "workerinput"):
                return
            for task in os.listdir("/proc/self/task"):
                with open(f"/proc/self/task/{task}/children") as f:
                    for pid in f.read().split():
                        with open(f"/proc/{pid}/comm") as c:
                            if c.read().strip() == "isolate-stem":
                                os.kill(int(pid), signal.SIGKILL)
                                print("KILLED THE STEM")
        """
    )
    pytester.makepyfile(test_one="def test_one():\n    pass\n\ndef test_two():\n    assert False\n")
    result = run("process", "-s")
    result.stdout.fnmatch_lines(["KILLED THE STEM", "*1 failed, 1 passed*"])
    assert "INTERNALERROR" not in result.stdout.str()


ASK_AND_DROP = """
import os
import os
import sys
import time

import pytest  # noqa: F401 - the stem is forked where pytest is imported

from pytest_isolate import stem


def children(pid):
    out = []
    for task in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{task}/children") as f:
            out += [int(x) for x in f.read().split()]
    return out


assert stem.start()
z = stem.current()
log = sys.argv[1]
asked = z.ask({"args": ["--co"], "dir": os.getcwd(), "argv": sys.argv, "sys_path": sys.path, "log": log})
end = time.monotonic() + 10
tree = []
while time.monotonic() < end:  # the gateway, then the server it forks
    gateways = children(z.pid)
    tree = gateways + [s for g in gateways for s in children(g)]
    if len(tree) == 2:
        break
    time.sleep(0.01)
print("ASKED", len(tree), flush=True)
z.drop(asked)
end = time.monotonic() + 10
while time.monotonic() < end and any(os.path.exists(f"/proc/{p}") for p in tree):
    time.sleep(0.01)
print("LEFT", [p for p in tree if os.path.exists(f"/proc/{p}")], children(z.pid), flush=True)
stem.stop()
"""


def test_a_gateway_asked_for_and_dropped_leaves_nothing(pytester: pytest.Pytester) -> None:
    """The controller asks the stem for a gateway and plants its tripwires while it is
    forked (``Worker._makegateway``); interrupted in between, it drops the gateway: the
    gateway and the server it forked end, quietly."""
    script = pytester.makepyfile(ask_and_drop=ASK_AND_DROP)
    log = pytester.path / "server.log"
    result = pytester.run(sys.executable, str(script), str(log), timeout=60)
    assert result.ret == 0, result.stderr.str()
    result.stdout.fnmatch_lines(["ASKED 2", "LEFT [[][]] []"])
    assert result.stderr.str().strip() == ""


def test_a_test_after_the_last_one_gets_a_new_worker(pytester: pytest.Pytester, run: Runner) -> None:
    """The workers end their sessions as soon as the last test (``nextitem`` None) is
    over (``Controller.finishing``). A runner that says so of every test (here: a
    conftest's own loop) gets a worker per test, with the outcomes of in-process pytest
    and the workers' session data in ``pytest_testnodedown`` each time."""
    pytester.makeconftest(
        """
        import pytest

        DOWN = []

        def pytest_runtestloop(session):
            for item in session.items:
                item.config.hook.pytest_runtest_protocol(item=item, nextitem=None)
            return True

        @pytest.hookimpl(optionalhook=True)
        def pytest_testnodedown(node, error):
            DOWN.append(node.workeroutput.get("tests"))

        def pytest_sessionfinish(session):
            if hasattr(session.config, "workerinput"):  # a worker's session
                session.config.workeroutput["tests"] = len(session.items)

        def pytest_unconfigure(config):
            if not hasattr(config, "workerinput"):
                print("NODES DOWN", DOWN)
        """
    )
    pytester.makepyfile(
        test_loop="""
        import pytest

        def test_a():
            pass

        def test_b():
            assert False

        @pytest.mark.skip
        def test_c():
            pass

        def test_d():
            pass
        """
    )
    base = run(None, "-s")
    assert outcomes(base) == {
        "test_loop.py::test_a": ["PASSED"], "test_loop.py::test_b": ["FAILED"],
        "test_loop.py::test_c": ["SKIPPED"], "test_loop.py::test_d": ["PASSED"],
    }
    result = run("process", "-s")
    assert outcomes(result) == outcomes(base)
    result.stdout.fnmatch_lines(["NODES DOWN [[]4, 4, 4, 4[]]"])
    assert "INTERNALERROR" not in result.stdout.str()


def _orphaned_workers() -> set[int]:
    """Stems and gateways of ended runs that init inherited (zombies until it reaps)."""
    out = set()
    for p in os.listdir("/proc"):
        try:
            with open(f"/proc/{p}/stat", "rb") as f:
                comm, rest = f.read().rsplit(b")", 1)
        except (OSError, ValueError):
            continue
        if comm.split(b"(", 1)[-1] in (b"isolate-gateway", b"isolate-stem") and rest.split()[1] == b"1":
            out.add(int(p))
    return out


def test_a_run_leaves_its_gateways_to_nobody(pytester: pytest.Pytester, run: Runner) -> None:
    """The stem is told to exit when the session ends, before the workers' gateways
    have: it reaps them before it exits, so none is left for init to reap (a container
    whose init reaps nothing would keep every run's gateways as zombies)."""
    pytester.makepyfile(test_one="def test_one():\n    pass\n")
    before = _orphaned_workers()
    result = run("process")
    assert result.ret == 0
    assert _orphaned_workers() - before == set()


def test_a_gateway_warns_of_nothing_where_warnings_are_errors(pytester: pytest.Pytester, run: Runner) -> None:
    """A project that turns warnings into errors (``filterwarnings = error``): the forked
    gateway, which starts with the controller's filters, must leave no file unclosed
    (it printed "Exception ignored ... ResourceWarning: unclosed file" on every run)."""
    pytester.makeini("[pytest]\nfilterwarnings = error\n")
    pytester.makepyfile(test_one="def test_one():\n    pass\n")
    result = run("process")
    assert result.ret == 0
    out = result.stdout.str() + result.stderr.str()
    assert "Exception ignored" not in out and "ResourceWarning" not in out, out

"""What the sandbox's session does must not show: start-up failures, the plugin's own
calls, another plugin's signal in the controller, markers that came too late."""

from __future__ import annotations

import json
import re
import shutil
import tempfile
import textwrap
import time
from pathlib import Path

import pytest

from tests.plugins.conftest import TIERS, Runner, outcomes


def test_a_sandbox_that_cannot_start_fails_once(pytester: pytest.Pytester, run: Runner) -> None:
    """Its own error is shown with the first test; the rest fail with that reason at
    once, without a start each; the run ends with its normal summary."""
    starts = pytester.path / "starts"
    pytester.makeconftest(
        f"""
        def pytest_configure(config):
            if hasattr(config, "workerinput"):  # the sandbox's session only
                with open({str(starts)!r}, "a") as f:
                    f.write("start\\n")
                raise RuntimeError("this sandbox cannot start: broken fixture server")
        """
    )
    pytester.makepyfile(test_many="\n".join(f"def test_{i}():\n    pass\n" for i in range(40)))
    t0 = time.monotonic()
    result = run("process")
    took = time.monotonic() - t0
    assert result.ret == 1
    assert result.parseoutcomes() == {"failed": 40}
    assert starts.read_text().count("start") == 1
    assert took < 30, took
    out = result.stdout.str()
    assert "INTERNALERROR" not in out
    result.stdout.fnmatch_lines(
        [
            "*RuntimeError: this sandbox cannot start: broken fixture server*",
            "isolated worker could not start: RuntimeError: this sandbox cannot start: broken fixture server"
            " (its output: in the failure of test_many.py::test_0)",
            "*= 40 failed in *",
        ]
    )


def test_something_raised_into_the_controller_fails_that_test_only(pytester: pytest.Pytester, run: Runner) -> None:
    """Another plugin's timer fires in the controller while it waits for a sandbox: the
    test fails with it, its worker is replaced, the run goes on."""
    pytester.makeconftest(
        """
        import signal
        import pytest

        class Alarm(Exception):
            pass

        def _raise(*_):
            raise Alarm("controller-side timer fired")

        @pytest.hookimpl(hookwrapper=True)
        def pytest_runtest_protocol(item):
            armed = item.name == "test_slow" and not item.config.pluginmanager.has_plugin("isolate-forkserver")
            if armed:
                old = signal.signal(signal.SIGALRM, _raise)
                signal.setitimer(signal.ITIMER_REAL, 0.5)
            yield
            if armed:
                signal.setitimer(signal.ITIMER_REAL, 0)
                signal.signal(signal.SIGALRM, old)
        """
    )
    pytester.makepyfile(
        test_ctl="""
        import time

        def test_before():
            pass

        def test_slow():
            time.sleep(3)

        def test_after():
            pass
        """
    )
    result = run("process")
    assert "INTERNALERROR" not in result.stdout.str()
    assert outcomes(result) == {
        "test_ctl.py::test_before": ["PASSED"],
        "test_ctl.py::test_slow": ["FAILED"],
        "test_ctl.py::test_after": ["PASSED"],
    }, result.stdout.str()
    result.stdout.fnmatch_lines(["*Alarm raised in the controller while the test ran isolated: controller-side timer fired*"])


INVISIBLE = """
    import json
    import logging
    import os
    import subprocess
    import warnings

    def test_never_calls_them(monkeypatch, tmp_path):
        calls = []

        def spy(name, real):
            def f(*a, **k):
                calls.append(name)
                return real(*a, **k)
            return f

        for name in ("getcwd", "stat", "fstat", "write", "read", "access", "listdir", "getpid", "isatty"):
            monkeypatch.setattr(os, name, spy(name, getattr(os, name)))
        monkeypatch.setattr(json, "dumps", spy("json.dumps", json.dumps))
        monkeypatch.setattr(os.path, "exists", spy("exists", os.path.exists))
        before = list(calls)
        with open("relative.txt", "w") as f:
            f.write("x")
        os.remove("relative.txt")
        subprocess.run(["true"], check=True)
        logging.getLogger("t").warning("a log line")
        print("some output")
        mine = list(calls)
        calls.clear()
        # What the test itself did is its own; nothing more may appear afterwards.
        assert "getcwd" not in mine and "json.dumps" not in mine, mine
"""


@pytest.mark.parametrize("tier", TIERS)
def test_instrumentation_is_invisible(pytester: pytest.Pytester, run: Runner, tier: str) -> None:
    pytester.makepyfile(test_inv=INVISIBLE)
    base = run(None)
    iso = run(tier)
    assert outcomes(base) == outcomes(iso) == {"test_inv.py::test_never_calls_them": ["PASSED"]}, iso.stdout.str()


def test_markers_from_modifyitems_count_and_late_ones_warn(pytester: pytest.Pytester, run: Runner) -> None:
    pytester.makeconftest(
        """
        import pytest

        def pytest_collection_modifyitems(items):
            for item in items:
                if item.name == "test_marked_by_conftest":
                    item.add_marker(pytest.mark.isolate("jail"))
        """
    )
    pytester.makepyfile(
        test_marks="""
        import os
        import pytest

        def test_marked_by_conftest():
            assert os.uname().nodename == "test-marked-by-conftest"

        def test_marked_too_late(request):
            request.applymarker(pytest.mark.isolate("jail"))
        """
    )
    result = run(None, "-W", "default::pytest.PytestWarning")
    assert outcomes(result) == {
        "test_marks.py::test_marked_by_conftest": ["PASSED"],
        "test_marks.py::test_marked_too_late": ["PASSED"],
    }, result.stdout.str()
    result.stdout.fnmatch_lines(
        [
            "*IsolationWarning: test_marks.py::test_marked_too_late: an isolate marker added while the test ran*"
            "pytest.param(..., marks=pytest.mark.isolate(...)), a class or module marker, or in "
            "pytest_collection_modifyitems",
            "*tests per tier: jail 1*",
        ]
    )


NO_WORKER_CONFTEST = """
    import pytest

    def pytest_configure(config):
        # Once per run, as the xdist docs advise: never again in a worker's session.
        if not hasattr(config, "workerinput"):
            with open("configured-by", "a") as f:
                f.write("controller\\n")

    def pytest_collection_modifyitems(config, items):
        if hasattr(config, "workerinput"):
            for item in items:
                if item.name == "test_skipped_on_workers":
                    item.add_marker(pytest.mark.skip(reason="not on xdist workers"))
"""
NO_WORKER = """
    from xdist import is_xdist_worker

    def test_not_a_worker(request):
        assert not hasattr(request.config, "workerinput")
        assert not is_xdist_worker(request)

    def test_worker_id(worker_id):
        assert worker_id == "master"

    def test_database_suffix(request):
        # pytest-django names its test databases after this
        assert not getattr(request.config, "workerinput", {}).get("workerid")

    def test_skipped_on_workers():
        pass
"""


@pytest.mark.parametrize("tier", TIERS)
def test_a_sandbox_is_no_xdist_worker_to_its_test(pytester: pytest.Pytester, run: Runner, tier: str) -> None:
    """The sandbox's session speaks the xdist node protocol to plugins, but from
    collection to the last test it looks like the in-process session: a conftest's
    collection hook, ``xdist.is_xdist_worker``, ``worker_id`` and pytest-django's
    database suffix see no worker. Once-per-run work in ``pytest_configure`` still
    runs in the controller only."""
    pytester.makeconftest(NO_WORKER_CONFTEST)
    pytester.makepyfile(test_nw=NO_WORKER)
    marker = pytester.path / "configured-by"
    base = run(None)
    assert marker.read_text() == "controller\n"
    marker.unlink()
    iso = run(tier)
    names = ("test_not_a_worker", "test_worker_id", "test_database_suffix", "test_skipped_on_workers")
    assert outcomes(base) == outcomes(iso) == {f"test_nw.py::{n}": ["PASSED"] for n in names}, iso.stdout.str()
    assert marker.read_text() == "controller\n"


def test_under_xdist_a_sandbox_is_its_workers(pytester: pytest.Pytester, run: Runner) -> None:
    """Under ``-n`` a test runs in an xdist worker in-process, and its sandbox shows
    that worker: the same outcomes either way."""
    pytester.makeconftest(NO_WORKER_CONFTEST)
    pytester.makepyfile(test_nw=NO_WORKER)
    base = run(None, "-n", "2")
    iso = run("process", "-n", "2")
    expected = {
        "test_nw.py::test_not_a_worker": "FAILED",
        "test_nw.py::test_worker_id": "FAILED",
        "test_nw.py::test_database_suffix": "FAILED",
        "test_nw.py::test_skipped_on_workers": "SKIPPED",
    }
    assert _xdist_outcomes(base) == _xdist_outcomes(iso) == expected, iso.stdout.str()


def _xdist_outcomes(result: pytest.RunResult) -> dict[str, str]:
    """``[gw0] [ 25%] FAILED test_nw.py::test_x`` lines of ``-v`` under xdist."""
    found = (re.match(r"^\[gw\d+\] \[\s*\d+%\] (\w+) (\S+)", line) for line in result.outlines)
    return {m.group(2): m.group(1) for m in found if m}


SESSION_ON_DISK = """
    import pytest

    BUILT = []

    @pytest.fixture(scope="session")
    def site(tmp_path_factory):
        # "Copy the sources unless they are there, then build": what it found on disk
        # and what it remembers in memory must agree (sphinx's test fixtures).
        src = tmp_path_factory.getbasetemp() / "site"
        fresh = not src.exists()
        src.mkdir(exist_ok=True)
        BUILT.append(fresh)
        return src

    def test_first(site, tmp_path):
        assert BUILT == [True]
        assert tmp_path.parent == site.parent  # tmp_path is below the same base

    def test_second(site):
        assert BUILT == [True]
"""


@pytest.mark.parametrize("tier", TIERS)
@pytest.mark.parametrize("scope", [None, "module"])
def test_a_sandbox_has_a_base_temp_dir_of_its_own(
    pytester: pytest.Pytester, run: Runner, tier: str, scope: str | None
) -> None:
    """A sandbox is a session of its own (its session fixtures run again), so, as each
    pytest-xdist worker, it gets its own base temp dir: a session fixture's files and its
    memory agree, as in-process. A shared one held what the previous sandbox's fixture
    wrote, and the next one found it without the rest of its state."""
    pytester.makepyfile(test_site=SESSION_ON_DISK)
    base = run(None, "-p", "no:randomly")
    args = ["-p", "no:randomly", f"--basetemp={pytester.path / 'bt'}"]
    if scope:
        args.append(f"--isolate-scope={scope}")
    iso = run(tier, *args)
    assert outcomes(iso) == outcomes(base) == {
        "test_site.py::test_first": ["PASSED"], "test_site.py::test_second": ["PASSED"],
    }, iso.stdout.str()
    sites = sorted((pytester.path / "bt").rglob("site"))
    assert len(sites) == (1 if scope else 2), sites  # one per sandbox, kept on the host
    assert all(p.is_dir() and (pytester.path / "bt") in p.parents for p in sites)


@pytest.mark.parametrize("tier", TIERS)
def test_the_main_thread_has_its_own_native_id(pytester: pytest.Pytester, run: Runner, tier: str) -> None:
    """A test runs on the main thread, and the main thread's native id is the process's
    own, as in-process; a thread it starts has another one. (A forked child kept its
    parent's: CPython updates only the ident after fork.)"""
    pytester.makepyfile(
        test_tid="""
        import threading

        def test_main_thread_native_id():
            main = threading.main_thread()
            assert threading.current_thread() is main
            assert main.native_id == threading.get_native_id()

        def test_a_thread_has_another():
            seen = []
            t = threading.Thread(target=lambda: seen.append(threading.get_native_id()))
            t.start()
            t.join()
            assert seen and seen[0] != threading.main_thread().native_id
            assert t.native_id == seen[0]
        """
    )
    base = run(None)
    iso = run(tier)
    want = {f"test_tid.py::{n}": ["PASSED"] for n in ("test_main_thread_native_id", "test_a_thread_has_another")}
    assert outcomes(base) == want, base.stdout.str()
    assert outcomes(iso) == want, iso.stdout.str()


@pytest.mark.parametrize("tier", TIERS)
def test_tmp_path_is_about_as_long_as_under_xdist(
    pytester: pytest.Pytester, run: Runner, tier: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A sandbox's ``tmp_path`` is at most 10 characters longer than in-process, as under
    pytest-xdist (``popen-gw0/``): a unix socket a test binds there (AF_UNIX paths hold
    107 bytes) fits wherever it fits under xdist. Named after the test, werkzeug's unix
    socket test failed for uid 65534, whose ``pytest-of-nobody`` is 2 characters longer
    than root's."""
    base = Path(tempfile.mkdtemp(prefix="ipt", dir="/tmp"))
    try:
        pytester.makepyfile(
            test_sock="""
            import os
            import socket

            def test_unix_socket_in_tmp_path(tmp_path):
                print(f"TMP_PATH_LENGTH={len(str(tmp_path))}")
                s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                s.bind(str(tmp_path / os.environ["SOCK_NAME"]))
                s.close()
            """
        )
        want = {"test_sock.py::test_unix_socket_in_tmp_path": ["PASSED"]}

        def length(result: pytest.RunResult) -> int:
            assert outcomes(result) == want, result.stdout.str()
            (n,) = re.findall(r"TMP_PATH_LENGTH=(\d+)", result.stdout.str())
            return int(n)

        monkeypatch.setenv("SOCK_NAME", "s")
        inside = length(run(None, "-rP", f"--basetemp={base / 'a'}"))
        # A socket path of 97 bytes in-process: 107 under xdist, the most AF_UNIX takes.
        monkeypatch.setenv("SOCK_NAME", "s" * (97 - inside - 1))
        assert length(run(None, "-rP", f"--basetemp={base / 'b'}")) == inside
        isolated = length(run(tier, "-rP", f"--basetemp={base / 'c'}"))
        assert isolated - inside <= 10, (inside, isolated)
    finally:
        shutil.rmtree(base, ignore_errors=True)


WARN_ORDER_CONFTEST = """
import json
import os


def _log(config, what):
    if os.getpid() != pytest_configure.pid:  # a sandbox, forked after its session's configure
        return
    with open(config.rootpath / "events", "a") as f:
        f.write(json.dumps(what) + "\\n")


def pytest_runtest_logstart(nodeid, location):
    import pytest

    _log(pytest_runtest_logstart.config, ["start", nodeid])


def pytest_runtest_logreport(report):
    _log(pytest_runtest_logstart.config, [report.when, report.nodeid, report.outcome])


def pytest_runtest_logfinish(nodeid, location):
    _log(pytest_runtest_logstart.config, ["finish", nodeid])


def pytest_warning_recorded(warning_message, when, nodeid, location):
    _log(pytest_runtest_logstart.config, ["warning", nodeid, str(warning_message.message)])


def pytest_configure(config):
    pytest_runtest_logstart.config = config
    pytest_configure.pid = os.getpid()
"""


@pytest.mark.parametrize("tier", TIERS)
def test_a_tests_warnings_come_after_its_reports(pytester: pytest.Pytester, run: Runner, tier: str) -> None:
    """pytest records the warnings a test raised when its protocol ends, after its
    reports and ``logfinish``; plugins that log events in order (pytest-reportlog) show
    them there. Isolated they came before the test's first report."""
    pytester.makeconftest(WARN_ORDER_CONFTEST)
    pytester.makepyfile(
        test_w="""
        import warnings

        def test_warns():
            warnings.warn("first")
            warnings.warn("second", DeprecationWarning)

        def test_quiet():
            pass
        """
    )
    events = pytester.path / "events"
    run(None, "-p", "no:randomly")
    base = events.read_text().splitlines()
    events.unlink()
    run(tier, "-p", "no:randomly")
    assert events.read_text().splitlines() == base
    kinds = [json.loads(line)[0] for line in base]
    assert kinds[:7] == ["start", "setup", "call", "teardown", "finish", "warning", "warning"], kinds


ENV_CONFTEST = """
import os


def pytest_configure(config):
    # Builds on its own value: a second configuration would apply it twice.
    os.environ["GROWS"] = "/opt/bin:" + os.environ.get("GROWS", "/usr/bin")
    # In the C environ only, as readline sets LINES and COLUMNS: not in os.environ, but
    # in a spawned process's environment.
    os.putenv("ONLY_IN_C", "from-c")
"""

ENV_TESTS = """
import os
import subprocess


def test_configured_once():
    assert os.environ["GROWS"] == "/opt/bin:/usr/bin"


def test_pytest_env_applied_once():
    assert os.environ["MYPATH"] == "/opt/tool/bin:/usr/local/bin"


def test_c_environ_only_in_spawned_processes():
    assert "ONLY_IN_C" not in os.environ
    out = subprocess.run(["sh", "-c", 'printf %s "$ONLY_IN_C"'], capture_output=True, text=True).stdout
    assert out == "from-c"
"""


@pytest.mark.parametrize("stem", ["1", "0"])
@pytest.mark.parametrize("tier", TIERS)
def test_the_environment_is_the_controllers(
    pytester: pytest.Pytester, run: Runner, tier: str, stem: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A test sees the environment it sees in-process: what configuration changed, once
    (pytest-env's ``MYPATH=/opt/tool/bin:{MYPATH}``, a conftest prepending to a
    variable; the sandbox's session configures again), and ``os.environ`` without what
    is only in the C ``environ`` (readline's ``COLUMNS``, which ``shutil`` and argparse
    would take as the terminal's width), which processes the test spawns still get."""
    pytester.makeconftest(ENV_CONFTEST)
    pytester.makeini("[pytest]\nenv =\n    MYPATH=/opt/tool/bin:{MYPATH}\n")
    pytester.makepyfile(test_env=ENV_TESTS)
    monkeypatch.setenv("MYPATH", "/usr/local/bin")
    monkeypatch.delenv("GROWS", raising=False)
    monkeypatch.setenv("PYTEST_ISOLATE_STEM", stem)
    names = ("test_configured_once", "test_pytest_env_applied_once", "test_c_environ_only_in_spawned_processes")
    want = {f"test_env.py::{n}": ["PASSED"] for n in names}
    base = run(None, plugins=("env",))
    assert outcomes(base) == want, base.stdout.str()
    iso = run(tier, plugins=("env",))
    assert outcomes(iso) == want, iso.stdout.str()


SHARED_TEARDOWN = {
    "conftest": """
        import pytest

        @pytest.fixture(scope="session")
        def server():
            yield
            raise RuntimeError("session teardown boom")
    """,
    "test_one": """
        import pytest

        @pytest.fixture(scope="module")
        def db(server):
            yield
            raise RuntimeError("module teardown boom")

        def test_a(db):
            pass

        def test_b(db):
            assert 0

        def test_c(db):
            pass
    """,
    "test_two": """
        def test_d(server):
            assert 0

        def test_e(server):
            pass
    """,
}


@pytest.mark.parametrize("tier", TIERS)
@pytest.mark.parametrize("args", [(), ("-x",), ("--maxfail=3",)], ids=["all", "x", "maxfail3"])
def test_a_shared_fixtures_teardown_error_is_reported_once_as_in_process(
    pytester: pytest.Pytester, run: Runner, tier: str, args: tuple[str, ...]
) -> None:
    """A module- or session-scoped fixture whose teardown fails: in-process pytest keeps
    it up for the next test that uses it and reports the error once, with the last one
    (or where ``-x``/``--maxfail`` stops the run). Each sandbox tore it down with its
    own test and reported it there: 7 errors instead of 2, and ``-x`` stopped the run
    after the first test. The sandbox now tears down what pytest would keep up for the
    next test (which sets it up again in its own sandbox) without a report."""
    for name, body in SHARED_TEARDOWN.items():
        if name == "conftest":
            pytester.makeconftest(body)
        else:
            pytester.makepyfile(**{name: body})
    base = run(None, "-p", "no:randomly", *args)
    iso = run(tier, "-p", "no:randomly", *args)
    assert iso.ret == base.ret
    assert outcomes(iso) == outcomes(base)
    summary = [line for line in base.outlines if line.startswith(("FAILED ", "ERROR "))]
    assert summary, base.stdout.str()
    iso.stdout.fnmatch_lines([*summary, f"*{base.outlines[-1].split(' in ')[0].strip('= ')}*"])
    assert iso.stdout.str().count("teardown boom") == base.stdout.str().count("teardown boom")


@pytest.mark.parametrize("tier", ("process", "jail"))
def test_a_shared_fixtures_teardown_error_under_xdist_as_in_process(
    pytester: pytest.Pytester, run: Runner, tier: str
) -> None:
    """The same under pytest-xdist, where a test sent ahead learns the test after it
    from the worker's queue."""
    for name, body in SHARED_TEARDOWN.items():
        if name == "conftest":
            pytester.makeconftest(body)
        else:
            pytester.makepyfile(**{name: body})
    args = ("-p", "no:randomly", "-n", "2", "--dist", "loadfile", "-rfE")
    base = run(None, *args, plugins=("xdist",))
    iso = run(tier, *args, plugins=("xdist",))

    def summary(res: pytest.RunResult) -> list[str]:
        return sorted(line for line in res.outlines if line.startswith(("FAILED ", "ERROR ")))

    assert iso.ret == base.ret
    assert summary(base) and summary(iso) == summary(base), (base.stdout.str(), iso.stdout.str())
    assert iso.parseoutcomes() == base.parseoutcomes()


KEPT_TEARDOWN = {
    "conftest": """
        import pytest

        @pytest.fixture(scope="session")
        def server():
            yield

        @pytest.fixture(scope="module")
        def db():
            yield
            raise RuntimeError("module teardown boom")
    """,
    "test_one": """
        def test_a(db, server):
            pass
    """,
    "test_two": """
        def test_b(server):
            pass
    """,
}


@pytest.mark.parametrize("tb", ["auto", "native"])
def test_a_teardown_error_beside_a_kept_fixture_shows_no_frame_of_ours(
    pytester: pytest.Pytester, run: Runner, tb: str
) -> None:
    """The sandbox keeps up the session fixture the next test (in another module) sets up
    again and tears the module fixture down with its test, as in-process. Its error's
    traceback showed a frame of the plugin (``child.py``, the wrapper that kept the
    session up) between pytest's frames and the fixture's."""
    pytester.makeconftest(KEPT_TEARDOWN["conftest"])
    pytester.makepyfile(test_one=KEPT_TEARDOWN["test_one"], test_two=KEPT_TEARDOWN["test_two"])
    base = run(None, "-p", "no:randomly", f"--tb={tb}")
    iso = run("process", "-p", "no:randomly", f"--tb={tb}")
    assert iso.ret == base.ret == 1
    assert outcomes(iso) == outcomes(base) == {
        "test_one.py::test_a": ["PASSED", "ERROR"], "test_two.py::test_b": ["PASSED"]
    }
    assert "module teardown boom" in iso.stdout.str()
    assert "pytest_isolate" not in iso.stdout.str()

    def tb_lines(res: pytest.RunResult) -> list[str]:
        lines = res.outlines
        start = next(i for i, ln in enumerate(lines) if "ERROR at teardown of test_a" in ln)
        end = next(i for i, ln in enumerate(lines) if ln.startswith("=") and i > start)
        return [re.sub(r"0x[0-9a-f]+", "0x", ln) for ln in lines[start:end]]

    assert tb_lines(iso) == tb_lines(base)


@pytest.mark.parametrize("tier", ("process", "jail"))
def test_a_fixture_the_next_test_shares_is_kept_up_beside_one_it_does_not(
    pytester: pytest.Pytester, run: Runner, tier: str
) -> None:
    """``test_a`` uses a session fixture and a module fixture whose teardown fails;
    ``test_b`` after it uses only the module fixture. In-process the module fixture comes
    down once, after ``test_b``: one error. The sandbox of ``test_a`` tore down every
    fixture, reported, as soon as the next test did not share one of them: the error
    came twice (``test_a`` and ``test_b``). Now only the fixture ``test_b`` does not
    set up again comes down with ``test_a``."""
    pytester.makeconftest(KEPT_TEARDOWN["conftest"])
    pytester.makepyfile(test_one="def test_a(db, server):\n    pass\n\ndef test_b(db):\n    pass\n")
    base = run(None, "-p", "no:randomly")
    iso = run(tier, "-p", "no:randomly")
    assert iso.ret == base.ret == 1
    assert outcomes(iso) == outcomes(base) == {
        "test_one.py::test_a": ["PASSED"], "test_one.py::test_b": ["PASSED", "ERROR"]
    }
    assert iso.stdout.str().count("module teardown boom") == base.stdout.str().count("module teardown boom")
    iso.stdout.fnmatch_lines(["ERROR test_one.py::test_b - RuntimeError: module teardown boom", "*2 passed, 1 error*"])


QUIET_TEARDOWN = """
    import logging

    import pytest

    @pytest.fixture(scope="module")
    def db():
        yield
        print("db closed")
        logging.getLogger("db").warning("db log at teardown")

    def test_a(db):
        pass

    def test_b(db):
        pass

    def test_c(db):
        pass
"""


@pytest.mark.parametrize("tier", ("process", "jail"))
def test_a_kept_fixtures_teardown_writes_nothing_until_reported(
    pytester: pytest.Pytester, run: Runner, tier: str
) -> None:
    """A module fixture shared by three tests: in-process it comes down once, after the
    last, and what its teardown prints and logs is captured there (``-rA`` shows it
    once; ``--setup-show`` has one ``TEARDOWN``). Each sandbox that kept it up for the
    next test tore it down at its end without a report, but not without output: "db
    closed" and the ``TEARDOWN`` line reached the terminal once per sandbox (each sandbox
    sets the fixture up again, so ``--setup-show`` has a ``SETUP`` line per test)."""
    pytester.makepyfile(test_one=QUIET_TEARDOWN)
    for args in (("-rA",), ("--setup-show",), ("-s",)):
        base = run(None, "-p", "no:randomly", *args)
        iso = run(tier, "-p", "no:randomly", *args)
        assert iso.ret == base.ret == 0
        for text in ("db closed", "TEARDOWN M db", "db log at teardown"):
            assert iso.stdout.str().count(text) + iso.stderr.str().count(text) == (
                base.stdout.str().count(text) + base.stderr.str().count(text)
            ), (args, text, iso.stdout.str())


@pytest.mark.parametrize("uses", ["shared", ""], ids=["isolated-uses-it", "isolated-does-not"])
def test_an_in_process_tests_fixture_comes_down_before_the_next_module(
    pytester: pytest.Pytester, run: Runner, uses: str
) -> None:
    """``test_plain`` runs in-process (no marker) and sets up a module fixture; the
    isolated ``test_iso`` comes next, ``test_other`` in the next module runs in-process.
    The controller runs none of an isolated test's protocol, so it kept the fixture up
    through ``test_iso``, and pytest's setup of ``test_other`` errored ("previous item
    was not torn down properly", pytest's own traceback). The controller now tears down
    what in-process tests set up where in-process pytest does: with ``test_iso``, whose
    teardown reports the fixture's error once (the sandbox's copy, or the controller's
    when the sandbox never set it up)."""
    pytester.makepyfile(
        test_m=f"""
            import pytest

            @pytest.fixture(scope="module")
            def shared():
                yield 1
                print("shared down")
                raise RuntimeError("shared teardown boom")

            def test_plain(shared):
                pass

            @pytest.mark.isolate("process")
            def test_iso({uses}):
                pass
        """,
        test_n="def test_other():\n    pass\n",
    )
    base = run(None, "-p", "no:randomly", "-p", "no:isolate", "-rA")
    iso = run(None, "-p", "no:randomly", "-rA")
    assert "not torn down properly" not in iso.stdout.str()
    assert iso.ret == base.ret == 1
    assert outcomes(iso) == outcomes(base) == {
        "test_m.py::test_plain": ["PASSED"], "test_m.py::test_iso": ["PASSED", "ERROR"],
        "test_n.py::test_other": ["PASSED"],
    }
    for text in ("shared teardown boom", "shared down"):
        assert iso.stdout.str().count(text) == base.stdout.str().count(text), (text, iso.stdout.str())
    iso.stdout.fnmatch_lines(["ERROR test_m.py::test_iso - RuntimeError: shared teardown boom"])


@pytest.mark.parametrize("tier", ("process", "jail"))
def test_a_module_sandbox_reports_what_its_earlier_test_set_up(
    pytester: pytest.Pytester, run: Runner, tier: str
) -> None:
    """``isolate(scope="module")``: one sandbox runs ``test_a`` (a session fixture whose
    teardown fails) and ``test_b`` (no fixture); ``test_c`` of the next module uses
    neither. The sandbox kept the session fixture up for ``test_c``, judging by
    ``test_b``'s fixtures only, and tore it down unreported: the error was lost (in
    0 errors, in-process 1). It is now reported, early (with ``test_b``: the known
    layout difference of a fixture the next test does not use)."""
    pytester.makepyfile(
        conftest="""
            import pytest

            @pytest.fixture(scope="session")
            def server():
                yield
                raise RuntimeError("session teardown boom")
        """,
        test_one="def test_a(server):\n    pass\n\ndef test_b():\n    pass\n",
        test_two="def test_c():\n    pass\n",
    )
    base = run(None, "-p", "no:randomly")
    iso = run(tier, "-p", "no:randomly", "--isolate-scope=module")
    assert iso.ret == base.ret == 1
    assert iso.parseoutcomes() == base.parseoutcomes() == {"passed": 3, "errors": 1}
    assert iso.stdout.str().count("session teardown boom") == base.stdout.str().count("session teardown boom")


#: A class- and a package-scoped fixture whose teardowns fail, each used by some of the
#: tests in its scope only: in-process pytest keeps them up to the last test of the class
#: (``test_c3``) and of the package (``test_b2``) and reports each error there.
PARTIAL_TEARDOWN = {
    "pkg/__init__.py": "",
    "pkg/conftest.py": """
        import pytest

        @pytest.fixture(scope="package")
        def pkgres():
            yield
            raise RuntimeError("package teardown boom")

        @pytest.fixture(scope="class")
        def clsres():
            yield
            raise RuntimeError("class teardown boom")
    """,
    "pkg/test_a.py": """
        def test_a1(pkgres):
            pass

        class TestC:
            def test_c1(self, clsres, pkgres):
                pass

            def test_c2(self, clsres):
                assert 0

            def test_c3(self):
                pass

        def test_a2():
            pass
    """,
    "pkg/test_b.py": """
        def test_b1(pkgres):
            pass

        def test_b2():
            pass
    """,
    "test_top.py": """
        def test_top():
            pass
    """,
}


@pytest.mark.parametrize("tier", TIERS)
@pytest.mark.parametrize("args", [(), ("-x",)], ids=["all", "x"])
def test_a_fixtures_teardown_error_is_reported_where_its_scope_ends(
    pytester: pytest.Pytester, run: Runner, tier: str, args: tuple[str, ...]
) -> None:
    """A sandbox whose next test stays in a fixture's class or package tore that fixture
    down with its own test and reported its error there, though the next test does not
    use it: 3 errors at ``test_c1``, ``test_c2`` and ``test_b1`` where in-process pytest
    reports 2 at ``test_c3`` and ``test_b2``, and ``-x`` stopped the run at ``test_c1``
    instead of ``test_c2``. The sandbox now sends the error on, and the controller puts
    it in the report of the test after which pytest tears the node down."""
    for path, body in PARTIAL_TEARDOWN.items():
        target = pytester.path / path
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(textwrap.dedent(body))
    base = run(None, "-p", "no:randomly", *args)
    iso = run(tier, "-p", "no:randomly", *args)

    def summary(res: pytest.RunResult) -> list[str]:
        return [" ".join(line.split()[:2]) for line in res.outlines if line.startswith(("FAILED ", "ERROR "))]

    assert iso.ret == base.ret
    assert outcomes(iso) == outcomes(base)
    assert summary(base) and summary(iso) == summary(base), (base.stdout.str(), iso.stdout.str())
    assert iso.parseoutcomes() == base.parseoutcomes()
    if not args:
        assert outcomes(base)["pkg/test_a.py::TestC::test_c3"] == ["PASSED", "ERROR"]
        assert outcomes(base)["pkg/test_b.py::test_b2"] == ["PASSED", "ERROR"]


REPARAMETRIZED = """
    import pytest

    @pytest.fixture(scope="module", params=["p1", "p2"])
    def res(request):
        yield request.param
        if request.param == "p1" or FAIL_BOTH:
            raise RuntimeError(f"teardown {request.param} boom")

    def test_x(res):
        pass

    def test_y(res):
        pass

    def test_z():
        pass
"""


@pytest.mark.parametrize("tier", ["process", "jail"])
@pytest.mark.parametrize("both", [False, True], ids=["p1-fails", "both-fail"])
def test_a_parametrized_fixtures_teardown_error_is_reported_once(
    pytester: pytest.Pytester, run: Runner, tier: str, both: bool
) -> None:
    """A parametrized module fixture's first instance, whose teardown fails: in-process
    pytest tears it down at the setup of the first test of the next parameter, which
    errors instead of running. A sandbox cannot give that test's setup error; its own
    errors sent on for the module's end were lost there behind the next instance's (or
    came twice), so the sandbox before now reports it with its own test: the same errors,
    once each, one test early."""
    pytester.makepyfile(test_par=f"FAIL_BOTH = {both}\n" + textwrap.dedent(REPARAMETRIZED))
    base = run(None, "-p", "no:randomly")
    iso = run(tier, "-p", "no:randomly")
    assert iso.ret == base.ret == 1
    for word in ("teardown p1 boom", "teardown p2 boom"):
        assert iso.stdout.str().count(word) == base.stdout.str().count(word), iso.stdout.str()
    assert iso.parseoutcomes()["errors"] == base.parseoutcomes()["errors"] == (2 if both else 1)
    assert outcomes(iso)["test_par.py::test_y[p1]"] == ["PASSED", "ERROR"]



DYNAMIC_TEARDOWN = """
    import pytest

    @pytest.fixture(scope="module")
    def srv():
        yield 1
        raise RuntimeError("dynamic teardown boom")

    def test_a(request):
        assert request.getfixturevalue("srv") == 1

    def test_b():
        pass
"""


@pytest.mark.parametrize("tier", TIERS)
def test_a_fixture_asked_for_by_name_reports_its_teardown_error(
    pytester: pytest.Pytester, run: Runner, tier: str
) -> None:
    """A module fixture only ``request.getfixturevalue`` asks for, whose teardown fails:
    in-process it stays up until the module's last test and fails that test's teardown.
    The sandbox of ``test_a`` judged what to keep up for ``test_b`` by the fixtures
    ``test_a`` declares, kept this one up, tore it down unreported, and the error was
    lost (``test_b`` never sets it up). Now what the test asked for counts too: the
    error is ``test_a``'s teardown error, early, as for a declared fixture the next
    test does not use (docs/compatibility.md)."""
    pytester.makepyfile(test_dynamic=DYNAMIC_TEARDOWN)
    base = run(None, "-p", "no:randomly")
    iso = run(tier, "-p", "no:randomly")
    assert iso.ret == base.ret == 1
    assert iso.parseoutcomes() == base.parseoutcomes() == {"passed": 2, "errors": 1}, iso.stdout.str()
    assert iso.stdout.str().count("RuntimeError: dynamic teardown boom") == base.stdout.str().count(
        "RuntimeError: dynamic teardown boom"
    )

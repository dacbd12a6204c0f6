"""Acceptance tests of the core plugin: marker and options, validation, fresh child per
test, crashes, timeouts, leftovers, Ctrl-C and pytest-xdist — each through a real pytest
subprocess running the real process tier."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tests.outputs import records, section, token

ISO = "--isolate=process"


# -- marker and options ----------------------------------------------------------------
def test_marker_listed_in_markers(pytester: pytest.Pytester) -> None:
    result = pytester.runpytest_subprocess("--markers")
    result.stdout.fnmatch_lines(["@pytest.mark.isolate(tier=None, *timeout=None*): run the test in an isolation tier*"])
    assert result.ret == 0


def test_options_in_their_own_help_group(pytester: pytest.Pytester) -> None:
    result = pytester.runpytest_subprocess("--help")
    assert result.ret == 0
    lines = result.outlines
    starts = [i for i, line in enumerate(lines) if line.startswith("test isolation")]
    assert len(starts) == 1, "no (or two) 'test isolation' option groups"
    group = []
    for line in lines[starts[0] + 1 :]:
        if not line.strip():
            break
        group.append(line)
    text = "\n".join(group)
    for flag in (
        "--isolate=TIER",
        "--isolate-timeout=",
        "--isolate-memory=",
        "--isolate-cpu-time=",
        "--isolate-cpu=",
        "--isolate-pids=",
        "--isolate-report=",
    ):
        assert flag in text, f"{flag} not in the 'test isolation' group:\n{text}"
    # ... and the same settings as ini options.
    result.stdout.fnmatch_lines(
        ["  isolate (string):*default isolation tier*", "  isolate_timeout (string):*", "  isolate_memory (string):*"]
    )


LEVELS = """
    import pytest

    pytestmark = pytest.mark.isolate(timeout="30s")
    SEEN = []

    def test_module_marker():
        pass

    @pytest.mark.isolate(tier="process", memory="512M")
    def test_function_keyword_tier():
        pass

    @pytest.mark.isolate("process", timeout="10s")
    def test_function_positional_tier():
        pass

    @pytest.mark.isolate("process", timeout="20s")
    class TestClassMarker:
        def test_class_marker(self):
            pass

        @pytest.mark.isolate(memory="64M")
        def test_function_in_class(self):
            pass

    @pytest.mark.isolate("none")
    def test_opt_out_first():
        SEEN.append(1)

    @pytest.mark.isolate("none")
    def test_opt_out_second():
        # Runs in the controller like plain pytest: module state is shared.
        assert SEEN == [1]
"""


def test_marker_levels_and_precedence(pytester: pytest.Pytester) -> None:
    """Closest marker wins key by key; marker > command line > ini."""
    pytester.makeini("[pytest]\nisolate = none\nisolate_timeout = 50s\nisolate_memory = 1G\n")
    pytester.makepyfile(test_levels=LEVELS, test_plain="def test_plain():\n    pass\n")
    result = pytester.runpytest_subprocess(ISO, "--isolate-timeout=40s", "--isolate-report=r.json", "-v")
    result.assert_outcomes(passed=8)
    recs = records(pytester.path / "r.json")
    MiB = 1 << 20

    def got(name: str) -> tuple[str, float, int]:
        r = recs[name]
        return r["tier"], r["spec"]["timeout"], r["spec"]["memory"]

    assert got("test_plain.py::test_plain") == ("process", 40.0, 1024 * MiB)  # CLI > ini
    assert got("test_levels.py::test_module_marker") == ("process", 30.0, 1024 * MiB)
    assert got("test_levels.py::test_function_keyword_tier") == ("process", 30.0, 512 * MiB)
    assert got("test_levels.py::test_function_positional_tier") == ("process", 10.0, 1024 * MiB)
    assert got("test_levels.py::TestClassMarker::test_class_marker") == ("process", 20.0, 1024 * MiB)
    assert got("test_levels.py::TestClassMarker::test_function_in_class") == ("process", 20.0, 64 * MiB)
    assert not [n for n in recs if "opt_out" in n], "isolate('none') must opt a test out"
    assert len(recs) == 6


def test_default_is_none_and_marker_opts_in(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        import pytest
        def test_plain():
            pass
        @pytest.mark.isolate("process")
        def test_marked():
            pass
        """
    )
    result = pytester.runpytest_subprocess("--isolate-report=r.json")
    result.assert_outcomes(passed=2)
    assert list(records(pytester.path / "r.json")) == ["test_default_is_none_and_marker_opts_in.py::test_marked"]
    result.stdout.fnmatch_lines(["*isolate: default tier none*", "tests per tier: process 1; *"])


def test_ini_options_in_pyproject(pytester: pytest.Pytester) -> None:
    pytester.makepyprojecttoml(
        """
        [tool.pytest.ini_options]
        isolate = "process"
        isolate_timeout = "45s"
        isolate_report = "report.json"
        """
    )
    pytester.makepyfile(
        """
        import pytest
        def test_from_ini():
            pass
        @pytest.mark.isolate("none")
        def test_opted_out():
            pass
        """
    )
    result = pytester.runpytest_subprocess()
    result.assert_outcomes(passed=2)
    recs = records(pytester.path / "report.json")
    assert list(recs) == ["test_ini_options_in_pyproject.py::test_from_ini"]
    assert recs["test_ini_options_in_pyproject.py::test_from_ini"]["spec"]["timeout"] == 45.0


# -- validation ------------------------------------------------------------------------
BAD_MARKERS = {
    "test_bad_tier": ('@pytest.mark.isolate("prison")', "test_it", "tier", "'prison'", "none, process, chroot, jail, zone, uml"),
    "test_bad_key": ('@pytest.mark.isolate("process", colour="red")', "test_it", "colour", "'colour'", "timeout, cpu_time, memory"),
    "test_bad_size": ('@pytest.mark.isolate("process", memory="256Q")', "test_it", "memory", "'256Q'", "K, M, G or T"),
    "test_bad_duration": ('@pytest.mark.isolate(timeout="soon")', "test_it", "timeout", "'soon'", "ms, s, m or h"),
}


def test_invalid_marker_is_one_line_collection_error(pytester: pytest.Pytester) -> None:
    for name, (mark, func, *_rest) in BAD_MARKERS.items():
        pytester.makepyfile(**{name: f"import pytest\n\n{mark}\ndef {func}():\n    pass\n"})
    pytester.makepyfile(
        test_bad_class='import pytest\n\n@pytest.mark.isolate(pids="lots")\nclass TestC:\n    def test_m(self):\n        pass\n',
        test_fine="def test_fine():\n    pass\n",
    )
    result = pytester.runpytest_subprocess(ISO)
    assert result.ret == pytest.ExitCode.INTERRUPTED
    result.assert_outcomes(errors=5)
    text = "\n".join(result.outlines + result.errlines)
    assert "Traceback" not in text
    assert "pytest_isolate/" not in text
    expected = {f"{n}.py::{f}": (key, value, valid) for n, (_m, f, key, value, valid) in BAD_MARKERS.items()}
    expected["test_bad_class.py::TestC::test_m"] = ("pids", "'lots'", "positive whole number")
    for nodeid, pieces in expected.items():
        lines = [line for line in result.outlines if line.startswith(nodeid + ":")]
        assert len(lines) == 1, f"expected one error line for {nodeid}:\n{text}"
        for piece in pieces:
            assert piece in lines[0], f"{piece!r} missing from: {lines[0]}"


@pytest.mark.parametrize(
    ("args", "ini", "names"),
    [
        (["--isolate=bogus"], "", ["--isolate", "'bogus'", "none, process, chroot, jail, zone, uml"]),
        (["--isolate-memory=256Q"], "", ["--isolate-memory", "'256Q'", "K, M, G or T"]),
        (["--isolate-timeout=soon"], "", ["--isolate-timeout", "'soon'", "ms, s, m or h"]),
        ([], "isolate_memory = 256Q", ["isolate_memory", "'256Q'", "K, M, G or T"]),
        ([], "isolate = prison", ["isolate", "'prison'", "none, process, chroot"]),
    ],
    ids=["flag-tier", "flag-memory", "flag-timeout", "ini-memory", "ini-tier"],
)
def test_bad_flag_or_ini_is_usage_error(pytester: pytest.Pytester, args: list[str], ini: str, names: list[str]) -> None:
    if ini:
        pytester.makeini(f"[pytest]\n{ini}\n")
    pytester.makepyfile("def test_x():\n    pass\n")
    result = pytester.runpytest_subprocess(*args)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    text = "\n".join(result.outlines + result.errlines)
    assert "Traceback" not in text and "pytest_isolate/" not in text
    errors = [line for line in result.errlines if line.startswith("ERROR:")]
    assert len(errors) == 1, text
    for piece in names:
        assert piece in errors[0], f"{piece!r} missing from: {errors[0]}"


# -- a fresh child per test ------------------------------------------------------------
FRESH_CONFTEST = """
    import os
    import pytest

    LOG = os.path.join(os.path.dirname(__file__), "fixtures.log")

    def log(what):
        with open(LOG, "a") as f:
            f.write(f"{what} {os.getpid()}\\n")

    @pytest.fixture(scope="session")
    def s_fix():
        log("session-setup")
        yield
        log("session-teardown")

    @pytest.fixture(scope="module")
    def m_fix():
        log("module-setup")
        yield
        log("module-teardown")

    @pytest.fixture(scope="class")
    def c_fix():
        log("class-setup")
        yield
        log("class-teardown")

    @pytest.fixture
    def f_fix():
        log("function-setup")
        yield
        log("function-teardown")
"""

FRESH_TESTS = """
    import os
    import pathlib

    HERE = pathlib.Path(__file__).parent
    STATE = []

    def test_1_dirty(tmp_path, s_fix, m_fix, f_fix):
        STATE.append("dirty")
        os.environ["ISOLATE_LEAK"] = "1"
        os.chdir("/")
        os.open(HERE / "held.txt", os.O_CREAT | os.O_WRONLY)  # never closed
        (tmp_path / "out.txt").write_text("written in the sandbox")
        (HERE / "tmp_path.txt").write_text(str(tmp_path))

    def test_2_clean(s_fix, m_fix, f_fix):
        assert STATE == []
        assert "ISOLATE_LEAK" not in os.environ
        assert os.getcwd() == str(HERE)
        held = []
        for fd in os.listdir("/proc/self/fd"):
            try:
                held.append(os.readlink(f"/proc/self/fd/{fd}"))
            except OSError:
                pass
        assert str(HERE / "held.txt") not in held

    class TestScoped:
        def test_a(self, s_fix, m_fix, c_fix, f_fix):
            pass

        def test_b(self, s_fix, m_fix, c_fix, f_fix):
            pass
"""


def test_fresh_child_per_test(pytester: pytest.Pytester) -> None:
    pytester.makeconftest(FRESH_CONFTEST)
    pytester.makepyfile(test_fresh=FRESH_TESTS)
    result = pytester.runpytest_subprocess(ISO, "-p", "no:randomly")
    result.assert_outcomes(passed=4)
    # tmp_path lives under the run's basetemp on the host and survives the test.
    tmp = Path((pytester.path / "tmp_path.txt").read_text())
    assert tmp.is_relative_to(pytester.path), tmp
    assert (tmp / "out.txt").read_text() == "written in the sandbox"
    # Every fixture a test uses is set up and torn down in that test's own process —
    # session and module fixtures too: "fresh per test" re-runs them in each child.
    by_pid: dict[str, list[str]] = {}
    for line in (pytester.path / "fixtures.log").read_text().splitlines():
        what, pid = line.split()
        by_pid.setdefault(pid, []).append(what)
    plain = ["session-setup", "module-setup", "function-setup", "function-teardown", "module-teardown", "session-teardown"]
    scoped = [
        "session-setup", "module-setup", "class-setup", "function-setup",
        "function-teardown", "class-teardown", "module-teardown", "session-teardown",
    ]
    assert list(by_pid.values()) == [plain, plain, scoped, scoped]


ONE_AT_A_TIME = """
    import os, time
    import pytest

    LOG = os.path.join(os.path.dirname(__file__), "times.log")

    @pytest.mark.parametrize("n", range(12))
    def test_slow_or_fast(n):
        start = time.monotonic()
        time.sleep(0.02 if n % 3 == 0 else 0)
        with open(LOG, "a") as f:
            f.write(f"{n} {os.getpid()} {start} {time.monotonic()}\\n")
"""


def test_tests_run_one_at_a_time_in_order(pytester: pytest.Pytester) -> None:
    """The controller sends the next test ahead while it logs the last one (the fork
    server then overlaps pytest's reporting), but a worker still runs its tests one
    after another, in collection order, each in its own process."""
    pytester.makepyfile(test_order=ONE_AT_A_TIME)
    result = pytester.runpytest_subprocess(ISO, "-p", "no:randomly")
    result.assert_outcomes(passed=12)
    rows = [line.split() for line in (pytester.path / "times.log").read_text().splitlines()]
    assert [int(r[0]) for r in rows] == list(range(12))
    assert len({r[1] for r in rows}) == 12
    spans = [(float(r[2]), float(r[3])) for r in rows]
    for (_, end), (start, _) in zip(spans, spans[1:], strict=False):
        assert start >= end, spans


def test_no_test_runs_after_the_failure_that_stops_the_session(pytester: pytest.Pytester) -> None:
    """Sending ahead stops at a failure: with ``-x`` the test after it never starts."""
    pytester.makepyfile(
        test_stop="""
        import pathlib
        def test_a():
            pass
        def test_b():
            assert 0
        def test_c():
            pathlib.Path(__file__).with_name("c-ran").write_text("yes")
        """
    )
    result = pytester.runpytest_subprocess(ISO, "-x", "-p", "no:randomly")
    result.assert_outcomes(passed=1, failed=1)
    assert not (pytester.path / "c-ran").exists()


def test_sandbox_holds_no_link_to_the_controller(pytester: pytest.Pytester) -> None:
    """The fork server talks to the controller over a socket and pipes; a test that
    could write to them could forge any result. The child closes them first."""
    pytester.makepyfile(
        test_fds="""
        import os, stat
        def test_fds():
            kinds = {}
            for n in os.listdir("/proc/self/fd"):
                try:
                    kinds[int(n)] = os.readlink(f"/proc/self/fd/{n}")
                except OSError:
                    pass
            assert not [t for t in kinds.values() if t.startswith("socket:")], kinds
        """
    )
    result = pytester.runpytest_subprocess(ISO)
    result.assert_outcomes(passed=1)


def test_killing_the_spawner_takes_its_test_and_the_run_goes_on(pytester: pytest.Pytester) -> None:
    """After the first test, a `process` child's parent is the spawner, not the fork
    server (see ``pytest_isolate/spawner.py``). A test that kills it dies with it and
    fails saying so; the server makes a new spawner and the run goes on."""
    pytester.makepyfile(
        test_sp="""
        import os, pathlib, signal, time
        def test_a():
            pass
        def test_kill_parent():
            os.kill(os.getppid(), signal.SIGKILL)
            time.sleep(6)
            pathlib.Path(__file__).with_name("survived").write_text("yes")
        def test_b():
            pass
        def test_c():
            assert os.getppid() != 1
        """
    )
    result = pytester.runpytest_subprocess(ISO, "-p", "no:randomly", "-rf")
    result.assert_outcomes(passed=3, failed=1)
    result.stdout.fnmatch_lines(["*killed with SIGKILL: the test killed its parent process (the worker's spawner)*"])
    assert not (pytester.path / "survived").exists()
    assert result.duration < 6


def test_in_process_fixture_sharing_unchanged(pytester: pytest.Pytester) -> None:
    """Without isolation the same suite shares module state (the baseline the fresh-child
    test contrasts with): test_2_clean fails in-process."""
    pytester.makeconftest(FRESH_CONFTEST)
    pytester.makepyfile(test_fresh=FRESH_TESTS)
    result = pytester.runpytest_subprocess()
    result.assert_outcomes(passed=3, failed=1)
    lines = (pytester.path / "fixtures.log").read_text().splitlines()
    assert sum(1 for ln in lines if ln.startswith("session-setup")) == 1


# -- crashes ---------------------------------------------------------------------------
CRASHES = """
    import os
    import signal

    def test_segv():
        print("printed before segv")
        os.kill(os.getpid(), signal.SIGSEGV)

    def test_after_segv():
        pass

    def test_exit3():
        print("printed before exit 3")
        os._exit(3)

    def test_after_exit():
        pass

    def test_sigkill():
        print("printed before sigkill")
        os.kill(os.getpid(), signal.SIGKILL)

    def test_after_sigkill():
        pass
"""


def test_crashes_fail_the_test_and_the_run_goes_on(pytester: pytest.Pytester, h: Any) -> None:
    pytester.makepyfile(test_crash=CRASHES)
    result = pytester.runpytest_subprocess(ISO, "-rA", "--isolate-report=r.json", "--junitxml=j.xml", timeout=60)
    result.assert_outcomes(failed=3, passed=3)
    # The teardown report that closes a crashed test adds no line to -rA's summary.
    assert [ln.split(" - ")[0] for ln in result.outlines if ln.startswith(("FAILED ", "ERROR "))] == [
        "FAILED test_crash.py::test_segv", "FAILED test_crash.py::test_exit3", "FAILED test_crash.py::test_sigkill",
    ]
    # junitxml writes properties and output from the teardown report only.
    props = h.junit_properties(pytester.path / "j.xml")
    assert props["test_segv"]["isolate_signal"] == "SIGSEGV" and props["test_segv"]["isolate_crashed"] == "True"
    assert props["test_exit3"]["isolate_exit_code"] == "3"
    assert props["test_sigkill"]["isolate_signal"] == "SIGKILL"
    segv = section(result, "test_segv")
    assert "SIGSEGV" in segv and "printed before segv" in segv
    assert re.search(r'test_crash\.py", line 6 in test_segv', segv), segv  # the dying line
    exit3 = section(result, "test_exit3")
    assert re.search(r"exit(ed)? (with )?code 3", exit3) and "printed before exit 3" in exit3
    kill = section(result, "test_sigkill")
    assert "SIGKILL" in kill and "printed before sigkill" in kill
    result.stdout.fnmatch_lines(
        [
            "PASSED test_crash.py::test_after_segv",
            "PASSED test_crash.py::test_after_exit",
            "PASSED test_crash.py::test_after_sigkill",
        ]
    )
    recs = records(pytester.path / "r.json")
    assert recs["test_crash.py::test_segv"]["signal"] == "SIGSEGV"
    assert recs["test_crash.py::test_exit3"]["exit_code"] == 3
    assert recs["test_crash.py::test_sigkill"]["signal"] == "SIGKILL"
    assert [n for n, r in recs.items() if r["crashed"]] == [
        "test_crash.py::test_segv", "test_crash.py::test_exit3", "test_crash.py::test_sigkill",
    ]
    result.stdout.fnmatch_lines(["tests per tier: process 6; crashed 3; timed out 0"])


WORKER_KILL = """
    import os
    import pathlib
    import signal
    import time

    def test_kill_worker():
        print("printed before killing the worker")
        os.kill(os.getppid(), signal.SIGKILL)  # in the process tier the parent is the fork server
        time.sleep(6)
        pathlib.Path(__file__).with_name("survived").write_text("the orphan kept running")

    def test_after_worker_kill():
        pass
"""


@pytest.fixture(scope="module")
def worker_kill(tmp_path_factory: pytest.TempPathFactory, h: Any) -> tuple[Path, pytest.RunResult]:
    path = tmp_path_factory.mktemp("workerkill")
    h.write_files(path, {"test_wk.py": WORKER_KILL})
    return path, h.run_pytest(path, ISO, "-rA", "--isolate-report=r.json", timeout=90)


def test_killed_worker_fails_the_test_and_is_replaced(worker_kill: tuple[Path, pytest.RunResult]) -> None:
    path, result = worker_kill
    result.assert_outcomes(failed=1, passed=1)
    text = section(result, "test_kill_worker")
    assert re.search(r"SIGKILL|signal 9|code -9", text), text
    result.stdout.fnmatch_lines(["PASSED test_wk.py::test_after_worker_kill"])
    assert records(path / "r.json")["test_wk.py::test_kill_worker"]["crashed"] is True


def test_killed_worker_shows_what_the_test_printed(worker_kill: tuple[Path, pytest.RunResult]) -> None:
    _, result = worker_kill
    assert "printed before killing the worker" in section(result, "test_kill_worker")


def test_killed_worker_takes_its_test_with_it(worker_kill: tuple[Path, pytest.RunResult]) -> None:
    path, _ = worker_kill
    assert not (path / "survived").exists(), "the test process outlived its dead worker"


# -- timeouts and leftovers ------------------------------------------------------------
TIMEOUTS = """
    import subprocess
    import time

    import pytest

    TOKEN = "{token}"

    def test_hang_cli():
        time.sleep(30)

    @pytest.mark.isolate(timeout="1500ms")
    def test_hang_marker_with_child():
        subprocess.Popen(["sh", "-c", "sleep 600; :", TOKEN + "-child"])
        print("spawned a child")
        while True:
            time.sleep(0.05)

    @pytest.mark.isolate(allow=["daemon"])  # a daemon is an escape; this one is intended
    def test_daemon():
        subprocess.Popen(["sh", "-c", "sleep 600; :", TOKEN + "-daemon"], start_new_session=True)

    def test_after():
        pass
"""


@pytest.fixture(scope="module")
def timeouts(tmp_path_factory: pytest.TempPathFactory, h: Any) -> tuple[Path, pytest.RunResult, str]:
    path = tmp_path_factory.mktemp("timeouts")
    tok = token()
    h.write_files(path, {"test_to.py": TIMEOUTS.replace("{token}", tok)})
    result = h.run_pytest(
        path, ISO, "--isolate-timeout=1s", "-rA", "--isolate-report=r.json", "--junitxml=j.xml", timeout=90
    )
    return path, result, tok


def test_timeout_from_flag_shows_the_test_line(timeouts: tuple[Path, pytest.RunResult, str]) -> None:
    _, result, _ = timeouts
    text = section(result, "test_hang_cli")
    assert re.search(r"process: timeout 1 s exceeded: still running after \S+ s, killed", text), text
    assert re.search(r'test_to\.py", line 9 in test_hang_cli', text), text


def test_timeout_from_marker(timeouts: tuple[Path, pytest.RunResult, str]) -> None:
    path, result, _ = timeouts
    text = section(result, "test_hang_marker_with_child")
    assert re.search(r"process: timeout 1\.5 s exceeded: still running after \S+ s, killed", text), text
    assert re.search(r'test_to\.py", line 16 in test_hang_marker_with_child', text), text
    assert "spawned a child" in text
    result.assert_outcomes(failed=2, passed=2)
    recs = records(path / "r.json")
    assert [n for n, r in recs.items() if r["timed_out"]] == [
        "test_to.py::test_hang_cli", "test_to.py::test_hang_marker_with_child",
    ]
    result.stdout.fnmatch_lines(
        [
            "tests per tier: process 4; crashed 0; timed out 2",
            "TIMEOUT test_to.py::test_hang_cli [[]process[]]*",
            "TIMEOUT test_to.py::test_hang_marker_with_child [[]process[]]*",
        ]
    )


def test_timed_out_tests_have_their_junit_properties(timeouts: tuple[Path, pytest.RunResult, str], h: Any) -> None:
    path, _, _ = timeouts
    props = h.junit_properties(path / "j.xml")
    for name in ("test_hang_cli", "test_hang_marker_with_child"):
        assert props[name]["isolate_timed_out"] == "True", name
        assert props[name]["isolate_overuse"].startswith("timeout "), name
    assert "isolate_timed_out" not in props["test_after"]


def test_timeout_kills_what_the_test_spawned(timeouts: tuple[Path, pytest.RunResult, str], h: Any) -> None:
    _, _, tok = timeouts
    assert h.wait_gone(tok + "-child", timeout=1.0) == []


def test_leftover_daemon_killed_and_reported(timeouts: tuple[Path, pytest.RunResult, str], h: Any) -> None:
    path, result, tok = timeouts
    assert h.wait_gone(tok + "-daemon", timeout=1.0) == []
    rec = records(path / "r.json")["test_to.py::test_daemon"]
    assert rec["outcome"] == "passed"
    assert any(tok + "-daemon" in p["cmdline"] for p in rec["leftovers"]), rec["leftovers"]
    assert all(isinstance(p["pid"], int) for p in rec["leftovers"])
    assert records(path / "r.json")["test_to.py::test_after"]["leftovers"] == []


# -- Ctrl-C ----------------------------------------------------------------------------
CTRLC = """
    import os
    import subprocess
    import time

    def test_slow():
        subprocess.Popen(["sh", "-c", "sleep 600; :", "{token}"])
        try:
            run_dir = os.readlink(f"/proc/{{os.getppid()}}/fd/2")
        except OSError:
            run_dir = ""
        with open(os.environ["ISOLATE_MARK"], "w") as f:
            f.write(run_dir)
        time.sleep(60)

    def test_never_reached():
        pass
"""


def test_ctrl_c_stops_the_run_and_cleans_up(tmp_path: Path, h: Any) -> None:
    tok = token()
    h.write_files(tmp_path, {"test_ctrlc.py": CTRLC.replace("{token}", tok).replace("{{", "{").replace("}}", "}")})
    mark = tmp_path / "running"
    snap = h.LeakSnapshot(tmp_path)
    before = h.run_dirs()
    env = dict(os.environ, PYTEST_ADDOPTS=h.FAST_ADDOPTS, PY_COLORS="0", ISOLATE_MARK=str(mark))
    proc = subprocess.Popen(
        [sys.executable, "-m", "pytest", ISO, f"--basetemp={tmp_path / 'bt'}", "test_ctrlc.py"],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,  # its own process group, as a terminal's foreground job
    )
    try:
        end = time.monotonic() + 60
        while not (mark.exists() and mark.stat().st_size) and proc.poll() is None and time.monotonic() < end:
            time.sleep(0.05)
        assert mark.exists(), "the test never started"
        # The run's dir: its owner file names our pytest; else the dir of the fork
        # server's log (the test wrote where its parent's stderr goes).
        owned = [d for d in h.run_dirs() - before if h._read(f"{d}/owner").split()[:1] == [str(proc.pid).encode()]]
        run_dir = Path(owned[0]) if owned else Path(mark.read_text()).parent.parent  # .../w1/server.log
        assert h.RUN_DIR_RE.fullmatch(str(run_dir)), f"cannot tell this run's dir: {run_dir}"
        assert h.procs_with(tok), "the test's child is not running"
        t0 = time.monotonic()
        os.killpg(proc.pid, signal.SIGINT)
        out, _ = proc.communicate(timeout=30)
        took = time.monotonic() - t0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    text = out.decode(errors="replace")
    assert took < 5.0, f"pytest took {took:.1f}s to stop after Ctrl-C"
    assert "KeyboardInterrupt" in text, text
    assert proc.returncode == pytest.ExitCode.INTERRUPTED
    assert "test_never_reached" not in text
    assert h.wait_gone(tok, timeout=2.0) == []
    assert h.fork_servers_under(tmp_path) == []
    assert not run_dir.exists(), f"{run_dir} left behind"
    assert snap.leaks() == []


# -- the worker starts while the controller collects ------------------------------------
EARLY_CONFTEST = """
    import os
    import time


    def _is_server(pid):
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            if b"pytest_isolate.forkserver" in f.read():
                return True  # spawned
        with open(f"/proc/{pid}/stat", "rb") as f:
            parent = f.read().rsplit(b")", 1)[1].split()[1].decode()
        with open(f"/proc/{parent}/comm") as f:
            return f.read().strip() == "isolate-gateway"  # forked from the stem


    def _server_running():
        me = os.getcwd()
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                if _is_server(pid) and os.readlink(f"/proc/{pid}/cwd") == me:
                    return True
            except OSError:
                pass
        return False


    def pytest_collection_finish(session):
        if session.config.pluginmanager.has_plugin("isolate-forkserver"):
            return  # the fork server's own collection
        end = time.monotonic() + 20
        while not _server_running() and time.monotonic() < end:
            time.sleep(0.05)
        with open("server-during-collection", "w") as f:
            f.write(str(_server_running()))
"""


def test_worker_starts_before_the_controller_has_collected(pytester: pytest.Pytester) -> None:
    """With the run's tier on the command line the fork server is up before the first
    test is known; with tiers from markers only it starts at the first isolated test."""
    pytester.makeconftest(EARLY_CONFTEST)
    pytester.makepyfile("def test_a():\n    pass\n")
    pytester.runpytest_subprocess(ISO).assert_outcomes(passed=1)
    assert (pytester.path / "server-during-collection").read_text() == "True"


@pytest.mark.parametrize(
    "files, args, code",
    [
        ({"test_bad.py": "def test_a(:\n    pass\n"}, [], pytest.ExitCode.INTERRUPTED),
        ({"test_ok.py": "def test_a():\n    pass\n"}, ["-k", "nothing_matches"], pytest.ExitCode.NO_TESTS_COLLECTED),
        ({"test_ok.py": "import pytest\n\n@pytest.mark.isolate('none')\ndef test_a():\n    pass\n"}, [], pytest.ExitCode.OK),
    ],
    ids=["collection-error", "all-deselected", "no-isolated-test"],
)
def test_early_worker_nobody_used_is_stopped(
    pytester: pytest.Pytester, files: dict[str, str], args: list[str], code: int
) -> None:
    """Started for a run whose tests then never reach it: stopped, nothing left (the
    leak check of every pytester test looks for fork servers and run dirs)."""
    pytester.makepyfile(**{k.removesuffix(".py"): v for k, v in files.items()})
    result = pytester.runpytest_subprocess("--isolate=zone", *args)
    assert result.ret == code, result.stdout.str()


CTRLC_COLLECTING = """
    import os
    import time

    with open(f"collecting-{os.getpid()}", "w"):
        pass
    time.sleep(60)


    def test_never_collected():
        pass
"""


def test_ctrl_c_while_collecting_stops_the_early_worker(tmp_path: Path, h: Any) -> None:
    h.write_files(tmp_path, {"test_slow_import.py": CTRLC_COLLECTING})
    snap = h.LeakSnapshot(tmp_path)
    env = dict(os.environ, PYTEST_ADDOPTS=h.FAST_ADDOPTS, PY_COLORS="0")
    proc = subprocess.Popen(
        [sys.executable, "-m", "pytest", ISO, f"--basetemp={tmp_path / 'bt'}"],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        # Both are collecting: the controller and the fork server it started early.
        end = time.monotonic() + 60
        while len(list(tmp_path.glob("collecting-*"))) < 2 and proc.poll() is None and time.monotonic() < end:
            time.sleep(0.05)
        assert len(list(tmp_path.glob("collecting-*"))) == 2, "the early fork server never collected"
        assert h.fork_servers_under(tmp_path), "no fork server while collecting"
        os.killpg(proc.pid, signal.SIGINT)
        out, _ = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    text = out.decode(errors="replace")
    assert proc.returncode == pytest.ExitCode.INTERRUPTED, text
    assert "KeyboardInterrupt" in text, text
    assert snap.leaks() == []


# -- pytest-xdist ----------------------------------------------------------------------
XDIST_SUITE = """
    import pytest

    @pytest.mark.parametrize("n", range(4))
    def test_ok(n):
        pass

    def test_fail():
        assert 0

    def test_skip():
        pytest.skip("no")

    @pytest.mark.xfail
    def test_xfail():
        assert 0
"""

XDIST_CONFTEST = """
    import os

    def pytest_isolate_report(config, records):
        with open(os.path.join(str(config.rootpath), "reports.log"), "a") as f:
            f.write(f"{len(records)}\\n")
"""


def test_xdist_runs_isolated_and_reports_once(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_dist=XDIST_SUITE)
    expected = dict(passed=4, failed=1, skipped=1, xfailed=1)
    plain = pytester.runpytest_subprocess("-n", "2")
    plain.assert_outcomes(**expected)
    pytester.makeconftest(XDIST_CONFTEST)
    result = pytester.runpytest_subprocess("-n", "2", ISO, "--isolate-report=r.json", timeout=90)
    result.assert_outcomes(**expected)
    recs = records(pytester.path / "r.json")
    assert sorted(recs) == sorted(
        [f"test_dist.py::test_ok[{n}]" for n in range(4)]
        + ["test_dist.py::test_fail", "test_dist.py::test_skip", "test_dist.py::test_xfail"]
    )
    assert {r["tier"] for r in recs.values()} == {"process"}
    assert recs["test_dist.py::test_fail"]["outcome"] == "failed"
    # pytest_isolate_report fired once, on the xdist controller, with every record.
    assert (pytester.path / "reports.log").read_text().split() == ["7"]
    assert not list(pytester.path.glob("r.json.tmp*"))
    result.stdout.fnmatch_lines(["tests per tier: process 7; crashed 0; timed out 0"])


DAEMONS = """
    import subprocess

    import pytest

    @pytest.mark.isolate(allow=["daemon"])
    @pytest.mark.parametrize("n", range(30))
    def test_daemon(n):
        subprocess.Popen(["sh", "-c", "sleep 600; :", "{token}-daemon"], start_new_session=True)
        print(n)
"""


def test_a_daemon_is_its_own_tests_leftover_under_load(pytester: pytest.Pytester, h: Any) -> None:
    """Under CPU load a daemon is often still inside ``execve`` when its test ends
    (``subprocess.Popen`` returns once the exec has begun): it has no command line yet,
    and was taken for a zombie, neither listed nor killed, and found at the next test's
    end and blamed on it (``describe_procs`` now waits for its arguments). Each daemon
    must be listed as its own test's leftover, none as the next test's."""
    tok = token()
    pytester.makepyfile(test_many_daemons=DAEMONS.replace("{token}", tok))
    hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(2)]
    try:
        result = pytester.runpytest_subprocess(ISO, "--isolate-report=r.json", timeout=120)
    finally:
        for p in hogs:
            p.kill()
            p.wait()
    assert h.wait_gone(tok + "-daemon", timeout=2.0) == []
    result.assert_outcomes(passed=30)
    recs = records(pytester.path / "r.json")
    for n in range(30):
        rec = recs[f"test_many_daemons.py::test_daemon[{n}]"]
        assert any(tok + "-daemon" in p["cmdline"] for p in rec["leftovers"]), (n, rec["leftovers"])


SLOW_EXEC = """
    import os
    import sys
    import time

    def test_daemon():
        if os.fork() == 0:
            os.setsid()
            if os.fork() == 0:
                time.sleep(1)  # the test ends before this fork gets to its exec
                os.execv(sys.executable, [sys.executable, "-c", "import time; time.sleep(60)", "{token}"])
            os._exit(0)
        os.wait()
"""


@pytest.mark.parametrize("tier", ["process", "zone"])
def test_a_daemon_caught_before_its_exec_is_placed_where_its_test_began(
    pytester: pytest.Pytester, h: Any, tier: str
) -> None:
    """A daemon still a fork of the test's process when the test ends (a busy host; here
    a sleep) has the test's command line, which no spawn's matches: its escape is still
    placed where the test forked (in one CI run the warning had no place at all)."""
    tok = token()
    pytester.makepyfile(test_slow=SLOW_EXEC.replace("{token}", tok))
    result = pytester.runpytest_subprocess(f"--isolate={tier}", "--isolate-on-escape=warn", timeout=60)
    result.assert_outcomes(passed=1, warnings=1)
    verdict = "escaped" if tier == "process" else "blocked"
    result.stdout.fnmatch_lines([f"*IsolationWarning: {tier}: {verdict} escape daemon at test_slow.py:6: pid *"])
    assert h.wait_gone(tok, timeout=2.0) == []


EXITING = """
    import subprocess
    import sys

    def test_leaves_a_process_on_its_way_out():
        # As execnet's gw.exit(): the process is told to go, and not waited for.
        subprocess.Popen([sys.executable, "-c", "import time; time.sleep(0.03)", "{token}"])
"""


@pytest.mark.parametrize("tier", ["process", "jail"])
def test_a_process_that_ends_just_after_its_test_is_no_daemon(pytester: pytest.Pytester, h: Any, tier: str) -> None:
    """Killed and reported at once, a process already on its way out was a daemon escape
    (20 of execnet's passing tests failed at ``process``); it is given a moment first."""
    tok = token()
    pytester.makepyfile(test_exiting=EXITING.replace("{token}", tok))
    result = pytester.runpytest_subprocess(f"--isolate={tier}", "--isolate-on-escape=fail", timeout=60)
    result.assert_outcomes(passed=1)
    assert "escape daemon" not in result.stdout.str() and "isolation escapes" not in result.stdout.str()
    assert h.wait_gone(tok, timeout=2.0) == []


NO_FDS = """
    import os
    import resource


    def test_fails_first():
        assert 0, "first"


    def test_fails_with_no_descriptor_left():
        resource.setrlimit(resource.RLIMIT_NOFILE, (16, 16))
        while True:
            try:
                os.dup(0)
            except OSError:
                break
        assert 0, "no-fds"
"""


@pytest.mark.parametrize("tier", ["none", "process", "chroot"])
def test_a_traceback_shows_the_source_when_no_descriptor_is_left(pytester: pytest.Pytester, tier: str) -> None:
    """In-process, a module's source is in linecache once one of its failures was shown;
    a sandbox's child was fresh and had to open the file to show it, which a test that
    used up its descriptors prevented: "???" instead of the code (a CI run of
    tests/test_faults.py). The server reads the collected files before any fork."""
    pytester.makepyfile(test_no_fds=NO_FDS)
    result = pytester.runpytest_subprocess(f"--isolate={tier}", "--isolate-on-escape=warn", "-p", "no:randomly")
    result.assert_outcomes(failed=2)
    result.stdout.fnmatch_lines(["*def test_fails_with_no_descriptor_left():*", "E       AssertionError: no-fds"])
    assert "???" not in result.stdout.str()


ORPHANS = """
    import os
    import signal
    import subprocess
    import sys
    import time

    # A child that starts a grandchild, prints its pid, then waits (or, ZOMBIE, whose
    # grandchild exits at once and stays a zombie while the child lives).
    CHILD = "import os, subprocess, sys, time\\np = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\\nprint(p.pid, flush=True)\\np.wait()\\n"
    ZOMBIE = "import os, time\\npid = os.fork()\\nif pid == 0:\\n    os._exit(0)\\nprint(pid, flush=True)\\ntime.sleep(60)\\n"

    def orphan(code):
        child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
        grandchild = int(child.stdout.readline())
        child.kill()
        child.wait()
        child.stdout.close()
        return grandchild

    def gone(pid):
        deadline = time.monotonic() + 5
        while os.path.exists(f"/proc/{pid}"):
            assert time.monotonic() < deadline, f"orphan {pid} is still there"
            time.sleep(0.02)

    def test_orphan_is_reaped():
        gone(orphan(ZOMBIE))

    def test_signal_orphaned_grandchild():
        grandchild = orphan(CHILD)
        os.kill(grandchild, signal.SIGTERM)
        gone(grandchild)
"""


@pytest.mark.parametrize("tier", ["process", "chroot", "jail", "uml"])
def test_the_tests_orphans_are_reaped_and_its_own(pytester: pytest.Pytester, tier: str) -> None:
    """A test kills a child and waits for the orphaned grandchild to go, or signals it
    first (psutil's process tests and clean-ups). The orphan is adopted by the fork
    server (a subreaper, in a uml guest too; at `jail` and `zone` the sandbox's init),
    as in-process init adopts it: it must be reaped while the test runs (psutil's
    test_zombie_process hung the whole run at `process`), and a signal to it is no
    escape while it stays in the process group the test leads (8 psutil tests failed
    on a `signal` escape at `process`, and warned at `jail`)."""
    pytester.makepyfile(test_orphans=ORPHANS)
    result = pytester.runpytest_subprocess(f"--isolate={tier}", "-p", "no:randomly", "-W", "error", timeout=60)
    result.stdout.fnmatch_lines(["*2 passed*"])
    result.stdout.no_fnmatch_line("*still there*")
    result.stdout.no_fnmatch_line("*escape signal*")


COMM = """
    import pathlib

    def test_name():
        # Said in the failure: a uml guest's uncaptured output does not reach the host.
        assert False, "COMM=" + pathlib.Path("/proc/self/comm").read_text().strip() + "="
"""


@pytest.mark.parametrize("tier", ["process", "jail", "uml"])
def test_the_tests_process_has_the_name_it_has_in_process(pytester: pytest.Pytester, tier: str) -> None:
    """``ps``, ``psutil.Process().name()`` and ``/proc/self/comm`` show the test's process
    as in-process (the interpreter's name), not a name of the plugin's (psutil's
    serialization tests labelled their subtests with it)."""
    pytester.makepyfile(test_comm=COMM)
    names = []
    for args in ((), (f"--isolate={tier}",)):
        result = pytester.runpytest_subprocess("-p", "no:randomly", *args, timeout=120)
        result.assert_outcomes(failed=1)
        names.append(re.findall(r"COMM=([^=\s]*)=", result.stdout.str()))
    assert names[0] == names[1] != [], names

"""What the sandbox's session does must not show: start-up failures, the plugin's own
calls, another plugin's signal in the controller, markers that came too late."""

from __future__ import annotations

import time

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
            armed = item.name == "test_slow" and not hasattr(item.config, "workerinput")
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

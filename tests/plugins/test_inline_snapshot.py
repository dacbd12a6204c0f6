"""inline-snapshot: the same outcomes isolated; what it cannot do there is said, not skipped.

Its snapshots live in the process the test ran in (frames, live values) and are
reported and applied at the session's end: isolated, its report lacked them and
``--inline-snapshot=fix`` changed nothing without a word.
"""

from __future__ import annotations

import pytest

from tests.plugins.conftest import Runner, outcomes

SUITE = """
    import pytest
    from inline_snapshot import snapshot


    def test_new():
        assert 1 + 1 == snapshot()


    def test_ok():
        assert "abc".upper() == snapshot("ABC")


    def test_wrong():
        assert [1, 2, 3] == snapshot([1, 2])


    def test_none():
        pass


    @pytest.mark.isolate("process")
    def test_marked():
        assert 2 * 3 == snapshot(6)
"""

PLUGINS = ("inline_snapshot",)


@pytest.mark.parametrize("tier", ["process", "jail"])
def test_same_outcomes_and_a_summary_of_what_was_left_out(
    pytester: pytest.Pytester, run: Runner, tier: str
) -> None:
    source = pytester.makepyfile(test_snap=SUITE)
    before = source.read_text()
    base = run(None, "--inline-snapshot=report", plugins=PLUGINS)
    iso = run(tier, "--inline-snapshot=report", plugins=PLUGINS)
    assert outcomes(iso) == outcomes(base), iso.stdout.str()
    assert outcomes(iso)["test_snap.py::test_wrong"] == ["FAILED", "ERROR"]
    assert outcomes(iso)["test_snap.py::test_new"] == ["PASSED", "ERROR"]
    # In-process the report shows the diffs; isolated it cannot, and says so.
    base.stdout.fnmatch_lines(["*Create snapshots*", "*Fix snapshots*"])
    iso.stdout.fnmatch_lines(
        [
            "*- inline-snapshot, isolated tests -*",
            "inline-snapshot would change 2 snapshots of 2 isolated tests (create 1, fix 1). Its report leaves"
            " them out, and it changes no snapshot of an isolated test: run those tests in-process to see or"
            " apply the changes.",
        ]
    )
    assert source.read_text() == before


def test_only_what_would_change_is_summed_up(pytester: pytest.Pytester, run: Runner) -> None:
    """Only the marked test runs isolated, and its snapshot holds: nothing to say (the
    report of the tests run in-process is inline-snapshot's own, as ever)."""
    source = pytester.makepyfile(test_snap=SUITE)
    result = run(None, "--inline-snapshot=report", plugins=PLUGINS)
    result.stdout.fnmatch_lines(["*Create snapshots*"])
    assert "isolated test" not in result.stdout.str()
    source.write_text(source.read_text().replace("snapshot(6)", "snapshot(7)"))
    result = run(None, "--inline-snapshot=report", plugins=PLUGINS)
    result.stdout.fnmatch_lines(["inline-snapshot would change 1 snapshot of 1 isolated test (fix 1).*"])


@pytest.mark.parametrize("tier", ["process", "jail"])
def test_writing_flags_are_refused_for_isolated_tests(
    pytester: pytest.Pytester, run: Runner, tier: str
) -> None:
    source = pytester.makepyfile(test_snap=SUITE)
    before = source.read_text()
    result = run(tier, "--inline-snapshot=create,fix", plugins=PLUGINS)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(
        [
            "ERROR: --inline-snapshot=create,fix: inline-snapshot can only change the snapshots of tests that run"
            " in-process, and test_snap.py::test_new and 4 more would run isolated; run them with --isolate=none*"
        ]
    )
    assert "passed" not in result.stdout.str()
    assert source.read_text() == before
    # Nothing runs with --collect-only: nothing to refuse.
    assert run(tier, "--inline-snapshot=create,fix", "--collect-only", plugins=PLUGINS).ret == 0


def test_in_process_tests_are_fixed_once_nothing_is_isolated(
    pytester: pytest.Pytester, run: Runner
) -> None:
    """With the marked test deselected, nothing runs isolated: inline-snapshot creates
    and fixes as it does without this plugin."""
    source = pytester.makepyfile(test_snap=SUITE)
    refused = run(None, "--inline-snapshot=create,fix", plugins=PLUGINS)
    assert refused.ret == pytest.ExitCode.USAGE_ERROR
    refused.stderr.fnmatch_lines(["*test_snap.py::test_marked would run isolated*"])
    result = run(None, "--inline-snapshot=create,fix", "-k", "not marked", plugins=PLUGINS)
    text = source.read_text()
    assert "snapshot(2)" in text and "snapshot([1, 2, 3])" in text, result.stdout.str()


def test_a_version_that_keeps_its_state_elsewhere_is_named(
    pytester: pytest.Pytester, run: Runner, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A release that moves its session state again (0.37 moved it to ``_core``) is said
    in the warnings, not passed over: the refusal and the summary need that state."""
    pytester.path.joinpath("newer/inline_snapshot").mkdir(parents=True)
    pytester.path.joinpath("newer/inline_snapshot/_state_elsewhere.py").write_text("state = {}\n")
    pytester.path.joinpath("newer/inline_snapshot/pytest_plugin.py").write_text(
        "import pytest\nfrom inline_snapshot import _state_elsewhere\n"
    )
    pytester.path.joinpath("newer/inline_snapshot/__init__.py").write_text(
        "def snapshot(value=None):\n    return value\n"
    )
    pytester.makepyfile(test_snap=SUITE)
    monkeypatch.setenv("PYTHONPATH", str(pytester.path / "newer"))
    result = run("process", "-p", "inline_snapshot.pytest_plugin")
    result.stdout.fnmatch_lines(
        [
            "*IsolationWarning: inline-snapshot *: pytest-isolate does not know where this version keeps its"
            " session state (none of inline_snapshot._core._global_state, inline_snapshot._global_state); for"
            " isolated tests its flags that change files are not refused, and what it would change is not"
            " summed up",
        ]
    )
    # Without an isolated test there is nothing to say.
    quiet = run(None, "-k", "not marked", "-p", "inline_snapshot.pytest_plugin")
    assert "IsolationWarning" not in quiet.stdout.str(), quiet.stdout.str()

"""Plugins that write a file at the session's end from the reports the controller saw:
the file must be the one the in-process run writes, whatever the sandboxes' sessions do.

pytest-split's ``--store-durations`` writes every test's duration to
``.test_durations``; pytest-reportlog writes one JSON line per event, in the order the
session logged them.
"""

from __future__ import annotations

import json

import pytest

from tests.plugins.conftest import TIERS, Runner, outcomes

SUITE = """
    import time
    import warnings

    def test_slow():
        time.sleep(0.2)

    def test_fast():
        pass

    def test_warns():
        warnings.warn("careful")
"""


@pytest.mark.parametrize("tier", TIERS)
def test_split_store_durations(pytester: pytest.Pytester, run: Runner, tier: str) -> None:
    """The run's durations replace what the file held, as in-process. The fork server's
    own session, which runs no test, wrote the file it had read at start over them."""
    pytester.makepyfile(test_d=SUITE)
    durations = pytester.path / ".test_durations"
    names = [f"test_d.py::{n}" for n in ("test_slow", "test_fast", "test_warns")]
    for t in (None, tier):
        durations.write_text(json.dumps({"test_d.py::test_fast": 9.0, "test_d.py::gone": 1.0}))
        result = run(t, "--store-durations", "-p", "no:randomly", plugins=("pytest-split",))
        assert outcomes(result) == {n: ["PASSED"] for n in names}, result.stdout.str()
        got = json.loads(durations.read_text())
        assert set(got) == {*names, "test_d.py::gone"}, (t, got)
        assert got["test_d.py::test_slow"] >= 0.2 and got["test_d.py::test_fast"] < 9.0, (t, got)


def _events(path: pytest.Pytester | object) -> list[tuple[object, ...]]:
    out = []
    for line in path.read_text().splitlines():  # type: ignore[attr-defined]
        e = json.loads(line)
        kind = e["$report_type"]
        if kind in ("SessionStart", "SessionFinish", "CollectReport"):
            continue
        if kind == "WarningMessage":
            out.append((kind, e.get("message"), e.get("category")))
        else:
            out.append((kind, e.get("nodeid"), e.get("when"), e.get("outcome")))
    return out


@pytest.mark.parametrize("tier", TIERS)
def test_reportlog_events_in_order(pytester: pytest.Pytester, run: Runner, tier: str) -> None:
    """The report log holds the same events in the same order as in-process: a test's
    warnings after its reports (isolated they came first)."""
    pytester.makepyfile(test_d=SUITE)
    logs = []
    for t in (None, tier):
        log = pytester.path / f"log-{t}.jsonl"
        result = run(t, f"--report-log={log}", "-p", "no:randomly", plugins=("pytest_reportlog",))
        assert result.ret == 0, result.stdout.str()
        logs.append(_events(log))
    assert logs[0] == logs[1]
    kinds = [e[0] for e in logs[0]]
    assert kinds[-4:] == ["TestReport", "TestReport", "TestReport", "WarningMessage"], kinds

"""Reports cross the sandbox boundary: pytest's own options and output work as they do
in-process, and the plugin's own reports (terminal section, JSON, junit properties,
hooks) carry one record per isolated test."""

from __future__ import annotations

import fnmatch
import json
import re
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import pytest

ISO = "--isolate=process"

SUITE = """
    import logging
    import sys
    import warnings

    import pytest

    def test_output(record_property):
        print("hello from stdout")
        sys.stderr.write("hello from stderr\\n")
        logging.getLogger("suite").warning("hello from logging")
        record_property("answer", "42")

    def test_caplog(caplog):
        logging.getLogger("suite").error("seen by caplog")
        assert [r.getMessage() for r in caplog.records] == ["seen by caplog"]

    def test_fail():
        print("output of a failing test")
        assert 1 + 1 == 3

    def test_skip():
        pytest.skip("not today")

    @pytest.mark.skipif(True, reason="never here")
    def test_skipif():
        pass

    @pytest.mark.xfail(reason="known bug")
    def test_xfail():
        assert 0

    @pytest.mark.xfail(strict=True, reason="strict and failing")
    def test_xfail_strict():
        assert 0

    @pytest.mark.xfail(reason="fixed already")
    def test_xpass():
        pass

    @pytest.mark.xfail(strict=True, reason="must fail")
    def test_xpass_strict():
        pass

    @pytest.mark.parametrize("n", [1, 2], ids=["one", "two"])
    def test_param(n):
        assert n

    def test_warning():
        warnings.warn("careful now", UserWarning)
"""

SUITE_IDS = [
    "test_suite.py::test_output",
    "test_suite.py::test_caplog",
    "test_suite.py::test_fail",
    "test_suite.py::test_skip",
    "test_suite.py::test_skipif",
    "test_suite.py::test_xfail",
    "test_suite.py::test_xfail_strict",
    "test_suite.py::test_xpass",
    "test_suite.py::test_xpass_strict",
    "test_suite.py::test_param[one]",
    "test_suite.py::test_param[two]",
    "test_suite.py::test_warning",
]

HOOKS_CONFTEST = """
    import os

    LOG = os.path.join(os.path.dirname(__file__), "hooks.log")

    def pytest_isolate_result(config, item, record):
        with open(LOG, "a") as f:
            f.write(f"result {os.getpid()} {item.nodeid} {record['outcome']}\\n")

    def pytest_isolate_report(config, records):
        with open(LOG, "a") as f:
            f.write(f"report {os.getpid()} {len(records)}\\n")
"""

COMMON = [
    "-v", "-rA", "--junitxml=j.xml", "-o", "junit_family=legacy", "-p", "no:randomly",
    "--durations=0", "--durations-min=0",
]


class Runs:
    def __init__(self, path: Path, isolated: pytest.RunResult, plain_path: Path, plain: pytest.RunResult) -> None:
        self.path = path
        self.plain_path = plain_path
        self.isolated = isolated
        self.plain = plain


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory, h: Any) -> Runs:
    """The suite run once isolated (with report, junit, hooks) and once in-process."""
    iso = tmp_path_factory.mktemp("iso")
    h.write_files(iso, {"test_suite.py": SUITE, "conftest.py": HOOKS_CONFTEST})
    isolated = h.run_pytest(iso, ISO, *COMMON, "--isolate-report=r.json")
    plain_dir = tmp_path_factory.mktemp("plain")
    h.write_files(plain_dir, {"test_suite.py": SUITE})
    plain = h.run_pytest(plain_dir, *COMMON)
    return Runs(iso, isolated, plain_dir, plain)


def _block(lines: list[str], title: str) -> list[str]:
    """Lines of a ``==== title ====`` section, up to the next one."""
    out: list[str] = []
    inside = False
    for line in lines:
        m = re.fullmatch(r"=+ (.*?) =+", line)
        if m:
            if inside:
                break
            inside = m.group(1) == title
            continue
        if inside:
            out.append(line)
    return out


def test_outcome_counts(runs: Runs) -> None:
    expected = dict(passed=5, failed=2, skipped=2, xfailed=2, xpassed=1, warnings=1)
    runs.plain.assert_outcomes(**expected)
    runs.isolated.assert_outcomes(**expected)
    assert runs.isolated.ret == pytest.ExitCode.TESTS_FAILED


def test_verbose_lines_and_parametrize_ids(runs: Runs) -> None:
    runs.isolated.stdout.fnmatch_lines(
        [
            "test_suite.py::test_output PASSED*",
            "test_suite.py::test_caplog PASSED*",
            "test_suite.py::test_fail FAILED*",
            "test_suite.py::test_skip SKIPPED (not today)*",
            "test_suite.py::test_skipif SKIPPED (never here)*",
            "test_suite.py::test_xfail XFAIL (known bug)*",
            "test_suite.py::test_xfail_strict XFAIL (strict and failing)*",
            "test_suite.py::test_xpass XPASS (fixed already)*",
            "test_suite.py::test_xpass_strict FAILED*",
            "test_suite.py::test_param[[]one[]] PASSED*",
            "test_suite.py::test_param[[]two[]] PASSED*",
            "test_suite.py::test_warning PASSED*",
        ]
    )

    def strip(lines: list[str]) -> list[str]:
        return [re.sub(r"\s+\[\s*\d+%\]$", "", ln) for ln in lines if ln.startswith("test_suite.py::")]

    assert strip(runs.isolated.outlines) == strip(runs.plain.outlines)


def test_captured_sections(runs: Runs) -> None:
    runs.isolated.stdout.fnmatch_lines(
        [
            "*_ test_output _*",
            "*- Captured stdout call -*",
            "hello from stdout",
            "*- Captured stderr call -*",
            "hello from stderr",
            "*- Captured log call -*",
            "WARNING  suite:test_suite.py:* hello from logging",
        ]
    )
    runs.isolated.stdout.fnmatch_lines(["*_ test_fail _*", "*assert (1 + 1) == 3*", "*- Captured stdout call -*", "output of a failing test"])


def test_short_summary_and_failures_match_in_process(runs: Runs) -> None:
    for title in ("short test summary info", "FAILURES", "PASSES"):
        iso, plain = _block(runs.isolated.outlines, title), _block(runs.plain.outlines, title)
        assert iso, f"no {title} section"
        assert iso == plain, title
    runs.isolated.stdout.fnmatch_lines(
        [
            "PASSED test_suite.py::test_output",
            "SKIPPED [[]1[]] test_suite.py:*: not today",
            "XFAIL test_suite.py::test_xfail - known bug",
            "XPASS test_suite.py::test_xpass - fixed already",
            "FAILED test_suite.py::test_fail - assert (1 + 1) == 3",
            "FAILED test_suite.py::test_xpass_strict*",
        ]
    )


def test_caplog_works_inside(runs: Runs) -> None:
    runs.isolated.stdout.fnmatch_lines(["test_suite.py::test_caplog PASSED*"])


def test_warning_summary(runs: Runs) -> None:
    iso = [ln.replace(str(runs.path), "<dir>") for ln in _block(runs.isolated.outlines, "warnings summary")]
    plain = [ln.replace(str(runs.plain_path), "<dir>") for ln in _block(runs.plain.outlines, "warnings summary")]
    assert iso == plain
    runs.isolated.stdout.fnmatch_lines(
        ["*= warnings summary =*", "test_suite.py::test_warning", "*test_suite.py:*: UserWarning: careful now"]
    )


def test_durations(runs: Runs) -> None:
    def entries(result: pytest.RunResult) -> list[tuple[str, str]]:
        lines = _block(result.outlines, "slowest durations")
        return sorted((m.group(1), m.group(2)) for ln in lines if (m := re.match(r"[\d.]+s (setup|call|teardown) +(\S+)", ln)))

    iso = entries(runs.isolated)
    assert ("call", "test_suite.py::test_fail") in iso
    assert ("setup", "test_suite.py::test_output") in iso
    assert iso == entries(runs.plain)


def test_record_property_in_junit(runs: Runs, h: Any) -> None:
    props = h.junit_properties(runs.path / "j.xml")
    assert props["test_output"]["answer"] == "42"


def test_isolation_terminal_section(runs: Runs) -> None:
    runs.isolated.stdout.fnmatch_lines(["*= isolation =*", "tests per tier: process 12; crashed 0; timed out 0"])
    assert not _block(runs.plain.outlines, "isolation")


def test_json_report_one_record_per_test(runs: Runs) -> None:
    doc = json.loads((runs.path / "r.json").read_text())
    recs = doc["tests"]
    assert [r["nodeid"] for r in recs] == SUITE_IDS
    assert doc["summary"]["tests"] == 12
    outcomes = {r["nodeid"].split("::")[1]: r["outcome"] for r in recs}
    assert outcomes == {
        "test_output": "passed", "test_caplog": "passed", "test_fail": "failed", "test_skip": "skipped",
        "test_skipif": "skipped", "test_xfail": "xfailed", "test_xfail_strict": "xfailed",
        "test_xpass": "xpassed", "test_xpass_strict": "failed", "test_param[one]": "passed",
        "test_param[two]": "passed", "test_warning": "passed",
    }
    for r in recs:
        assert r["tier"] == "process"
        assert isinstance(r["duration"], float) and 0 <= r["duration"] < 30
        assert isinstance(r["cpu_user"], float) and r["cpu_user"] >= 0
        assert isinstance(r["cpu_sys"], float) and r["cpu_sys"] >= 0
        # A forked pytest has megabytes resident; a count in KiB or pages would be tiny.
        assert isinstance(r["peak_rss"], int) and 4 << 20 < r["peak_rss"] < 4 << 30
        assert r["exit_code"] == 0 and r["signal"] is None
        assert r["crashed"] is False and r["timed_out"] is False
        assert r["escapes"] == [] and r["overuse"] == [] and r["leftovers"] == []


def test_junit_properties_carry_the_same_figures(runs: Runs, h: Any) -> None:
    recs = {r["nodeid"].split("::")[1]: r for r in json.loads((runs.path / "r.json").read_text())["tests"]}
    props = h.junit_properties(runs.path / "j.xml")
    assert set(props) == set(recs)
    for name, r in recs.items():
        p = props[name]
        assert p["isolate_tier"] == "process"
        for key in ("peak_rss", "cpu_user", "cpu_sys", "exit_code"):
            assert p[f"isolate_{key}"] == str(r[key]), (name, key)
        for key in ("cpu_user", "cpu_sys"):  # seconds to the microsecond, as getrusage counts
            assert len(p[f"isolate_{key}"].partition(".")[2]) <= 6, (name, key, p[f"isolate_{key}"])


def test_hooks_fire_once_per_test_and_once_per_session(runs: Runs) -> None:
    lines = [ln.split() for ln in (runs.path / "hooks.log").read_text().splitlines()]
    results = [ln for ln in lines if ln[0] == "result"]
    reports = [ln for ln in lines if ln[0] == "report"]
    assert [ln[2] for ln in results] == SUITE_IDS
    assert reports == [["report", reports[0][1], "12"]]
    assert {ln[1] for ln in results} == {reports[0][1]}, "hooks ran outside the controller"
    assert dict((ln[2].split("::")[1], ln[3]) for ln in results)["test_xpass"] == "xpassed"


def test_setup_show(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        import pytest
        @pytest.fixture
        def fx():
            yield 1
        def test_uses(fx):
            pass
        """
    )
    result = pytester.runpytest_subprocess(ISO, "--setup-show")
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(["*SETUP    F fx*", "*test_setup_show.py::test_uses (fixtures used: fx)*", "*TEARDOWN F fx*"])


TERMINAL = """
    import logging

    import pytest

    @pytest.fixture
    def fx():
        logging.getLogger("suite").warning("in setup")
        yield 1
        logging.getLogger("suite").warning("in teardown")

    @pytest.fixture(params=[1, 2])
    def p(request, fx):
        return request.param

    def test_param(p):
        logging.getLogger("suite").warning("in call")

    def test_fail(fx):
        assert 0

    def test_plain():
        pass
"""


def _test_lines(result: pytest.RunResult) -> list[str]:
    """What pytest wrote while the tests ran: after "collected", up to the first section."""
    lines = result.outlines
    start = next(i for i, ln in enumerate(lines) if "collected " in ln)
    end = next(i for i, ln in enumerate(lines) if i > start and re.fullmatch(r"=+ .* =+", ln))
    return lines[start:end]


@pytest.mark.parametrize(
    "args",
    [("--setup-show",), ("--setup-show", "-v"), ("--setup-plan",), ("-o", "log_cli=true")],
    ids=["setup-show", "setup-show-v", "setup-plan", "log-cli"],
)
def test_terminal_output_of_setup_and_teardown_as_in_process(pytester: pytest.Pytester, args: tuple[str, ...]) -> None:
    """Function-scoped fixtures only: a module fixture is set up again in each fresh
    child, which is the point of isolation, and shows as such."""
    pytester.makepyfile(test_terminal=TERMINAL)
    plain = pytester.runpytest_subprocess("-p", "no:randomly", *args)
    iso = pytester.runpytest_subprocess(ISO, "-p", "no:randomly", *args)
    assert _test_lines(iso) == _test_lines(plain)
    assert any("fx" in ln or "in call" in ln for ln in _test_lines(iso))


# -- options that steer the run ----------------------------------------------------------
FAILS = """
    def test_a_fail():
        assert 0

    def test_b_fail():
        assert 0

    def test_c_fail():
        assert 0

    def test_d_pass():
        pass
"""


def test_exitfirst(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_fails=FAILS)
    result = pytester.runpytest_subprocess(ISO, "-x")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*stopping after 1 failures*"])
    assert "test_b_fail" not in result.stdout.str()


def test_maxfail(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_fails=FAILS)
    result = pytester.runpytest_subprocess(ISO, "--maxfail=2", "-v")
    result.assert_outcomes(failed=2)
    result.stdout.fnmatch_lines(["*stopping after 2 failures*"])
    assert "test_c_fail" not in result.stdout.str()


def test_last_failed_and_failed_first(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        test_lf="""
        def test_a():
            pass
        def test_b():
            assert 0
        def test_c():
            pass
        def test_d():
            assert 0
        """
    )
    first = pytester.runpytest_subprocess(ISO)
    first.assert_outcomes(passed=2, failed=2)
    again = pytester.runpytest_subprocess(ISO, "--lf", "-v", "--isolate-report=r.json")
    again.assert_outcomes(failed=2)
    again.stdout.fnmatch_lines(["run-last-failure: rerun previous 2 failures*"])
    ran = [r["nodeid"] for r in json.loads((pytester.path / "r.json").read_text())["tests"]]
    assert ran == ["test_lf.py::test_b", "test_lf.py::test_d"]
    ff = pytester.runpytest_subprocess(ISO, "--ff", "-v")
    ff.assert_outcomes(passed=2, failed=2)
    ff.stdout.fnmatch_lines(
        [
            "test_lf.py::test_b FAILED*",
            "test_lf.py::test_d FAILED*",
            "test_lf.py::test_a PASSED*",
            "test_lf.py::test_c PASSED*",
        ]
    )


def test_keyword_selection(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        test_k="""
        def test_alpha():
            pass
        def test_alpha_slow():
            pass
        def test_beta():
            pass
        """
    )
    result = pytester.runpytest_subprocess(ISO, "-k", "alpha and not slow", "--isolate-report=r.json")
    result.assert_outcomes(passed=1, deselected=2)
    ran = [r["nodeid"] for r in json.loads((pytester.path / "r.json").read_text())["tests"]]
    assert ran == ["test_k.py::test_alpha"]


TIMED_OUT = """
    import time

    import pytest

    @pytest.mark.isolate(timeout="1s")
    def test_hangs():
        time.sleep(60)
"""
#: How a test killed at its timeout is told (observe/usage.py ``timeout_message``).
KILLED = "timeout 1 s exceeded: still running after * s, killed"


def test_timeout_is_told_once_everywhere(pytester: pytest.Pytester) -> None:
    """One line, the informative one, in the failure, the isolation section (its TIMEOUT
    line, not again under resource usage), the JSON record and the junit testcase."""
    pytester.makepyfile(test_to=TIMED_OUT)
    result = pytester.runpytest_subprocess(ISO, "-rA", "--isolate-report=r.json", "--junitxml=j.xml")
    result.assert_outcomes(failed=1)
    out = result.outlines
    failure = _block(out, "FAILURES")
    assert fnmatch.filter(failure, f"process: {KILLED}") == failure[1:2], failure
    assert not [line for line in out if "timed out after" in line], out
    isolation = _block(out, "isolation")
    assert len(fnmatch.filter(isolation, f"*{KILLED}*")) == 1, isolation
    result.stdout.fnmatch_lines(
        [
            "*= isolation =*",
            "tests per tier: process 1; crashed 0; timed out 1",
            f"TIMEOUT test_to.py::test_hangs [[]process[]]: {KILLED}",
        ]
    )
    (rec,) = json.loads((pytester.path / "r.json").read_text())["tests"]
    assert rec["timed_out"] is True
    assert [(o["budget"], o["kind"]) for o in rec["overuse"]] == [("timeout", "reached")]
    assert fnmatch.fnmatch(rec["overuse"][0]["message"], KILLED)
    (case,) = ET.parse(pytester.path / "j.xml").getroot().iter("testcase")
    (fail,) = case.iter("failure")
    text = f"{fail.get('message')}\n{fail.text}"
    assert len(re.findall(r"timeout 1 s exceeded: still running after \S+ s, killed", text)) == 2, text  # message + body
    assert fnmatch.fnmatch(str(fail.get("message")).splitlines()[0], f"process: {KILLED}")
    assert "timed out after" not in text
    overuse = [p.get("value") for p in case.iter("property") if p.get("name") == "isolate_overuse"]
    assert len(overuse) == 1 and fnmatch.fnmatch(str(overuse[0]), KILLED), overuse


PEAKS = """
    import time

    def test_trivial():
        pass

    def test_heavy():
        block = b"x" * (48 << 20)  # written: resident, not just reserved
        time.sleep(0.3)
        assert len(block)
"""


def test_top_by_peak_memory_lists_only_measured_peaks(pytester: pytest.Pytester) -> None:
    """A test that used no memory of its own is not a "top" entry at "0 B"; with no
    such entry at all there is no list and no header."""
    pytester.makepyfile(test_peaks=PEAKS)
    result = pytester.runpytest_subprocess(ISO, "-p", "no:randomly", "--isolate-report=r.json")
    result.assert_outcomes(passed=2)
    recs = {r["nodeid"]: r for r in json.loads((pytester.path / "r.json").read_text())["tests"]}
    assert recs["test_peaks.py::test_trivial"]["usage"]["peak_memory"] == 0  # the premise
    result.stdout.fnmatch_lines(["top 1 by peak memory:", "* MiB  cpu * test_peaks.py::test_heavy [[]process[]]"])
    assert not [line for line in result.outlines if " 0 B " in line or "test_trivial [" in line]
    trivial = pytester.runpytest_subprocess(ISO, "-k", "trivial")
    trivial.assert_outcomes(passed=1, deselected=1)
    trivial.stdout.fnmatch_lines(["tests per tier: process 1; crashed 0; timed out 0"])
    assert not [line for line in trivial.outlines if "by peak memory" in line], trivial.outlines

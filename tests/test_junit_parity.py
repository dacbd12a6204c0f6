"""Parity: one suite run in-process and with ``--isolate=process`` must look the same to
pytest's users — outcome counts, the FAILURES/ERRORS text and the junit XML testcases
(names, classnames, failure/skipped/error elements, properties other than ours, captured
output)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

SUITE = """
    import logging
    import sys
    import warnings

    import pytest

    @pytest.fixture
    def broken():
        raise RuntimeError("fixture broke")

    @pytest.fixture
    def broken_teardown():
        yield
        raise RuntimeError("teardown broke")

    def test_pass(record_property):
        record_property("answer", 42)
        record_property("who", "pass")
        print("to stdout")
        sys.stderr.write("to stderr\\n")
        logging.getLogger("suite").warning("a log line")

    def test_fail():
        print("before failing")
        assert [1, 2, 3] == [1, 2, 4]

    def test_skip():
        pytest.skip("not today")

    @pytest.mark.skipif(True, reason="never here")
    def test_skipif():
        pass

    @pytest.mark.xfail(reason="known bug")
    def test_xfail():
        assert 0

    @pytest.mark.xfail(reason="fixed already")
    def test_xpass():
        pass

    @pytest.mark.xfail(strict=True, reason="must fail")
    def test_xpass_strict():
        pass

    def test_error_in_fixture(broken):
        pass

    def test_error_in_teardown(broken_teardown):
        print("teardown will break")

    @pytest.mark.parametrize("n", [1, 2, 3], ids=["one", "two", "three"])
    def test_param(n):
        assert n < 3

    def test_warning():
        warnings.warn("careful now", UserWarning)

    class TestGroup:
        def test_method(self, record_property):
            record_property("where", "class")

        def test_method_output(self):
            print("method output")
"""

ARGS = ["--junitxml=junit.xml", "-o", "junit_logging=all", "-p", "no:randomly"]


class Pair:
    def __init__(self, plain_dir: Path, plain: pytest.RunResult, iso_dir: Path, iso: pytest.RunResult) -> None:
        self.plain_dir, self.plain, self.iso_dir, self.iso = plain_dir, plain, iso_dir, iso


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory, h: Any) -> Pair:
    # Same directory name for both, so paths in output compare equal.
    plain_dir = tmp_path_factory.mktemp("plain") / "suite"
    iso_dir = tmp_path_factory.mktemp("iso") / "suite"
    for d in (plain_dir, iso_dir):
        d.mkdir()
        h.write_files(d, {"test_parity.py": SUITE})
    plain = h.run_pytest(plain_dir, *ARGS)
    iso = h.run_pytest(iso_dir, "--isolate=process", *ARGS)
    return Pair(plain_dir, plain, iso_dir, iso)


def _block(result: pytest.RunResult, title: str, root: Path) -> list[str]:
    out: list[str] = []
    inside = False
    for line in result.outlines:
        m = re.fullmatch(r"=+ (.*?) =+", line)
        if m:
            if inside:
                break
            inside = m.group(1) == title
            continue
        if inside:
            out.append(line.replace(str(root), "<root>"))
    return out


def _rooted(cases: list[dict[str, Any]], root: Path) -> list[dict[str, Any]]:
    """The run directory differs between the two runs: write it as <root>."""
    out = []
    for case in cases:
        case = dict(case)
        for k, v in case.items():
            if isinstance(v, tuple):
                case[k] = tuple(x.replace(str(root), "<root>") if isinstance(x, str) else x for x in v)
        out.append(case)
    return out


def test_same_outcome_counts(pair: Pair) -> None:
    plain, iso = pair.plain.parseoutcomes(), pair.iso.parseoutcomes()
    plain.pop("warnings", None)
    iso.pop("warnings", None)
    assert iso == plain
    assert plain == {"failed": 3, "passed": 7, "skipped": 2, "xfailed": 1, "xpassed": 1, "errors": 2}
    assert pair.iso.ret == pair.plain.ret == pytest.ExitCode.TESTS_FAILED


def test_same_warning_count(pair: Pair) -> None:
    assert pair.iso.parseoutcomes().get("warnings") == pair.plain.parseoutcomes().get("warnings")


def test_same_failures_and_errors_text(pair: Pair) -> None:
    for title in ("FAILURES", "ERRORS", "short test summary info"):
        plain = _block(pair.plain, title, pair.plain_dir)
        assert plain, f"no {title} section in the in-process run"
        assert _block(pair.iso, title, pair.iso_dir) == plain, title


def test_junit_testcases_equal(pair: Pair, h: Any) -> None:
    plain = _rooted(h.junit_cases(pair.plain_dir / "junit.xml"), pair.plain_dir)
    iso = _rooted(h.junit_cases(pair.iso_dir / "junit.xml"), pair.iso_dir)
    assert [c["name"] for c in iso] == [c["name"] for c in plain]
    for a, b in zip(plain, iso, strict=True):
        assert b == a, a["name"]
    # The comparison must have compared something of each kind.
    kinds = {k for c in plain for k in c}
    assert {"failure", "skipped", "error", "system-out", "system-err"} <= kinds
    by_name = {c["name"]: c for c in plain}
    assert by_name["test_pass"]["properties"] == [("answer", "42"), ("who", "pass")]
    assert "to stdout" in by_name["test_pass"]["system-out"][2]
    assert by_name["test_method"]["classname"] == "test_parity.TestGroup"


def test_isolated_junit_adds_only_isolate_properties(pair: Pair, h: Any) -> None:
    everything = h.junit_cases(pair.iso_dir / "junit.xml", drop_prefix="\0")
    for case in everything:
        names = [n for n, _ in case["properties"]]
        assert "isolate_tier" in names, case["name"]
        ours = [n for n in names if n.startswith("isolate_")]
        assert names[-len(ours) :] == ours, f"{case['name']}: isolate_* properties must follow the user's"


XUNIT1 = """
    def test_attrs(record_xml_attribute, record_testsuite_property):
        record_xml_attribute("assertions", "3")
        record_xml_attribute("owner", "team <a&b>")
        record_testsuite_property("build", 1234)

    def test_more(record_testsuite_property):
        record_testsuite_property("arch", "x86_64")
"""


def _suite_and_cases(path: Path) -> tuple[list[tuple[str | None, str | None]], dict[str, dict[str, str]]]:
    import xml.etree.ElementTree as ET

    root = ET.parse(path).getroot()
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    assert suite is not None
    props = suite.find("properties")
    suite_props = [(p.get("name"), p.get("value")) for p in props] if props is not None else []
    cases = {str(tc.get("name")): {k: v for k, v in tc.attrib.items() if k != "time"} for tc in suite.iter("testcase")}
    return suite_props, cases


def test_xml_attributes_and_suite_properties_reach_the_junit_file(pytester: pytest.Pytester) -> None:
    """``record_xml_attribute`` and ``record_testsuite_property`` inside a sandbox write
    what they write in-process (junit_family=xunit1, where attributes are allowed)."""
    pytester.makepyfile(test_xunit1=XUNIT1)
    args = ["-o", "junit_family=xunit1", "-p", "no:randomly", "-W", "ignore::pytest.PytestExperimentalApiWarning"]
    pytester.runpytest_subprocess("--junitxml=plain.xml", *args).assert_outcomes(passed=2)
    pytester.runpytest_subprocess("--junitxml=iso.xml", "--isolate=process", *args).assert_outcomes(passed=2)
    plain_props, plain_cases = _suite_and_cases(pytester.path / "plain.xml")
    iso_props, iso_cases = _suite_and_cases(pytester.path / "iso.xml")
    assert plain_props == [("build", "1234"), ("arch", "x86_64")]
    assert iso_props == plain_props
    assert plain_cases["test_attrs"]["owner"] == "team <a&b>"
    assert iso_cases == plain_cases

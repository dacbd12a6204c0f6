"""allure-pytest: the same result files in ``--alluredir`` isolated as in-process.

allure writes each test's result, its fixtures' containers and its attachments from
the test's own process. Isolated, `chroot`/`jail`/`zone` threw them away with the
sandbox, and the controller's own listener added an empty result for every test
(at `process` too: ten results for five tests).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from tests.plugins.conftest import TIERS, Runner, outcomes

SUITE = """
    import allure
    import pytest

    @pytest.fixture
    def resource():
        with allure.step("open the resource"):
            pass
        yield "r"

    @allure.feature("login")
    @allure.title("a titled test")
    def test_steps_and_attachments(resource):
        with allure.step("outer"):
            with allure.step("inner"):
                allure.attach("some text", name="text", attachment_type=allure.attachment_type.TEXT)
        allure.attach(bytes(range(256)), name="binary", attachment_type=allure.attachment_type.PNG)

    def test_fails():
        assert 1 == 2, "not equal"

    @pytest.mark.parametrize("x", [1, 2])
    def test_parametrized(x):
        allure.dynamic.description(f"x is {x}")

    @pytest.mark.skip(reason="not today")
    def test_skipped():
        pass

    @pytest.mark.isolate(tier="none")
    def test_in_process_anyway():
        pass
"""


def allure_dir(path: Path) -> dict[str, Any]:
    """The directory's results and containers, without what differs between runs
    (uuids, times, the process's pid and host in labels, addresses): each result by
    its test, each container's children named by their tests, attachments by content."""
    attachments = {f.name: f.read_bytes() for f in path.glob("*-attachment*")}
    results = [json.loads(f.read_text()) for f in path.glob("*-result.json")]
    names = {r["uuid"]: f"{r.get('fullName')}{r.get('parameters', '')}" for r in results}

    def norm(x: Any) -> Any:
        if isinstance(x, dict):
            out = {}
            for k, v in x.items():
                if k in ("start", "stop", "uuid", "historyId", "testCaseId"):
                    continue
                if k == "labels":
                    v = [label for label in v if label["name"] not in ("thread", "host")]
                elif k == "children":
                    v = sorted(names.get(c, "?") for c in v)
                elif k == "source":
                    v = attachments.get(v, b"missing").hex()
                elif isinstance(v, str):
                    v = re.sub(r"0x[0-9a-f]+", "0x0", v)
                out[k] = norm(v)
            return out
        return [norm(v) for v in x] if isinstance(x, list) else x

    def dump(x: Any) -> str:
        return json.dumps(norm(x), sort_keys=True)

    return {
        "results": sorted(dump(r) for r in results),
        "containers": sorted(dump(json.loads(f.read_text())) for f in path.glob("*-container.json")),
        "files": len(list(path.iterdir())),
    }


@pytest.mark.parametrize("tier", TIERS)
def test_allure_same_results(pytester: pytest.Pytester, run: Runner, tier: str) -> None:
    pytester.makepyfile(test_a=SUITE)
    base = run(None, "-p", "no:randomly", "--alluredir=base", plugins=("allure_pytest",))
    iso = run(tier, "-p", "no:randomly", "--alluredir=iso", plugins=("allure_pytest",))
    assert outcomes(iso) == outcomes(base), iso.stdout.str()
    expected = allure_dir(pytester.path / "base")
    assert len(expected["results"]) == 6 and expected["containers"], expected
    got = allure_dir(pytester.path / "iso")
    assert got == expected, iso.stdout.str()


def test_allure_clean_alluredir_once_with_markers_only(pytester: pytest.Pytester, run: Runner) -> None:
    """Tiers by markers only: the worker starts at the first isolated test, after
    in-process tests wrote their results; ``--clean-alluredir`` is the controller's, at
    its start, and a server started later deletes nothing."""
    pytester.makepyfile(
        test_m="""
        import pytest

        def test_first_in_process():
            pass

        @pytest.mark.isolate(tier="process")
        def test_then_isolated():
            pass

        @pytest.mark.isolate(tier="jail")
        def test_and_jailed():
            pass
        """
    )
    stale = pytester.path / "out" / "00000000-0000-0000-0000-000000000000-result.json"
    stale.parent.mkdir()
    stale.write_text("{}")
    res = run(None, "-p", "no:randomly", "--alluredir=out", "--clean-alluredir", plugins=("allure_pytest",))
    res.assert_outcomes(passed=3)
    results = [json.loads(f.read_text()) for f in (pytester.path / "out").glob("*-result.json")]
    assert sorted((r["name"], r.get("status")) for r in results) == [
        ("test_and_jailed", "passed"),
        ("test_first_in_process", "passed"),
        ("test_then_isolated", "passed"),
    ]
    assert not stale.exists()

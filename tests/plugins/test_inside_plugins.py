"""Plugins that act inside the test: nothing to carry, and they must keep working.

pytest-asyncio runs the test's event loop, pytest-mock patches inside the test,
pytest-env sets the environment before the session (the sandbox's session inherits
it), pytest-html writes its report from the controller's reports alone.
"""

from __future__ import annotations

import pytest

from tests.plugins.conftest import Runner, outcomes

SUITE = """
    import asyncio
    import os

    import pytest

    async def test_async():
        await asyncio.sleep(0)
        assert asyncio.get_running_loop() is not None

    def test_mocker(mocker):
        spy = mocker.patch("os.getcwd", return_value="/nowhere")
        assert os.getcwd() == "/nowhere"
        assert spy.call_count == 1

    def test_env():
        assert os.environ["FROM_PYTEST_ENV"] == "yes"

    def test_fails():
        assert 1 == 2
"""
INI = """
    [pytest]
    asyncio_mode = auto
    asyncio_default_fixture_loop_scope = function
    env =
        FROM_PYTEST_ENV=yes
    filterwarnings = error
"""
PLUGINS = ("asyncio", "pytest_mock", "env", "html", "html_fixtures", "metadata")


@pytest.mark.parametrize("tier", ["process", "jail", "zone"])
def test_same_outcomes_and_html_report(pytester: pytest.Pytester, run: Runner, tier: str) -> None:
    import textwrap

    pytester.makepyfile(test_inside=SUITE)
    pytester.makeini(textwrap.dedent(INI))
    base = run(None, "--html=base.html", plugins=PLUGINS)
    iso = run(tier, "--html=iso.html", plugins=PLUGINS)
    expected = {
        "test_inside.py::test_async": ["PASSED"],
        "test_inside.py::test_mocker": ["PASSED"],
        "test_inside.py::test_env": ["PASSED"],
        "test_inside.py::test_fails": ["FAILED"],
    }
    assert outcomes(base) == outcomes(iso) == expected, iso.stdout.str()
    html = (pytester.path / "iso.html").read_text()
    for name in expected:
        assert name.split("::")[1] in html
    assert "1 Failed" in html and "3 Passed" in html

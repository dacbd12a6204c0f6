"""A project's own configuration gives the same outcomes isolated as in-process.

The suite below is what a modern project's configuration looks like: warnings are
errors, strict markers and config, strict xfail, importlib mode, ``pythonpath``,
``testpaths``, conftests at two levels, a ``-p`` plugin of the project's own, live
logging, doctests and a unittest class. Nothing the sandbox's own start-up does may
reach those settings (a start-up warning under ``filterwarnings = error`` used to kill
every sandbox).
"""

from __future__ import annotations

import pytest

from tests.plugins.conftest import TIERS, Runner, outcomes

PROJECT = {
    "pyproject.toml": """
        [tool.pytest.ini_options]
        filterwarnings = ["error"]
        addopts = "--strict-markers --strict-config --import-mode=importlib -p localplugin --doctest-modules"
        xfail_strict = true
        pythonpath = ["src", "plugins"]
        testpaths = ["tests", "src"]
        markers = ["slow: a slow test"]
        log_cli = true
        log_cli_level = "INFO"
    """,
    "plugins/localplugin.py": """
        import pytest

        @pytest.fixture
        def from_plugin():
            return "plugin"
    """,
    "src/pkg.py": '''
        """A module with a doctest.

        >>> double(2)
        4
        """

        def double(x):
            return 2 * x
    ''',
    "tests/conftest.py": """
        import pytest

        @pytest.fixture
        def level():
            return "top"

        @pytest.fixture(scope="session")
        def shared():
            return {"n": 0}
    """,
    "tests/sub/conftest.py": """
        import pytest

        @pytest.fixture
        def level(level):
            return level + "/sub"
    """,
    "tests/sub/test_suite.py": """
        import logging
        import unittest
        import warnings

        import pytest

        import pkg

        def test_levels(level, from_plugin):
            assert (level, from_plugin) == ("top/sub", "plugin")

        def test_pythonpath():
            assert pkg.double(3) == 6

        def test_warning_is_an_error():
            warnings.warn("deprecated thing", DeprecationWarning)

        def test_warns_caught():
            with pytest.warns(UserWarning):
                warnings.warn("expected", UserWarning)

        @pytest.mark.xfail(reason="strict: passing is a failure")
        def test_xpass_strict():
            pass

        @pytest.mark.xfail(reason="known")
        def test_xfail():
            assert 0

        @pytest.mark.slow
        @pytest.mark.parametrize("n", [1, 2, 3])
        def test_param(n, shared):
            shared["n"] += n
            assert n < 3

        @pytest.mark.skip(reason="not here")
        def test_skipped():
            pass

        def test_output(capsys, caplog, tmp_path):
            logging.getLogger("suite").info("live log line")
            print("to stdout")
            (tmp_path / "f").write_text("x")
            assert capsys.readouterr().out == "to stdout\\n"
            assert "live log line" in caplog.text

        class TestUnit(unittest.TestCase):
            def test_ok(self):
                self.assertEqual(pkg.double(1), 2)

            def test_fails(self):
                self.assertEqual(pkg.double(1), 3)
    """,
}


def _write(pytester: pytest.Pytester) -> None:
    import textwrap

    for name, text in PROJECT.items():
        path = pytester.path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text).lstrip())


@pytest.mark.parametrize("tier", TIERS)
def test_project_configuration_same_outcomes(pytester: pytest.Pytester, run: Runner, tier: str) -> None:
    _write(pytester)
    base = run(None)
    iso = run(tier)
    expected = outcomes(base)
    assert len(expected) == 14, base.stdout.str()
    assert outcomes(iso) == expected, iso.stdout.str()
    assert iso.parseoutcomes() == base.parseoutcomes()
    assert iso.ret == base.ret == 1
    out = iso.stdout.str()
    assert "INTERNALERROR" not in out and "PytestAssertRewriteWarning" not in out
    # The warning that the project's filter made an error is the test's, as in-process.
    iso.stdout.fnmatch_lines(["E   *DeprecationWarning: deprecated thing"])
    iso.stdout.fnmatch_lines(["*live log line*"])


@pytest.mark.parametrize("tier", ["process", "zone"])
def test_plugins_from_the_environment(pytester: pytest.Pytester, run: Runner, tier: str,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """PYTEST_DISABLE_PLUGIN_AUTOLOAD, PYTEST_PLUGINS, -p name and -p no:name reach the
    sandbox's session as they reach the controller's."""
    pytester.makepyfile(
        envplugin="""
            import pytest

            @pytest.fixture
            def from_env():
                return "env"
        """,
        test_env="""
            import sys

            def test_env_plugin(from_env):
                assert from_env == "env"

            def test_no_doctest_plugin(request):
                assert not request.config.pluginmanager.has_plugin("doctest")
        """,
    )
    monkeypatch.setenv("PYTHONPATH", str(pytester.path))
    monkeypatch.setenv("PYTEST_DISABLE_PLUGIN_AUTOLOAD", "1")
    monkeypatch.setenv("PYTEST_PLUGINS", "envplugin")
    args = ("-p", "pytest_isolate.plugin", "-p", "no:doctest")
    base = run(None, *args)
    iso = run(tier, *args)
    assert outcomes(base) == outcomes(iso) == {
        "test_env.py::test_env_plugin": ["PASSED"],
        "test_env.py::test_no_doctest_plugin": ["PASSED"],
    }, iso.stdout.str()
    iso.stdout.fnmatch_lines(["*tests per tier: " + tier + " 2*"])


@pytest.mark.parametrize("tier", ["process", "jail"])
def test_builtin_plugins_off_and_sys_capture(pytester: pytest.Pytester, run: Runner, tier: str) -> None:
    """packaging's suite runs with ``-p no:tmpdir -p no:logging --capture=sys``: no
    tmp_path factory, no capture file to share with the fork server."""
    pytester.makepyfile(
        test_plain="""
            import sys

            def test_prints():
                print("out")
                sys.stderr.write("err\\n")

            def test_fails():
                print("seen in the failure")
                assert 0
        """
    )
    args = ("-p", "no:tmpdir", "-p", "no:logging", "--capture=sys")
    base = run(None, *args)
    iso = run(tier, *args)
    assert outcomes(iso) == outcomes(base) == {
        "test_plain.py::test_prints": ["PASSED"],
        "test_plain.py::test_fails": ["FAILED"],
    }, iso.stdout.str()
    iso.stdout.fnmatch_lines(["*Captured stdout call*", "seen in the failure"])


@pytest.mark.parametrize("tier", [*TIERS, "uml"])
def test_uncaptured_output_goes_to_stdout_and_stderr_as_in_process(
    pytester: pytest.Pytester, run: Runner, tier: str
) -> None:
    """Under ``-s`` a test's prints reach pytest's stdout, what it writes to stderr
    pytest's stderr, whether the test runs in-process or in a sandbox (and so does a
    subprocess it starts). In a ``uml`` guest they went to the guest's console, lost:
    its worker relays them now."""
    pytester.makepyfile(
        test_streams="""
            import subprocess
            import sys

            def test_writes():
                print("OUT-FROM-TEST", flush=True)
                sys.stderr.write("ERR-FROM-TEST\\n")
                subprocess.run(["sh", "-c", "echo OUT-FROM-CHILD; echo ERR-FROM-CHILD >&2"], check=True)
        """
    )
    for result in (run(None, "-s"), run(tier, "-s")):
        assert result.parseoutcomes() == {"passed": 1}, result.stdout.str()
        out, err = result.stdout.str(), result.stderr.str()
        assert "OUT-FROM-TEST" in out and "OUT-FROM-CHILD" in out, (out, err)
        assert "ERR-FROM-TEST" in err and "ERR-FROM-CHILD" in err, (out, err)
        assert "OUT-FROM" not in err and "ERR-FROM" not in out, (out, err)


@pytest.mark.parametrize("tier", ["process", "zone"])
def test_subtest_labels_as_in_process(pytester: pytest.Pytester, run: Runner, tier: str) -> None:
    """unittest's ``subTest`` and pytest's ``subtests``: the same labels on both sides
    (pytest renders a subtest's parameters again when it rebuilds a report from JSON)."""
    pytester.makepyfile(
        test_sub="""
            import unittest

            class TestUnit(unittest.TestCase):
                def test_params(self):
                    for n in (1, 2):
                        with self.subTest(n=n, flag=True):
                            self.assertEqual(n, 1)

            def test_fixture(subtests):
                for word in ("a", "b"):
                    with subtests.test(msg="word", word=word):
                        assert word == "a"
        """
    )
    base = run(None, "-rA")
    iso = run(tier, "-rA")

    def labels(result: pytest.RunResult) -> list[str]:
        import re

        # The words, not the lines: in-process the first one shares the test's line.
        return sorted(m.group(0) for line in result.outlines for m in re.finditer(r"SUB[A-Z]+(?:\[[^\]]*\])?(?: ?\([^)]*\))?", line))

    assert labels(base), base.stdout.str()
    assert labels(iso) == labels(base), iso.stdout.str()
    assert any("n=2, flag=True" in line for line in labels(iso))


@pytest.mark.parametrize("tier", ("process", "jail"))
def test_import_path_order_as_in_process(pytester: pytest.Pytester, run: Runner, tier: str) -> None:
    """The sandbox's ``sys.path`` is the controller's, in its order. pytest-django
    imports ``DJANGO_SETTINGS_MODULE = tests.settings`` at start-up from the working
    directory (``python -m pytest`` puts it first); the server used to put the plugin's
    own location first, where this repo (installed editable) has a ``tests`` package of
    its own, and every sandbox failed to start ("No module named 'tests.settings'")."""
    pytester.makepyfile(
        **{
            "tests/__init__.py": "",
            "tests/settings.py": "NAME = 'the project'\n",
            "localplug.py": """
                import importlib
                import os

                def pytest_configure(config):
                    # As pytest-django imports its settings module: by name, at start-up.
                    settings = importlib.import_module(os.environ["SETTINGS_MODULE"])
                    config.settings_name = settings.NAME
            """,
            "tests/test_x.py": """
                def test_settings(pytestconfig):
                    assert pytestconfig.settings_name == "the project"
            """,
        }
    )
    pytester.makeini("[pytest]\naddopts = -p localplug\n")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SETTINGS_MODULE", "tests.settings")
        base = run(None)
        iso = run(tier)
    assert outcomes(iso) == outcomes(base) == {"tests/test_x.py::test_settings": ["PASSED"]}, iso.stdout.str()


@pytest.mark.parametrize("tier", ["process", "jail"])
def test_encoding_warnings_as_errors(
    pytester: pytest.Pytester, run: Runner, monkeypatch: pytest.MonkeyPatch, tier: str
) -> None:
    """``-X warn_default_encoding`` with EncodingWarning as an error (a project's CI
    checking its own code): the plugin's own text files (its run dir's owner file, /proc
    reads, the report) warned, and every isolated run ended in INTERNALERROR."""
    pytester.makepyfile(test_enc="def test_ok():\n    pass\n\ndef test_fail():\n    assert 0\n")
    monkeypatch.setenv("PYTHONWARNDEFAULTENCODING", "1")
    monkeypatch.setenv("PYTHONWARNINGS", "error::EncodingWarning")
    base = run(None)
    iso = run(tier)
    assert "INTERNALERROR" not in iso.stdout.str() + iso.stderr.str(), iso.stderr.str()[-2000:]
    assert outcomes(iso) == outcomes(base) == {"test_enc.py::test_ok": ["PASSED"], "test_enc.py::test_fail": ["FAILED"]}


REWRITE_WARNS = """
    def test_tuple_assert():
        assert (1, "always true")
"""

SLOW_CONTROLLER = """
    import time


    def pytest_collect_file(file_path, parent):
        # Only the controller collects slowly: the worker's collection reaches the module
        # first, as it can whenever the worker starts early (the stem) and the
        # controller has more to do before it.
        if file_path.name == "test_rewrite.py" and not parent.config.pluginmanager.has_plugin("isolate-forkserver"):
            time.sleep(2)
"""


@pytest.mark.parametrize("tier", ["process", "jail"])
def test_an_assert_rewrite_warning_is_counted_as_in_process(
    pytester: pytest.Pytester, run: Runner, monkeypatch: pytest.MonkeyPatch, tier: str
) -> None:
    """pytest's rewriter warns about an assert on a tuple when it compiles the module,
    not when it loads the copy it cached in ``__pycache__``. The fork server collects
    beside the controller, and when it cached the module first the controller loaded
    its copy and the summary lost the warning (pyyaml's "1 warning", run 53)."""
    monkeypatch.delenv("PYTHONDONTWRITEBYTECODE", raising=False)  # a user's runs write it
    pytester.makepyfile(test_rewrite=REWRITE_WARNS)
    pytester.makeconftest(SLOW_CONTROLLER)
    iso = run(tier, "-p", "no:cacheprovider")
    iso.stdout.fnmatch_lines(["*PytestAssertRewriteWarning: assertion is always true*", "*1 passed, 1 warning*"])
    assert (pytester.path / "__pycache__").is_dir()

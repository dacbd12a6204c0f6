"""hypothesis: a failure found isolated is replayed first on the next run, as in-process.

hypothesis saves failing examples in its example database (``.hypothesis/examples``)
and replays them before searching. Isolated at `chroot` and up the sandbox's writes were
thrown away (and reported as a blocked escape), so the next run searched afresh.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import OPTIONAL_PLUGINS
from tests.plugins.conftest import TIERS, Runner

SUITE = """
    from hypothesis import given, strategies as st

    @given(st.integers(min_value=0, max_value=10**9))
    def test_small(x):
        print("CALL", x)
        assert x < 1000
"""


def calls(res: pytest.RunResult) -> int:
    return sum(line.startswith("CALL") for line in res.outlines)


@pytest.mark.parametrize("tier", TIERS)
def test_failure_found_isolated_is_replayed(pytester: pytest.Pytester, run: Runner, tier: str) -> None:
    pytester.makepyfile(test_h=SUITE)
    # hypothesis's "ci" profile (loaded when $CI is set, as in this suite's CI) keeps no
    # database: the suite asks for the one a developer's run has.
    pytester.makeconftest("from hypothesis import settings\n\nsettings.load_profile('default')\n")
    first = run(tier, "-s", plugins=("hypothesispytest",))
    first.assert_outcomes(failed=1)
    assert calls(first) > 3, first.stdout.str()  # a search, then the shrinking to 1000
    assert "escape" not in first.stdout.str().lower(), first.stdout.str()
    assert list((pytester.path / ".hypothesis" / "examples").iterdir())
    for again in (run(None, "-s", plugins=("hypothesispytest",)), run(tier, "-s", plugins=("hypothesispytest",))):
        again.assert_outcomes(failed=1)
        again.stdout.fnmatch_lines(["*x=1000*"])
        assert calls(again) <= 3, again.stdout.str()  # the saved example, first


TEXT_SUITE = """
from hypothesis import given, settings, strategies as st

@settings(max_examples=5, database=None)
@given(st.text())
def test_text(s):
    assert isinstance(s, str)
"""


@pytest.fixture
def home_project(monkeypatch: pytest.MonkeyPatch, h: Any) -> Iterator[Path]:
    """A project where real ones live (the home dir, not /tmp: a write into a tree below
    /tmp is never an escape), removed after."""
    files = {
        "pytest.ini": "[pytest]\n",
        "test_text.py": TEXT_SUITE,
        # A fresh checkout: nothing made .hypothesis before the first test. (hypothesis
        # caches the constants of modules outside site-packages, this editable plugin's
        # included, while the session collects.)
        "conftest.py": "import shutil\n\ndef pytest_collection_finish(session):\n"
        "    shutil.rmtree('.hypothesis', ignore_errors=True)\n",
    }
    with h.home_project("hyp", files) as d:
        monkeypatch.chdir(d)  # hypothesis's storage dir is below the working directory
        monkeypatch.setenv("PYTEST_ADDOPTS", " ".join(f"-p no:{p}" for p in OPTIONAL_PLUGINS if p != "hypothesispytest"))
        monkeypatch.setenv("PY_COLORS", "0")
        yield d


@pytest.mark.parametrize("tier", ["none", "chroot", "jail"])
def test_its_caches_are_written_as_in_process(pytester: pytest.Pytester, home_project: Path, tier: str) -> None:
    """hypothesis computes its Unicode tables the first time a test draws text and writes
    them (and the ``.gitignore`` of its storage dir) into ``.hypothesis`` below the
    working directory. From ``chroot`` up each such test wrote them into its overlay: a
    blocked ``write-host-file``, a warning in-process pytest never gives, and the
    tables thrown away."""
    result = pytester.runpytest_subprocess(str(home_project), f"--isolate={tier}", "-p", "no:cacheprovider", timeout=120)
    result.assert_outcomes(passed=1)
    result.stdout.no_fnmatch_line("*escape*")
    result.stdout.no_fnmatch_line("*warning*")
    storage = home_project / ".hypothesis"
    assert (storage / ".gitignore").is_file()
    assert list((storage / "unicode_data").glob("*/charmap.json.gz")), sorted(storage.rglob("*"))

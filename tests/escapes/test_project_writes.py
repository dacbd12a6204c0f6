"""A project outside the temp dirs, where real projects live: what its tests write into
its own tree, and pytest's cache, are not escapes.

pytester's projects sit under /tmp, which the audit layer always lets a test write: a
suite run from ``/home/<user>/proj`` saw every write into its tree (an output file, a
golden file, ``config.cache.set``) fail its test at ``process``, and warn from ``chroot``
up even for the paths the user asked to keep. These tests build their project in the
user's home instead.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

SUITE = """
def test_output(request):
    (request.config.rootpath / "out.txt").write_text("x")

def test_cache_set(request):
    request.config.cache.set("proj/key", 41)

def test_cache_mkdir(request):
    (request.config.cache.mkdir("mine") / "f").write_text("x")

def test_golden(request):
    d = request.config.rootpath / "golden"
    d.mkdir(exist_ok=True)
    (d / "out.txt").write_text("golden")
"""


@pytest.fixture
def project(h: Any) -> Iterator[Path]:
    """A project below the home dir (not /tmp, /var/tmp or /dev/shm), removed after."""
    with h.home_project("proj", {"pytest.ini": "[pytest]\n", "test_writes.py": SUITE}) as d:
        yield d


def _run(pytester: pytest.Pytester, project: Path, *args: str) -> tuple[pytest.RunResult, dict]:
    for p in ("out.txt", "golden", ".pytest_cache"):
        shutil.rmtree(project / p, ignore_errors=True) if (project / p).is_dir() else (project / p).unlink(missing_ok=True)
    report = project.parent / f"{project.name}.json"
    result = pytester.runpytest_subprocess(
        str(project), "-p", "no:randomly", f"--isolate-report={report}", *args, timeout=120
    )
    doc = json.loads(report.read_text()) if report.exists() else {}
    report.unlink(missing_ok=True)
    return result, doc


def test_at_process_the_projects_tree_and_pytests_cache_are_the_tests(
    pytester: pytest.Pytester, project: Path
) -> None:
    base, _ = _run(pytester, project, "--isolate=none")
    base.assert_outcomes(passed=4)
    result, doc = _run(pytester, project, "--isolate=process")
    result.assert_outcomes(passed=4)
    assert "escape" not in result.stdout.str(), result.stdout.str()
    assert [r["escapes"] for r in doc["tests"]] == [[], [], [], []]
    # What the tests wrote is on disk, as in-process.
    assert (project / "out.txt").read_text() == "x"
    assert (project / "golden" / "out.txt").read_text() == "golden"
    assert json.loads((project / ".pytest_cache" / "v" / "proj" / "key").read_text()) == 41


@pytest.mark.parametrize("tier", ["chroot", "jail"])
def test_from_chroot_up_only_writes_left_in_the_sandbox_are_reported(
    pytester: pytest.Pytester, project: Path, tier: str
) -> None:
    result, doc = _run(pytester, project, f"--isolate={tier}", "--isolate-keep=golden/**")
    result.assert_outcomes(passed=4, warnings=1)
    escapes = {r["nodeid"].split("::")[1]: r["escapes"] for r in doc["tests"]}
    # The output file stayed in the sandbox: said so.
    (out,) = escapes.pop("test_output")
    assert (out["technique"], out["verdict"]) == ("write-host-file", "blocked")
    assert f"created {project}/out.txt (kept in the sandbox's overlay)" in out["evidence"]
    # pytest's cache (its values are carried) and the kept golden file reached the host.
    assert escapes == {"test_cache_set": [], "test_cache_mkdir": [], "test_golden": []}
    assert not (project / "out.txt").exists()
    assert (project / "golden" / "out.txt").read_text() == "golden"
    assert json.loads((project / ".pytest_cache" / "v" / "proj" / "key").read_text()) == 41


@pytest.mark.parametrize("tier", ["none", "process", "chroot", "jail", "zone"])
def test_a_first_import_is_not_an_escape(
    pytester: pytest.Pytester, project: Path, tier: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A test that imports a module nobody compiled yet (a fresh checkout, a package
    installed without bytecode) makes Python write its ``__pycache__``: from ``chroot``
    up that new directory was reported as a blocked ``write-host-file`` in every such
    test (a warning in-process pytest never gives). This machine's environment sets
    ``PYTHONDONTWRITEBYTECODE``, which hid it from every suite run here."""
    monkeypatch.delenv("PYTHONDONTWRITEBYTECODE", raising=False)
    lib = project / "lib"
    (lib / "freshpkg").mkdir(parents=True)
    (lib / "freshpkg" / "__init__.py").write_text("")
    (lib / "freshpkg" / "mod.py").write_text("X = 1\n")
    monkeypatch.setenv("PYTHONPATH", str(lib))
    (project / "test_writes.py").write_text(
        "def test_first_import():\n    import freshpkg.mod\n\n    assert freshpkg.mod.X == 1\n"
    )
    result, doc = _run(pytester, project, f"--isolate={tier}", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=1)
    assert "escape" not in result.stdout.str(), result.stdout.str()
    if tier != "none":  # in-process tests have no record
        assert [r["escapes"] for r in doc["tests"]] == [[]]


CACHE_SUITE = """
import os
from pathlib import Path
from typing import Any

def test_xdg_cache():
    d = Path(os.environ["XDG_CACHE_HOME"]) / "sometool"
    d.mkdir(parents=True, exist_ok=True)
    (d / "grammar.pickle").write_text("x")

def test_config_dir():
    d = Path(os.environ["ISOLATE_CONFIG_DIR"])
    d.mkdir(parents=True, exist_ok=True)
    (d / "settings.ini").write_text("x")
"""


def test_at_process_the_users_cache_dir_is_the_tests(
    pytester: pytest.Pytester, project: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What a tool builds on first use in the user's cache dir (black, parso, matplotlib)
    is written in-process too: not an escape at ``process``. Any other file outside the
    project still is (here a config dir beside it)."""
    outside = project.parent / f"{project.name}-home"
    monkeypatch.setenv("XDG_CACHE_HOME", str(outside / "cache"))
    monkeypatch.setenv("ISOLATE_CONFIG_DIR", str(outside / "config"))
    (project / "test_writes.py").write_text(CACHE_SUITE)
    try:
        base, _ = _run(pytester, project, "--isolate=none")
        base.assert_outcomes(passed=2)
        shutil.rmtree(outside)
        result, doc = _run(pytester, project, "--isolate=process")
        result.assert_outcomes(passed=1, failed=1)
        escapes = {r["nodeid"].split("::")[1]: r["escapes"] for r in doc["tests"]}
        assert escapes["test_xdg_cache"] == []
        (cfg,) = escapes["test_config_dir"]
        assert (cfg["technique"], cfg["verdict"]) == ("write-host-file", "escaped")
        assert (outside / "cache" / "sometool" / "grammar.pickle").read_text() == "x"
    finally:
        shutil.rmtree(outside, ignore_errors=True)

"""Files a test writes below kept paths reach the host from every tier, as in-process.

From `chroot` up a test writes into a throwaway root: pytest-regressions' baselines, a
golden file, anything a test writes into the source tree for the next run was lost, and
the next run failed again where in-process it passes. ``keep`` (``isolate_keep``,
``--isolate-keep``, ``isolate(keep=...)``; pytest-regressions' data directories by
default) copies such writes back, and nothing else.
"""

from __future__ import annotations

import json
import os
import stat
import textwrap

import pytest

from tests.plugins.conftest import TIERS, Runner, outcomes

REGRESSIONS = """
    def test_data(data_regression):
        data_regression.check({"a": 1, "b": [1, 2]})

    def test_file(file_regression):
        file_regression.check("some text\\n", extension=".txt")
"""


def tree(path: os.PathLike[str]) -> dict[str, str]:
    root = os.fspath(path)
    out = {}
    for dirpath, _, files in os.walk(root):
        for name in files:
            full = os.path.join(dirpath, name)
            with open(full) as f:
                out[os.path.relpath(full, root)] = f.read()
    return out


def regressions_story(pytester: pytest.Pytester, run: Runner, tier: str | None) -> tuple[list[object], dict[str, str]]:
    """Two runs (baselines written, then used), then changed data with
    ``--force-regen`` and a run after it: each run's outcomes, the baselines at the end."""
    plugins = ("regressions", "datadir")
    pytester.makepyfile(test_reg=REGRESSIONS)
    seen: list[object] = [outcomes(run(tier, plugins=plugins)) for _ in range(2)]
    seen.append(tree(pytester.path / "test_reg"))
    pytester.makepyfile(test_reg=REGRESSIONS.replace('"a": 1', '"a": 2'))
    seen += [outcomes(run(tier, "--force-regen", plugins=plugins)), outcomes(run(tier, plugins=plugins))]
    return seen, tree(pytester.path / "test_reg")


@pytest.mark.parametrize("tier", TIERS)
def test_regression_baselines_as_in_process(pytester: pytest.Pytester, run: Runner, tier: str) -> None:
    """The first run writes the missing baselines and fails, the second passes; with
    ``--force-regen`` changed data is written again (fails), then passes."""
    base, files = regressions_story(pytester, run, None)
    assert base[:2] == [
        {"test_reg.py::test_data": ["FAILED"], "test_reg.py::test_file": ["FAILED"]},
        {"test_reg.py::test_data": ["PASSED"], "test_reg.py::test_file": ["PASSED"]},
    ]
    assert base[3] == {"test_reg.py::test_data": ["FAILED"], "test_reg.py::test_file": ["PASSED"]}
    assert "a: 2" in files["test_data.yml"]
    pytester.path.joinpath("test_reg").rename(pytester.path / "in-process")
    assert regressions_story(pytester, run, tier) == (base, files)


GOLDEN = """
    import os, pathlib

    HERE = pathlib.Path(__file__).parent

    def test_write():
        gold = HERE / "golden" / "sub"
        gold.mkdir(parents=True, exist_ok=True)
        (gold / "out.txt").write_text("new\\n")
        (HERE / "golden" / "old.txt").unlink()
        (HERE / "outside.txt").write_text("not kept\\n")

    def test_reads_what_the_last_one_kept():
        assert (HERE / "golden" / "sub" / "out.txt").read_text() == "new\\n"
"""


@pytest.mark.parametrize("tier", ["chroot", "jail", "zone"])
@pytest.mark.parametrize("how", ["flag", "ini", "marker"])
def test_kept_paths_from_flag_ini_or_marker(pytester: pytest.Pytester, run: Runner, tier: str, how: str) -> None:
    """Written, created below and deleted as in-process; what is outside stays in the
    sandbox; a later test sees the kept files; the JSON report lists them."""
    suite = GOLDEN
    args: list[str] = ["-p", "no:randomly", "--isolate-report=r.json"]
    if how == "flag":
        args.append("--isolate-keep=golden")
    elif how == "ini":
        pytester.makeini("[pytest]\nisolate_keep =\n    golden\n    other/**/data\n")
    else:
        suite = "import pytest\npytestmark = pytest.mark.isolate(keep=['golden'])\n" + textwrap.dedent(GOLDEN)
    pytester.makepyfile(test_gold=suite)
    (pytester.path / "golden").mkdir()
    (pytester.path / "golden" / "old.txt").write_text("old\n")
    result = run(tier, *args)
    assert outcomes(result) == {
        "test_gold.py::test_write": ["PASSED"],
        "test_gold.py::test_reads_what_the_last_one_kept": ["PASSED"],
    }, result.stdout.str()
    assert tree(pytester.path / "golden") == {"sub/out.txt": "new\n"}
    assert not (pytester.path / "outside.txt").exists()
    result.stdout.fnmatch_lines(["tests per tier: *", "kept: 2 changes copied back to your files (keep; *"])
    records = {t["nodeid"]: t for t in json.loads((pytester.path / "r.json").read_text())["tests"]}
    here = os.path.realpath(pytester.path)
    assert json.loads((pytester.path / "r.json").read_text())["summary"]["kept"] == 2
    assert sorted(records["test_gold.py::test_write"]["kept"]) == sorted(
        [f"deleted {here}/golden/old.txt", f"{here}/golden/sub/out.txt"]
    )


def test_what_is_never_written_back(pytester: pytest.Pytester, run: Runner) -> None:
    """Code Python or pytest would run on the host next time (a test could plant it to
    get out of its sandbox), links, and paths the sandbox claims outside the kept ones:
    each refused with a warning naming it, nothing written."""
    pytester.makepyfile(
        test_evil="""
        import os, pathlib

        HERE = pathlib.Path(__file__).parent

        def test_plant():
            d = HERE / "golden"
            d.mkdir()
            (d / "conftest.py").write_text("import os; os.system('touch /tmp/owned')\\n")
            (d / "json.py").write_text("raise SystemExit\\n")
            (d / "pytest.ini").write_text("[pytest]\\naddopts = -p evil\\n")
            os.symlink("/etc/passwd", d / "passwd")
            (d / "fine.yml").write_text("a: 1\\n")
        """
    )
    result = run("jail", "--isolate-keep=golden", "-W", "always")
    assert outcomes(result) == {"test_evil.py::test_plant": ["PASSED"]}, result.stdout.str()
    assert tree(pytester.path / "golden") == {"fine.yml": "a: 1\n"}
    here = os.path.realpath(pytester.path)
    result.stdout.fnmatch_lines(
        [
            f"*IsolationWarning: keep: {here}/golden/conftest.py not written back (Python could import it on the host*",
            f"*IsolationWarning: keep: {here}/golden/json.py not written back (Python could import it on the host*",
            f"*IsolationWarning: keep: {here}/golden/passwd not kept (not a regular file)*",
            f"*IsolationWarning: keep: {here}/golden/pytest.ini not written back (pytest reads it as configuration*",
        ]
    )


def test_the_controller_checks_what_a_sandbox_claims(tmp_path: os.PathLike[str]) -> None:
    """The sandbox is untrusted: the controller writes only paths below the item's own
    kept paths, normalised, never through a link on the host."""
    import base64

    from pytest_isolate.facets import keep

    root = os.path.realpath(tmp_path)
    os.mkdir(f"{root}/golden")
    os.symlink("/etc", f"{root}/golden/etc")
    with open(f"{root}/golden/run.sh", "w") as f:
        f.write("#!/bin/sh\n")
    os.chmod(f"{root}/golden/run.sh", 0o755)
    data = base64.b64encode(b"x").decode()
    kept, notes = keep.write_back(
        [
            {"path": f"{root}/golden/ok.txt", "data": data},
            {"path": f"{root}/elsewhere.txt", "data": data},
            {"path": f"{root}/golden/../elsewhere.txt", "data": data},
            {"path": f"{root}/golden/etc/owned.txt", "data": data},
            {"path": "relative/golden/x", "data": data},
            {"path": f"{root}/golden/bad.txt", "data": "not base64!"},
            {"path": f"{root}/golden/run.sh", "data": data},
            {"path": f"{root}/golden/.git/hooks/pre-commit", "data": data},
            "not a dict",
        ],
        keep.resolve(["golden"], root),
    )
    assert kept == [f"{root}/golden/ok.txt"]
    assert sorted(os.listdir(root)) == ["golden"]
    assert not os.path.exists("/etc/owned.txt")
    assert sorted(os.listdir(f"{root}/golden")) == ["etc", "ok.txt", "run.sh"]
    with open(f"{root}/golden/run.sh") as f:
        assert f.read() == "#!/bin/sh\n"
    assert stat.S_IMODE(os.stat(f"{root}/golden/ok.txt").st_mode) & 0o111 == 0
    assert len(notes) == 6, notes
    assert any("run.sh not written back (an executable file on the host)" in n for n in notes), notes
    assert any(".git/hooks/pre-commit not written back (git runs" in n for n in notes), notes


def test_patterns() -> None:
    from pytest_isolate.facets import keep

    match = keep.matcher(["/r/tests/*/data", "/r/gold/**/snap", "/r/one"])
    assert match("/r/tests/a/data/x.yml") and match("/r/tests/a/data")
    assert not match("/r/tests/a/b/data/x.yml")
    assert match("/r/gold/snap/x") and match("/r/gold/a/b/snap/y/z")
    assert match("/r/one") and match("/r/one/two") and not match("/r/onex")
    assert keep.literal_prefix("/r/tests/*/data") == "/r/tests"


def test_bad_keep_values_are_usage_errors(pytester: pytest.Pytester, run: Runner) -> None:
    pytester.makepyfile(
        test_bad="""
        import pytest

        @pytest.mark.isolate("jail", keep=3)
        def test_one():
            pass
        """
    )
    result = run(None)
    assert result.ret != 0
    result.stdout.fnmatch_lines(["*test_bad.py::test_one: isolate marker: keep: expected a path or a list of paths*got 3*"])
    assert "Traceback" not in result.stdout.str() and "INTERNALERROR" not in result.stdout.str()


def test_same_baselines_from_a_uml_guest(pytester: pytest.Pytester, run: Runner) -> None:
    base = regressions_story(pytester, run, None)
    pytester.path.joinpath("test_reg").rename(pytester.path / "in-process")
    assert regressions_story(pytester, run, "uml") == base


@pytest.mark.parametrize("scope", ["module", "session"])
def test_a_shared_sandbox_keeps_what_any_of_its_tests_keeps(pytester: pytest.Pytester, run: Runner, scope: str) -> None:
    """Tests that share one sandbox (``scope``) stay one group though only some of them
    use pytest-regressions: its fixtures stay up as without it, and the baselines are kept."""
    plugins = ("regressions", "datadir")
    pytester.makepyfile(
        test_reg="""
        import pytest

        @pytest.fixture(scope="module")
        def once():
            return object()

        def test_plain(once):
            pytest.once = id(once)

        def test_data(data_regression, once):
            assert pytest.once == id(once)
            data_regression.check({"a": 1, "b": [1, 2]})

        def test_file(file_regression, once):
            assert pytest.once == id(once)
            file_regression.check("some text\\n", extension=".txt")

        def test_same_fixture(once):
            assert pytest.once == id(once)
        """
    )
    args = (f"--isolate-scope={scope}", "-p", "no:randomly")
    first, second = (run("jail", *args, plugins=plugins) for _ in range(2))
    assert outcomes(first) == {
        "test_reg.py::test_data": ["FAILED"],
        "test_reg.py::test_file": ["FAILED"],
        "test_reg.py::test_plain": ["PASSED"],
        "test_reg.py::test_same_fixture": ["PASSED"],
    }, first.stdout.str()
    assert outcomes(second) == {k: ["PASSED"] for k in outcomes(first)}, second.stdout.str()
    assert set(tree(pytester.path / "test_reg")) == {"test_data.yml", "test_file.txt"}

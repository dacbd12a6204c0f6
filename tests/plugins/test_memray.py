"""pytest-memray: the same limits and the same "MEMRAY REPORT" isolated as in-process.

Its result files are written by the test's process into a directory the controller
reads; from `chroot` up they were written into the sandbox's own ``/tmp`` and the
report was empty.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.plugins.conftest import TIERS, Runner, outcomes

SUITE = """
    import pytest

    @pytest.mark.limit_memory("1 MB")
    def test_big():
        data = bytearray(5 * 1024 * 1024)
        assert len(data)

    def test_medium():
        data = bytearray(2 * 1024 * 1024)
        assert len(data)

    def test_small():
        pass
"""


def report(result: pytest.RunResult) -> list[str]:
    """The MEMRAY REPORT section, addresses aside."""
    lines = result.stdout.lines
    start = next(i for i, line in enumerate(lines) if "MEMRAY REPORT" in line)
    end = next(i for i in range(start + 1, len(lines)) if lines[i].startswith("====="))
    return [re.sub(r"0x[0-9a-f]+|prefix [0-9a-f]+|/tmp/tmp\w+", "_", line) for line in lines[start:end]]


@pytest.mark.parametrize("tier", TIERS)
def test_limits_and_report_as_in_process(
    pytester: pytest.Pytester, run: Runner, tier: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Each run makes its own result directory (an outer pytest-memray would share its).
    monkeypatch.delenv("MEMRAY_RESULT_PATH", raising=False)
    pytester.makepyfile(test_mem=SUITE)
    base = run(None, "--memray", plugins=("memray",))
    iso = run(tier, "--memray", plugins=("memray",))
    assert outcomes(iso) == outcomes(base), iso.stdout.str()
    assert iso.parseoutcomes() == base.parseoutcomes()
    iso.stdout.fnmatch_lines(["test_mem.py::test_big MEMORY PROBLEMS*", "*1 failed, 2 passed*"])
    assert report(iso) == report(base)
    assert any("Allocation results for test_mem.py::test_big" in line for line in report(iso)), report(iso)


def test_result_files_the_controller_refuses(tmp_path: Path) -> None:
    """The sandbox is untrusted: a carried file is one plain name, created where none
    exists, never through a link."""
    import base64
    import os

    from pytest_isolate.session.memray import Collector, _plain_name

    for bad in ("../x.bin", "a/b.bin", "/tmp/x.bin", ".hidden", "", "a\0b", "x" * 300, 5, None):
        assert not _plain_name(bad), bad
    assert _plain_name("3f2a.bin") and _plain_name("prefix-test_x.py-test_a[1].bin")
    text = base64.b64encode(b"data").decode()
    (tmp_path / "elsewhere").write_text("keep")
    os.symlink(tmp_path / "elsewhere", tmp_path / "link.bin")
    assert not Collector._write(tmp_path, "link.bin", text)
    assert (tmp_path / "elsewhere").read_text() == "keep"
    assert not Collector._write(tmp_path, "../up.bin", text)
    assert not (tmp_path.parent / "up.bin").exists()
    assert Collector._write(tmp_path, "new.bin", text)
    assert (tmp_path / "new.bin").read_bytes() == b"data"
    inode = (tmp_path / "new.bin").stat().st_ino
    assert Collector._write(tmp_path, "new.bin", text)  # written by the sandbox at `process`: left
    assert (tmp_path / "new.bin").stat().st_ino == inode
    assert Collector._write(tmp_path, "new.bin", base64.b64encode(b"other run").decode())  # a stale one: replaced
    assert (tmp_path / "new.bin").read_bytes() == b"other run"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["elsewhere", "link.bin", "new.bin"]


def test_a_result_whose_file_memray_cannot_read_is_not_filed(tmp_path: Path) -> None:
    """A damaged or hostile file would make pytest-memray's summary fail in the controller."""
    from memray import FileReader

    from pytest_isolate.session.memray import Collector

    garbage = tmp_path / "garbage.bin"
    garbage.write_bytes(b"not a memray capture")
    assert not Collector._readable(FileReader, garbage)
    assert not Collector._readable(FileReader, tmp_path / "missing.bin")


def test_a_fixed_result_directory_reused_reports_this_run(
    pytester: pytest.Pytester, run: Runner, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``--memray-bin-path`` and ``--memray-bin-prefix`` give each test the same file
    name run after run; pytest-memray replaces it in-process, and so does the controller
    with what a sandbox carried (from `chroot` up), so the report is this run's."""
    monkeypatch.delenv("MEMRAY_RESULT_PATH", raising=False)
    pytester.makepyfile(
        test_grow="""
        import os

        def test_alloc():
            data = bytearray(int(os.environ["MIB"]) * 1024 * 1024)
            assert len(data)
        """
    )
    args = ("--memray", f"--memray-bin-path={pytester.path / 'bins'}", "--memray-bin-prefix=fixed")
    seen = {}
    for tier in (None, "jail"):
        for mib in ("3", "7"):
            monkeypatch.setenv("MIB", mib)
            result = run(tier, *args, plugins=("memray",))
            assert outcomes(result) == {"test_grow.py::test_alloc": ["PASSED"]}, result.stdout.str()
            seen[tier, mib] = [line for line in report(result) if "Total memory allocated" in line]
    assert seen["jail", "3"] == seen[None, "3"] and seen["jail", "7"] == seen[None, "7"], seen
    assert seen[None, "3"] != seen[None, "7"]

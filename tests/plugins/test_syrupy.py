"""syrupy: the same verdicts, snapshot report and snapshot files isolated as in-process.

An isolated test asserts its snapshots in a sandbox whose session ends with the test;
syrupy's record of it must reach the controller's session, or the controller reports
the test's snapshots unused and ``--snapshot-update`` deletes them (and in jail/zone the
files the sandbox wrote are thrown away with it). One suite goes through a snapshot's
whole life, in-process and at each tier from the same start: generated, matched, one
changed (failed, and xfailed), one orphaned (unused), then updated (rewritten, deleted).
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Any

import pytest

from tests.plugins.conftest import TIERS, Runner, outcomes

SUITE = """
    import pytest
    from syrupy.extensions.json import JSONSnapshotExtension
    from syrupy.extensions.single_file import SingleFileSnapshotExtension

    VALUE = {value!r}

    def test_amber(snapshot):
        assert {{"a": 1, "b": [1, 2]}} == snapshot
        assert "second" == snapshot

    def test_named(snapshot):
        assert VALUE == snapshot(name="named")

    def test_json(snapshot):
        assert {{"k": VALUE}} == snapshot.use_extension(JSONSnapshotExtension)

    def test_bytes(snapshot):
        assert b"\\x00\\xffbin" == snapshot.use_extension(SingleFileSnapshotExtension)

    class TestKlass:
        def test_method(self, snapshot):
            assert ("tuple", 3) == snapshot

    @pytest.mark.xfail(reason="known", strict=False)
    def test_xfail(snapshot):
        assert VALUE * 2 == snapshot

    {extra}

    def test_plain():
        assert True
"""
#: A test that is there in the first version only: its snapshot is then unused.
ORPHAN = """
    def test_orphan(snapshot):
        assert "soon unused" == snapshot
"""


def _write(pytester: pytest.Pytester, version: int) -> None:
    value, extra = ("first", ORPHAN) if version == 1 else ("second", "")
    pytester.makepyfile(test_snap=SUITE.format(value=value, extra=extra.strip()))


def _report(result: pytest.RunResult) -> list[str]:
    """syrupy's summary: the lines after its separator, up to pytest's last line."""
    lines = result.outlines
    start = next((i for i, ln in enumerate(lines) if re.match(r"^-+ snapshot report summary -+$", ln)), None)
    if start is None:
        return []
    out = []
    for line in lines[start + 1 :]:
        if line.startswith("="):
            break
        out.append(line.rstrip())
    return out


def _files(root: Path) -> dict[str, bytes]:
    snaps = root / "__snapshots__"
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(snaps.rglob("*")) if p.is_file()}


def _life(pytester: pytest.Pytester, run: Runner, tier: str | None) -> list[dict[str, Any]]:
    """The suite's snapshots from nothing to updated, one run per step."""
    shutil.rmtree(pytester.path / "__snapshots__", ignore_errors=True)
    steps = []
    for version, args in ((1, ("--snapshot-update",)), (1, ()), (2, ()), (2, ("--snapshot-update",))):
        _write(pytester, version)
        res = run(tier, "-p", "syrupy", *args, plugins=("syrupy",))
        steps.append(
            {
                "args": args,
                "version": version,
                "ret": int(res.ret),
                "outcomes": outcomes(res),
                "report": _report(res),
                "files": _files(pytester.path),
                "out": res.stdout.str(),
            }
        )
    return steps


def _same(iso: list[dict[str, Any]], base: list[dict[str, Any]]) -> None:
    for i, b in zip(iso, base, strict=True):
        for key in ("ret", "outcomes", "report", "files"):
            assert i[key] == b[key], f"step {b['version']} {b['args']}: {key} differs\n{i['out']}"


@pytest.fixture(scope="module")
def baseline() -> dict[str, Any]:
    """In-process steps, computed once per module (filled by the first test)."""
    return {}


@pytest.mark.parametrize("tier", TIERS)
def test_syrupy_same_verdicts_report_and_files(
    pytester: pytest.Pytester, run: Runner, tier: str, baseline: dict[str, Any]
) -> None:
    if "steps" not in baseline:
        baseline["steps"] = _life(pytester, run, None)
    base = baseline["steps"]
    # The in-process life is what the comparison is about: all of it happened.
    assert base[0]["report"][0] == "8 snapshots generated.", base[0]["out"]
    assert base[1]["report"] == ["8 snapshots passed."], base[1]["out"]
    assert base[2]["report"][0] == "2 snapshots failed. 1 snapshot xfailed. 4 snapshots passed. 1 snapshot unused."
    assert base[2]["outcomes"]["test_snap.py::test_named"] == ["FAILED"]
    assert base[2]["outcomes"]["test_snap.py::test_xfail"] == ["XFAIL"]
    assert base[3]["report"][0] == "4 snapshots passed. 3 snapshots updated. 1 unused snapshot deleted."
    assert set(base[3]["files"]) == {
        "__snapshots__/test_snap.ambr",
        "__snapshots__/test_snap/test_json.json",
        "__snapshots__/test_snap/test_bytes.raw",
    }
    assert b"soon unused" not in base[3]["files"]["__snapshots__/test_snap.ambr"]

    iso = _life(pytester, run, tier)
    _same(iso, base)
    assert "INTERNALERROR" not in "".join(s["out"] for s in iso)
    # The isolated run's own output, as syrupy printed it.
    assert "1 snapshot unused." in iso[2]["out"]


@pytest.mark.parametrize("tier", TIERS)
def test_syrupy_report_lines(pytester: pytest.Pytester, run: Runner, tier: str) -> None:
    """The report as the user reads it, isolated: no snapshot counted unused that a
    sandbox used, and the details of what ``--snapshot-update`` deleted."""
    _write(pytester, 1)
    run(None, "-p", "syrupy", "--snapshot-update", plugins=("syrupy",))
    _write(pytester, 2)
    res = run(tier, "-p", "syrupy", "--snapshot-update", "--snapshot-details", plugins=("syrupy",))
    res.stdout.fnmatch_lines(
        [
            "*- snapshot report summary -*",
            "4 snapshots passed. 3 snapshots updated. 1 unused snapshot deleted.",
            "",
            "Deleted test_orphan (__snapshots__/test_snap.ambr)",
        ]
    )
    assert "test_orphan" not in (pytester.path / "__snapshots__" / "test_snap.ambr").read_text()

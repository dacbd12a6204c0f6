"""pytest-benchmark: isolated benchmarks in the controller's table and ``--benchmark-json``.

An isolated benchmark measures in a sandbox whose session ends with the test: its
results must reach the controller's benchmark session, or the test passes and its row,
its JSON entry and its saved data are missing. Timings differ from run to run; what is
compared is which benchmarks there are, in which groups, with which parameters, extra
info, options and (for pedantic runs) rounds and iterations.
"""

from __future__ import annotations

import json
import re
from typing import Any

import pytest

from tests.plugins.conftest import TIERS, Runner, outcomes

SUITE = """
    import pytest

    def test_sum(benchmark):
        assert benchmark(sum, range(100)) == 4950

    @pytest.mark.parametrize("n", [10, 20])
    def test_sorted(benchmark, n):
        benchmark.extra_info["n"] = n
        benchmark(sorted, list(range(n, 0, -1)))

    @pytest.mark.benchmark(group="pedantic")
    def test_pedantic(benchmark):
        benchmark.pedantic(sum, args=([1, 2, 3],), rounds=4, iterations=3)

    class TestGroup:
        @pytest.mark.benchmark(group="klass")
        def test_in_class(self, benchmark):
            benchmark(len, "abc")

    def test_not_a_benchmark():
        assert True

    def test_fails_after(benchmark):
        benchmark(sum, [1])
        assert False
"""
ARGS = ("--benchmark-min-rounds=3", "--benchmark-max-time=0.005", "--benchmark-sort=name")
_ROW = re.compile(r"^(test_\S+)\s+[\d,.]+\s")
_HEADER = re.compile(r"^-+ benchmark(?: '([^']*)')?: (\d+) tests? -+$")


def _table(result: pytest.RunResult) -> list[tuple[str, ...]]:
    """The results table as groups (header) and rows (benchmark names), in order."""
    out: list[tuple[str, ...]] = []
    for line in result.outlines:
        if m := _HEADER.match(line):
            out.append(("group", m.group(1) or "", m.group(2)))
        elif m := _ROW.match(line):
            out.append(("row", m.group(1)))
    return out


def _json(path: Any) -> list[dict[str, Any]]:
    data = json.loads(path.read_text())
    keep = ("group", "name", "fullname", "params", "param", "extra_info", "options")
    benches = []
    for bench in data["benchmarks"]:
        entry = {k: bench[k] for k in keep}
        stats = bench["stats"]
        entry["rounds=len(data)"] = stats["rounds"] == len(stats["data"])
        if bench["group"] == "pedantic":
            entry["rounds"], entry["iterations"] = stats["rounds"], stats["iterations"]
        benches.append(entry)
    return sorted(benches, key=lambda b: b["fullname"])


@pytest.mark.parametrize("tier", TIERS)
def test_benchmark_table_and_json(pytester: pytest.Pytester, run: Runner, tier: str) -> None:
    pytester.makepyfile(test_bench=SUITE)
    base = run(None, *ARGS, "--benchmark-json=base.json", plugins=("benchmark",))
    iso = run(tier, *ARGS, "--benchmark-json=iso.json", plugins=("benchmark",))
    assert outcomes(iso) == outcomes(base), iso.stdout.str()
    assert outcomes(base)["test_bench.py::test_fails_after"] == ["FAILED"]
    assert _table(iso) == _table(base), iso.stdout.str()
    assert _table(base) == [
        ("group", "", "4"),
        ("row", "test_fails_after"),
        ("row", "test_sorted[10]"),
        ("row", "test_sorted[20]"),
        ("row", "test_sum"),
        ("group", "klass", "1"),
        ("row", "test_in_class"),
        ("group", "pedantic", "1"),
        ("row", "test_pedantic"),
    ], base.stdout.str()
    base_json, iso_json = _json(pytester.path / "base.json"), _json(pytester.path / "iso.json")
    assert iso_json == base_json
    assert len(base_json) == 6
    assert [b["fullname"] for b in base_json if b["group"] == "pedantic"] == ["test_bench.py::test_pedantic"]
    assert next(b for b in base_json if b["group"] == "pedantic")["iterations"] == 3
    iso.stdout.fnmatch_lines(["*- benchmark 'pedantic': 1 tests -*", "test_pedantic *"])
    assert "INTERNALERROR" not in iso.stdout.str()


@pytest.mark.parametrize("tier", ["process", "zone"])
def test_benchmark_save_and_compare(pytester: pytest.Pytester, run: Runner, tier: str) -> None:
    """``--benchmark-autosave`` stores what the sandboxes measured, and a later run
    compares against it, as in-process."""
    pytester.makepyfile(test_bench=SUITE)
    run(tier, *ARGS, "--benchmark-autosave", "--benchmark-storage=file://./store", plugins=("benchmark",))
    saved = list((pytester.path / "store").rglob("*.json"))
    assert len(saved) == 1
    assert len(json.loads(saved[0].read_text())["benchmarks"]) == 6
    res = run(tier, *ARGS, "--benchmark-compare", "--benchmark-storage=file://./store", plugins=("benchmark",))
    res.stderr.fnmatch_lines(["Comparing against benchmarks from: *0001_*.json"])
    res.stdout.fnmatch_lines(["test_pedantic (0001_*) *", "test_pedantic (NOW) *"])
    res.stdout.fnmatch_lines(["test_sum (0001_*) *", "test_sum (NOW) *"])

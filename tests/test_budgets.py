"""Acceptance tests of resource budgets (issue 6) with real limits: the zone's cgroup,
the rlimits of the lower tiers, the /proc sampler and a UML guest — each through a real
pytest subprocess with ``--isolate-report``, asserting on what a user sees: outcomes,
the failure line, the "resource usage" section, the JSON record and junit properties.

Every inner run passes ``--isolate-on-escape=warn``: the escape canaries watch the
host's whole mount table, and on this shared machine a mount made by someone else during
a test is blamed on that test and fails it (a known false positive, reported). Escape
verdicts are not what these tests are about; detection still runs.
"""

from __future__ import annotations

import json
import re
import subprocess
import uuid
from pathlib import Path
from typing import Any

import pytest

from pytest_isolate.facets import rlimits
from pytest_isolate.spec import IsolationSpec
from tests.outputs import records, section, summary_block

MiB = 1 << 20
#: See the module docstring: escape false positives must not decide budget tests.
ESC = "--isolate-on-escape=warn"


# -- helpers ---------------------------------------------------------------------------


def cpu(rec: dict[str, Any]) -> float:
    return rec["usage"]["cpu_user"] + rec["usage"]["cpu_sys"]


# -- zone: memory bomb, fork bomb, CPU share -------------------------------------------
ZONE_SUITE = """
    import os
    import time

    import pytest

    TOKEN = "{token}"

    @pytest.mark.isolate("zone", memory="64M")
    def test_bomb():
        blocks = []
        while True:
            blocks.append(b"\\1" * (8 << 20))  # every page written: really resident

    def test_after_bomb():
        pass

    @pytest.mark.isolate("zone", pids=16)
    def test_fork_bomb():
        # Bounded (fan-out 3, depth 4: at most 120 processes) so that a host without the
        # limit survives it too; every process ends as a `sleep` carrying TOKEN.
        def spawn(depth):
            for _ in range(3):
                try:
                    pid = os.fork()
                except OSError:
                    continue
                if pid == 0:
                    if depth < 4:
                        spawn(depth + 1)
                    os.execv("/bin/sh", ["sh", "-c", "sleep 30; :", TOKEN])
        spawn(1)
        time.sleep(1)

    def test_after_fork_bomb():
        pass

    @pytest.mark.isolate("zone", cpu=0.2)
    def test_spin():
        end = time.monotonic() + 1.5
        while time.monotonic() < end:
            pass

    def test_last():
        pass
"""
ZONE = "test_zone.py::"
MEMORY_LINE = re.compile(r"zone: memory budget 64 MiB exceeded: peak [\d.]+ MiB, OOM-killed")


@pytest.fixture(scope="module")
def zone_run(tmp_path_factory: pytest.TempPathFactory, h: Any) -> tuple[Path, pytest.RunResult, str]:
    path = tmp_path_factory.mktemp("budgets_zone")
    tok = f"isotok-{uuid.uuid4().hex[:12]}"
    h.write_files(path, {"test_zone.py": ZONE_SUITE.replace("{token}", tok)})
    result = h.run_pytest(
        path, "--isolate=zone", ESC, "-rA", "--isolate-report=r.json", "--junitxml=j.xml", timeout=180
    )
    return path, result, tok


def test_memory_bomb_in_zone_is_oom_killed_and_only_it_fails(zone_run: tuple[Path, pytest.RunResult, str]) -> None:
    path, result, _ = zone_run
    text = section(result, "test_bomb")
    assert MEMORY_LINE.search(text), text
    recs = records(path / "r.json")
    bomb = recs[ZONE + "test_bomb"]
    assert bomb["outcome"] == "failed"
    assert bomb["signal"] == "SIGKILL"
    assert bomb["usage"]["oom_kills"] >= 1
    assert bomb["usage"]["peak_memory"] <= 64 * MiB
    [over] = bomb["overuse"]
    assert (over["budget"], over["limit"], over["kind"], over["enforced"]) == ("memory", 64 * MiB, "reached", True)
    # Only that test: the next one (same worker, fresh cgroup) and the rest pass.
    for name in ("test_after_bomb", "test_after_fork_bomb", "test_last"):
        assert recs[ZONE + name]["outcome"] == "passed", name
        assert recs[ZONE + name]["usage"]["oom_kills"] == 0
    result.stdout.fnmatch_lines([f"PASSED {ZONE}test_after_bomb"])


def test_fork_bomb_stops_at_pids_and_the_host_is_fine(zone_run: tuple[Path, pytest.RunResult, str], h: Any) -> None:
    path, result, tok = zone_run
    text = section(result, "test_fork_bomb")
    m = re.search(r"zone: pids budget 16 reached: fork failed (\d+) times?", text)
    assert m and int(m.group(1)) >= 1, text
    rec = records(path / "r.json")[ZONE + "test_fork_bomb"]
    assert rec["usage"]["pids_max_hits"] == int(m.group(1))
    assert rec["usage"]["peak_pids"] <= 16
    [over] = rec["overuse"]
    assert (over["budget"], over["kind"], over["enforced"]) == ("pids", "reached", True)
    # The host: nothing of the bomb is left, we can still fork, and the next test ran.
    assert h.wait_gone(tok, timeout=2.0) == []
    assert subprocess.run(["true"], timeout=10).returncode == 0
    assert records(path / "r.json")[ZONE + "test_after_fork_bomb"]["outcome"] == "passed"


def test_cpu_share_gives_about_a_fifth_of_a_cpu(zone_run: tuple[Path, pytest.RunResult, str]) -> None:
    path, _, _ = zone_run
    rec = records(path / "r.json")[ZONE + "test_spin"]
    usage = rec["usage"]
    assert usage["wall"] >= 1.5
    share = cpu(rec) / usage["wall"]
    assert 0.08 <= share <= 0.45, f"cpu=0.2 got {share:.3f} CPU ({cpu(rec):.3f} s in {usage['wall']:.3f} s)"
    assert usage["cpu_throttled"] > 0
    [over] = rec["overuse"]
    assert (over["budget"], over["limit"], over["kind"], over["enforced"]) == ("cpu", 0.2, "throttled", True)


def test_cpu_share_throttled_test_still_passes(zone_run: tuple[Path, pytest.RunResult, str]) -> None:
    """A CPU share is a rate: a test held back to it was not killed and did nothing
    wrong, so its outcome is its own (the record still lists the throttling)."""
    path, _, _ = zone_run
    assert records(path / "r.json")[ZONE + "test_spin"]["outcome"] == "passed"


def test_zone_over_budget_in_terminal_json_and_junit(zone_run: tuple[Path, pytest.RunResult, str], h: Any) -> None:
    path, result, _ = zone_run
    lines = summary_block(result, "resource usage")
    assert any(ZONE + "test_bomb [zone] (enforced): memory budget 64 MiB exceeded" in ln for ln in lines), lines
    assert any(ZONE + "test_fork_bomb [zone] (enforced): pids budget 16 reached" in ln for ln in lines), lines
    recs = records(path / "r.json")
    # Readings and budgets side by side, in every record.
    assert recs[ZONE + "test_bomb"]["budgets"] == {"memory": 64 * MiB}
    assert recs[ZONE + "test_fork_bomb"]["budgets"] == {"pids": 16}
    assert recs[ZONE + "test_spin"]["budgets"] == {"cpu": 0.2}
    assert recs[ZONE + "test_last"]["budgets"] == {}
    for rec in recs.values():
        for key in ("wall", "cpu_user", "cpu_sys", "peak_memory", "peak_pids", "oom_kills", "cpu_throttled"):
            assert key in rec["usage"], (rec["nodeid"], key)
    props = h.junit_properties(path / "j.xml")
    assert props["test_fork_bomb"]["isolate_overuse"].startswith("pids budget 16 reached: fork failed")
    assert props["test_spin"]["isolate_overuse"].startswith("cpu budget 0.2 CPU: throttled for")
    assert "isolate_overuse" not in props["test_last"]


def test_junit_properties_of_an_oom_killed_test(zone_run: tuple[Path, pytest.RunResult, str], h: Any) -> None:
    path, _, _ = zone_run
    props = h.junit_properties(path / "j.xml")
    assert MEMORY_LINE.search("zone: " + props["test_bomb"]["isolate_overuse"])


# -- budgets from flags and ini apply like the marker ----------------------------------
UNMARKED = """
    def test_bomb():
        blocks = []
        while True:
            blocks.append(b"\\1" * (8 << 20))

    def test_after_bomb():
        pass
"""


@pytest.mark.parametrize("source", ["flag", "ini"])
def test_memory_budget_from_flag_and_ini_like_the_marker(
    source: str, tmp_path: Path, h: Any, zone_run: tuple[Path, pytest.RunResult, str]
) -> None:
    files = {"test_unmarked.py": UNMARKED}
    if source == "ini":
        files["pytest.ini"] = "[pytest]\nisolate = zone\nisolate_memory = 64M\n"
        args: tuple[str, ...] = ()
    else:
        files["pytest.ini"] = "[pytest]\n"
        args = ("--isolate=zone", "--isolate-memory=64M")
    h.write_files(tmp_path, files)
    result = h.run_pytest(tmp_path, *args, ESC, "-rA", "--isolate-report=r.json", timeout=120)
    result.assert_outcomes(failed=1, passed=1)
    assert MEMORY_LINE.search(section(result, "test_bomb"))
    recs = records(tmp_path / "r.json")
    bomb = recs["test_unmarked.py::test_bomb"]
    assert bomb["budgets"] == {"memory": 64 * MiB}
    assert recs["test_unmarked.py::test_after_bomb"]["budgets"] == {"memory": 64 * MiB}
    assert recs["test_unmarked.py::test_after_bomb"]["outcome"] == "passed"
    marker = records(zone_run[0] / "r.json")[ZONE + "test_bomb"]

    def shape(rec: dict[str, Any]) -> list[tuple[Any, ...]]:
        return [(o["budget"], o["limit"], o["kind"], o["enforced"]) for o in rec["overuse"]]

    assert shape(bomb) == shape(marker)


# -- disk ------------------------------------------------------------------------------
DISK_SUITE = """
    import errno
    import json
    import os
    import tempfile

    import pytest

    MiB = 1 << 20
    CHUNK = b"\\0" * MiB


    def tiers(*names):
        return pytest.mark.parametrize(
            "tier", [pytest.param(t, marks=pytest.mark.isolate(t, disk="100M"), id=t) for t in names]
        )


    def write(where, per_file, name, factory, total=1 << 30):
        # Raw os.write: the count is what the kernel took, also a short last write.
        written, err, n = 0, None, 0
        try:
            while written < total and err is None:
                fd = os.open(f"{where}.{n}", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
                n += 1
                try:
                    in_file = 0
                    while in_file < per_file and written < total:
                        k = os.write(fd, CHUNK)
                        written += k
                        in_file += k
                except OSError as e:
                    err = errno.errorcode[e.errno]
                finally:
                    os.close(fd)
        finally:
            for i in range(n):
                try:
                    os.unlink(f"{where}.{i}")
                except OSError:
                    pass
        out = factory.getbasetemp() / "results"
        out.mkdir(exist_ok=True)
        (out / f"{name}.json").write_text(json.dumps({"written": written, "error": err}))
        if err:
            raise OSError(getattr(errno, err), f"stopped after {written} bytes: {err}")


    @tiers("process", "chroot", "jail", "zone")
    def test_one_file(tier, tmp_path_factory):
        write(os.path.join(tempfile.gettempdir(), "big"), 1 << 30, f"one_file-{tier}", tmp_path_factory)


    @tiers("chroot", "jail", "zone")
    def test_files_in_sandbox_tmp(tier, tmp_path_factory):
        write(os.path.join(tempfile.gettempdir(), "big"), 64 * MiB, f"files_tmp-{tier}", tmp_path_factory)


    @tiers("process", "chroot", "jail", "zone")
    def test_files_in_tmp_path(tier, tmp_path, tmp_path_factory):
        write(str(tmp_path / "big"), 64 * MiB, f"files_tmp_path-{tier}", tmp_path_factory)
"""
#: What stops one 1 GiB file with disk="100M" (observed): RLIMIT_FSIZE at process and
#: chroot (chroot's 100M upper tmpfs is full at the same byte, the size check comes
#: first), the overlay's tmpfs (size = budget, minus the sandbox's own files) at jail
#: and zone.
ONE_FILE_STOP = {"process": "EFBIG", "chroot": ("EFBIG", "ENOSPC"), "jail": "ENOSPC", "zone": "ENOSPC"}


@pytest.fixture(scope="module")
def disk_run(tmp_path_factory: pytest.TempPathFactory, h: Any) -> tuple[Path, pytest.RunResult]:
    path = tmp_path_factory.mktemp("budgets_disk")
    h.write_files(path, {"test_disk.py": DISK_SUITE, "pytest.ini": "[pytest]\n"})
    result = h.run_pytest(path, ESC, "-rA", "--isolate-report=r.json", timeout=300)
    return path, result


def _disk(path: Path, kind: str, tier: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """(what the test wrote and why it stopped, its JSON record)."""
    # Each fork server has its own basetemp below the run's (basetemp/iso<N>).
    [found] = (path / "basetemp").glob(f"**/results/{kind}-{tier}.json")
    fact = json.loads(found.read_text())
    test = {"one_file": "test_one_file", "files_tmp": "test_files_in_sandbox_tmp"}.get(kind, "test_files_in_tmp_path")
    return fact, records(path / "r.json")[f"test_disk.py::{test}[{tier}]"]


def _disk_overuse(rec: dict[str, Any]) -> list[dict[str, Any]]:
    return [o for o in rec["overuse"] if o["budget"] == "disk"]


@pytest.mark.parametrize("tier", ["process", "chroot", "jail", "zone"])
def test_one_big_file_is_stopped_at_every_tier(tier: str, disk_run: tuple[Path, pytest.RunResult]) -> None:
    path, _ = disk_run
    fact, rec = _disk(path, "one_file", tier)
    want = ONE_FILE_STOP[tier]
    assert fact["error"] in (want if isinstance(want, tuple) else (want,)), fact
    assert fact["written"] <= 100 * MiB, fact
    assert rec["outcome"] == "failed"
    assert rec["budgets"] == {"disk": 100 * MiB}


@pytest.mark.parametrize("tier", ["chroot", "jail", "zone"])
def test_many_files_in_the_sandbox_are_stopped_by_the_overlay_size(
    tier: str, disk_run: tuple[Path, pytest.RunResult]
) -> None:
    """64 MiB files each pass RLIMIT_FSIZE; the total stops at the upper layer's tmpfs."""
    path, _ = disk_run
    fact, rec = _disk(path, "files_tmp", tier)
    assert fact["error"] == "ENOSPC", fact
    assert 64 * MiB < fact["written"] <= 100 * MiB, fact
    assert rec["outcome"] == "failed"


def test_many_files_at_process_are_reported(disk_run: tuple[Path, pytest.RunResult]) -> None:
    """At process nothing bounds a total over files (RLIMIT_FSIZE is per file): the whole
    1 GiB lands on the host disk, and the readings report it."""
    path, result = disk_run
    fact, rec = _disk(path, "files_tmp_path", "process")
    assert fact == {"written": 1 << 30, "error": None}
    assert rec["usage"]["write_bytes"] >= 1 << 30
    [over] = _disk_overuse(rec)
    assert over["message"].startswith("disk budget 100 MiB exceeded: wrote 1.0 GiB"), over
    assert rec["outcome"] == "failed"
    assert "process: disk budget 100 MiB exceeded: wrote 1.0 GiB" in section(result, "test_files_in_tmp_path[process]")


def test_many_files_at_process_are_observed_not_enforced(disk_run: tuple[Path, pytest.RunResult]) -> None:
    path, _ = disk_run
    [over] = _disk_overuse(_disk(path, "files_tmp_path", "process")[1])
    assert over["enforced"] is False
    assert "not enforced by the process tier" in over["message"]


@pytest.mark.parametrize("tier", ["chroot", "jail", "zone"])
def test_many_files_in_tmp_path_are_stopped_or_reported(tier: str, disk_run: tuple[Path, pytest.RunResult]) -> None:
    """tmp_path is the host's basetemp, bound into the sandbox: neither RLIMIT_FSIZE (per
    file) nor the overlay's size bounds it, so the budget must at least be reported."""
    path, _ = disk_run
    fact, rec = _disk(path, "files_tmp_path", tier)
    assert rec["usage"]["write_bytes"] >= 1 << 30  # the readings saw it
    assert fact["error"] or _disk_overuse(rec), (fact, rec["overuse"])


# -- readings: a known 200 MiB at every tier -------------------------------------------
MEMORY_SUITE = """
    import time

    import pytest

    TIERS = [pytest.param(t, marks=pytest.mark.isolate(t), id=t) for t in ("process", "chroot", "jail", "zone")]
    # The guest needs room for its kernel and pytest beside the 200 MiB.
    TIERS.append(pytest.param("uml", marks=pytest.mark.isolate("uml", memory="512M"), id="uml"))

    @pytest.mark.parametrize("tier", TIERS)
    def test_200mib(tier):
        b = b"x" * (200 << 20)  # every page written
        time.sleep(0.3)  # several sampling periods of the /proc sampler
        assert len(b) == 200 << 20

    @pytest.mark.isolate("uml")
    def test_uml_default_guest_oom():
        # More than the default 256M guest has, in chunks each of which the guest grants
        # (one 240 MiB request is refused outright: a MemoryError, not an OOM kill).
        chunks = [b"x" * (16 << 20) for _ in range(30)]
        assert chunks
"""


@pytest.fixture(scope="module")
def memory_run(tmp_path_factory: pytest.TempPathFactory, h: Any) -> tuple[Path, pytest.RunResult]:
    path = tmp_path_factory.mktemp("budgets_memory")
    h.write_files(path, {"test_mem.py": MEMORY_SUITE, "pytest.ini": "[pytest]\n"})
    result = h.run_pytest(path, ESC, "-rA", "--isolate-report=r.json", timeout=300)
    return path, result


@pytest.mark.parametrize("tier", ["process", "chroot", "jail", "zone", "uml"])
def test_200mib_reads_within_10_percent(tier: str, memory_run: tuple[Path, pytest.RunResult]) -> None:
    path, _ = memory_run
    rec = records(path / "r.json")[f"test_mem.py::test_200mib[{tier}]"]
    assert rec["outcome"] == "passed", rec
    peak = rec["usage"]["peak_memory"]
    assert abs(peak - 200 * MiB) <= 20 * MiB, f"{tier}: peak_memory {peak / MiB:.1f} MiB for 200 MiB"


def test_uml_oom_without_a_budget_says_oom(memory_run: tuple[Path, pytest.RunResult]) -> None:
    path, result = memory_run
    rec = records(path / "r.json")["test_mem.py::test_uml_default_guest_oom"]
    assert rec["outcome"] == "failed" and rec["usage"]["oom_kills"] >= 1, rec
    assert "OOM" in section(result, "test_uml_default_guest_oom")


TREE_SUITE = """
    import subprocess
    import sys

    import pytest

    @pytest.mark.isolate("process", memory="100M")
    def test_three_children():
        # Each child stays far under the per-process RLIMIT_AS; together they pass 100 MiB.
        code = "import time; b = b'x' * (60 << 20); time.sleep(0.6)"
        ps = [subprocess.Popen([sys.executable, "-c", code]) for _ in range(3)]
        assert [p.wait() for p in ps] == [0, 0, 0]
"""


@pytest.fixture(scope="module")
def tree_run(tmp_path_factory: pytest.TempPathFactory, h: Any) -> tuple[Path, pytest.RunResult]:
    path = tmp_path_factory.mktemp("budgets_tree")
    h.write_files(path, {"test_tree.py": TREE_SUITE, "pytest.ini": "[pytest]\n"})
    result = h.run_pytest(path, ESC, "--isolate-on-overuse=ignore", "-rA", "--isolate-report=r.json", timeout=120)
    return path, result


def test_memory_of_a_process_tree_is_measured_at_process(tree_run: tuple[Path, pytest.RunResult]) -> None:
    """RLIMIT_AS holds each process; the sampler sums the tree and sees the total."""
    path, _ = tree_run
    rec = records(path / "r.json")["test_tree.py::test_three_children"]
    assert rec["usage"]["peak_memory"] >= 180 * MiB
    [over] = rec["overuse"]
    assert (over["budget"], over["limit"], over["kind"]) == ("memory", 100 * MiB, "exceeded")


def test_memory_of_a_process_tree_is_observed_not_enforced(tree_run: tuple[Path, pytest.RunResult]) -> None:
    """The tree's total was only observed, so --isolate-on-overuse=ignore keeps the test
    passing and the message says it was not enforced."""
    path, _ = tree_run
    rec = records(path / "r.json")["test_tree.py::test_three_children"]
    [over] = rec["overuse"]
    assert over["enforced"] is False and "not enforced by the process tier" in over["message"]
    assert rec["outcome"] == "passed"


# -- --isolate-on-overuse, the summary, --isolate-top -----------------------------------
POLICY_SUITE = """
    import threading
    import time

    import pytest

    @pytest.mark.isolate(pids=2)
    def test_threads():
        ts = [threading.Thread(target=time.sleep, args=(0.4,)) for _ in range(6)]
        for t in ts:
            t.start()
        for t in ts:
            t.join()

    @pytest.mark.parametrize("mib", [10, 60, 120])
    def test_alloc(mib):
        b = b"x" * (mib << 20)
        time.sleep(0.15)
        assert b

    def test_after():
        pass
"""
THREADS = "test_policy.py::test_threads"
SOFT_LINE = re.compile(r"process: pids budget 2 exceeded: peak (\d+) tasks \(not enforced by the process tier\)")


def test_pids_is_observed_not_enforced_at_process_as_root() -> None:
    """The soft overrun below relies on this: root bypasses RLIMIT_NPROC, so the process
    tier only observes ``pids`` (and says so)."""
    spec = IsolationSpec(tier="process", pids=2)
    assert "pids" not in rlimits.enforced(spec, root=True)
    assert "pids" in rlimits.enforced(spec, root=False)
    assert "pids" not in rlimits.enforced(spec)  # this machine runs the suite as root


@pytest.mark.parametrize("policy", ["fail", "warn", "ignore"])
def test_on_overuse_policy_decides_a_soft_overrun(policy: str, tmp_path: Path, h: Any) -> None:
    h.write_files(tmp_path, {"test_policy.py": POLICY_SUITE, "pytest.ini": "[pytest]\n"})
    result = h.run_pytest(
        tmp_path,
        "--isolate=process",
        ESC,
        f"--isolate-on-overuse={policy}",
        "--isolate-top=2",
        "-rA",
        "--isolate-report=r.json",
        "--junitxml=j.xml",
        timeout=120,
    )
    rec = records(tmp_path / "r.json")[THREADS]
    [over] = rec["overuse"]
    assert (over["budget"], over["limit"], over["kind"], over["enforced"]) == ("pids", 2, "exceeded", False)
    assert over["used"] == rec["usage"]["peak_pids"] > 2
    assert SOFT_LINE.fullmatch("process: " + over["message"]), over["message"]
    out = "\n".join(result.outlines)
    if policy == "fail":
        result.assert_outcomes(failed=1, passed=4)
        assert SOFT_LINE.search(section(result, "test_threads"))
        assert "IsolationWarning" not in out
    elif policy == "warn":
        result.assert_outcomes(passed=5, warnings=1)
        assert re.search(r"IsolationWarning: " + SOFT_LINE.pattern, out), out
    else:
        result.assert_outcomes(passed=5)
        assert "IsolationWarning" not in out
    assert rec["outcome"] == ("failed" if policy == "fail" else "passed")
    # Whatever the policy, the record is reported: summary, JSON, junit.
    usage = summary_block(result, "resource usage")
    assert usage[0] == "1 test(s) over budget:", usage
    assert re.fullmatch(rf"  {re.escape(THREADS)} \[process\] \(observed\): pids budget 2 exceeded: .*", usage[1])
    props = h.junit_properties(tmp_path / "j.xml")
    assert props["test_threads"]["isolate_overuse"] == over["message"]
    assert rec["budgets"] == {"pids": 2}
    # --isolate-top 2: the two largest by peak memory, largest first.
    top = usage.index("top 2 by peak memory:")
    shown = usage[top + 1 : top + 3]
    assert [re.sub(r".*  ", "", ln) for ln in shown] == [
        "test_policy.py::test_alloc[120] [process]",
        "test_policy.py::test_alloc[60] [process]",
    ], usage
    peaks = [float(ln.split()[0]) for ln in shown]
    assert peaks[0] > peaks[1] >= 60
    assert len(usage) == top + 3, "more than N lines in the top list"


# -- docs ------------------------------------------------------------------------------
def test_docs_render_the_readings_table() -> None:
    """docs/resources.md shows where each reading comes from: the generated table, as is."""
    from pytest_isolate.observe import usage

    doc = (Path(__file__).resolve().parent.parent / "docs" / "resources.md").read_text()
    assert usage.readings_markdown() in doc

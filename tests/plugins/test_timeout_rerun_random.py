"""pytest-timeout, pytest-rerunfailures and pytest-randomly: in-process outcomes.

Each acts around a test: its timer, its attempts, its seeds. Isolated, they must act in
the sandbox as they would in the test's own process, and never in the controller while
it waits (a SIGALRM there used to abort the whole session with an INTERNALERROR).
"""

from __future__ import annotations

import re

import pytest

from tests.plugins.conftest import TIERS, Runner, outcomes

TIMEOUT_SUITE = """
    import time
    import pytest

    @pytest.mark.timeout(1)
    def test_marker():
        time.sleep(5)

    def test_option():
        time.sleep(5)

    def test_after_them():
        pass
"""


@pytest.mark.parametrize("tier", TIERS)
@pytest.mark.parametrize("how", ["marker+option", "ini"])
def test_timeout_same_outcome_and_message(pytester: pytest.Pytester, run: Runner, tier: str, how: str) -> None:
    pytester.makepyfile(test_t=TIMEOUT_SUITE)
    args: tuple[str, ...] = ("--timeout=1",)
    if how == "ini":
        pytester.makeini("[pytest]\ntimeout = 1\n")
        args = ()
    base = run(None, *args, plugins=("timeout",))
    iso = run(tier, *args, plugins=("timeout",))
    assert outcomes(iso) == outcomes(base) == {
        "test_t.py::test_marker": ["FAILED"],
        "test_t.py::test_option": ["FAILED"],
        "test_t.py::test_after_them": ["PASSED"],
    }, iso.stdout.str()
    assert "INTERNALERROR" not in iso.stdout.str()
    for res in (base, iso):
        res.stdout.fnmatch_lines(["E       Failed: Timeout (>1.0s) from pytest-timeout."])


RERUN_SUITE = """
    import os
    import pytest

    MARK = os.path.join(os.path.dirname(__file__), "seen-{n}")

    @pytest.mark.flaky(reruns=2)
    def test_second_attempt_passes():
        # Fresh module state every attempt in-process too (a new call); a file marks
        # the first attempt: in-process it persists, isolated it persists on the host
        # for process/chroot-less tiers only, so count through the environment instead.
        n = int(os.environ.get("ATTEMPT", "0"))
        os.environ["ATTEMPT"] = str(n + 1)
        assert False, "always fails"

    @pytest.mark.flaky(reruns=1)
    def test_fails_twice():
        assert False

    def test_plain():
        pass
"""


@pytest.mark.parametrize("tier", TIERS)
def test_rerunfailures_counts(pytester: pytest.Pytester, run: Runner, tier: str) -> None:
    pytester.makepyfile(test_r=RERUN_SUITE)
    base = run(None, "-rA", plugins=("rerunfailures",))
    iso = run(tier, "-rA", plugins=("rerunfailures",))
    assert outcomes(iso) == outcomes(base) == {
        "test_r.py::test_second_attempt_passes": ["RERUN", "RERUN", "FAILED"],
        "test_r.py::test_fails_twice": ["RERUN", "FAILED"],
        "test_r.py::test_plain": ["PASSED"],
    }, iso.stdout.str()
    assert iso.parseoutcomes() == base.parseoutcomes() == {"failed": 2, "passed": 1, "rerun": 3}


RANDOM_SUITE = """
    import random
    import pytest

    @pytest.mark.parametrize("n", range(6))
    def test_draw(n):
        print(f"DRAW {n} {random.random()!r}")
"""


def _draws(result: pytest.RunResult) -> tuple[list[str], dict[str, str]]:
    order = [m.group(1) for line in result.outlines if (m := re.match(r"^(\S+::\S+) PASSED", line))]
    draws = {m.group(1): m.group(2) for line in result.outlines if (m := re.match(r"^DRAW (\d+) (\S+)", line))}
    return order, draws


@pytest.mark.parametrize("tier", TIERS)
def test_randomly_same_order_and_seeds(pytester: pytest.Pytester, run: Runner, tier: str) -> None:
    pytester.makepyfile(test_rand=RANDOM_SUITE)
    args = ("-p", "randomly", "-p", "no:cacheprovider", "-p", "randomly", "--randomly-seed=1234", "-rP")
    base = run(None, *args, plugins=("randomly",))
    iso = run(tier, *args, plugins=("randomly",))
    order, draws = _draws(base)
    assert len(order) == 6 and len(draws) == 6, base.stdout.str()
    assert order != sorted(order, key=lambda s: int(s[-2]))  # randomly did reorder
    assert _draws(iso) == (order, draws), iso.stdout.str()


FRESH_SUITE = """
    import os
    import pytest

    STATE = []

    @pytest.mark.flaky(reruns=2)
    def test_attempts():
        STATE.append(1)
        with open(os.environ["ATTEMPTS_FILE"], "a") as f:
            f.write(f"{os.getpid()} {len(STATE)}\\n")
        assert False
"""


def test_each_rerun_attempt_gets_a_fresh_sandbox(pytester: pytest.Pytester, run: Runner,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """In-process the attempts share a process and its module state; isolated each
    attempt is a new sandbox: another process, pristine module state."""
    pytester.makepyfile(test_fresh=FRESH_SUITE)
    log = pytester.path / "attempts"
    monkeypatch.setenv("ATTEMPTS_FILE", str(log))
    base = run(None, plugins=("rerunfailures",))
    assert [ln.split()[1] for ln in log.read_text().splitlines()] == ["1", "2", "3"]
    assert len({ln.split()[0] for ln in log.read_text().splitlines()}) == 1
    log.unlink()
    iso = run("process", plugins=("rerunfailures",))
    lines = log.read_text().splitlines()
    assert [ln.split()[1] for ln in lines] == ["1", "1", "1"], iso.stdout.str()
    assert len({ln.split()[0] for ln in lines}) == 3
    assert outcomes(iso) == outcomes(base) == {"test_fresh.py::test_attempts": ["RERUN", "RERUN", "FAILED"]}
    assert iso.parseoutcomes() == base.parseoutcomes() == {"failed": 1, "rerun": 2}

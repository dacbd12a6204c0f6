"""Acceptance tests: one suite run in-process and at each host tier, compared.

Each test turns on only the plugins it is about (the suite's ``FAST_ADDOPTS`` turns
every optional plugin off in the pytests it starts), so a difference is the plugin's
and ours, not another plugin's.
"""

from __future__ import annotations

import re
from collections.abc import Callable

import pytest

from tests.conftest import OPTIONAL_PLUGINS

#: The host tiers every acceptance test compares with in-process.
TIERS = ("process", "chroot", "jail", "zone")
_WORDS = "PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS|RERUN"
_VERBOSE = re.compile(rf"^(\S+::\S+?)(?:\s+({_WORDS})\b|\s*$)")
_ALONE = re.compile(rf"^({_WORDS})\s+\[\s*\d+%\]")


def outcomes(result: pytest.RunResult) -> dict[str, list[str]]:
    """Each test's outcomes in the order logged (``-v`` lines; reruns log several; with
    live logging the word comes on a line of its own after the test's log)."""
    out: dict[str, list[str]] = {}
    last = None
    for line in result.outlines:
        m = _VERBOSE.match(line)
        if m:
            last = m.group(1)
            if m.group(2):
                out.setdefault(last, []).append(m.group(2))
            continue
        m = _ALONE.match(line)
        if m and last is not None:
            out.setdefault(last, []).append(m.group(1))
    return out


Runner = Callable[..., pytest.RunResult]


@pytest.fixture
def run(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> Runner:
    """``run(tier, *args, plugins=(...))``: the suite in ``pytester``'s dir, in-process
    for ``tier=None``, with only ``plugins`` of the optional ones loaded."""

    def _run(tier: str | None, *args: str, plugins: tuple[str, ...] = (), timeout: float = 120) -> pytest.RunResult:
        off = " ".join(f"-p no:{p}" for p in OPTIONAL_PLUGINS if p not in plugins)
        monkeypatch.setenv("PYTEST_ADDOPTS", off)
        monkeypatch.setenv("PY_COLORS", "0")
        extra = [f"--isolate={tier}"] if tier else []
        return pytester.runpytest_subprocess("-v", *extra, *args, timeout=timeout)

    return _run

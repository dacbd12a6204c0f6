"""Demo suite support: a safety guard, and a check that the plugin reported what the
demo provokes.

The demo's tests write outside ``tmp_path``, try a chroot escape and allocate memory
on purpose. They are only safe inside a sandbox, so when pytest-isolate is not active
(``-p no:isolate``, or another plugin owns the ``pytest_isolate`` import name) every
test here is skipped instead of running on the host.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

#: What the plugin should report for the demo's provocations: test name -> (what, check).
EXPECTED: dict[str, tuple[str, Callable[[dict[str, Any]], bool]]] = {
    "test_fails_on_purpose_segfault": (
        "crash reported with SIGSEGV",
        lambda r: r["crashed"] and r["signal"] == "SIGSEGV",
    ),
    "test_fails_on_purpose_timeout": ("timeout reported", lambda r: r["timed_out"]),
    "test_leftover_process_is_killed_and_reported": (
        "leftover process reported",
        lambda r: bool(r["leftovers"]),
    ),
    "test_root_is_a_throwaway_overlay": (
        "write outside tmp_path listed under changes",
        lambda r: bool(r["changes"]),
    ),
    "test_fails_on_purpose_double_chroot_escape": (
        "escape reported as escaped",
        lambda r: any(e.get("verdict") == "escaped" for e in r["escapes"]),
    ),
    "test_fails_on_purpose_memory_bomb": (
        "memory overuse reported",
        lambda r: any(o.get("budget") == "memory" for o in r["overuse"]),
    ),
}

_records: list[dict[str, Any]] = []


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.pluginmanager.has_plugin("isolate-plugin"):
        return
    skip = pytest.mark.skip(reason="pytest-isolate is not active: the demo only runs sandboxed")
    for item in items:
        item.add_marker(skip)


@pytest.hookimpl(optionalhook=True)
def pytest_isolate_report(config: pytest.Config, records: list[dict[str, Any]]) -> None:
    # Called once, on the controller (the xdist controller too), before the JSON report
    # is written; the terminal summary comes after it.
    _records[:] = records


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if not _records:
        return
    tr = terminalreporter
    tr.section("demo: what the plugin should have reported")
    by_name = {r["nodeid"].rsplit("::", 1)[-1]: r for r in _records}
    for name, (what, check) in EXPECTED.items():
        r = by_name.get(name)
        if r is None:
            verdict = "not run (deselected)"
        elif r.get("unavailable"):
            verdict = f"not run: {r['unavailable']}"
        elif check(r):
            verdict = "yes"
        else:
            verdict = "NO"
        tr.write_line(f"{name}: {what}: {verdict}")

"""Hooks other plugins can implement (registered through ``pytest_addhooks``)."""

from __future__ import annotations

from typing import Any

import pytest


def pytest_isolate_result(config: pytest.Config, item: pytest.Item, record: dict[str, Any]) -> None:
    """Called in the process that ran the sandbox, once per isolated test, after the
    sandbox is gone and before its reports are logged.

    ``record`` is the test's report record (the same dict that lands in the JSON report:
    tier, outcome, usage, exit, escapes, overuse, ...). Implementations may add keys or
    append to ``record["escapes"]``/``record["overuse"]``; the changes are reported.
    Under pytest-xdist it runs on the xdist worker.
    """


def pytest_isolate_report(config: pytest.Config, records: list[dict[str, Any]]) -> None:
    """Called once at the end of the session on the controller (the xdist controller when
    distributed) with every isolated test's record, before the JSON report is written."""

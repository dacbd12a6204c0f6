"""Turn escape and overuse records into test outcomes, as the user's policy says.

Kept apart from the detectors (``observe/``) so what is *seen* and what it *means for
the build* can change independently: the same record is a failure in CI and a warning
on a laptop.
"""

from __future__ import annotations

from typing import Any

import pytest

from pytest_isolate.spec import IsolationSpec


class IsolationWarning(pytest.PytestWarning):
    """An isolated test did something worth knowing that the policy does not fail."""


def _policy(config: pytest.Config, name: str) -> str:
    value = config.getoption(name, None) or config.getini(name) or "fail"
    return str(value)


def apply(
    config: pytest.Config,
    item: pytest.Item,
    spec: IsolationSpec,
    reports: list[pytest.TestReport],
    record: dict[str, Any],
) -> None:
    """Fail or warn per ``--isolate-on-escape`` / ``--isolate-on-overuse``."""
    allowed = set(spec.allow)
    failures: list[str] = []
    warnings: list[str] = []
    on_escape = _policy(config, "isolate_on_escape")
    for e in record["escapes"]:
        if e.get("technique") in allowed or on_escape == "ignore":
            e["allowed"] = e.get("technique") in allowed
            continue
        where = f" at {e['where']}" if e.get("where") else ""
        line = f"{spec.tier}: {e.get('verdict')} escape {e.get('technique')}{where}: {e.get('evidence')}"
        if e.get("verdict") == "escaped" and on_escape == "fail":
            failures.append(line)
        else:
            warnings.append(line)
    on_overuse = _policy(config, "isolate_on_overuse")
    for o in record["overuse"]:
        if o.get("budget") in allowed:
            continue
        line = f"{spec.tier}: {o.get('message')}"
        if o.get("kind") == "throttled":
            # A CPU share is a rate: held back to it, the test did nothing wrong and its
            # outcome stays its own. The record (summary, JSON, junit) still shows it.
            if on_overuse != "ignore":
                warnings.append(line)
        elif o.get("enforced"):
            failures.append(line)  # killed at a hard limit: the test failed anyway; say why
        elif on_overuse == "fail":
            failures.append(line)
        elif on_overuse == "warn":
            warnings.append(line)
    if failures:
        _fail(reports, failures)
    for w in warnings:
        config.hook.pytest_warning_recorded.call_historic(
            kwargs=dict(
                warning_message=_warning(w, item),
                when="runtest",
                nodeid=item.nodeid,
                location=item.location,
            )
        )


def _fail(reports: list[pytest.TestReport], lines: list[str]) -> None:
    """Fail the call phase (or explain an existing failure) with the policy lines first."""
    text = "\n".join(lines)
    for rep in reports:
        if rep.when == "call":
            if rep.passed:
                rep.outcome = "failed"
                rep.longrepr = text
            elif rep.failed and text not in str(rep.longrepr):
                rep.longrepr = f"{text}\n{rep.longrepr}"
            return
    for rep in reports:
        if rep.failed:
            if text not in str(rep.longrepr):
                rep.longrepr = f"{text}\n{rep.longrepr}"
            return


def _warning(text: str, item: pytest.Item) -> Any:
    import warnings

    path, lineno, _ = item.location
    return warnings.WarningMessage(IsolationWarning(text), IsolationWarning, str(path), (lineno or 0) + 1)

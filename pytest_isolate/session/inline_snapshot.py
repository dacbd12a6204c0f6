"""inline-snapshot, isolated: its assertions act in the sandbox; its report and fixes cannot.

inline-snapshot keeps each ``snapshot()`` a test met in the process the test runs in,
with the test's frames and live values, and at the session's end reports what it would
change and applies what its flags ask (``create``, ``fix``, ``update``, ``trim``,
``review``) by rewriting source files and its external storage. A sandbox's snapshots
end with the sandbox, and frames and live values do not cross a process boundary, so
isolated its report lacked them and ``--inline-snapshot=fix`` changed nothing, silently.
(Under pytest-xdist inline-snapshot refuses those flags and disables itself.)

Isolated, each assertion is checked as in-process (a missing or wrong snapshot fails
the test alike). What this adds:

- flags given on the command line that change files are refused, with the tests that
  would run isolated, before any test runs: they would change nothing for those tests,
  and ``trim`` would take external snapshots only isolated tests use for unused;
- each sandbox tells how many of the snapshots its test met inline-snapshot would
  change (counts per category), and the controller says so in the summary, with how to
  see or apply the changes (nothing when nothing would change: in-process its report
  then shows nothing either).

Default flags (``create,review`` in a terminal, ``report`` elsewhere) are not refused:
they change nothing without the user's answer, and the summary says what was left out.
"""

from __future__ import annotations

import importlib.metadata
import sys
import warnings
from collections.abc import Callable
from typing import Any

import pytest

from pytest_isolate.answer import IsolationWarning
from pytest_isolate.session.kind import PluginCollector, registered

NAME = "inline_snapshot"
PLUGIN = "isolate-inline-snapshot"
#: inline-snapshot's flags that change files (``review`` asks, then applies).
WRITING = ("create", "fix", "fix-assert", "update", "trim", "review")
#: Where inline-snapshot keeps its session state: ``_core`` since 0.37.
STATE_MODULES = ("inline_snapshot._core._global_state", "inline_snapshot._global_state")
#: Categories a sandbox may report counts for (inline-snapshot's ``Flags``).
CATEGORIES = ("create", "fix", "fix-assert", "update", "trim")


def _loaded(config: pytest.Config) -> bool:
    return registered(config, "inline_snapshot.pytest_plugin") is not None


def _state(config: pytest.Config) -> Any:
    """inline-snapshot's session state, when its pytest plugin is a plugin of this
    session and checks snapshots (not disabled: in CI, under xdist, ``disable``)."""
    glob = next((sys.modules[m] for m in STATE_MODULES if m in sys.modules), None)
    if glob is None or not _loaded(config):
        return None
    try:
        state = glob.state()
    except Exception:  # noqa: BLE001 - another version's internals: nothing to do
        return None
    return state if getattr(state, "active", False) is True else None


def _unknown() -> bool:
    """inline-snapshot is imported, but its state is in none of the places known."""
    return "inline_snapshot" in sys.modules and not any(m in sys.modules for m in STATE_MODULES)


def _version() -> str:
    try:
        return importlib.metadata.version("inline-snapshot")
    except importlib.metadata.PackageNotFoundError:
        return "(version unknown)"


def _asked(config: pytest.Config) -> list[str]:
    """The flags given with ``--inline-snapshot`` (or a shortcut) that change files."""
    value = getattr(config.option, "inline_snapshot", None)
    flags = value.split(",") if isinstance(value, str) else []
    return [f for f in flags if f in WRITING]


class Guard:
    """Controller side: refuses writing flags for isolated tests, and sums up."""

    def __init__(self, config: pytest.Config, isolated: Callable[[pytest.Item], bool]) -> None:
        self.config = config
        self.isolated = isolated
        self.snapshots = 0  # that would change
        self.tests = 0  # with such snapshots
        self.changes: dict[str, int] = {}

    @pytest.hookimpl(trylast=True)
    def pytest_collection_finish(self, session: pytest.Session) -> None:
        if _unknown() and any(self.isolated(item) for item in session.items):
            # Said rather than guessed: a release that moved its state again would
            # otherwise lose the refusal and the summary without a word.
            warnings.warn(
                IsolationWarning(
                    f"inline-snapshot {_version()}: pytest-isolate does not know where this version keeps "
                    f"its session state (none of {', '.join(STATE_MODULES)}); for isolated tests its flags "
                    "that change files are not refused, and what it would change is not summed up"
                ),
                stacklevel=1,
            )
        asked = _asked(self.config)
        if not asked or self.config.option.collectonly or _state(self.config) is None:
            return
        isolated = [item for item in session.items if self.isolated(item)]
        if not isolated:
            return
        more = f" and {len(isolated) - 1} more" if len(isolated) > 1 else ""
        raise pytest.UsageError(
            f"--inline-snapshot={','.join(asked)}: inline-snapshot can only change the snapshots of tests "
            f"that run in-process, and {isolated[0].nodeid}{more} would run isolated; run them with "
            "--isolate=none (tests isolated by a marker stay isolated) to create or fix their snapshots"
        )

    def add(self, data: Any) -> None:
        if not isinstance(data, dict):
            return
        count = data.get("changed")
        if not isinstance(count, int) or isinstance(count, bool) or count <= 0:
            return
        self.tests += 1
        self.snapshots += min(count, 1 << 20)
        changes = data.get("changes")
        if isinstance(changes, dict):
            for category in CATEGORIES:
                n = changes.get(category)
                if isinstance(n, int) and not isinstance(n, bool) and n > 0:
                    self.changes[category] = self.changes.get(category, 0) + min(n, 1 << 20)

    def pytest_terminal_summary(self, terminalreporter: Any) -> None:
        if not self.tests:
            return
        tr = terminalreporter
        tr.write_sep("-", "inline-snapshot, isolated tests")
        s = "s" if self.snapshots != 1 else ""
        t = "s" if self.tests != 1 else ""
        what = ", ".join(f"{k} {v}" for k, v in sorted(self.changes.items()))
        tr.write_line(
            f"inline-snapshot would change {self.snapshots} snapshot{s} of {self.tests} isolated test{t} "
            f"({what}). Its report leaves them out, and it changes no snapshot of an isolated test: "
            "run those tests in-process to see or apply the changes."
        )


class Collector(PluginCollector):
    """Carried frames go to the guard's sums."""

    def loaded(self) -> bool:
        return _state(self.config) is not None

    def merge(self, data: Any) -> None:
        guard = self.config.pluginmanager.get_plugin(PLUGIN)
        if guard is not None:
            guard.add(data)


class Recorder:
    """Sandbox side: the snapshots the child's tests met, and what would change."""

    def __init__(self, config: pytest.Config) -> None:
        self.config = config
        self.before: set[Any] = set()

    def begin(self) -> None:
        state = _state(self.config)
        self.before = set(state.snapshots) if state is not None else set()

    def collect(self) -> dict[str, Any] | None:
        state = _state(self.config)
        if state is None:
            return None
        new = [snap for key, snap in state.snapshots.items() if key not in self.before]
        if not new:
            return None
        changes: dict[str, int] = {}
        changed = 0
        for snap in new:
            try:
                flags = [getattr(c, "flag", None) for c in snap._changes()]
            except Exception:  # noqa: BLE001 - inline-snapshot reports its own errors in-process
                continue
            flags = [f for f in flags if f in CATEGORIES]
            changed += bool(flags)
            for flag in flags:
                changes[flag] = changes.get(flag, 0) + 1
        return {"snapshots": len(new), "changed": changed, "changes": changes}


def register(config: pytest.Config, isolated: Callable[[pytest.Item], bool]) -> None:
    """In the controller, when inline-snapshot is one of its plugins."""
    if _loaded(config) and not config.pluginmanager.has_plugin(PLUGIN):
        config.pluginmanager.register(Guard(config, isolated), PLUGIN)


def sandbox(config: pytest.Config, init: dict[str, Any]) -> Recorder | None:
    """The sandbox side, made in the fork server (before inline-snapshot is configured
    there: its state is looked at in each child)."""
    return Recorder(config) if _loaded(config) else None

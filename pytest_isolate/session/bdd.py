"""pytest-bdd's scenario reports, made inside sandboxes, reach the controller's reports.

pytest-bdd (8 and later) keeps what a scenario did (its steps, their outcomes, the
feature) in a registry keyed by the test's report object, filled by its
``pytest_runtest_makereport`` in the process the test runs in; ``--cucumberjson`` and
``--gherkin-terminal-reporter`` read it when the report is logged. A report that came
back from a sandbox is a new object the registry has never seen: the cucumber JSON was
``[]``. So the sandbox adds the registry's entry to the report it sends, and the
controller, once it has rebuilt the report, files the entry under it. (Before 8 the
entry was an attribute of the report, which crosses as it is.)
"""

from __future__ import annotations

import sys
from typing import Any

import pytest

from pytest_isolate.session.kind import PluginCollector, registered

NAME = "bdd"
#: The key the entry travels under in a serialized report (taken out again before
#: pytest rebuilds the report, so no plugin sees it as an attribute).
KEY = "_isolate_bdd"


def _reporting(config: pytest.Config) -> Any:
    """pytest-bdd's reporting module, when pytest-bdd is a plugin of this session and
    keeps the registry."""
    module = sys.modules.get("pytest_bdd.reporting")
    if module is None or registered(config, "pytest_bdd.plugin") is None:
        return None
    if not hasattr(module, "test_report_context_registry") or not hasattr(module, "ReportContext"):
        return None
    return module


class ControllerHooks:
    """Files each carried entry under the report pytest rebuilt from the sandbox's."""

    def __init__(self, reporting: Any) -> None:
        self.reporting = reporting

    @pytest.hookimpl(wrapper=True)
    def pytest_report_from_serializable(self, config: pytest.Config, data: dict[str, Any]) -> Any:
        entry = data.pop(KEY, None) if isinstance(data, dict) else None
        report = yield
        if isinstance(entry, dict) and isinstance(entry.get("scenario"), dict) and isinstance(entry.get("name"), str):
            try:
                self.reporting.test_report_context_registry[report] = self.reporting.ReportContext(
                    scenario=entry["scenario"], name=entry["name"]
                )
            except Exception:  # noqa: BLE001 - another version's classes: no entry, as before
                pass
        return report


class SandboxHooks:
    """Adds the registry's entry for a report to what the sandbox sends of it."""

    def __init__(self, reporting: Any) -> None:
        self.reporting = reporting

    @pytest.hookimpl(wrapper=True)
    def pytest_report_to_serializable(self, config: pytest.Config, report: Any) -> Any:
        data = yield
        try:
            # A report that compares by value (pytest 9's ``SubtestReport``, a
            # dataclass) is not hashable, so it cannot be a key: pytest-bdd filed nothing
            # under it. A lookup must not fail the test whose subtest is being logged.
            context = self.reporting.test_report_context_registry.get(report) if isinstance(data, dict) else None
        except TypeError:
            context = None
        if context is not None:
            data[KEY] = {"scenario": context.scenario, "name": context.name}
        return data


class Collector(PluginCollector):
    """Controller side: nothing to merge; its hooks act on the reports themselves."""

    def __init__(self, config: pytest.Config) -> None:
        super().__init__(config)
        reporting = _reporting(config)
        if reporting is not None and not config.pluginmanager.has_plugin("isolate-carry-bdd"):
            config.pluginmanager.register(ControllerHooks(reporting), "isolate-carry-bdd")

    def loaded(self) -> bool:
        return _reporting(self.config) is not None

    def merge(self, data: Any) -> None:
        """Nothing comes as a carry frame."""


def sandbox(config: pytest.Config, init: dict[str, Any]) -> None:
    """In the fork server: its reports carry the registry's entries."""
    reporting = _reporting(config)
    if reporting is not None and not config.pluginmanager.has_plugin("isolate-carry-bdd"):
        config.pluginmanager.register(SandboxHooks(reporting), "isolate-carry-bdd")

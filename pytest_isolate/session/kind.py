"""What carried kinds share: the controller side of those that only need the plugin
loaded, and the sandbox side of those that write a text report to a stream.

A plugin whose per-test state is carried back (``carry.py``) needs nothing from the
server's start but to be told that the controller wants its state, and nothing at the
end: its own ``pytest_sessionfinish`` in the controller acts on what was merged.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import pytest


def registered(config: pytest.Config, module_name: str) -> Any:
    """The module ``module_name`` when it is imported and is a plugin of this session
    (installed is not enough: ``-p no:...``, or not loaded at all)."""
    module = sys.modules.get(module_name)
    if module is None or not config.pluginmanager.is_registered(module):
        return None
    return module


class PluginCollector:
    """Base of a kind's controller side; ``loaded`` says whether the plugin is active."""

    #: What it merges, a later test may read: merged before the next test is sent.
    early = False

    def __init__(self, config: pytest.Config) -> None:
        self.config = config

    def loaded(self) -> bool:
        raise NotImplementedError

    def server_args(self) -> list[str]:
        return []

    def server_init(self) -> dict[str, Any] | None:
        return {} if self.loaded() else None

    def merge(self, data: Any) -> None:
        raise NotImplementedError

    def finish(self) -> None:
        """The plugin's own ``pytest_sessionfinish`` acts on what was merged."""


class StreamRecorder:
    """Sandbox side of a plugin that writes a text report to a stream of its own (flaky,
    pytest-retry): what the child's tests added to it."""

    def __init__(self, config: pytest.Config, stream: Callable[[pytest.Config], Any]) -> None:
        self.config = config
        self.stream = stream
        self.start = 0

    def begin(self) -> None:
        stream = self.stream(self.config)
        self.start = len(stream.getvalue()) if stream is not None else 0

    def collect(self) -> str | None:
        stream = self.stream(self.config)
        text = stream.getvalue()[self.start :] if stream is not None else ""
        return text or None


class ListRecorder:
    """Sandbox side of a plugin that appends each test's result to a list of its own
    (pytest-benchmark's benchmarks, pytest-profiling's files): what the child's tests
    appended. ``items`` is that list, or None when the plugin is not active."""

    def __init__(self, config: pytest.Config) -> None:
        self.config = config
        self.start = 0

    def items(self) -> list[Any] | None:
        raise NotImplementedError

    def begin(self) -> None:
        items = self.items()
        self.start = len(items) if items is not None else 0

    def added(self) -> list[Any] | None:
        items = self.items()
        return None if items is None else items[self.start :]

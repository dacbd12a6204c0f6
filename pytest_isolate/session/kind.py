"""The controller side shared by carried kinds that only need the plugin loaded.

A plugin whose per-test state is carried back (``carry.py``) needs nothing from the
server's start but to be told that the controller wants its state, and nothing at the
end: its own ``pytest_sessionfinish`` in the controller acts on what was merged.
"""

from __future__ import annotations

from typing import Any

import pytest


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

"""flaky's report of reruns, written inside sandboxes, reaches the controller's summary.

flaky (``@flaky(max_runs=...)``) reruns a failing test inside its own
``pytest_runtest_protocol``, in the process the test runs in, and writes each attempt
to a text stream that its ``pytest_terminal_summary`` prints as the "Flaky Test
Report". Isolated, the reruns happen in the sandbox as in-process (the same outcomes),
but the stream is the child's and ends with it: the report was printed empty. So what a
test's child added to the stream is sent back as text and appended to the controller's
stream, in test order; flaky's own summary prints it. (Under pytest-xdist flaky does
the same with ``workeroutput`` at the end of each worker's session.)
"""

from __future__ import annotations

from typing import Any

import pytest

from pytest_isolate.session.kind import PluginCollector, StreamRecorder, registered

NAME = "flaky"
#: At most this much report text per sandbox (a test rerun many times with long errors).
_MAX = 1 << 20


def _stream(config: pytest.Config) -> Any:
    """flaky's report stream, when flaky is a plugin of this session."""
    module = registered(config, "flaky.flaky_pytest_plugin")
    return getattr(getattr(module, "PLUGIN", None), "stream", None)


class Collector(PluginCollector):
    """Controller side: report text appended to flaky's stream."""

    def loaded(self) -> bool:
        return _stream(self.config) is not None

    def merge(self, data: Any) -> None:
        stream = _stream(self.config)
        if stream is not None and isinstance(data, str):
            stream.write(data[:_MAX])


def sandbox(config: pytest.Config, init: dict[str, Any]) -> StreamRecorder | None:
    """The sandbox side, made in the fork server: what the child's tests added to the stream."""
    return StreamRecorder(config, _stream) if _stream(config) is not None else None

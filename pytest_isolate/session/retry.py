"""pytest-retry: its retries happen in the sandbox, and its report reaches the summary.

pytest-retry (``@pytest.mark.flaky(retries=...)``, ``--retries``) reruns a failing test
inside the test's process and writes each attempt to a report its
``pytest_terminal_summary`` prints ("the following tests were retried"). In a
pytest-xdist worker (any session with ``workerinput``, as the fork server's) it sends
that report to a socket server its xdist controller started, whose port it reads from
``workerinput["server_port"]``: without pytest-xdist running there was no port, its
configuration raised ``KeyError`` in the server, and every isolated test failed with
"isolated worker could not start".

So the server's ``workerinput`` gets ``server_port`` ``None`` when no xdist controller
gave one, the server's pytest-retry keeps its report in memory (its own offline
reporter, as in-process) when there is no port or the port cannot be reached (a UML
guest has its own loopback), and what a sandbox added to that report is carried back
and added to the controller's, which prints it. Under pytest-xdist at the host tiers
the sandboxes report to xdist's controller directly, as its workers do.
"""

from __future__ import annotations

import sys
from typing import Any

import pytest

from pytest_isolate.session.kind import PluginCollector, StreamRecorder, registered

NAME = "retry"
#: At most this much report text per sandbox.
_MAX = 1 << 20


def _plugin(config: pytest.Config) -> Any:
    return registered(config, "pytest_retry.retry_plugin")


def _stream(config: pytest.Config) -> Any:
    """The report stream of pytest-retry's reporter, when it keeps its report here."""
    module = _plugin(config)
    reporter = getattr(getattr(module, "retry_manager", None), "reporter", None)
    offline = getattr(sys.modules.get("pytest_retry.server"), "OfflineReporter", None)
    if reporter is None or offline is None or not isinstance(reporter, offline):
        return None
    return getattr(reporter, "stream", None)


def shim(config: pytest.Config, workerinput: dict[str, Any]) -> None:
    """In the controller: the key pytest-retry reads in any worker."""
    if _plugin(config) is not None:
        workerinput.setdefault("server_port", None)


def in_server() -> None:
    """In the fork server, before its plugins are configured: no port, or one that
    cannot be reached, means pytest-retry's offline reporter."""
    plugin = sys.modules.get("pytest_retry.retry_plugin")
    server = sys.modules.get("pytest_retry.server")
    real = getattr(plugin, "ClientReporter", None)
    offline = getattr(server, "OfflineReporter", None)
    if real is None or offline is None:
        return

    def client_or_offline(port: Any = None, *args: Any, **kwargs: Any) -> Any:
        if port is None:
            return offline()
        try:
            return real(port, *args, **kwargs)
        except OSError:
            return offline()

    plugin.ClientReporter = client_or_offline


class Collector(PluginCollector):
    """Controller side: report text added to pytest-retry's own."""

    def loaded(self) -> bool:
        return _plugin(self.config) is not None

    def merge(self, data: Any) -> None:
        if not isinstance(data, str):
            return
        stream = _stream(self.config)
        if stream is not None:
            stream.write(data[:_MAX])
            return
        # A controller that is itself an xdist worker: its reporter sends to xdist's.
        reporter = getattr(getattr(_plugin(self.config), "retry_manager", None), "reporter", None)
        sock = getattr(reporter, "sock", None)
        if sock is not None:
            try:
                sock.sendall(data[:_MAX].encode("utf-8"))
            except OSError:
                pass


def sandbox(config: pytest.Config, init: dict[str, Any]) -> StreamRecorder | None:
    """The sandbox side, made in the fork server: what the child's tests added to the
    offline report (its reporter is made when pytest-retry is configured, later)."""
    return StreamRecorder(config, _stream) if _plugin(config) is not None else None

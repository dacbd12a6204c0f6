"""State that plugins build per test inside a sandbox, carried back after each test.

A test's child ends with its test, and with it whatever a plugin accumulated there for
the end of the session (coverage data, ...). Each kind of state has a controller side
(what the server needs to start, how a frame is merged, what happens at the end) and a
sandbox side (set up once in the server, started before each test in the child,
collected after it). Frames are ``{"t": "carry", "name": ..., "data": ...}``: plain
JSON, checked by the controller side before use, since the sandbox is untrusted.
"""

from __future__ import annotations

import contextlib
from typing import Any

import pytest

from pytest_isolate import wire
from pytest_isolate.session import (
    allure,
    bdd,
    benchmark,
    coverage,
    flaky,
    hypothesis_db,
    inline_snapshot,
    memray,
    profiling,
    pytest_cache,
    retry,
    syrupy,
)

#: Kinds made the same way: a module with ``NAME``, ``Collector(config)`` (controller
#: side) and ``sandbox(config, init)`` (its sandbox side in the server, or None).
KINDS: tuple[Any, ...] = (
    syrupy, benchmark, flaky, bdd, allure, hypothesis_db, inline_snapshot, pytest_cache, retry, memray, profiling,
)


class Carry:
    """Controller side, one per session."""

    def __init__(self, config: pytest.Config) -> None:
        self.kinds: dict[str, Any] = {coverage.NAME: coverage.Collector(config)}
        self.kinds.update((kind.NAME, kind.Collector(config)) for kind in KINDS)

    def server_args(self) -> list[str]:
        """Arguments appended to the server's command line."""
        return [arg for kind in self.kinds.values() for arg in kind.server_args()]

    def server_init(self) -> dict[str, Any]:
        out = {}
        for name, kind in self.kinds.items():
            init = kind.server_init()
            if init is not None:
                out[name] = init
        return out

    def merge(self, frames: Any, early: bool = False) -> None:
        """``early``: only the kinds a later test may read (``Collector.early``), merged
        before the next test is sent ahead; otherwise the others, after."""
        for frame in frames or ():
            name = frame.get("name") if isinstance(frame, dict) else None
            kind = self.kinds.get(name) if isinstance(name, str) else None
            if kind is not None and getattr(kind, "early", False) is early:
                kind.merge(frame.get("data"))

    def finish(self) -> None:
        for kind in self.kinds.values():
            kind.finish()


class SandboxCarry:
    """Sandbox side: made in the fork server, used in each test's child."""

    def __init__(self, config: pytest.Config, init: dict[str, Any]) -> None:
        self.kinds: dict[str, Any] = {}
        if coverage.NAME in init:
            measurer = coverage.Measurer(init[coverage.NAME])
            coverage.install(config, measurer)
            self.kinds[coverage.NAME] = measurer
        for kind in KINDS:
            side = kind.sandbox(config, init[kind.NAME]) if kind.NAME in init else None
            if side is not None:
                self.kinds[kind.NAME] = side

    def begin(self) -> None:
        for kind in self.kinds.values():
            kind.begin()

    def send(self, fd: int) -> None:
        """After the child's last test: one frame per kind that has something."""
        for name, kind in self.kinds.items():
            data = None
            with contextlib.suppress(Exception):
                data = kind.collect()
            if data is not None:
                wire.send(fd, {"t": "carry", "name": name, "data": data})

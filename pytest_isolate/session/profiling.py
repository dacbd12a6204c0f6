"""pytest-profiling's per-test profiles, made inside sandboxes, reach its combined profile.

pytest-profiling (``--profile``) profiles each test's protocol with a hook wrapper,
writes ``prof/<test>.prof`` and combines the files at the session's end
(``combined.prof``, its terminal summary, ``--profile-svg``). Isolated, its wrapper ran
in the controller around the wait for the sandbox: every profile showed pytest-isolate
waiting on a socket, and at `process` it replaced the one the sandbox had written (from
`chroot` up that one was thrown away with the sandbox). The controller's wrapper now
stands aside for isolated tests; the sandbox's (its wrapper ran there, around the
test's own protocol) sends what it measured, and the controller writes it where
pytest-profiling writes it and adds it to the files it combines.

The sandbox is untrusted: it sends the statistics as plain JSON, checked entry by entry
and written here (never a file's bytes for ``pstats`` to unmarshal in the controller),
under one plain file name in the profile directory, replacing the name and never
writing through a link.
"""

from __future__ import annotations

import marshal
import math
import os
import pstats
import sys
from collections.abc import Generator
from typing import Any

import pytest

from pytest_isolate.facets import keep
from pytest_isolate.session.kind import ListRecorder, PluginCollector, registered

NAME = "profiling"
#: Functions one sandbox may send (a test's profile holds hundreds to a few thousand).
_MAX_ENTRIES = 100_000


def _profiling(config: pytest.Config) -> Any:
    """pytest-profiling's plugin object, when it profiles this session (``--profile``)."""
    cls = getattr(sys.modules.get("pytest_profiling"), "Profiling", None)
    if cls is None:
        return None
    for plugin in config.pluginmanager.get_plugins():
        if isinstance(plugin, cls):
            return plugin
    return None


class StandAside:
    """Controller side: pytest-profiling's wrapper profiles only tests run in-process."""

    def __init__(self, isolated: Any) -> None:
        self.isolated = isolated

    @pytest.hookimpl(trylast=True)
    def pytest_sessionstart(self, session: pytest.Session) -> None:
        """Once every plugin is configured (pytest-profiling registers its object in its
        ``pytest_configure``) and before the first test's protocol."""
        plugin = _profiling(session.config)
        if plugin is None:
            return
        isolated = self.isolated
        for impl in session.config.pluginmanager.hook.pytest_runtest_protocol.get_hookimpls():
            if impl.plugin is not plugin or getattr(impl.function, "isolate_aside", False):
                continue
            original = impl.function

            def protocol(item: pytest.Item, nextitem: pytest.Item | None, _original: Any = original) -> Generator[None, Any, None]:
                if isolated(item):
                    yield
                    return
                yield from _original(item, nextitem)

            protocol.isolate_aside = True  # type: ignore[attr-defined]
            impl.function = protocol


def register(config: pytest.Config, isolated: Any) -> None:
    """In the controller, when pytest-profiling is a plugin of the session."""
    if registered(config, "pytest_profiling") is not None:
        config.pluginmanager.register(StandAside(isolated), "isolate-adapter-profiling")


def _key(value: Any) -> tuple[str, int, str] | None:
    if (
        isinstance(value, list) and len(value) == 3 and isinstance(value[0], str)
        and isinstance(value[1], int) and not isinstance(value[1], bool) and isinstance(value[2], str)
    ):
        return (value[0], value[1], value[2])
    return None


def _numbers(value: Any, n: int) -> tuple[Any, ...] | None:
    """``n`` counts and times: two ints then floats (pstats' own shapes)."""
    if not isinstance(value, list) or len(value) != n:
        return None
    out: list[Any] = []
    for i, x in enumerate(value):
        if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x) or x < 0:
            return None
        out.append(int(x) if i < 2 else float(x))
    return tuple(out)


def _stats(entries: Any) -> dict[Any, Any] | None:
    """The pstats dictionary of a sandbox's profile, or None when any entry is off."""
    if not isinstance(entries, list) or len(entries) > _MAX_ENTRIES:
        return None
    stats: dict[Any, Any] = {}
    for entry in entries:
        if not isinstance(entry, list) or len(entry) != 2 or not isinstance(entry[1], list) or len(entry[1]) != 5:
            return None
        key, figures = _key(entry[0]), _numbers(entry[1][:4], 4)
        raw_callers = entry[1][4]
        if key is None or figures is None or not isinstance(raw_callers, list):
            return None
        callers: dict[Any, Any] = {}
        for caller in raw_callers:
            if not isinstance(caller, list) or len(caller) != 2:
                return None
            ckey, cfig = _key(caller[0]), _numbers(caller[1], 4)
            if ckey is None or cfig is None:
                return None
            callers[ckey] = cfig
        stats[key] = (*figures, callers)
    return stats


def _plain_name(name: Any) -> bool:
    return (
        isinstance(name, str) and 0 < len(name) <= 255 and name == os.path.basename(name)
        and not name.startswith(".") and name.endswith(".prof") and "\0" not in name
    )


class Collector(PluginCollector):
    """Controller side: each sandbox profile written and added to pytest-profiling's list."""

    def loaded(self) -> bool:
        return registered(self.config, "pytest_profiling") is not None

    def merge(self, data: Any) -> None:
        plugin = _profiling(self.config)
        profiles = data.get("profiles") if isinstance(data, dict) else None
        if plugin is None or not isinstance(profiles, list):
            return
        where = os.path.abspath(plugin.dir)
        for profile in profiles:
            if not isinstance(profile, dict) or not _plain_name(profile.get("file")):
                continue
            stats = _stats(profile.get("stats"))
            if stats is None:
                continue
            try:
                os.makedirs(where, exist_ok=True)
                fd = os.open(where, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            except OSError:
                continue
            try:
                keep.replace_at(fd, profile["file"], marshal.dumps(stats))
            except OSError:
                continue
            finally:
                os.close(fd)
            path = os.path.join(where, profile["file"])
            if path not in plugin.profs:
                plugin.profs.append(path)


class Recorder(ListRecorder):
    """Sandbox side: the profiles pytest-profiling wrote for the child's tests."""

    def items(self) -> list[Any] | None:
        plugin = _profiling(self.config)
        return plugin.profs if plugin is not None else None

    def collect(self) -> dict[str, Any] | None:
        profiles = []
        for path in self.added() or ():
            try:
                stats = pstats.Stats(path).stats  # type: ignore[attr-defined]
            except Exception:  # noqa: BLE001 - a file the test damaged: its profile is lost
                continue
            entries = [
                [list(key), [cc, nc, tt, ct, [[list(k), list(v)] for k, v in callers.items()]]]
                for key, (cc, nc, tt, ct, callers) in stats.items()
            ]
            profiles.append({"file": os.path.basename(path), "stats": entries})
        return {"profiles": profiles} if profiles else None


def sandbox(config: pytest.Config, init: dict[str, Any]) -> Recorder | None:
    """The sandbox side, made in the fork server (pytest-profiling is configured later)."""
    return Recorder(config) if config.pluginmanager.has_plugin("profiling") else None

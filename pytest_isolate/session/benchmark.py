"""pytest-benchmark's results, measured inside sandboxes, reach the controller's table.

pytest-benchmark's fixture appends each benchmark's results to its session's list
(``config._benchmarksession.benchmarks``); at the session's end that list becomes the
results table, ``--benchmark-json``, ``--benchmark-save`` and the comparisons. An
isolated test measures in a child of the fork server, whose list ends with it: the test
passes and its results are missing from all of those.

pytest-benchmark has no cross-process support to speak of (it turns itself off under
pytest-xdist, on ``PYTEST_XDIST_WORKER`` or a ``--dist`` other than ``no``; the fork
server sets neither, so it measures in the sandbox as in-process). So, per test:

- in the child, after the protocol, each benchmark the test ran is sent in the shape
  of pytest-benchmark's own JSON (``Metadata.as_dict``'s fields, made JSON by its own
  encoder, so what reaches ``--benchmark-json`` is what in-process would have written),
  with the raw timings rather than the statistics;
- the controller checks the frame's shape and rebuilds each as pytest-benchmark's
  ``Metadata``, its statistics recomputed from the timings by pytest-benchmark itself,
  and appends it to the controller's list, in test order as the fixture would have.

cProfile data (``--benchmark-cprofile``) is not carried: it is a ``pstats.Stats`` in
the child. The fork server's own end of session saves nothing (it measured nothing;
pytest-benchmark would warn that it has nothing to save, and could overwrite the
controller's ``--benchmark-json``).
"""

from __future__ import annotations

import contextlib
import json
import math
import sys
from typing import Any

import pytest

from pytest_isolate.session.kind import ListRecorder, PluginCollector

NAME = "benchmark"
_MAX = 10_000
#: Metadata fields carried as pytest-benchmark's JSON has them (besides the timings).
_TEXT = ("name", "fullname")
_OPTIONAL_TEXT = ("group", "param")


def _loaded(config: pytest.Config) -> bool:
    """pytest-benchmark is a plugin of this session (``-p no:benchmark`` turns it off;
    registered by its module, whatever name loaded it)."""
    module = sys.modules.get("pytest_benchmark.plugin")
    return module is not None and config.pluginmanager.is_registered(module)


def _bsession(config: pytest.Config) -> Any:
    """pytest-benchmark's session, when the plugin is active here."""
    return getattr(config, "_benchmarksession", None) if _loaded(config) else None


# -- controller ---------------------------------------------------------------------
class Collector(PluginCollector):
    """Controller side: carried benchmarks, appended to pytest-benchmark's session."""

    def loaded(self) -> bool:
        return _loaded(self.config)

    def merge(self, data: Any) -> None:
        bs = _bsession(self.config)
        if bs is None or not isinstance(data, list):
            return
        with contextlib.suppress(Exception):
            for entry in data[:_MAX]:
                meta = _metadata(entry)
                if meta is not None:
                    bs.benchmarks.append(meta)


def _plain(value: Any) -> bool:
    """JSON's own values only (what ``json.loads`` makes), nested."""
    if value is None or type(value) in (bool, int, str):
        return True
    if type(value) is float:
        return math.isfinite(value)
    if type(value) is list:
        return all(_plain(v) for v in value)
    if type(value) is dict:
        return all(type(k) is str and _plain(v) for k, v in value.items())
    return False


class _Fixture:
    """What ``Metadata`` reads of the ``BenchmarkFixture`` that made it."""

    cprofile_stats = None

    def __init__(self, fields: dict[str, Any], has_error: bool) -> None:
        for key, value in fields.items():
            setattr(self, key, value)
        self.has_error = has_error


def _metadata(entry: Any) -> Any:
    """A carried benchmark as pytest-benchmark's ``Metadata``, or None when its shape
    is not the one the child sends."""
    if not isinstance(entry, dict) or not _plain(entry):
        return None
    fields: dict[str, Any] = {}
    for key in _TEXT:
        if not isinstance(entry.get(key), str):
            return None
        fields[key] = entry[key]
    for key in _OPTIONAL_TEXT:
        if entry.get(key) is not None and not isinstance(entry[key], str):
            return None
        fields[key] = entry.get(key)
    for key in ("params", "extra_info", "options"):
        if key == "params" and entry.get(key) is None:
            fields[key] = None
        elif isinstance(entry.get(key), dict):
            fields[key] = entry[key]
        else:
            return None
    iterations, timings, has_error = entry.get("iterations"), entry.get("data"), entry.get("has_error")
    if type(iterations) is not int or iterations < 1 or type(has_error) is not bool:
        return None
    if not isinstance(timings, list) or not all(type(t) in (int, float) for t in timings):
        return None
    from pytest_benchmark.stats import Metadata

    options = fields.pop("options")
    meta = Metadata(_Fixture(fields, has_error), iterations, options)
    for t in timings:
        meta.stats.update(float(t))
    return meta


# -- fork server and its children ----------------------------------------------------
class Recorder(ListRecorder):
    """Sandbox side: the benchmarks the child's tests ran."""

    def items(self) -> list[Any] | None:
        bs = _bsession(self.config)
        return bs.benchmarks if bs is not None else None

    def collect(self) -> list[dict[str, Any]] | None:
        added = self.added()
        if added is None:
            return None
        from pytest_benchmark.utils import funcname, safe_dumps

        out = []
        for bench in added:
            fields = {
                "name": bench.name,
                "fullname": bench.fullname,
                "group": bench.group,
                "param": bench.param,
                "params": bench.params,
                "extra_info": bench.extra_info,
                # As Metadata.as_dict writes them, through pytest-benchmark's encoder.
                "options": {k: funcname(v) if callable(v) else v for k, v in bench.options.items()},
                "iterations": bench.iterations,
                "data": list(bench.stats.data),
                "has_error": bool(bench.has_error),
            }
            out.append(json.loads(safe_dumps(fields)))
        return out or None


class ServerHooks:
    """In the fork server's session: its own end of session saves nothing."""

    @pytest.hookimpl(wrapper=True, tryfirst=True)
    def pytest_sessionfinish(self, session: pytest.Session) -> Any:
        bs = _bsession(session.config)
        if bs is not None:
            bs.json = None
            bs.save = bs.autosave = False
        return (yield)


def sandbox(config: pytest.Config, init: dict[str, Any]) -> Recorder | None:
    """The sandbox side, made in the fork server before its session configures."""
    if not _loaded(config):
        return None
    config.pluginmanager.register(ServerHooks(), "isolate-carry-benchmark")
    return Recorder(config)

"""Coverage measured inside sandboxes reaches the controller's coverage data.

Whoever measures the controller (pytest-cov's ``--cov``, or ``coverage run -m pytest``)
measures only what runs in its own process: collection, and the tests that run
in-process. An isolated test runs in a process forked from the fork server, inside a
root whose writes may be thrown away (chroot, jail, zone) or another kernel (uml), so
no data file it wrote could be trusted to reach the host. Instead:

- the controller gives the server its coverage configuration (``CoverageConfig``
  serialized, as coverage's own ``patch = subprocess`` does) and turns pytest-cov's
  worker side off there (``--no-cov``): pytest-cov would otherwise start, erase,
  combine and report from the server too;
- the server makes one ``Coverage`` from that configuration, without a data file, and
  starts and stops it once, so each test's child only restarts a warm measurer;
- each child starts it with empty data before its test and stops it after, and sends
  what it measured (lines or arcs per file and context) as a ``carry`` frame;
- the controller checks each frame's shape (the sandbox is untrusted: plain JSON,
  never a pickled or SQL dump) and adds it to a data file of its own beside the
  controller's, which pytest-cov's combine takes in at the end; under bare
  ``coverage run`` it is merged into that run's data at session end.

pytest-cov's ``no_cover`` marker and fixture and ``--cov-context=test`` act in the
sandbox as they do in-process.
"""

from __future__ import annotations

import contextlib
import os
import random
import re
import socket
import sys
import types
import warnings
from typing import Any

import pytest

NAME = "coverage"


def _current() -> Any:
    """The controller's running ``Coverage``, if coverage.py is measuring this process."""
    mod = sys.modules.get("coverage")
    if mod is None or not hasattr(mod, "Coverage"):
        return None
    with contextlib.suppress(Exception):
        return mod.Coverage.current()
    return None


def _pytest_cov(config: pytest.Config) -> Any:
    """pytest-cov's plugin when it is active in this session, else None."""
    plugin = config.pluginmanager.get_plugin("_cov")
    if plugin is None or getattr(plugin, "_disabled", False):
        return None
    return plugin


# -- controller ---------------------------------------------------------------------
class Collector:
    """Controller side: coverage from sandboxes, written beside the controller's data."""

    def __init__(self, config: pytest.Config) -> None:
        self.config = config
        self.cov = _current()
        self.data: Any = None
        self.arcs: bool | None = None
        if self.active:
            # This process measures only what runs in it, the sandboxes the rest: its own
            # data may hold none of the source ("No data was collected", "Module ... was
            # previously imported, but not measured"), which says nothing of the run. As
            # pytest-cov's xdist controller does (``DistMaster.start``).
            for flag in ("_warn_no_data", "_warn_unimported_source", "_warn_preimported_source"):
                if hasattr(self.cov, flag):
                    setattr(self.cov, flag, False)

    @property
    def active(self) -> bool:
        return self.cov is not None and hasattr(self.cov.config, "serialize")

    def server_args(self) -> list[str]:
        return ["--no-cov"] if _pytest_cov(self.config) is not None else []

    def server_init(self) -> dict[str, Any] | None:
        if not self.active:
            return None
        plugin = _pytest_cov(self.config)
        context = getattr(getattr(plugin, "options", None), "cov_context", None) if plugin else None
        return {"config": self.cov.config.serialize(), "context": context == "test"}

    def merge(self, data: Any) -> None:
        if not self.active:
            return
        arcs, contexts = _checked(data)
        if not contexts:
            return
        if self.data is None:
            from coverage import CoverageData

            suffix = f"{socket.gethostname()}.{os.getpid()}.isolate.{random.randrange(1 << 30):09d}"
            basename = os.path.abspath(self.cov.config.data_file)
            self.data = CoverageData(basename=basename, suffix=suffix)
            self.arcs = arcs
        if arcs != self.arcs:
            return  # a sandbox that measured otherwise than the controller: not ours to mix
        for context, files in contexts.items():
            self.data.set_context(context or None)
            if arcs:
                self.data.add_arcs({f: [tuple(a) for a in v] for f, v in files.items()})
            else:
                self.data.add_lines(files)

    def finish(self) -> None:
        """pytest-cov combines every data file beside its own at its end, ours with them.
        A bare ``coverage run`` does not: merge ours into its data then."""
        if self.data is None:
            return
        data, self.data = self.data, None
        if _pytest_cov(self.config) is not None:
            data.close()
            return
        cov = _current()
        try:
            if cov is not None:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    cov.get_data().update(data)
        finally:
            data.erase()


def _checked(data: Any) -> tuple[bool, dict[str, dict[str, list[Any]]]]:
    """A frame's measurements as coverage's API takes them, or nothing when its shape is
    wrong (what a test forged on its result pipe must not reach the data file)."""
    if not isinstance(data, dict) or not isinstance(data.get("contexts"), dict):
        return False, {}
    arcs = bool(data.get("arcs"))
    out: dict[str, dict[str, list[Any]]] = {}
    for context, files in data["contexts"].items():
        if not isinstance(context, str) or not isinstance(files, dict):
            return False, {}
        clean: dict[str, list[Any]] = {}
        for path, values in files.items():
            if not isinstance(path, str) or not isinstance(values, list):
                return False, {}
            if arcs:
                ok = all(
                    isinstance(a, list) and len(a) == 2 and all(type(n) is int for n in a) for a in values
                )
            else:
                ok = all(type(n) is int for n in values)
            if not ok:
                return False, {}
            clean[path] = values
        out[context] = clean
    return arcs, out


# -- fork server and its children ----------------------------------------------------
class Measurer:
    """Server side: one warm ``Coverage``, restarted empty in each test's child."""

    def __init__(self, init: dict[str, Any]) -> None:
        from coverage import Coverage
        from coverage.control import CONFIG_DATA_PREFIX

        self.cov = Coverage(data_file=None, config_file=CONFIG_DATA_PREFIX + init["config"])
        self.cov._warn_no_data = False
        self.cov._warn_unimported_source = False
        self.cov._warn_preimported_source = False
        self.context = bool(init.get("context"))
        # Once here, so a child's start only restarts the tracer (inorout, plugins and
        # source matching are worked out now and inherited). What the server ran between
        # the two is dropped from the data, not with ``erase()``: that also forgets the
        # start-up work, and every child redid it (~30 ms a test, half of it coverage's
        # ``short_stack()`` of the collector's origin).
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self.cov.start()
            self.cov.stop()
            self.cov.get_data().erase()
        _decide_ahead(self.cov)
        self.running = False

    def begin(self) -> None:
        """In a test's child, before its protocol."""
        self.cov.start()
        self.running = True

    def switch(self, item: pytest.Item, when: str) -> None:
        if self.running and self.context:
            self.cov.switch_context(f"{item.nodeid}|{when}")

    def pause(self) -> None:
        if self.running:
            self.cov.stop()

    def resume(self) -> None:
        if self.running:
            self.cov.start()

    def collect(self) -> dict[str, Any] | None:
        """In a test's child, after its protocol: what the test ran."""
        if not self.running:
            return None
        self.running = False
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self.cov.stop()
            data = self.cov.get_data()
        arcs = data.has_arcs()
        contexts: dict[str, dict[str, list[Any]]] = {}
        measured = sorted(data.measured_contexts()) or [""]
        for context in measured:
            # Regexes to coverage: anchored and escaped, so one context is one context.
            data.set_query_contexts(["^" + re.escape(context) + "$"] if len(measured) > 1 else None)
            files: dict[str, list[Any]] = {}
            for path in data.measured_files():
                values = data.arcs(path) if arcs else data.lines(path)
                if values:
                    files[path] = [list(a) for a in values] if arcs else list(values)
            if files:
                contexts[context] = files
        return {"arcs": arcs, "contexts": contexts} if contexts else None


def _decide_ahead(cov: Any) -> None:
    """Decide once, in the server, whether to trace each file the session has imported.

    The tracer asks coverage about each file the first time a frame of it runs and keeps
    the answer for the process (``should_trace_cache``): in-process the first test pays
    for the files it touches, later tests find them decided. Every child starts from the
    server's cache, so each test paid again, ~0.1 ms a file and ~70 files for a trivial
    test (pytest's own, the plugins', the test module). The answers are coverage's own
    (``_should_trace`` with the module's globals as the frame's, which is all it reads of
    a frame); a file a plugin traces or names at run time is left to the tracer. Private
    names of coverage.py: where one is missing or fails, the rest is left to the tracer.
    """
    cache = getattr(getattr(cov, "_collector", None), "should_trace_cache", None)
    decide = getattr(cov, "_should_trace", None)
    if not isinstance(cache, dict) or not callable(decide):
        return
    for module in list(sys.modules.values()):
        path = getattr(module, "__file__", None)
        if not isinstance(path, str) or not path.endswith(".py") or path in cache:
            continue
        try:
            disposition = decide(path, types.SimpleNamespace(f_globals=vars(module)))
        except Exception:
            return
        if getattr(disposition, "file_tracer", None) is None and not getattr(
            disposition, "has_dynamic_filename", False
        ):
            cache[path] = disposition


class CovStandIn:
    """Registered as ``_cov`` in the server's session, in place of pytest-cov's own
    plugin (turned off there): what tests and pytest-cov's fixtures reach through that
    name. The ``cov`` fixture returns the measuring ``Coverage``, the ``no_cover``
    marker and fixture pause it, ``--cov-context=test`` names each phase's lines."""

    def __init__(self, measurer: Measurer) -> None:
        self.m = measurer
        self.cov_controller = self
        self._disabled = False

    # what pytest-cov's fixtures and a test's own code use of its controller
    @property
    def cov(self) -> Any:
        return self.m.cov

    @property
    def started(self) -> bool:
        return self.m.running

    def pause(self) -> None:
        self.m.pause()

    def resume(self) -> None:
        self.m.resume()

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_call(self, item: pytest.Item) -> Any:
        self.m.switch(item, "run")
        off = item.get_closest_marker("no_cover") is not None or "no_cover" in getattr(item, "fixturenames", ())
        if off:
            self.m.pause()
        try:
            return (yield)
        finally:
            if off:
                self.m.resume()

    def pytest_runtest_setup(self, item: pytest.Item) -> None:
        self.m.switch(item, "setup")

    def pytest_runtest_teardown(self, item: pytest.Item) -> None:
        self.m.switch(item, "teardown")


def install(config: pytest.Config, measurer: Measurer) -> None:
    """In the server, before its session is configured: the stand-in replaces
    pytest-cov's plugin (started with ``--no-cov``, so it measured and erased nothing)."""
    pm = config.pluginmanager
    own = pm.get_plugin("_cov")
    if own is not None:
        pm.unregister(own)
    pm.register(CovStandIn(measurer), "_cov")

"""Plugins that act in the controller around a test, made to act on its sandbox.

In-process, a plugin that wraps ``pytest_runtest_protocol`` acts on the process the
test runs in. For an isolated test that process is the sandbox, where the same plugin
is loaded too (the sandbox's session is the user's): the controller's copy must stand
aside, or it acts on the controller while it waits (pytest-timeout's SIGALRM raised
into the plugin's own socket read: an INTERNALERROR).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import Any

import pytest

from pytest_isolate.session import hypothesis_db, inline_snapshot, profiling, retry

Isolated = Callable[[pytest.Item], bool]


class Timeout:
    """pytest-timeout: its timer runs in the sandbox, where the test's frames are.

    pytest-timeout asks its own firstresult hooks to set and cancel the timer; answering
    them first, for isolated tests only, keeps the controller's timer off. The sandbox's
    pytest-timeout then fails the test with the message and stack dump it gives
    in-process (``signal`` method), or ends the sandbox's process (``thread`` method:
    in-process it ends the whole run; here the test fails and the run goes on)."""

    def __init__(self, isolated: Isolated) -> None:
        self.isolated = isolated

    @pytest.hookimpl(tryfirst=True, optionalhook=True)
    def pytest_timeout_set_timer(self, item: pytest.Item, settings: Any) -> bool | None:
        return True if self.isolated(item) else None

    @pytest.hookimpl(tryfirst=True, optionalhook=True)
    def pytest_timeout_cancel_timer(self, item: pytest.Item) -> bool | None:
        return True if self.isolated(item) else None


def register(config: pytest.Config, isolated: Isolated) -> None:
    """In the controller only: the sandbox's session keeps every plugin as it is."""
    pm = config.pluginmanager
    if pm.has_plugin("timeout"):
        pm.register(Timeout(isolated), "isolate-adapter-timeout")
    dependency = dependency_module(config)
    if dependency is not None:
        pm.register(Dependencies(dependency, isolated), Dependencies.NAME)
    inline_snapshot.register(config, isolated)
    profiling.register(config, isolated)


def kept_by_plugins(item: pytest.Item) -> list[str]:
    """Where plugins that write a test's expected files into the source tree write them
    by default, for tests that use them: kept (``facets.keep``) as in-process. A test
    that chose another place (its own ``original_datadir``) names it with
    ``isolate(keep=...)``, as do other plugins' users (pytest-snapshot's ``snapshots``).

    hypothesis's storage directory too (``.hypothesis`` below the working directory),
    for its tests: in-process the first test that draws text creates it (with a
    ``.gitignore``) and writes the Unicode tables it computed into it (built in ``tmp``,
    renamed into ``unicode_data``), and its cache of the constants in the user's modules;
    later tests read them. From ``chroot`` up each such test wrote them into its
    overlay, which reported a blocked ``write-host-file`` (a warning in-process pytest
    never gives: attrs, 24 of its tests, when its tree is not below /tmp) and threw them
    away. Its example database (``examples``) is in there too: its writes are carried as
    operations (``session/hypothesis_db.py``), so the sandbox writes nothing there
    itself, and a file a test put there would be one more example, which the
    operations can add anyway."""
    path = getattr(item, "path", None)
    names = getattr(item, "fixturenames", ())
    out = []
    if isinstance(item, pytest.Function) and getattr(item.obj, "is_hypothesis_test", False):
        examples = hypothesis_db.default_path()
        if examples is not None:
            out.append(os.path.dirname(examples))
    out += _kept_by_mypy(item) + _kept_by_ruff(item) + _kept_by_recording(item)
    if path is None or not names:
        return out
    pm = item.config.pluginmanager
    if pm.has_plugin("regressions") and any(n.endswith("_regression") for n in names):
        out.append(str(path.with_suffix("")))  # pytest-datadir's ``original_datadir``
    return out


def _kept_by_recording(item: pytest.Item) -> list[str]:
    """pytest-recording's tests (``@pytest.mark.vcr``): their module's cassette directory.

    Such a test records its HTTP exchanges (``--record-mode=once`` and the other
    recording modes) into ``cassettes/<module>/`` beside its module (its
    ``vcr_cassette_dir`` fixture), and the next run replays them. From ``chroot`` up
    the cassettes stayed in the sandbox's root: the next run found none, recorded again
    (or, with ``--record-mode=none``, failed where in-process it replays). A test that
    overrides ``vcr_cassette_dir`` names its directory with ``isolate(keep=...)``."""
    mod = sys.modules.get("pytest_recording.plugin")
    path = getattr(item, "path", None)
    if mod is None or path is None or not item.config.pluginmanager.is_registered(mod):
        return []
    if item.get_closest_marker("vcr") is None:
        return []
    return [os.path.join(os.path.dirname(path), "cassettes", path.stem)]


def _kept_by_mypy(item: pytest.Item) -> list[str]:
    """pytest-mypy's items (``--mypy``): its results file and mypy's cache directory.

    In-process the first of them runs mypy once for the session, writes its cache
    (``.mypy_cache`` below the working directory) and puts the results in a file of
    ``/tmp`` named by the run's configuration; every later item reads that file, and
    the "mypy" summary section is read from it at the end. From ``chroot`` up both
    stayed in the first item's sandbox: every later item ran mypy again (a project of
    two files: three runs, 12 s against 2.8 s), each warned of a blocked
    ``write-host-file`` into ``.mypy_cache``, and the summary section was missing.
    Kept, the file reaches the host after that first item, and the items after it
    read it there, as in-process. A ``cache_dir`` set in mypy's configuration is not
    looked up: ``isolate_keep`` names it."""
    mod = sys.modules.get("pytest_mypy")
    kind = getattr(mod, "MypyItem", None)
    if kind is None or not isinstance(item, kind):
        return []
    try:
        results = item.config.stash[mod.stash_key["config"]].mypy_results_path  # type: ignore[union-attr]
    except (AttributeError, KeyError, TypeError):
        return []
    cache = os.environ.get("MYPY_CACHE_DIR") or ".mypy_cache"
    return [str(results), os.path.join(item.config.invocation_params.dir, cache)]


def _kept_by_ruff(item: pytest.Item) -> list[str]:
    """pytest-ruff's items (``--ruff``, ``--ruff-format``): ruff's cache directory.

    Each item runs ruff on its file, and ruff writes ``.ruff_cache`` into the project's
    root (the directory of its configuration, else the working directory): from
    ``chroot`` up every such item warned of a blocked ``write-host-file`` that
    in-process pytest never gives. ``RUFF_CACHE_DIR`` moves it, as it moves ruff's;
    a ``cache-dir`` in ruff's configuration is named in ``isolate_keep``."""
    mod = sys.modules.get("pytest_ruff")
    kind = getattr(mod, "RuffItem", None)
    if kind is None or not isinstance(item, kind):
        return []
    cache = os.environ.get("RUFF_CACHE_DIR")
    if cache:
        return [os.path.join(item.config.invocation_params.dir, cache)]
    roots = dict.fromkeys((str(item.config.rootpath), str(item.config.invocation_params.dir)))
    return [os.path.join(root, ".ruff_cache") for root in roots]


def in_server() -> None:
    """In the fork server, once its plugins are loaded and before they are configured.

    pytest-rerunfailures' worker side connects to its controller's status socket on
    127.0.0.1 when pytest-xdist is installed. A UML guest has its own loopback: there
    the connection cannot succeed, and the whole sandbox would fail to start. Its own
    in-process status store then stands in (the counts it shares serve reruns of tests
    xdist restarted after a crash, and ``--max-suite-reruns``, neither of which a guest
    takes part in).
    """

    retry.in_server()
    rr = sys.modules.get("pytest_rerunfailures")  # loaded by the session, if at all
    if rr is None:
        return
    real = getattr(rr, "ClientStatusDB", None)
    base = getattr(rr, "StatusDB", None)
    if real is None or base is None:
        return

    def client_or_local(*args: Any, **kwargs: Any) -> Any:
        try:
            return real(*args, **kwargs)
        except OSError:
            return base()

    rr.ClientStatusDB = client_or_local


#: Plugins that write, at their session's end, a file the controller's session writes
#: too, from what its reports showed: in the fork server, which runs no test, the same
#: plugin would write what it read at start (at the same time or after the controller).
#: Each is unregistered in the server once configured. pytest-split's
#: ``--store-durations``: the run's durations were lost.
CONTROLLER_WRITERS = ("pytestsplitcacheplugin",)


def server_configured(config: pytest.Config) -> None:
    """In the fork server, after every plugin's ``pytest_configure``."""
    pm = config.pluginmanager
    for name in CONTROLLER_WRITERS:
        plugin = pm.get_plugin(name)
        if plugin is not None:
            pm.unregister(plugin, name)


class NextAttempt(BaseException):
    """Raised in a test's child when pytest-rerunfailures starts another attempt: that
    attempt gets a sandbox of its own (the controller sends the test again)."""


class Reruns:
    """pytest-rerunfailures: every attempt in a fresh sandbox.

    In-process its protocol loops over attempts in one process. In the sandbox it runs
    as it is, until it logs the start of a second attempt: the child then ends (its
    fixtures torn down, as after a last attempt), and the controller runs the test
    again in a new sandbox, which rerunfailures resumes at the attempt it reached (it
    counts attempts from its status store: the child answers for this test from it).
    What it logged of each attempt (the rerun reports, then the final ones) reaches
    the controller as in-process: the same counts, the same summary.
    """

    #: Attempts one test may make, whatever a plugin asks (a guard, not a setting).
    LIMIT = 100

    @staticmethod
    def applies(item: pytest.Item) -> bool:
        rr = sys.modules.get("pytest_rerunfailures")
        if rr is None or not item.config.pluginmanager.is_registered(rr):
            return False
        try:
            return bool(rr.get_reruns_count(item))
        except Exception:  # noqa: BLE001 - another version's helpers: attempts stay in one sandbox
            return False

    @staticmethod
    def resume(item: pytest.Item, attempt: int) -> None:
        """In the child, before the protocol: rerunfailures starts at ``attempt``."""
        db = getattr(item.config, "failures_db", None)
        if db is None or attempt <= 0:
            return
        real = db.get_test_failures

        def failures(crashitem: str) -> int:
            return attempt if crashitem == item.nodeid else real(crashitem)

        db.get_test_failures = failures

    @staticmethod
    def end(item: pytest.Item) -> None:
        """In the child, after an attempt that asked for another: tear down what
        rerunfailures held up for that attempt (module, class, session fixtures)."""
        rr = sys.modules.get("pytest_rerunfailures")
        restore = getattr(rr, "_restore_suspended_finalizers", None)
        if restore is not None:
            restore(item)
        item.session._setupstate.teardown_exact(None)  # type: ignore[attr-defined]


class Dependencies:
    """pytest-dependency: a sandbox knows how the tests before it ended.

    pytest-dependency records each marked test's outcome on the collection nodes of the
    process the test ran in (``node.dependencyManager``, from its
    ``pytest_runtest_makereport`` wrapper) and skips a test whose ``depends`` did not
    pass there. Each sandbox starts from the collected session, where nothing has run:
    every dependent test would be skipped. So the controller records the outcomes it
    logs (the sandboxes' and its own in-process tests'), applies those of isolated tests
    to its own nodes (for in-process tests that come later), and sends them with each
    job that may ask; the child applies them before its test, as pytest-dependency would
    have. Plain ``[nodeid, when, outcome]`` triples: nothing the sandbox sends is
    trusted for them, only what the controller logged.
    """

    NAME = "isolate-adapter-dependency"
    #: Beyond this many recorded tests, only tests with ``depends`` on their marker get
    #: the record (a runtime ``depends(request, ...)`` in an unmarked test then sees
    #: none): sending all of it with every job would cost a suite of thousands
    #: quadratic time.
    SEND_ALL_UP_TO = 1000

    def __init__(self, module: Any, isolated: Isolated) -> None:
        self.module = module
        self.isolated = isolated
        self.items: dict[str, pytest.Item] = {}
        #: nodeid -> {when: outcome}, in the order tests were logged.
        self.outcomes: dict[str, dict[str, str]] = {}

    def relevant(self, item: pytest.Item) -> bool:
        """Does pytest-dependency record this test's outcome?"""
        return item.get_closest_marker("dependency") is not None or bool(getattr(self.module, "_automark", False))

    def asks(self, item: pytest.Item) -> bool:
        """May this test look at earlier outcomes?"""
        if len(self.outcomes) <= self.SEND_ALL_UP_TO:
            return True
        marker = item.get_closest_marker("dependency")
        return marker is not None and bool(marker.kwargs.get("depends"))

    @pytest.hookimpl(trylast=True)
    def pytest_collection_finish(self, session: pytest.Session) -> None:
        self.items = {item.nodeid: item for item in session.items}

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        item = self.items.get(report.nodeid)
        if item is None or report.when not in ("setup", "call", "teardown") or not self.relevant(item):
            return
        self.outcomes.setdefault(report.nodeid, {})[report.when] = report.outcome
        if self.isolated(item):  # in-process, pytest-dependency recorded it itself
            apply(self.module, {report.nodeid: item}, [[report.nodeid, report.when, report.outcome]])

    def for_job(self, nodeid: str) -> list[list[str]] | None:
        item = self.items.get(nodeid)
        if not self.outcomes or item is None or not self.asks(item):
            return None
        return [[n, when, outcome] for n, ends in self.outcomes.items() for when, outcome in ends.items()]


def apply(module: Any, items: dict[str, pytest.Item], outcomes: Any) -> None:
    """Record ``outcomes`` (``[nodeid, when, outcome]``) on ``items``' nodes as
    pytest-dependency's own report hook does. Malformed entries and another version's
    classes are skipped: the test then sees what it would have without us."""
    manager = getattr(module, "DependencyManager", None)
    scopes = getattr(manager, "ScopeCls", None)
    if manager is None or not isinstance(scopes, dict) or not isinstance(outcomes, list):
        return
    import types

    for entry in outcomes:
        if not (isinstance(entry, list) and len(entry) == 3 and all(isinstance(x, str) for x in entry)):
            continue
        item = items.get(entry[0])
        if item is None:
            continue
        marker = item.get_closest_marker("dependency")
        name = marker.kwargs.get("name") if marker is not None else None
        rep = types.SimpleNamespace(when=entry[1], outcome=entry[2])
        try:
            for scope in scopes:
                node_manager = manager.getManager(item, scope=scope)
                if node_manager:
                    node_manager.addResult(item, name, rep)
        except Exception:  # noqa: BLE001 - another version's internals
            return


def dependency_module(config: pytest.Config) -> Any:
    """pytest-dependency's module, when this session runs it."""
    mod = sys.modules.get("pytest_dependency")
    return mod if mod is not None and config.pluginmanager.is_registered(mod) else None

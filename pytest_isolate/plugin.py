"""pytest hooks only: options, the ``isolate`` marker, dispatch to sandboxes.

Everything with substance lives elsewhere: parsing in ``spec``, workers in
``controller``, a sandbox's answer turned into reports in ``answer``, the sandbox's
session kept the user's in ``session/``, output in ``report``. This module wires them
into pytest's hooks.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import sys
import types
import warnings
from typing import Any

import pluggy
import pytest

# stem at import, with the plugin: it keeps the warnings state from before pytest's
# configuration.
from pytest_isolate import answer, report, stem
from pytest_isolate.facets import keep
from pytest_isolate.session import adapters, rewritten
from pytest_isolate.spec import (
    TIERS,
    IsolationSpec,
    SpecError,
    intern,
    marker_values,
    parse_values,
    resolve,
)

# What pytest rewrites from now on is kept for a UML guest's server (see the module).
rewritten.capture()

SPEC_KEY = pytest.StashKey[IsolationSpec]()
#: Tiers whose fork server runs on this host (one worker for all of them).
HOST_TIERS = ("process", "chroot", "jail", "zone")
#: Flags/ini options for the budget-like keys: (key, help).
_KEY_HELP = {
    "timeout": "wall-clock budget per test, e.g. '30s'; over it the test fails and its process tree is killed",
    "cpu_time": "CPU-time budget per test, e.g. '10s'",
    "memory": "peak memory budget per test, e.g. '256M' (hard limit in zone/uml)",
    "cpu": "CPU share per test as a fraction of one CPU, e.g. 0.5 (zone/uml)",
    "pids": "max processes/threads at once per test (hard limit in zone)",
    "disk": "bytes a test may write inside its sandbox, e.g. '100M'",
    "fds": "max open file descriptors per test",
    "io": "block IO bandwidth per test in bytes/s, e.g. '50M' (zone)",
    "network": "network of jail/zone/uml tests: 'none' (loopback only) or 'ip' (one address on the run's private switch)",
    "scope": "share a sandbox: 'module' or 'session' keep one child (and its fixtures) for consecutive tests; "
    "default: a fresh child per test; 'test' for uml: a fresh guest per test",
    "rootfs": "directory to use as the read-only lower root instead of the host / (chroot/jail/zone)",
    "cpus": "CPUs of a UML guest",
    "keep": "paths (relative to the rootdir; '*', '**' allowed) below which what a test writes from chroot up "
    "is copied back to the host, e.g. 'tests/golden'; repeat or separate with commas",
}


def _flag(key: str) -> str:
    return "--isolate-" + key.replace("_", "-")


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("isolate", "test isolation (pytest-isolate)")
    group.addoption(
        "--isolate",
        dest="isolate_tier",
        default=None,
        metavar="TIER",
        help=f"isolation tier for every test without an isolate marker: {', '.join(TIERS)} (default: none)",
    )
    parser.addini("isolate", f"default isolation tier ({', '.join(TIERS)})", default=None)
    for key, text in _KEY_HELP.items():
        action = "append" if key == "keep" else "store"
        group.addoption(_flag(key), dest=f"isolate_{key}", default=None, action=action, metavar=key.upper(), help=text)
        parser.addini(f"isolate_{key}", text, default=None)
    group.addoption(
        "--isolate-uml-kernel",
        dest="isolate_uml_kernel",
        default=None,
        metavar="PATH",
        help="User-Mode Linux kernel for the uml tier (default: linux.uml or linux on PATH)",
    )
    parser.addini("isolate_uml_kernel", "User-Mode Linux kernel for the uml tier", default=None)
    group.addoption(
        "--isolate-report",
        dest="isolate_report",
        default=None,
        metavar="PATH",
        help="write a JSON report with one record per isolated test",
    )
    parser.addini("isolate_report", "path of the JSON report", default=None)
    group.addoption(
        "--isolate-unavailable",
        dest="isolate_unavailable",
        default=None,
        choices=("skip", "fail"),
        help="what happens to tests whose tier cannot run on this host (default: fail)",
    )
    parser.addini("isolate_unavailable", "skip|fail for tests whose tier cannot run here", default=None)
    for name, what, default in (
        ("escape", "a test whose sandbox was escaped (blocked attempts are shown, never failed)", "fail"),
        ("overuse", "a test over a budget its tier could only observe, not enforce", "fail"),
    ):
        group.addoption(
            f"--isolate-on-{name}",
            dest=f"isolate_on_{name}",
            default=None,
            choices=("fail", "warn", "ignore"),
            help=f"what happens to {what} (default: {default})",
        )
        parser.addini(f"isolate_on_{name}", f"fail|warn|ignore for {what}", default=None)
    group.addoption(
        "--isolate-readings",
        dest="isolate_readings",
        default=None,
        choices=("on", "off"),
        help="sample usage from /proc while tests run (tiers without a cgroup); off leaves "
        "rusage and cgroup totals only (default: on)",
    )
    parser.addini("isolate_readings", "on|off: sample usage from /proc while tests run", default=None)
    group.addoption(
        "--isolate-advise",
        dest="isolate_advise",
        action="store_true",
        default=False,
        help="after the run, print for each isolated test the weakest tier that would have "
        "contained everything it did, with a marker to paste",
    )
    group.addoption(
        "--isolate-top",
        dest="isolate_top",
        default=None,
        type=int,
        metavar="N",
        help="show the N isolated tests with the highest peak memory and CPU (default 5, 0 = off)",
    )
    parser.addini("isolate_top", "top N tests by memory and CPU in the summary", default=None)


def pytest_addhooks(pluginmanager: pytest.PytestPluginManager) -> None:
    from pytest_isolate import hookspec

    pluginmanager.add_hookspecs(hookspec)


@pytest.hookimpl(tryfirst=True)
def pytest_load_initial_conftests(early_config: pytest.Config) -> None:
    """Fork the stem host workers are forked from (``stem.py``) while pytest is
    imported and nothing of the run is configured, when the run's own tier will want a
    host worker. Only the command line and ini file say so this early; a run that
    isolates by markers only starts its workers fresh."""
    ns = early_config.known_args_namespace
    if stem.disabled or getattr(ns, "collectonly", False) or getattr(ns, "numprocesses", None):
        return
    try:
        tier = getattr(ns, "isolate_tier", None) or early_config.getini("isolate")
    except ValueError:
        return
    if tier in HOST_TIERS and stem.start():
        early_config.stash[_STEM_KEY] = True
        early_config.add_cleanup(stem.stop)


#: Set in the config that started the stem (a run inside a test of this one does not).
_STEM_KEY = pytest.StashKey[bool]()


def _option(config: pytest.Config, name: str) -> Any:
    """Command line first, then ini."""
    value = config.getoption(name, None)
    if value is None:
        ini = "isolate" if name == "isolate_tier" else name
        value = config.getini(ini) or None
    return value


def _run_layers(config: pytest.Config) -> tuple[dict[str, Any], dict[str, Any]]:
    """The command-line and ini layers, validated once (usage errors name the flag)."""
    cli: dict[str, Any] = {}
    ini: dict[str, Any] = {}
    names = {"tier": ("isolate_tier", "--isolate", "isolate")}
    names.update({k: (f"isolate_{k}", _flag(k), f"isolate_{k}") for k in _KEY_HELP})
    names["kernel"] = ("isolate_uml_kernel", "--isolate-uml-kernel", "isolate_uml_kernel")
    for key, (dest, flag, ininame) in names.items():
        value = config.getoption(dest, None)
        if value is not None:
            cli.update(parse_values({key: value}, flag))
        raw = config.getini(ininame)
        if raw:
            ini.update(parse_values({key: raw}, f"ini option {ininame}"))
    return cli, ini


def is_server(config: pytest.Config) -> bool:
    from pytest_isolate.session.node import SERVER_KEY

    return config.stash.get(SERVER_KEY, False)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "isolate(tier=None, *, timeout=None, memory=None, cpu=None, cpu_time=None, pids=None, "
        "disk=None, fds=None, io=None, network=None, scope=None, rootfs=None, kernel=None, "
        f"cpus=None, allow=None, keep=None): run the test in an isolation tier ({', '.join(TIERS[1:])}) "
        "with budgets; the closest marker wins key by key. See docs/reference.md.",
    )
    try:
        cli, ini = _run_layers(config)
        unavailable = _option(config, "isolate_unavailable") or "fail"
        if unavailable not in ("skip", "fail"):
            raise SpecError(f"ini option isolate_unavailable: unknown value {unavailable!r} (valid: skip, fail)")
        for name in ("isolate_on_escape", "isolate_on_overuse"):
            value = _option(config, name) or "fail"
            if value not in ("fail", "warn", "ignore"):
                raise SpecError(f"ini option {name}: unknown value {value!r} (valid: fail, warn, ignore)")
    except SpecError as exc:
        raise pytest.UsageError(str(exc)) from None
    config.stash[_LAYERS] = (cli, ini)
    plugin = IsolatePlugin(config, unavailable)
    config.pluginmanager.register(plugin, "isolate-plugin")
    if not is_server(config):
        config.pluginmanager.register(report.ReportPlugin(config), "isolate-report")
        adapters.register(config, _isolated)


_LAYERS = pytest.StashKey[tuple[dict[str, Any], dict[str, Any]]]()


#: A marker added in ``pytest_collection_modifyitems`` that does not parse: its error.
SPEC_ERROR_KEY = pytest.StashKey[str]()
#: The isolate markers an item had when collection ended.
MARKS_KEY = pytest.StashKey[int]()


def _isolate_marks(item: pytest.Item) -> int:
    return sum(1 for _ in item.iter_markers("isolate"))


def _isolated(item: pytest.Item) -> bool:
    spec = item.stash.get(SPEC_KEY, None)
    return spec is not None and spec.isolated


def item_spec(item: pytest.Item) -> IsolationSpec:
    """Resolve marker > command line > ini > default, key by key."""
    marker_layer: dict[str, Any] = {}
    for mark in item.iter_markers("isolate"):  # closest first
        for k, v in marker_values(mark.args, mark.kwargs, "isolate marker").items():
            marker_layer.setdefault(k, v)
    cli, ini = item.config.stash[_LAYERS]
    spec = resolve([marker_layer, cli, ini])
    if spec.tier in ("none", "process"):
        return spec  # its writes reach the host as they are
    patterns = [*spec.keep, *adapters.kept_by_plugins(item)]
    if not patterns:
        return spec
    kept = _resolved_keep(tuple(patterns), str(item.config.rootpath))
    return spec if kept == spec.keep else intern(dataclasses.replace(spec, keep=kept))


@functools.lru_cache(maxsize=256)
def _resolved_keep(patterns: tuple[str, ...], rootdir: str) -> tuple[str, ...]:
    return keep.resolve(patterns, rootdir)


def _xdist_queue(config: pytest.Config) -> tuple[Any, int]:
    """The indices of the tests pytest-xdist's worker runs next (its
    ``WorkerInteractor.torun``), and where in it the test after ``nextitem`` is: a
    ``TestQueue`` since 3.6, from which ``nextitem`` is already taken (0); a deque
    before, which still holds it (1). (None, 0) when there is no such worker here."""
    for plugin in config.pluginmanager.get_plugins():
        if type(plugin).__name__ == "WorkerInteractor" and hasattr(plugin, "torun"):
            inner = getattr(plugin.torun, "_items", None)
            queue, ahead = (inner, 0) if inner is not None else (plugin.torun, 1)
            if hasattr(queue, "__getitem__") and hasattr(queue, "__len__"):
                return queue, ahead
    return None, 0


def _set_up_here(item: pytest.Item) -> bool:
    """Whether in-process tests set up anything in this process that is still up."""
    return bool(getattr(getattr(item.session, "_setupstate", None), "stack", None))


class IsolatePlugin:
    def __init__(self, config: pytest.Config, unavailable: str) -> None:
        self.config = config
        self.unavailable = unavailable
        self.server = is_server(config)
        self.ctl: Any = None
        self._availability: dict[str, str | None] = {}
        self._last_in_process: str | None = None
        #: How deep pytest called the current test's protocol (``_caller_depth``).
        self._depth: int | None = None
        #: session.items, their positions, their number (``_following``).
        self._order: tuple[list[pytest.Item], dict[int, int], int] | None = None
        #: Shared fixtures' teardown errors that belong to a later test's report.
        self._deferred = answer.DeferredTeardowns(config)

    @pytest.hookimpl(wrapper=True)
    def pytest_make_collect_report(self, collector: pytest.Collector):  # type: ignore[no-untyped-def]
        rep = yield
        if rep.outcome != "passed" or not rep.result:
            return rep
        errors = []
        for node in rep.result:
            if isinstance(node, pytest.Item):
                try:
                    node.stash[SPEC_KEY] = item_spec(node)
                except SpecError as exc:
                    errors.append(f"{node.nodeid}: {exc}")
        if errors:
            rep.outcome = "failed"
            rep.longrepr = "\n".join(errors)
            rep.result = []
        return rep

    def pytest_report_header(self, config: pytest.Config) -> list[str] | None:
        cli, ini = config.stash[_LAYERS]
        tier = cli.get("tier") or ini.get("tier") or "none"
        return [f"isolate: default tier {tier}"]

    @pytest.hookimpl(tryfirst=True)
    def pytest_sessionstart(self, session: pytest.Session) -> None:
        """Start the worker now when the run's own tier says one will be needed (a host
        worker, or the run's UML guest): it imports pytest and collects on the other CPU
        while this process collects. As early as the session exists: the first test
        waits for the worker (~0.3 s of interpreter start, imports and collection on the
        host; seconds in a guest), not the other way round."""
        cfg = self.config
        if self.server or cfg.option.collectonly or cfg.pluginmanager.has_plugin("dsession"):
            return  # a server, nothing will run, or pytest-xdist's controller (no tests here)
        cli, ini = cfg.stash[_LAYERS]
        try:
            spec = resolve([{}, cli, ini])
        except SpecError:
            return  # said per test, at collection
        if spec.tier == "uml":
            from pytest_isolate import tiers

            # The probe guest and the run's own guest boot while this process collects,
            # as a host worker does; should the probe then find the kernel unusable, the
            # first test says so (this guest did not boot either).
            tiers.start_uml_probe(cfg)
            if tiers.availability("uml", cfg, quick=True):
                return
        elif spec.tier not in HOST_TIERS or self.availability(spec.tier):
            return
        with self._uncaptured(), contextlib.suppress(Exception):  # if it cannot start, the first test says why
            self.controller().launch(spec)

    def _uncaptured(self) -> contextlib.AbstractContextManager[Any]:
        """The gateway (so the server, so each test's uncaptured output) inherits this
        process's stderr as it is while a worker starts: the terminal, never a capture file."""
        capman = self.config.pluginmanager.get_plugin("capturemanager")
        return capman.global_and_fixture_disabled() if capman is not None else contextlib.nullcontext()

    @pytest.hookimpl(tryfirst=True)
    def pytest_runtestloop(self, session: pytest.Session) -> None:
        """When the first test is a uml test, its guest starts booting now, beside the
        probe guest that the tier's availability waits for (``tiers.start_uml_probe``),
        not after it: ~1 s less before the first result. Should the probe then find the
        kernel unusable, the test says so as before (this guest did not boot either)."""
        cfg = self.config
        if self.server or not session.items or cfg.option.collectonly or cfg.pluginmanager.has_plugin("dsession"):
            return
        if session.testsfailed and not cfg.option.continue_on_collection_errors:
            return  # pytest stops before the first test
        item = session.items[0]
        spec = item.stash.get(SPEC_KEY, None)
        if spec is None or not spec.isolated or spec.tier != "uml" or item.stash.get(SPEC_ERROR_KEY, None) is not None:
            return
        if "uml" in self._availability:
            return  # known already: the first test starts its guest as any would
        from pytest_isolate import tiers

        tiers.start_uml_probe(cfg)
        if tiers.availability("uml", cfg, quick=True):
            return
        with self._uncaptured(), contextlib.suppress(Exception):
            self.controller().launch(spec)

    @pytest.hookimpl(trylast=True)
    def pytest_collection_modifyitems(self, items: list[pytest.Item]) -> None:
        # Markers a conftest or plugin added here count, as markers do for pytest's own
        # marks; a bad one fails its test when it comes (collection is over).
        for item in items:
            try:
                item.stash[SPEC_KEY] = item_spec(item)
            except SpecError as exc:
                item.stash[SPEC_ERROR_KEY] = str(exc)
            item.stash[MARKS_KEY] = _isolate_marks(item)
        _keep_groups(items)
        specs = [item.stash.get(SPEC_KEY, None) for item in items]
        self.needs_switch = any(s is not None and s.network == "ip" and s.tier in ("jail", "zone", "uml") for s in specs)
        if not any(s is not None and s.tier == "uml" for s in specs):
            rewritten.stop()
        if self.ctl is not None:
            self.ctl.collected(self.needs_switch)

    def availability(self, tier: str) -> str | None:
        if tier not in self._availability:
            from pytest_isolate import tiers

            self._availability[tier] = tiers.availability(tier, self.config)
        return self._availability[tier]

    @pytest.hookimpl(trylast=True)
    def pytest_runtest_teardown(self, item: pytest.Item) -> None:
        """A marker added once the test has started chose nothing: say so, where the
        test's warnings go (in the sandbox or in-process alike)."""
        before = item.stash.get(MARKS_KEY, None)
        if before is not None and _isolate_marks(item) != before:
            path, lineno, _ = item.location
            warnings.warn_explicit(
                answer.IsolationWarning(
                    f"{item.nodeid}: an isolate marker added while the test ran "
                    "(request.applymarker, node.add_marker) is ignored: the tier is chosen "
                    "before the test starts; mark it with pytest.param(..., "
                    "marks=pytest.mark.isolate(...)), a class or module marker, or in "
                    "pytest_collection_modifyitems"
                ),
                answer.IsolationWarning,
                str(item.config.rootpath / path),
                (lineno or 0) + 1,
            )

    @pytest.hookimpl(tryfirst=True)
    def pytest_runtest_protocol(self, item: pytest.Item, nextitem: pytest.Item | None) -> bool | None:
        if self.server:
            return None
        spec = item.stash.get(SPEC_KEY, None)
        bad = item.stash.get(SPEC_ERROR_KEY, None)
        if (spec is None or not spec.isolated) and bad is None:
            if nextitem is None:
                self._last_in_process = item.nodeid  # workers end once it has run
            return None
        self._depth = _caller_depth(sys._getframe())
        if item.config.getini("faulthandler_timeout"):
            # pytest's faulthandler armed its timer around this hook: here it would dump
            # this process's threads (ours, waiting) instead of the test's, which the
            # sandbox's own timer dumps to the terminal.
            import faulthandler

            faulthandler.cancel_dump_traceback_later()
        ihook = item.ihook
        attempt = 0
        with answer.held_warnings():
            while True:
                ihook.pytest_runtest_logstart(nodeid=item.nodeid, location=item.location)
                again = self._attempt(item, nextitem, spec, bad, attempt)
                ihook.pytest_runtest_logfinish(nodeid=item.nodeid, location=item.location)
                if not again or attempt >= adapters.Reruns.LIMIT:
                    return True
                attempt += 1

    @pytest.hookimpl(trylast=True)
    def pytest_runtest_logfinish(self, nodeid: str) -> None:
        """The session's last test ran in-process: the workers end their sessions now,
        not while it runs (it may look at them, and it shares the CPU with nobody)."""
        if nodeid == self._last_in_process and self.ctl is not None:
            self._last_in_process = None
            self.ctl.finishing()

    def _attempt(
        self, item: pytest.Item, nextitem: pytest.Item | None, spec: IsolationSpec | None, bad: str | None,
        attempt: int,
    ) -> bool:
        """One run of the test in a sandbox of its own, logged; True when the sandbox
        asked for another attempt (pytest-rerunfailures, ``adapters.Reruns``)."""
        terminal: dict[int | None, str] = {}
        again = False
        stop = None
        deferred = None
        reason = self.availability(spec.tier) if spec is not None and bad is None else None
        if bad is not None or spec is None:
            reports = answer.synthetic(item, "failed", f"{item.nodeid}: {bad}")
            spec = spec or resolve([{}, {}, {}])
            record = answer.new_record(item, spec, reports, {"worker_error": bad})
        elif reason:
            reports = answer.synthetic(item, "skipped" if self.unavailable == "skip" else "failed", reason)
            record = answer.new_record(item, spec, reports, {"unavailable": reason})
        else:
            group = scope_group(item, spec)
            nextid = None
            if group and nextitem is not None and scope_group(nextitem, nextitem.stash.get(SPEC_KEY, None)) == group:
                nextid = nextitem.nodeid
            self.controller().depth = self._depth
            try:
                done = self.controller().run(
                    item.nodeid, spec, group, nextid, attempt, item.location, self._teardown_for(item, nextitem)
                )
            except (KeyboardInterrupt, pytest.exit.Exception):
                raise
            except BaseException as exc:  # noqa: BLE001 - raised into us while waiting: this test's
                done = self.controller().abort(item.nodeid, spec, exc)
            again = bool(done.get("next_attempt"))
            stop = done.get("stop")
            deferred = done.get("deferred")
            if nextitem is None and not again:
                self.controller().finishing()
            # Tripwires are read before anything else can run: a contact is this test's.
            contacts = self.controller().canary_escapes(spec.tier)
            self.controller().carry.merge(done.get("carry"), early=True)
            # Before the next test is sent: its sandbox, built from the host, sees them.
            kept, kept_notes = keep.write_back(done.get("kept"), spec.keep)
            if nextitem is not None and not contacts and not again and answer.clean(done):
                self._prefetch(item, nextitem)
            reports, record = answer.unpack(self.config, item, spec, done, self.unavailable)
            self.controller().carry.merge(done.get("carry"))
            record["escapes"] += contacts
            record["kept"] = kept
            record["notes"] += kept_notes
            answer.warn(self.config, item, kept_notes)
            terminal = answer.terminal_text(done, reports)
        reports = answer.finish(self.config, item, spec, reports, record, stopped=stop is not None)
        tail = None
        if not again and stop is None and reports and reports[-1].when == "teardown" and _set_up_here(item):
            reports, tail = reports[:-1], reports[-1]
        for rep in reports:
            self._write_terminal(terminal.get(id(rep)))
            if rep.when == "teardown" and not again:
                self._deferred.place(item, nextitem, rep, reports, record)
            item.ihook.pytest_runtest_logreport(report=rep)
        if tail is not None:
            # After the test's other reports, as in-process: a failure logged there may
            # have reached --maxfail, and then everything comes down.
            self._teardown_here(item, nextitem, reports, tail, record)
            self._deferred.place(item, nextitem, tail, [*reports, tail], record)
            self._write_terminal(terminal.get(id(tail)))
            item.ihook.pytest_runtest_logreport(report=tail)
        self._write_terminal(terminal.get(None))
        self._deferred.add(deferred)  # for a later test: none of this test's nodes came down
        if stop is not None:
            answer.stop_session(stop)
        return again

    def _teardown_here(
        self, item: pytest.Item, nextitem: pytest.Item | None, reports: list[pytest.TestReport],
        report: pytest.TestReport, record: dict[str, Any],
    ) -> None:
        """In-process, the teardown of every test brings down what the next one does not
        share, whoever set it up: here, what in-process tests (no tier) set up in this
        process. The sandbox ran the isolated test's protocol and this process none of
        it, so a module fixture of an in-process test stayed up through the isolated
        tests after it, and the next in-process test of another module errored at
        setup ("previous item was not torn down properly"). Torn down here, its output
        captured; an error is the test's teardown error (with that output), as
        in-process, unless the sandbox reported one. Without an error the output is
        dropped: a fixture the isolated test used too was torn down, and reported, in
        its sandbox already."""
        session = item.session
        if session.shouldfail or session.shouldstop:
            nextitem = None
        state = session._setupstate  # type: ignore[attr-defined]
        capman = self.config.pluginmanager.get_plugin("capturemanager")
        capturing = capman is not None and capman.is_globally_capturing()
        if capturing:
            capman.resume_global_capture()
        out = err = ""
        try:
            call = pytest.CallInfo.from_call(
                lambda: state.teardown_exact(nextitem), when="teardown",
                reraise=(pytest.exit.Exception, KeyboardInterrupt),
            )
        finally:
            if capturing:
                capman.suspend_global_capture(in_=False)
                out, err = capman.read_global_capture()
        if call.excinfo is None or report.failed:
            return
        made = item.ihook.pytest_runtest_makereport(item=item, call=call)
        report.outcome = "failed"
        report.longrepr = made.longrepr
        for name, text in (("stdout", out), ("stderr", err)):
            if text:
                report.sections.append((f"Captured {name} teardown", text))
        record["outcome"] = answer.outcome_of([*reports, report])

    def _prefetch(self, item: pytest.Item, nextitem: pytest.Item) -> None:
        """Send the next test ahead when it is a plain per-test sandbox (see
        ``Controller.prefetch``). pytest-xdist's work stealing may take a queued item
        away from this worker, so there the next item is never sent early; nor after a
        test whose outcome pytest-dependency records (not logged yet, so not in the next
        job's ``adapters.Dependencies`` record)."""
        spec = nextitem.stash.get(SPEC_KEY, None)
        if spec is None or not spec.isolated or spec.tier == "uml" or scope_group(nextitem, spec):
            return
        dependency = self.config.pluginmanager.get_plugin(adapters.Dependencies.NAME)
        if dependency is not None and dependency.relevant(item):
            return
        if self.availability(spec.tier) or getattr(self.config.option, "dist", None) == "worksteal":
            return
        known, following = self._following(nextitem)
        if not known:
            return
        self.controller().prefetch(nextitem.nodeid, spec, nextitem.location, self._teardown_for(nextitem, following))

    @staticmethod
    def _teardown_for(item: pytest.Item, nextitem: pytest.Item | None) -> dict[str, Any]:
        """What the sandbox needs to tear ``item`` down as in-process: the next test (pytest
        keeps up the fixtures it shares, their teardown and its errors belong to a later
        test) and the failures so far (``--maxfail`` reached: everything comes down)."""
        return {"after": nextitem.nodeid if nextitem is not None else None, "failed": item.session.testsfailed}

    def _following(self, item: pytest.Item) -> tuple[bool, pytest.Item | None]:
        """The test pytest runs after ``item`` (for a test sent ahead, whose own
        ``nextitem`` is not known yet), if it can be known: the next in the session's
        order; under pytest-xdist the next in the worker's queue (False while the queue
        does not hold it yet)."""
        items = item.session.items
        if hasattr(item.config, "workerinput"):
            queue, ahead = _xdist_queue(item.config)
            if queue is None or len(queue) <= ahead:
                return False, None
            head = queue[ahead]
            if isinstance(head, int) and not isinstance(head, bool):
                return (True, items[head]) if 0 <= head < len(items) else (False, None)
            # xdist 3.6+: its shutdown marker, the worker's last test; before: unknown.
            return (True, None) if ahead == 0 else (False, None)
        if self._order is None or self._order[0] is not items or self._order[2] != len(items):
            self._order = (items, {id(it): i for i, it in enumerate(items)}, len(items))
        i = self._order[1].get(id(item))
        return True, (items[i + 1] if i is not None and i + 1 < len(items) else None)

    def _write_terminal(self, text: str | None) -> None:
        """What the sandbox wrote to its terminal writer (``--setup-show``, live logs, a
        plugin's ``terminalreporter.write``) goes where pytest would have written it
        in-process: the user's terminal, between the same two reports."""
        if not text:
            return
        tr = self.config.pluginmanager.get_plugin("terminalreporter")
        if tr is not None:
            tr._tw.write(text, flush=True)

    def controller(self) -> Any:
        if self.ctl is None:
            from pytest_isolate.controller import Controller

            self.ctl = Controller(self.config)
            self.ctl.needs_switch = getattr(self, "needs_switch", False)
        return self.ctl

    def pytest_sessionfinish(self, exitstatus: int) -> None:
        if self.config.stash.get(_STEM_KEY, False):
            stem.release()  # no worker is asked for once the session ends
        if self.ctl is not None:
            self.ctl.shutdown(fast=exitstatus == pytest.ExitCode.INTERRUPTED)
            self.ctl = None

    def pytest_unconfigure(self) -> None:
        # Reached on Ctrl-C and internal errors too.
        if self.ctl is not None:
            with contextlib.suppress(Exception):
                self.ctl.shutdown(fast=True)
            self.ctl = None
        if "pytest_isolate.tiers.uml_kernel" in sys.modules:
            sys.modules["pytest_isolate.tiers.uml_kernel"].stop_probes()


def scope_group(item: pytest.Item, spec: IsolationSpec | None) -> str | None:
    """Tests with the same group may share one sandbox child (and its fixtures)."""
    if spec is None or spec.scope not in ("module", "session") or spec.tier == "uml" and spec.scope == "test":
        return None
    where = item.nodeid.split("::", 1)[0] if spec.scope == "module" else "session"
    # Not ``keep``: a shared sandbox keeps what any of its tests keeps (``_keep_groups``).
    return f"{spec.scope}:{where}:{sorted((k, v) for k, v in spec.to_dict().items() if k != 'keep')}"


def _keep_groups(items: list[pytest.Item]) -> None:
    """Tests that share a sandbox (``scope``) share its kept paths too: the sandbox's
    writes are read once, when it ends, for all of them."""
    groups: dict[str, list[pytest.Item]] = {}
    for item in items:
        spec = item.stash.get(SPEC_KEY, None)
        group = scope_group(item, spec)
        if group is not None and spec is not None and spec.tier not in ("none", "process"):
            groups.setdefault(group, []).append(item)
    for members in groups.values():
        specs = [m.stash[SPEC_KEY] for m in members]
        union = tuple(dict.fromkeys(p for s in specs for p in s.keep))
        for m, s in zip(members, specs, strict=True):
            if s.keep != union:
                m.stash[SPEC_KEY] = intern(dataclasses.replace(s, keep=union))


_PLUGGY_DIR = os.path.dirname(pluggy.__file__)


def _caller_depth(hookimpl: types.FrameType) -> int:
    """How many frames deep the code that called a hook is (pytest's runtestloop, or
    xdist's worker loop): where in-process pytest would run the test's protocol. A
    sandbox's child starts deeper (``child.match_depth``)."""
    f = hookimpl.f_back
    while f is not None and f.f_code.co_filename.startswith(_PLUGGY_DIR):
        f = f.f_back
    n = 0
    while f is not None:
        n += 1
        f = f.f_back
    return n

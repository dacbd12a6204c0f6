"""A sandbox's answer turned into the pytest reports of its test, in one place.

The fork server answers each test with one ``done`` message: the reports the sandbox
logged (serialized), what it recorded besides (warnings, junit attributes, terminal
text) and the run's record (usage, escapes, overuse). Here that becomes what the
controller logs: reports pytest accepts, reports for a test that never ran in a sandbox
(unavailable tier, dead worker), the user's policy on escapes and overuse applied (the
same record is a failure in CI and a warning on a laptop: what is *seen* lives in
``observe/``, what it *means for the build* here), and the record attached to the
last report, where the JSON report, junit and pytest-xdist find it.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from typing import Any

import pytest

from pytest_isolate.session import extras
from pytest_isolate.spec import IsolationSpec


def outcome_of(reports: list[pytest.TestReport]) -> str:
    """One word per test, as pytest's summary counts it."""
    for rep in reports:
        if rep.when != "call" and rep.failed:
            return "error"
    for rep in reports:
        if hasattr(rep, "wasxfail"):
            return "xpassed" if rep.passed else "xfailed"
        if rep.failed:
            return "failed"
        if rep.skipped:
            return "skipped"
    return "passed"


def _micro(value: Any) -> Any:
    return round(value, 6) if isinstance(value, float) else value


def new_record(
    item: pytest.Item, spec: IsolationSpec, reports: list[pytest.TestReport], raw: dict[str, Any]
) -> dict[str, Any]:
    usage = dict(raw.get("usage") or {})
    exit_info = raw.get("exit") or {}
    record: dict[str, Any] = {
        "nodeid": item.nodeid,
        "tier": spec.tier,
        "outcome": outcome_of(reports),
        "duration": round(sum(r.duration for r in reports), 6),
        # To the microsecond getrusage counts in: a sum of its two halves printed
        # 0.053592999999999995 in junit's properties.
        "cpu_user": _micro(usage.get("cpu_user")),
        "cpu_sys": _micro(usage.get("cpu_sys")),
        "peak_rss": usage.get("max_rss"),
        "exit_code": exit_info.get("exit_code"),
        "signal": exit_info.get("signame"),
        "crashed": bool(raw.get("crashed")) or "worker_error" in raw,
        "timed_out": bool(raw.get("timed_out")),
        "spec": spec.to_dict(),
        "budgets": spec.budgets(),
        "usage": usage,
        "escapes": list(raw.get("escapes") or []),
        "overuse": list(raw.get("overuse") or []),
        "leftovers": list(raw.get("leftovers") or []),
        "changes": list(raw.get("changes") or []),
        # What of them reached the host (``isolate(keep=...)``, ``facets.keep``).
        "kept": [],
        "notes": list(raw.get("notes") or []),
        # What the test did to its result channel or to pytest's protocol (outcome.py
        # ``_faults``): each fails the test, whatever the policy.
        "faults": [str(f) for f in raw.get("faults") or ()],
    }
    for key in ("unavailable", "worker_error"):
        if key in raw:
            record[key] = raw[key]
    return record


def attach(rep: pytest.TestReport, record: dict[str, Any]) -> None:
    """Put the record on the report and its figures into junit ``user_properties``
    (junitxml reads them from the teardown report, the last one)."""
    rep.isolate = record  # type: ignore[attr-defined]
    props = [("isolate_tier", record["tier"])]
    for key in ("cpu_user", "cpu_sys", "peak_rss", "exit_code", "signal"):
        if record.get(key) is not None:
            props.append((f"isolate_{key}", record[key]))
    if record["crashed"]:
        props.append(("isolate_crashed", True))
    if record["timed_out"]:
        props.append(("isolate_timed_out", True))
    for e in record["escapes"]:
        props.append(("isolate_escape", f"{e.get('technique')}: {e.get('verdict')}"))
    for o in record["overuse"]:
        props.append(("isolate_overuse", o.get("message", o.get("budget"))))
    rep.user_properties = list(rep.user_properties) + props


def unpack(
    config: pytest.Config, item: pytest.Item, spec: IsolationSpec, done: dict[str, Any], unavailable: str
) -> tuple[list[pytest.TestReport], dict[str, Any]]:
    """The test's reports and record from the server's ``done`` message; what the
    sandbox recorded besides (warnings, junit attributes) replayed into this session."""
    hook = config.hook
    if "unavailable" in done:
        reason = f"{spec.tier}: {done['unavailable']}".replace(f"{spec.tier}: {spec.tier}: ", f"{spec.tier}: ")
        reports = synthetic(item, "skipped" if unavailable == "skip" else "failed", reason)
        return reports, new_record(item, spec, reports, {"unavailable": reason})
    if "error" in done:
        reports = synthetic(item, "failed", done["error"])
        return reports, new_record(item, spec, reports, {"worker_error": done["error"]})
    reports = []
    for d in done["reports"]:
        data = _tuples(extras.unpack(d))
        crash = extras.sent_crash(data)
        rep = _subtest_kwargs(hook.pytest_report_from_serializable(config=config, data=data), d)
        reports.append(extras.restore_text(rep, crash))
    for when in done.get("pdbshown") or ():
        # Its failure was shown in the sandbox's debugger: the summary leaves it out.
        for rep in reports:
            if rep.when == when:
                rep._pdbshown = True  # type: ignore[attr-defined]
    for w in done.get("warnings", ()):
        _replay_warning(config, w)
    _replay_xml(config, item.nodeid, done.get("xml", ()))
    return reports, new_record(item, spec, reports, done["record"])


def finish(
    config: pytest.Config, item: pytest.Item, spec: IsolationSpec, reports: list[pytest.TestReport],
    record: dict[str, Any], stopped: bool = False,
) -> list[pytest.TestReport]:
    """The reports to log: the policy's verdict applied, a closing teardown report for a
    test that died before its own, the record attached to the last. A test that stopped
    the session (``stopped``) logs only what it logged, as in-process: maybe nothing."""
    config.hook.pytest_isolate_result(config=config, item=item, record=record)
    apply_policy(config, item, spec, reports, record)
    record["outcome"] = outcome_of(reports)  # the policy may have failed it
    if not stopped:
        reports = closed(reports)
    if reports:
        attach(reports[-1], record)
    return reports


class IsolationWarning(pytest.PytestWarning):
    """An isolated test did something worth knowing that the policy does not fail."""


def _policy(config: pytest.Config, name: str) -> str:
    value = config.getoption(name, None) or config.getini(name) or "fail"
    return str(value)


def apply_policy(
    config: pytest.Config,
    item: pytest.Item,
    spec: IsolationSpec,
    reports: list[pytest.TestReport],
    record: dict[str, Any],
) -> None:
    """Fail or warn per ``--isolate-on-escape`` / ``--isolate-on-overuse``."""
    allowed = set(spec.allow)
    failures: list[str] = list(record.get("faults") or ())
    warnings: list[str] = []
    on_escape = _policy(config, "isolate_on_escape")
    for e in record["escapes"]:
        if e.get("technique") in allowed or on_escape == "ignore":
            e["allowed"] = e.get("technique") in allowed
            continue
        where = f" at {e['where']}" if e.get("where") else ""
        line = f"{spec.tier}: {e.get('verdict')} escape {e.get('technique')}{where}: {e.get('evidence')}"
        if e.get("verdict") == "escaped" and on_escape == "fail":
            failures.append(line)
        else:
            warnings.append(line)
    on_overuse = _policy(config, "isolate_on_overuse")
    for o in record["overuse"]:
        if o.get("budget") in allowed:
            continue
        line = f"{spec.tier}: {o.get('message')}"
        if o.get("kind") == "throttled":
            # A CPU share is a rate: held back to it, the test did nothing wrong and its
            # outcome stays its own. The record (summary, JSON, junit) still shows it.
            if on_overuse != "ignore":
                warnings.append(line)
        elif o.get("enforced"):
            failures.append(line)  # killed at a hard limit: the test failed anyway; say why
        elif on_overuse == "fail":
            failures.append(line)
        elif on_overuse == "warn":
            warnings.append(line)
    if failures:
        _fail(reports, failures)
    warn(config, item, warnings)


def warn(config: pytest.Config, item: pytest.Item, lines: list[str]) -> None:
    """Each line an ``IsolationWarning`` of ``item`` in pytest's warnings summary."""
    for w in lines:
        _record_warning(
            config,
            dict(warning_message=_warning(w, item), when="runtest", nodeid=item.nodeid, location=item.location),
        )


#: While a test's protocol runs (``held_warnings``): what it warned, recorded at its end.
_held: list[tuple[pytest.Config, dict[str, Any]]] | None = None


@contextlib.contextmanager
def held_warnings() -> Iterator[None]:
    """Record the warnings of one isolated test when its protocol ends, as pytest records
    the warnings a test raised in-process: after its reports and ``logfinish``, on every
    way out (pytest's ``catch_warnings_for_item``). Recorded as each came, plugins that
    log events in order (pytest-reportlog) had them before the test's reports."""
    global _held
    outer, _held = _held, []
    try:
        yield
    finally:
        held, _held = _held, outer
        for config, kwargs in held:
            config.hook.pytest_warning_recorded.call_historic(kwargs=kwargs)


def _record_warning(config: pytest.Config, kwargs: dict[str, Any]) -> None:
    if _held is not None:
        _held.append((config, kwargs))
    else:
        config.hook.pytest_warning_recorded.call_historic(kwargs=kwargs)


def _fail(reports: list[pytest.TestReport], lines: list[str]) -> None:
    """Fail the call phase (or explain an existing failure) with the policy lines first.

    A line the failure already holds is not added again: the fork server's failure for
    a test killed at its timeout says it in the overuse record's own words.
    """
    for rep in reports:
        if rep.when == "call":
            if rep.passed:
                rep.outcome = "failed"
                rep.longrepr = "\n".join(lines)
            elif rep.failed:
                _explain(rep, lines)
            return
    for rep in reports:
        if rep.failed:
            _explain(rep, lines)
            return


def _explain(rep: pytest.TestReport, lines: list[str]) -> None:
    """Put the lines the failure does not hold yet before it."""
    have = str(rep.longrepr)
    new = [line for line in lines if line not in have]
    if new:
        rep.longrepr = "\n".join([*new, have])


def _warning(text: str, item: pytest.Item) -> Any:
    import warnings

    path, lineno, _ = item.location
    return warnings.WarningMessage(IsolationWarning(text), IsolationWarning, str(path), (lineno or 0) + 1)


def stop_session(stop: Any) -> None:
    """A sandboxed test stopped its session (``pytest.exit``, pdb's "quit", Ctrl-C):
    stop this one the same way, after its reports, as pytest does in-process (the
    "!!! Exit: ... !!!" line, the exit code asked for)."""
    if not isinstance(stop, dict):
        return
    msg = stop.get("msg") if isinstance(stop.get("msg"), str) else ""
    if stop.get("kind") == "interrupt":
        raise KeyboardInterrupt(msg)
    code = stop.get("returncode")
    raise pytest.exit.Exception(msg, returncode=code if isinstance(code, int) and not isinstance(code, bool) else None)


def clean(done: dict[str, Any]) -> bool:
    """Nothing in this result can fail the test or stop the session (the policy fails
    only on escapes and overuse), so the next test may start before it is logged."""
    if "error" in done or "unavailable" in done or "stop" in done:
        return False
    record = done.get("record") or {}
    if record.get("escapes") or record.get("overuse") or record.get("faults"):
        return False
    return not any(rep.get("outcome") == "failed" for rep in done.get("reports") or ())


def _subtest_kwargs(rep: Any, data: dict[str, Any]) -> Any:
    """A subtest's parameters as the sandbox rendered them.

    pytest renders them with ``saferepr`` when it makes a subtest's context, and again
    when it rebuilds one from JSON: ``n=2`` would become ``n='2'`` on this side of the
    boundary (in the terminal, junit and every plugin that keys on the label). The
    sandbox's rendering is the in-process one."""
    ctx = getattr(rep, "context", None)
    raw = (data.get("_subtest.context") or {}).get("kwargs") if isinstance(data, dict) else None
    if ctx is not None and isinstance(raw, dict) and all(isinstance(v, str) for v in raw.values()):
        with contextlib.suppress(Exception):
            object.__setattr__(ctx, "kwargs", dict(raw))
    return rep


def _tuples(data: dict[str, Any]) -> dict[str, Any]:
    """Undo what JSON did to tuples pytest relies on (skip longrepr, location, properties)."""
    if isinstance(data.get("longrepr"), list):
        data["longrepr"] = tuple(data["longrepr"])
    if isinstance(data.get("location"), list):
        data["location"] = tuple(data["location"])
    if data.get("user_properties"):
        data["user_properties"] = [tuple(p) for p in data["user_properties"]]
    if data.get("sections"):
        data["sections"] = [tuple(p) for p in data["sections"]]
    return data


def terminal_text(done: dict[str, Any], reports: list[pytest.TestReport]) -> dict[int | None, str]:
    """The sandbox's terminal text keyed by the report it preceded (``None``: after the
    last one). Keyed by identity because the policy and ``_closed`` may add reports that
    the sandbox never wrote anything before."""
    texts = list(done.get("terminal") or ())
    if not texts:
        return {}
    out: dict[int | None, str] = {id(rep): text for rep, text in zip(reports, texts, strict=False) if text}
    if len(texts) > len(reports) and texts[len(reports)]:
        out[None] = texts[len(reports)]
    return out


def closed(reports: list[pytest.TestReport]) -> list[pytest.TestReport]:
    """End a test that died before its teardown (crash, timeout) with a passed teardown
    report, as pytest itself would have logged one after the failure.

    junitxml writes a testcase's ``<properties>`` and captured output only when it sees
    the teardown report; without one the ``isolate_*`` properties of exactly the tests
    that crashed or ran over a budget were lost. Like pytest's own teardown report it
    carries every section and user property of the test so far; a passed teardown adds
    nothing to the terminal, the counts or the JSON report's outcome.
    """
    if not reports or reports[-1].when == "teardown":
        return reports
    sections: list[tuple[str, str]] = []
    for rep in reports:
        sections += [s for s in rep.sections if s not in sections]
    props = max((list(rep.user_properties) for rep in reports), key=len)
    last = reports[-1]
    teardown = pytest.TestReport(
        nodeid=last.nodeid,
        location=last.location,
        keywords=dict(last.keywords),
        outcome="passed",
        longrepr=None,
        when="teardown",
        sections=sections,
        duration=0.0,
        start=last.stop,
        stop=last.stop,
        user_properties=props,
    )
    return [*reports, teardown]


def synthetic(item: pytest.Item, outcome: str, message: str) -> list[pytest.TestReport]:
    """Reports for a test that never ran in a sandbox (unavailable tier, dead worker)."""
    keywords = {k: 1 for k in item.keywords}
    if outcome == "skipped":
        path, lineno, _ = item.location
        longrepr: Any = (str(path), (lineno or 0) + 1, f"Skipped: {message}")
        when = "setup"
    else:
        longrepr = message
        when = "call"
    reps = []
    if when == "call":
        reps.append(pytest.TestReport(item.nodeid, item.location, keywords, "passed", None, "setup"))
    reps.append(pytest.TestReport(item.nodeid, item.location, keywords, outcome, longrepr, when))  # type: ignore[arg-type]
    reps.append(pytest.TestReport(item.nodeid, item.location, keywords, "passed", None, "teardown"))
    return reps


def _replay_xml(config: pytest.Config, nodeid: str, entries: Any) -> None:
    """Testcase attributes and suite properties a sandbox recorded, to this LogXML (in
    the order recorded, before the test's reports are logged, as in-process)."""
    if not entries:
        return
    from _pytest.junitxml import xml_key

    xml = config.stash.get(xml_key, None)
    if xml is None:
        return
    for e in entries:
        if e.get("kind") == "attribute":
            xml.node_reporter(nodeid).add_attribute(e["name"], e["value"])
        else:
            xml.add_global_property(e["name"], e["value"])


def _replay_warning(config: pytest.Config, w: dict[str, Any]) -> None:
    category: type[Warning] = UserWarning
    with contextlib.suppress(Exception):
        mod = __import__(w["category_module"], fromlist=[w["category"]])
        cat = getattr(mod, w["category"])
        if isinstance(cat, type) and issubclass(cat, Warning):
            category = cat
    try:
        message = category(w["message"])
    except Exception:  # noqa: BLE001 - odd constructors
        message = UserWarning(w["message"])
    wm = warnings.WarningMessage(message, category, w["filename"], w["lineno"])
    loc = tuple(w["location"]) if w.get("location") else None
    _record_warning(config, dict(warning_message=wm, when=w["when"], nodeid=w["nodeid"], location=loc))



class DeferredTeardowns:
    """Teardown errors of fixtures a sandbox tore down after its test for a later one
    (``child._teardown_rest``), each put where in-process pytest reports it: in the
    teardown report of the test after which it tears down their node (the last test of
    their class, module, package or session, or the last to run when the session
    stops). Before, the sandbox reported them with its own test: an error at every
    sandbox that had the fixture set up, one or more tests early, and with ``-x`` a run
    that stopped there instead of at the test in-process pytest stops at."""

    def __init__(self, config: pytest.Config) -> None:
        self.config = config
        #: node id -> the serialized teardown report of its latest sandbox's error
        self.pending: dict[str, dict[str, Any]] = {}

    def add(self, deferred: list[dict[str, Any]] | None) -> None:
        """The sandbox's errors, in its order; one without data: the sandbox tore that
        node down with its own test and reported what it had (``child._reparametrizes``),
        so what earlier sandboxes sent for it is settled."""
        for d in deferred or ():
            if not isinstance(d, dict) or not isinstance(d.get("node"), str):
                continue
            if isinstance(d.get("data"), dict):
                self.pending[d["node"]] = d["data"]
            elif d.get("data") is None:
                self.pending.pop(d["node"], None)

    def place(
        self, item: pytest.Item, nextitem: pytest.Item | None, rep: pytest.TestReport,
        reports: list[pytest.TestReport], record: dict[str, Any],
    ) -> None:
        """Into ``item``'s teardown report ``rep``, before it is logged: the errors of
        the nodes pytest tears down after ``item`` (all of them once the session is to
        stop, as ``runtestprotocol`` decides after the call). A report with an error of
        its own keeps it: its sandbox had the fixture set up and tore it down here."""
        if not self.pending:
            return
        session = item.session
        if session.shouldfail or session.shouldstop:
            nextitem = None
        staying = {n.nodeid for n in nextitem.listchain()} if nextitem is not None else set()
        found = [
            self.pending.pop(n.nodeid)
            for n in reversed(item.listchain())
            if n.nodeid not in staying and n.nodeid in self.pending
        ]
        if not found or not rep.passed:
            return
        hook = self.config.hook
        data = _tuples(extras.unpack(found[0]))
        crash = extras.sent_crash(data)
        theirs = extras.restore_text(hook.pytest_report_from_serializable(config=self.config, data=data), crash)
        rep.outcome = "failed"
        rep.longrepr = theirs.longrepr
        record["outcome"] = outcome_of(reports)

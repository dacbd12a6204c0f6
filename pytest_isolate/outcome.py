"""A finished sandbox turned into the fork server's answer for its test, in one place.

When a test's child is gone (or said it is done), the fork server holds what it sent
(frames), how it ended (wait status, rusage, a timeout), its stack file and what its
tier measured. Here that becomes the one ``done`` message the controller gets: the
reports the sandbox logged, a failed report for the phase a child died in (built here,
where the item is), what the test did to its result channel, the readings, escapes and
overuse of the run's record. Which frames a sandbox may send at all is said here too
(``_frame_ok``). The controller's side of the same message is ``answer.py``.
"""

from __future__ import annotations

import contextlib
import os
import signal
from typing import Any

import pytest

from pytest_isolate.child import CHANNEL_NOTE, pytest_writes
from pytest_isolate.facets import keep, rlimits
from pytest_isolate.observe import escapes, usage
from pytest_isolate.tiers.base import Box, rusage_dict

#: Tiers whose sandbox has a cgroup of its own (readings, memory and pids limits).
CGROUP_TIERS = ("zone", "uml")


def _not_escapes(config: pytest.Config, kept: tuple[str, ...], changes: list[str]) -> list[str]:
    """The overlay's change lines but those that are no escape: pytest's own cache (its
    values reach the controller's, ``session/pytest_cache.py``) and what the test's
    ``keep`` patterns brought back to the host on the user's word."""
    if not changes:
        return changes
    own = tuple(w.rstrip("*") if w.endswith("*") else w.rstrip("/") + "/" for w in pytest_writes(config))
    match = keep.matcher(kept) if kept else None
    prefixes = [keep.literal_prefix(p).rstrip("/") + "/" for p in kept]

    def ours(line: str) -> bool:
        path = line.partition(" ")[2].split(" (", 1)[0]
        if path.startswith(own) or path.rstrip("/") + "/" in own:
            return True
        if match is None:
            return False
        return match(path.rstrip("/")) or (path.endswith("/") and path.startswith(tuple(prefixes)))

    return [line for line in changes if line.startswith("... and") or not ours(line)]


def _signame(sig: int) -> str:
    try:
        return signal.Signals(sig).name
    except ValueError:
        return f"signal {sig}"


def _cgroup(box: Box) -> bool:
    """Whether the test's readings and limits come from a cgroup (zone, uml)."""
    return box.spec.tier in CGROUP_TIERS


def done_message(
    config: pytest.Config,
    item: pytest.Item,
    box: Box,
    msgs: list[dict[str, Any]],
    status: int,
    ru: Any,
    timed_out: bool,
    wall: float,
    stack_fd: int,
    captures: list[Any],
    leftovers: list[dict[str, Any]],
) -> dict[str, Any]:
    """The ``done`` message for ``item``'s finished run: its sandbox's frames
    (``msgs``), how its child ended (``status``, ``ru``: None when it was not waited
    for), the wall time, its stack file, pytest's capture files and what it left behind
    (``leftovers``)."""
    reports: list[dict[str, Any]] = []
    # terminal[i]: what the child's terminal writer wrote before reports[i]; one more
    # entry for what it wrote after the last.
    terminal: list[str] = []
    pending = ""
    for m in msgs:
        if m.get("t") == "term":
            pending += str(m.get("text") or "")
        elif m.get("t") == "report":
            reports.append(m["data"])
            terminal.append(pending)
            pending = ""
    warnings = [m for m in msgs if m.get("t") == "warning"]
    xml = [m for m in msgs if m.get("t") == "xml"]
    carry = [m for m in msgs if m.get("t") == "carry"]
    internal = [m["error"] for m in msgs if m.get("t") == "internal"]
    stop = next((m for m in msgs if m.get("t") == "stop"), None)
    faults = _faults(box, msgs, stack_fd)
    for m in msgs:
        if m.get("t") == "exit":  # an init between us and the runner told the truth
            status = m["status"]
            if m.get("rusage"):
                box.usage.update({k: v for k, v in m["rusage"].items() if k not in box.usage})
        elif m.get("t") in ("end", "item_done") and ru is None:
            box.usage.update({k: v for k, v in m["rusage"].items() if k not in box.usage})
        elif m.get("t") == "leftover":
            leftovers = leftovers + list(m.get("procs") or [])
    # A tier that ends what a test left by other means (uml: the test's cgroup) names it.
    seen = {p["pid"] for p in leftovers}
    leftovers = leftovers + [p for p in box.state.get("leftovers", []) if p["pid"] not in seen]
    ru_figures = rusage_dict(ru) or {k: box.usage[k] for k in ("cpu_user", "cpu_sys", "max_rss", "write_bytes") if k in box.usage}
    sampler = box.state.get("sampler")
    readings = usage.merge(
        ru_figures,
        box.usage if _cgroup(box) else None,
        sampler.result() if sampler is not None else None,
        wall,
    )
    readings.update({k: v for k, v in box.usage.items() if k not in readings})
    readings.setdefault("max_rss", ru_figures.get("max_rss"))
    if "disk_bytes" in readings:
        readings.setdefault("disk_used", readings["disk_bytes"])
    exit_info: dict[str, Any] = {}
    if os.WIFSIGNALED(status):
        exit_info = {"signal": os.WTERMSIG(status), "signame": _signame(os.WTERMSIG(status))}
    elif os.WIFEXITED(status):
        exit_info = {"exit_code": os.WEXITSTATUS(status)}
    finished = any(rep.get("when") == "teardown" for rep in reports)
    crash = None
    # A test that stopped the session (pytest.exit, Ctrl-C) logs what it logged before.
    if timed_out or (not finished and stop is None) or internal:
        killed_after = readings["wall"] if timed_out else None
        crash = _crash_report(
            config, item, box, reports, exit_info, killed_after, stack_fd, captures, internal, faults
        )
        reports.append(crash)
        terminal.append(pending)
        pending = ""
    terminal.append(pending)
    changes = _not_escapes(config, box.spec.keep, box.state.get("changes", []))
    escapes_found = escapes.verdicts(box.spec.tier, msgs, changes, leftovers, [])
    cg = _cgroup(box)
    enforced = rlimits.enforced(box.spec, cgroup_memory=cg, cgroup_pids=cg) | {"timeout"}
    if cg:
        enforced |= {"memory", "pids", "cpu", "io"}
    flags = {"timed_out": timed_out, "signal": exit_info.get("signame")}
    overuse = usage.check(box.spec, {**readings, **flags}, enforced)
    record = {
        "overuse": overuse,
        "escapes": escapes_found,
        "nodeid": item.nodeid,
        "tier": box.spec.tier,
        "exit": exit_info,
        "crashed": bool(crash) and not timed_out,
        "timed_out": timed_out,
        "usage": readings,
        "notes": box.notes,
        "events": box.events,
        "leftovers": leftovers,
        "changes": box.state.get("changes", []),
    }
    if faults:
        record["faults"] = faults
    done = {"t": "done", "nodeid": item.nodeid, "reports": reports, "warnings": warnings, "record": record}
    if stop is not None:
        done["stop"] = {k: stop.get(k) for k in ("kind", "msg", "returncode")}
    shown = [m["when"] for m in msgs if m.get("t") == "pdbshown"]
    if shown:
        done["pdbshown"] = shown
    if xml:
        done["xml"] = xml
    deferred = [{"node": m.get("node"), "data": m.get("data")} for m in msgs if m.get("t") == "deferred"]
    if deferred:
        done["deferred"] = deferred
    if carry:
        done["carry"] = carry
    if box.state.get("kept"):
        done["kept"] = box.state["kept"]
    if any(m.get("t") == "next_attempt" for m in msgs):
        done["next_attempt"] = True
    if any(terminal):
        done["terminal"] = terminal
    return done


def _faults(box: Box, msgs: list[dict[str, Any]], stack_fd: int) -> list[str]:
    """What the test did to its result channel (and to pytest's protocol), one line
    each: bytes that are not frames, a frame over the limit, the channel closed,
    a forked process that returned into pytest. Each fails the test (answer.py)."""
    tier = box.spec.tier
    fd = next((m["fd"] for m in msgs if m.get("t") == "channel"), box.state.get("channel_fd"))
    box.state["channel_fd"] = fd
    out = []
    reader = box.state.get("reader")
    line = reader.fault(fd) if reader is not None else None
    if line:
        out.append(f"{tier}: {line}")
        reader.garbage = reader.oversized = 0  # said: a kept child's next test starts clean
    # Said where the test cannot close it: the child's stack file (its channel is gone).
    for ln in _stack_text(stack_fd).splitlines():
        if ln.startswith(CHANNEL_NOTE):
            out.append(f"{tier}: {ln[len(CHANNEL_NOTE):].strip()}")
            box.state["channel_lost"] = True
            break
    for m in msgs:
        if m.get("t") == "stray":
            out.append(
                f"{tier}: a process the test forked (pid {m['pid']}) returned into pytest instead of "
                "exiting; it was ended before it could report as the test or run another"
            )
            break
    return out


def _crash_report(
    config: pytest.Config,
    item: pytest.Item,
    box: Box,
    reports: list[dict[str, Any]],
    exit_info: dict[str, Any],
    timed_out: float | None,
    stack_fd: int,
    captures: list[Any],
    internal: list[str],
    faults: list[str] = (),  # type: ignore[assignment]
) -> dict[str, Any]:
    """A failed report for the phase the child died in, built here where the item is.

    ``timed_out``: the wall time of a test killed at its timeout, said in the
    overuse record's words (the policy then does not say it twice). ``faults``: what
    the test did to its result channel; they say why its reports are missing better
    than an exit code (the runner's own 70 for a channel it lost, or 0 for a test
    whose last frames a bogus header swallowed), so they stand alone unless a
    signal or the timeout ended the test."""
    whens = [rep.get("when") for rep in reports]
    when = "teardown" if "call" in whens else ("call" if "setup" in whens else "setup")
    if when == "call" and any(rep.get("when") == "setup" and rep.get("outcome") != "passed" for rep in reports):
        when = "teardown"
    if timed_out is not None:
        head = usage.timeout_message(box.spec.timeout or 0.0, timed_out)
    elif box.state.get("spawner_killed"):
        head = "killed with SIGKILL: the test killed its parent process (the worker's spawner)"
    elif "signal" in exit_info:
        head = f"crashed with {exit_info['signame']} (signal {exit_info['signal']})"
    elif internal:
        head = "the isolated child failed before it could report"
    else:
        head = f"exited with code {exit_info.get('exit_code')} before the test finished"
    head = f"{box.spec.tier}: {head}"
    stack = _user_frames(_stack_text(stack_fd))
    parts = [head]
    if faults:
        ended_by = timed_out is not None or "signal" in exit_info
        parts = [*faults, head] if ended_by else list(faults)
        internal = [] if box.state.get("channel_lost") else internal
    if stack:
        parts.append(("Python stack when it timed out:\n" if timed_out is not None else "Python stack:\n") + stack)
    parts.extend(internal)
    sections = []
    for name, f in zip(("stdout", "stderr"), captures, strict=False):
        with contextlib.suppress(Exception):
            f.buffer.seek(0)
            text = f.buffer.read().decode(errors="replace")
            if text:
                sections.append((f"Captured {name} {when}", text))
    rep = pytest.TestReport(
        nodeid=item.nodeid,
        location=item.location,
        keywords={k: 1 for k in item.keywords},
        outcome="failed",
        longrepr="\n".join(parts),
        when=when,  # type: ignore[arg-type]
        sections=sections,
        duration=0.0,
        user_properties=list(item.user_properties),
    )
    return config.hook.pytest_report_to_serializable(config=config, report=rep)



#: Frame types a sandbox sends and the fields the server and controller rely on: a
#: frame of another shape is the test's doing and counts as bytes that are not frames.
_FIELDS: dict[str, dict[str, type | tuple[type, ...]]] = {
    "channel": {"fd": int, "pid": int},
    "report": {"data": dict},
    "term": {"text": str},
    "warning": {"message": str, "category": str, "category_module": str, "when": str, "nodeid": str},
    "xml": {"kind": str, "name": str, "value": str},
    "carry": {"name": str},
    "internal": {"error": str},
    "stop": {"kind": str, "msg": str},
    "pdbshown": {"when": str},
    "end": {"rusage": dict},
    "item_done": {"rusage": dict},
    "exit": {"status": int},
    "leftover": {"procs": list},
    "stray": {"pid": int},
}
_WHENS = ("setup", "call", "teardown")


def _frame_ok(m: Any) -> bool:
    """Whether a frame from a sandbox has the shape its type promises (``wire.Reader``)."""
    if not isinstance(m, dict) or not isinstance(m.get("t"), str):
        return False
    fields = _FIELDS.get(m["t"])
    if fields is None:
        return True  # audit frames and the like: their readers check what they use
    for key, kind in fields.items():
        value = m.get(key)
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            return False
    if m["t"] == "report":
        d = m["data"]
        # Any outcome word: plugins log their own (pytest-rerunfailures' "rerun").
        return d.get("when") in _WHENS and isinstance(d.get("outcome"), str) and isinstance(d.get("nodeid"), str)
    if m["t"] in ("end", "item_done", "exit"):
        ru = m.get("rusage") or {}
        return isinstance(ru, dict) and all(isinstance(v, int | float) for v in ru.values())
    if m["t"] == "stop":
        code = m.get("returncode")
        return m["kind"] in ("exit", "interrupt") and (code is None or (isinstance(code, int) and not isinstance(code, bool)))
    if m["t"] == "leftover":
        return all(isinstance(p, dict) and isinstance(p.get("pid"), int) for p in m["procs"])
    return True


def _stack_text(stack_fd: int) -> str:
    """The child's stack file (faulthandler's dumps, a lost channel's note)."""
    try:
        os.lseek(stack_fd, 0, os.SEEK_SET)
        return os.read(stack_fd, 1 << 20).decode(errors="replace")
    except OSError:
        return ""


_NOISE = ("/pluggy/", "/_pytest/", "/pytest_isolate/", '"<string>"', CHANNEL_NOTE)


def _user_frames(dump: str) -> str:
    """faulthandler's dump without pytest's, pluggy's and our own frames: the user wants
    to see where *their* code was."""
    lines = [ln for ln in dump.strip().splitlines() if not any(n in ln for n in _NOISE)]
    return "\n".join(lines).strip()

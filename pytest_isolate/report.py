"""Reporting: per-test records, the terminal sections, the JSON report, junit properties.

A record rides on the test's last report as the attribute ``isolate``. pytest's report
serialization keeps extra attributes, so records cross pytest-xdist's boundary with the
reports themselves and the xdist controller sees exactly what a single process sees.
"""

from __future__ import annotations

import datetime
import json
import os
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from pytest_isolate.spec import format_size

SCHEMA_VERSION = 1


class ReportPlugin:
    """Registered in the user's pytest (not in fork servers)."""

    def __init__(self, config: pytest.Config) -> None:
        self.config = config
        self.records: list[dict[str, Any]] = []

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        record = getattr(report, "isolate", None)
        if isinstance(record, dict):
            self.records.append(record)

    def pytest_terminal_summary(self, terminalreporter: Any) -> None:
        if not self.records or hasattr(self.config, "workerinput"):
            return
        tr = terminalreporter
        tr.write_sep("=", "isolation")  # after a newline, as pytest's own sections
        tiers = Counter(r["tier"] for r in self.records)
        crashed = [r for r in self.records if r["crashed"] and not r["timed_out"]]
        timed_out = [r for r in self.records if r["timed_out"]]
        unavailable = [r for r in self.records if r.get("unavailable")]
        tr.write_line(
            "tests per tier: " + ", ".join(f"{t} {n}" for t, n in sorted(tiers.items()))
            + f"; crashed {len(crashed)}; timed out {len(timed_out)}"
            + (f"; tier unavailable {len(unavailable)}" if unavailable else "")
        )
        kept = sum(len(r.get("kept") or ()) for r in self.records)
        if kept:
            # Sandboxes wrote to the user's tree: say so, never silently.
            tr.write_line(f"kept: {kept} change{'s' if kept != 1 else ''} copied back to your files (keep; the JSON report's \"kept\" lists them)")
        for r in crashed:
            how = r.get("signal") or (f"exit code {r['exit_code']}" if r.get("exit_code") is not None else "worker died")
            tr.write_line(f"CRASHED {r['nodeid']} [{r['tier']}]: {how}")
        for r in timed_out:
            tr.write_line(f"TIMEOUT {r['nodeid']} [{r['tier']}]: {_timeout_message(r)}")
        for reason in sorted({r["unavailable"] for r in unavailable}):
            tr.write_line(f"UNAVAILABLE {reason}")
        self._escape_section(tr)
        self._usage_section(tr)
        if self.config.getoption("isolate_advise", False):
            tr.section("isolation advice", sep="-")
            for line in advise(self.records):
                tr.write_line(line)

    def _escape_section(self, tr: Any) -> None:
        with_escapes = [r for r in self.records if r["escapes"]]
        if not with_escapes:
            return
        tr.section("isolation escapes", sep="-")
        for r in with_escapes:
            tr.write_line(f"{r['nodeid']} [{r['tier']}]")
            for e in r["escapes"]:
                where = f" at {e['where']}" if e.get("where") else ""
                allowed = " (allowed)" if e.get("allowed") else ""
                tr.write_line(
                    f"  {e.get('verdict', '?').upper():8} {e.get('technique')}{where}{allowed}: {e.get('evidence')}"
                )

    def _usage_section(self, tr: Any) -> None:
        # A timeout that killed its test is its TIMEOUT line above: not said twice.
        over = [
            (r, shown) for r in self.records if (shown := [o for o in r["overuse"] if not _is_kill(r, o)])
        ]
        if over:
            tr.section("resource usage", sep="-")
            tr.write_line(f"{len(over)} test(s) over budget:")
            for r, overuse in over:
                for o in overuse:
                    how = "enforced" if o.get("enforced") else "observed"
                    tr.write_line(f"  {r['nodeid']} [{r['tier']}] ({how}): {o.get('message')}")
        top = self.config.getoption("isolate_top", None)
        if top is None:
            top = int(self.config.getini("isolate_top") or 5)
        # Only what was measured above zero: a trivial test whose reading is 0 B (it
        # used nothing beyond what its fork inherited) tells nobody anything, and with
        # nothing measured there is no list, so no header either.
        measured = [r for r in self.records if _peak(r) > 0]
        if not top or not measured:
            return
        by_mem = sorted(measured, key=_peak, reverse=True)
        tr.write_line(f"top {min(top, len(measured))} by peak memory:")
        for r in by_mem[:top]:
            peak = _peak(r)
            cpu = (r.get("cpu_user") or 0) + (r.get("cpu_sys") or 0)
            tr.write_line(f"  {format_size(peak):>10}  cpu {cpu:6.2f}s  {r['nodeid']} [{r['tier']}]")

    @pytest.hookimpl(trylast=True)
    def pytest_sessionfinish(self) -> None:
        if hasattr(self.config, "workerinput"):
            return  # an xdist worker: its records travel to the controller on the reports
        self.config.hook.pytest_isolate_report(config=self.config, records=self.records)
        path = self.config.getoption("isolate_report", None) or self.config.getini("isolate_report")
        if path:
            write_json(Path(self.config.invocation_params.dir, path), self.records)


def advise(records: list[dict[str, Any]]) -> list[str]:
    """The weakest tier that would have contained what each test did.

    What a test *attempted* (every escape record, blocked or not) is checked against the
    measured table of which tier lets which technique through; budgets that were
    observed but not enforced ask for a tier with a cgroup.
    """
    from pytest_isolate.observe.escapes import TIER_ESCAPES
    from pytest_isolate.spec import LADDER

    lines = []
    for r in records:
        techniques = sorted({e["technique"] for e in r["escapes"] if e.get("technique")})
        need = LADDER.index("process")
        why: list[str] = []
        for t in techniques:
            leaks_at = TIER_ESCAPES.get(t, frozenset())
            ok = [i for i, tier in enumerate(LADDER) if tier not in leaks_at]
            if ok and ok[0] > need:
                need, why = ok[0], [t]
            elif ok and ok[0] == need and need > 0:
                why.append(t)
        soft = [o["budget"] for o in r["overuse"] if not o.get("enforced")]
        if soft and need < LADDER.index("zone"):
            need, why = LADDER.index("zone"), [f"{b} budget" for b in soft]
        tier = LADDER[need]
        kwargs = ""
        if "network" in techniques and tier in ("jail", "zone"):
            kwargs = ', network="ip"'
        because = f" ({', '.join(why)})" if why else ""
        lines.append(f"{r['nodeid']}: needs `{tier}`{because}  @pytest.mark.isolate(\"{tier}\"{kwargs})")
    return lines


def write_json(path: Path, records: list[dict[str, Any]]) -> None:
    """Write atomically so CI never uploads a half-written report."""
    doc = {
        "schema": SCHEMA_VERSION,
        "generator": "pytest-isolate-tiers",
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "summary": {
            "tests": len(records),
            "tiers": dict(Counter(r["tier"] for r in records)),
            "outcomes": dict(Counter(r["outcome"] for r in records)),
            "crashed": sum(1 for r in records if r["crashed"] and not r["timed_out"]),
            "timed_out": sum(1 for r in records if r["timed_out"]),
            "escapes": sum(len(r["escapes"]) for r in records),
            "overuse": sum(len(r["overuse"]) for r in records),
            "kept": sum(len(r.get("kept") or ()) for r in records),
        },
        "tests": records,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(doc, indent=2, default=str), encoding="utf-8")
    os.replace(tmp, path)


def _is_kill(record: dict[str, Any], overuse: dict[str, Any]) -> bool:
    """The overuse entry of a test killed at its timeout (told on its TIMEOUT line)."""
    return bool(record.get("timed_out")) and overuse.get("budget") == "timeout" and overuse.get("kind") == "reached"


def _timeout_message(record: dict[str, Any]) -> str:
    """How a timed-out test is told: its overuse record's message (how long it ran, that
    it was killed), as in its failure, JSON record and junit property."""
    for o in record["overuse"]:
        if _is_kill(record, o) and o.get("message"):
            return str(o["message"])
    limit = record["budgets"].get("timeout")
    return f"timeout {limit:g} s exceeded, killed" if isinstance(limit, (int, float)) else "killed at its timeout"


def _peak(record: dict[str, Any]) -> int:
    """The test's peak memory reading; rusage's max_rss only where there is none (a 0
    reading is a reading: a trivial test uses nothing beyond what its fork inherited)."""
    peak = record["usage"].get("peak_memory")
    return int(peak if peak is not None else record.get("peak_rss") or 0)

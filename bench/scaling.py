#!/usr/bin/env python3
"""Does a run's wall time grow linearly with its number of tests? (issue 12)

For each tier, wall(3,000 trivial tests) / wall(300 trivial tests), from two pytest runs
timed back to back. With a start-up cost S and a constant cost c per test, the ratio is
(S + 3000c) / (S + 300c), which is below 10 whatever S and c are; it passes 10 only
when a test costs more the more tests came before it (a list searched per test, a
descriptor table or a cgroup directory that fills up, a GC walking everything kept).
The limit is 10.5: linear, plus 5% for a noisy host.

Run it on its own or through the bench (``python bench/bench.py --scaling``); it uses
the bench's rows (same arguments, same interpreter, same ``-p`` plugins, same
``--isolate-on-escape=warn``), suites and runner, so its numbers compare with the
table's. Like the bench, it measures and prints: it exits 0 on a MISS.

Usage: ``python bench/scaling.py [--small 300] [--large 3000] [--repeat R] [--json PATH]``
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench  # noqa: E402 - bench/bench.py, the harness this script shares

#: Rows of bench.py timed at both sizes: plain pytest first (its ratio shows what pytest
#: alone does with more tests), then the host tiers.
ROWS = ("in-process", "process", "chroot", "jail", "zone")
SMALL, LARGE = 300, 3000
#: Linear is large/small (10 for 3,000/300); 5% on top for a shared host's noise.
SLACK = 1.05


@dataclass
class Scale:
    """One row's walls at both sizes."""

    cfg: bench.Config
    small: list[float] = field(default_factory=list)
    large: list[float] = field(default_factory=list)
    error: str | None = None

    def ratio(self) -> float | None:
        if self.error or not self.small or not self.large:
            return None
        return statistics.median(self.large) / statistics.median(self.small)


def measure(
    names: Sequence[str], small: int, large: int, repeat: int, timeout: float, log: Any
) -> dict[str, Scale]:
    """Each row at ``small`` then ``large`` tests, rows round-robin, ``repeat`` rounds.

    The two sizes of a row are timed back to back, so the host's drift over the minutes
    the large runs take hits both sides of the ratio alike.
    """
    by_name = {c.name: c for c in bench.CONFIGS}
    interp = bench.self_interp()
    rows = {n: Scale(by_name[n]) for n in names}
    if interp.error:
        for r in rows.values():
            r.error = f"interpreter: {interp.error}"
        return rows
    root, suites = bench.make_workspace((small, large))
    try:
        # Untimed warm-up: the suites' .pyc files and the page cache.
        for n in (small, large):
            bench.run_pytest(bench.command(by_name["in-process"], interp, suites[n]), root, interp.env, n, timeout)
        for rep in range(repeat):
            for r in rows.values():
                for n, walls in ((small, r.small), (large, r.large)):
                    if r.error:
                        break
                    run = bench.run_pytest(bench.command(r.cfg, interp, suites[n]), root, interp.env, n, timeout)
                    shown = f"{run.wall:.2f} s" if run.wall is not None else f"FAILED {run.error}"
                    print(f"scaling: [{rep + 1}/{repeat}] {r.cfg.name} {n} tests: {shown}", file=log, flush=True)
                    if run.wall is None:
                        r.error = f"{n} tests: {run.error}"
                    else:
                        walls.append(run.wall)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return rows


def render(rows: dict[str, Scale], small: int, large: int) -> str:
    limit = SLACK * large / small
    head = f"{'row':<12} {f'wall {small} s':>12} {f'wall {large} s':>13} {'ms/test':>8} {'ratio':>6}  target <= {limit:g}"
    lines = [head, "-" * len(head)]
    for r in rows.values():
        ratio = r.ratio()
        if ratio is None:
            lines.append(f"{r.cfg.name:<12} n/a ({r.error})")
            continue
        ws, wl = statistics.median(r.small), statistics.median(r.large)
        marginal = (wl - ws) * 1000.0 / (large - small)
        verdict = "PASS" if ratio <= limit else "MISS"
        lines.append(f"{r.cfg.name:<12} {ws:>12.2f} {wl:>13.2f} {marginal:>8.2f} {ratio:>6.2f}  {verdict}")
    lines.append(f"(ms/test: (wall {large} - wall {small}) / {large - small}, start-up excluded)")
    return "\n".join(lines)


def to_json(rows: dict[str, Scale], small: int, large: int, repeat: int) -> dict[str, Any]:
    limit = SLACK * large / small
    return {
        "meta": {
            "small": small,
            "large": large,
            "repeat": repeat,
            "limit": limit,
            "cpus": os.cpu_count(),
            "kernel": platform.release(),
            "python": platform.python_version(),
            "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        },
        "rows": [
            {
                "name": r.cfg.name,
                "walls_small_s": r.small,
                "walls_large_s": r.large,
                "ratio": r.ratio(),
                "verdict": None if r.ratio() is None else ("PASS" if r.ratio() <= limit else "MISS"),  # type: ignore[operator]
                "error": r.error,
            }
            for r in rows.values()
        ],
    }


def add_arguments(ap: argparse.ArgumentParser) -> None:
    """The options of this script (also used by ``bench.py --scaling``)."""
    ap.add_argument("--small", type=int, default=SMALL, help=f"tests in the small run (default {SMALL})")
    ap.add_argument("--large", type=int, default=LARGE, help=f"tests in the large run (default {LARGE})")


def run(small: int, large: int, repeat: int, timeout: float, only: Sequence[str], json_path: Path | None) -> int:
    """Measure, print, optionally write JSON; the exit code (0 unless the harness broke)."""
    names = [n for n in ROWS if not only or n in only or n == "in-process"]
    print(f"scaling: rows {', '.join(names)}; {small} and {large} tests, {repeat} round(s)", file=sys.stderr)
    rows = measure(names, small, large, repeat, timeout, sys.stderr)
    print(f"\npytest-isolate scaling: wall({large}) / wall({small}), median of {repeat}, {os.cpu_count()} CPUs")
    print(render(rows, small, large))
    if json_path:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(to_json(rows, small, large, repeat), indent=2) + "\n")
        print(f"\nwrote {json_path}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_arguments(ap)
    ap.add_argument("--repeat", type=int, default=1, help="rounds; the median wall is used (default 1)")
    ap.add_argument("--only", action="append", default=[], metavar="TIER", help=f"rows among {', '.join(ROWS)}")
    ap.add_argument("--timeout", type=float, default=1200.0, help="seconds per pytest run")
    ap.add_argument("--json", type=Path, metavar="PATH", help="also write the numbers here")
    opts = ap.parse_args(argv)
    if opts.small < 1 or opts.large <= opts.small or opts.repeat < 1:
        ap.error("need 1 <= --small < --large and --repeat >= 1")
    only = [n for chunk in opts.only for n in chunk.split(",") if n]
    bad = [n for n in only if n not in ROWS]
    if bad:
        ap.error(f"unknown row(s) {', '.join(bad)}; choose among {', '.join(ROWS)}")
    return run(opts.small, opts.large, opts.repeat, opts.timeout, only, opts.json)


if __name__ == "__main__":
    sys.exit(main())

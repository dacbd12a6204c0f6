#!/usr/bin/env python3
"""Per-test overhead of each isolation tier against in-process pytest and other plugins.

Every figure this project states about speed comes from one run of this script, because
the machines are noisy: a ratio is only meaningful when both of its sides were timed in
the same run, interleaved. So the in-process baselines, our tiers and the third-party
plugins are all rows of one table, timed round-robin (row 1..k, then again), and each
row's overhead is taken against an in-process row of the *same* interpreter and suite
size.

Each row is a separate ``pytest`` subprocess over a generated suite of trivial tests,
timed by wall clock from spawn to exit (``time.perf_counter``); the median of
``--repeat`` runs is reported. Start-up costs (imports, worker pools, fork servers) are
deliberately inside the wall time: a user pays them, and spread over N tests they are
part of the per-test overhead.

The bench measures and prints. It never fails on a missed target: it exits 0 unless the
harness itself breaks, so CI can run it for the numbers without gating on a noisy host.

Usage: ``python bench/bench.py [--tests N] [--repeat R] [--only ROW,...] [--json PATH]``
"""

from __future__ import annotations

import argparse
import fnmatch
import hashlib
import json
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
BASELINES_VENV = BENCH_DIR / ".venv-baselines"
BASELINES_REQ = BENCH_DIR / "requirements-baselines.txt"

#: Interpreters a row can run under. "self" is the one running this script, with this
#: checkout first on PYTHONPATH; "baselines" is the pytest-8 venv for plugins that fail
#: on pytest 9 (and PyPI's pytest-isolate shares our import name, so it must never be
#: importable next to ours).
SELF = "self"
BASELINES = "baselines"

#: Plugin modules rows load with ``-p``. Every run has PYTEST_DISABLE_PLUGIN_AUTOLOAD=1:
#: whatever else happens to be installed stays out of the timings (hypothesis' pytest
#: plugin alone adds 0.6 s to each start-up on this machine), in-process rows are plain
#: pytest, and a plugin's own import cost counts as its overhead. It also sidesteps a
#: double registration when our entry point is installed *and* loaded with -p.
OURS = "pytest_isolate.plugin"
XDIST = "xdist.plugin"
COV = "pytest_cov.plugin"
FORKED = "pytest_forked"
PYPI_ISOLATE = "pytest_isolate.plugin"  # same module name as ours, other venv

#: How the readings-off rows switch measurement off (plugin.py's option; one place).
READINGS_OFF = ("--isolate-readings=off",)
#: Arguments of every row that loads our plugin. The escape canaries watch host-wide
#: facilities (e.g. the host's mount table), so on a shared machine another user's mount
#: during a run is blamed on whichever test is running and fails it — a lost row, not a
#: slower one. Detection still runs (and costs the same); only the verdict's policy is
#: relaxed, which is all the timing needs.
OURS_ARGS = ("--isolate-on-escape=warn",)
#: Tiers whose measurement overhead (readings on - off, per test) the bench reports.
READINGS_TIERS = ("process", "jail", "zone")


@dataclass(frozen=True)
class Target:
    """A stated goal for a row; evaluated against rows of the same run.

    kind:
      ``overhead_ms``    row's overhead per test (vs its ``ref``) <= limit ms
      ``overhead_ratio`` row's overhead / ``against``'s overhead <= limit
      ``over_ms``        row's overhead - ``against``'s overhead <= limit ms (what a tier
                         adds to the fork floor, issue 13)
      ``saves_ms``       (wall(against) - wall(row)) / N <= limit ms — the cost of what
                         ``against`` has and this row switched off
      ``speedup``        wall(against) / wall(row) >= limit (limit None: print only)
    """

    kind: str
    limit: float | None
    against: str | None = None
    label: str = ""


@dataclass(frozen=True)
class Config:
    """One row of the table: how to run pytest, and what to compare it with."""

    name: str
    env: str
    args: tuple[str, ...] = ()
    ref: str | None = None  # in-process row (same env, same size) for overhead; None = is one
    plugins: tuple[str, ...] = ()  # modules loaded with -p (autoload is off)
    factor: int = 1  # suite size = factor * --tests
    targets: tuple[Target, ...] = ()
    default: bool = True  # run without --only


def _readings_off(tier: str) -> Config:
    """``tier`` with measurement switched off: wall(tier) - wall(this) is what readings cost."""
    return Config(
        f"{tier}-readings-off",
        SELF,
        (f"--isolate={tier}", *READINGS_OFF),
        ref="in-process",
        plugins=(OURS,),
        targets=(Target("saves_ms", 1.0, against=tier, label=f"readings cost ({tier} - this)"),),
    )


def _tier(tier: str, *targets: Target) -> Config:
    return Config(
        tier,
        SELF,
        (f"--isolate={tier}",),
        ref="in-process",
        plugins=(OURS,),
        targets=targets,
    )


def _over_floor(ms: float) -> Target:
    """Issue 13: what a namespace tier adds to a bare fork per test, in the same run."""
    return Target("over_ms", ms, against="fork-floor", label="over the fork floor")


# fmt: off
CONFIGS: tuple[Config, ...] = (
    Config("in-process", SELF),
    # The least a fresh child forked per test from a warm pytest costs (bench/fork_floor.py):
    # a tier's overhead minus this row's is what the tier adds to the bare fork.
    Config("fork-floor", SELF, ref="in-process", plugins=("bench.fork_floor",)),
    # Each readings-off row right after its tier's row: round-robin then times the two
    # back to back, so the host's drift hits both sides of the difference alike.
    # Targets of issue 13, each a ratio or a difference to rows of the same run.
    _tier("process", Target("overhead_ratio", 0.85, against="pytest-forked"),
          Target("over_ms", None, against="fork-floor", label="over the fork floor")),
    _readings_off("process"),
    _tier("chroot", _over_floor(2.5)),
    _tier("jail", _over_floor(3.5)),
    _readings_off("jail"),
    _tier("zone", _over_floor(4.5)),
    _readings_off("zone"),
    Config("in-process-2x", SELF, factor=2),
    Config("zone-n1-2x", SELF, ("--isolate=zone", "-n", "1"), ref="in-process-2x", plugins=(OURS, XDIST), factor=2),
    Config("zone-n2-2x", SELF, ("--isolate=zone", "-n", "2"), ref="in-process-2x", plugins=(OURS, XDIST), factor=2,
           targets=(Target("speedup", None, against="zone-n1-2x", label="-n 2 vs -n 1"),)),
    Config("uml", SELF, ("--isolate=uml",), ref="in-process", plugins=(OURS,), default=False),
    # What --cov costs an isolated test beyond what it costs in-process: each test's child
    # restarts the server's measurer and sends its lines back (session/coverage.py).
    Config("in-process-cov", SELF, ("--cov=.", "--cov-report="), plugins=(COV,), default=False),
    Config("process-cov", SELF, ("--isolate=process", "--cov=.", "--cov-report="), ref="in-process-cov",
           plugins=(OURS, COV), default=False,
           targets=(Target("over_ms", None, against="process", label="--cov's cost isolated"),)),
    Config("in-process-pytest8", BASELINES),
    Config("pytest-forked", BASELINES, ("--forked",), ref="in-process-pytest8", plugins=(FORKED,)),
    Config("pytest-isolate-pypi", BASELINES, ("--isolate",), ref="in-process-pytest8", plugins=(PYPI_ISOLATE,)),
)
# fmt: on


# ---------------------------------------------------------------------------- suite


def write_suite(root: Path, n: int, per_module: int = 50) -> Path:
    """A directory of ``n`` trivial tests; several modules so per-module work shows."""
    d = root / f"n{n}"
    d.mkdir()
    for m, start in enumerate(range(0, n, per_module)):
        body = "".join(
            f"def test_{i:05d}():\n    assert True\n\n\n"
            for i in range(start, min(start + per_module, n))
        )
        (d / f"test_n{n}_m{m:03d}.py").write_text(body)
    return d


def make_workspace(sizes: Iterable[int]) -> tuple[Path, dict[int, Path]]:
    # Not "pytest-isolate-*": the plugin's sweep owns that prefix under /tmp.
    root = Path(tempfile.mkdtemp(prefix="isolate-bench-"))
    # Our own ini stops rootdir discovery here, so the repo's pyproject (addopts) and any
    # conftest above /tmp never reach the timed runs.
    (root / "pytest.ini").write_text("[pytest]\n")
    return root, {n: write_suite(root, n) for n in sorted(set(sizes))}


# ------------------------------------------------------------------ interpreters


@dataclass
class Interp:
    """An interpreter rows run under, or why it is unavailable."""

    name: str
    python: str | None
    env: dict[str, str]
    error: str | None = None
    info: dict[str, Any] = field(default_factory=dict)


def _clean_env() -> dict[str, str]:
    env = dict(os.environ)
    for k in (
        "PYTEST_ADDOPTS",
        "PYTEST_PLUGINS",
        "PYTHONPATH",
        "PYTHONSTARTUP",
        "VIRTUAL_ENV",
        "PYTHONHOME",
    ):
        env.pop(k, None)
    env["PYTEST_DISABLE_PLUGIN_AUTOLOAD"] = "1"
    env["PY_COLORS"] = "0"
    return env


def _probe(python: str, env: dict[str, str], code: str) -> str:
    p = subprocess.run([python, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    if p.returncode:
        raise RuntimeError(first_error_line(p.stderr + p.stdout))
    return p.stdout.strip()


def self_interp() -> Interp:
    """This interpreter with this checkout first on sys.path.

    Why not a second venv with ``pip install -e .``: PYTHONPATH needs no network and no
    build step, and it wins over any installed copy (a ``.pth`` entry or setuptools'
    editable finder both come after it), so the code benchmarked is always this
    checkout's, installed or not.
    """
    env = _clean_env()
    env["PYTHONPATH"] = str(REPO)
    code = (
        "import importlib.util as u, json, pytest;"
        f"s = u.find_spec({OURS.split('.')[0]!r});"
        "print(json.dumps({'pytest': pytest.__version__,"
        " 'package': s.submodule_search_locations[0] if s else None}))"
    )
    interp = Interp(SELF, sys.executable, env)
    try:
        interp.info = json.loads(_probe(sys.executable, env, code))
    except (RuntimeError, ValueError, subprocess.SubprocessError) as e:
        interp.error = f"probe failed: {e}"
    return interp


def baselines_interp(rebuild: bool, log: Any) -> Interp:
    """The pytest-8 venv, (re)built when missing or when the requirements changed."""
    env = _clean_env()
    python = BASELINES_VENV / "bin" / "python"
    stamp = BASELINES_VENV / ".requirements.sha256"
    digest = hashlib.sha256(BASELINES_REQ.read_bytes()).hexdigest()
    interp = Interp(BASELINES, str(python), env)
    fresh = python.exists() and stamp.exists() and stamp.read_text().strip() == digest
    if rebuild or not fresh:
        print(
            f"bench: building {BASELINES_VENV.relative_to(REPO)} from {BASELINES_REQ.name} ...",
            file=log,
            flush=True,
        )
        if BASELINES_VENV.exists():
            shutil.rmtree(BASELINES_VENV)
        steps = (
            [sys.executable, "-m", "venv", str(BASELINES_VENV)],
            [
                str(python),
                "-m",
                "pip",
                "install",
                "--disable-pip-version-check",
                "-q",
                "-r",
                str(BASELINES_REQ),
            ],
        )
        for cmd in steps:
            try:
                p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
            except subprocess.TimeoutExpired:
                interp.error = f"venv build timed out: {' '.join(cmd[:4])}"
                return interp
            if p.returncode:
                interp.error = f"venv build failed: {first_error_line(p.stderr + p.stdout)}"
                return interp
        stamp.write_text(digest + "\n")
        # Ignores itself, as venvs made by Python 3.13+ do, so no checkout can commit it.
        (BASELINES_VENV / ".gitignore").write_text("*\n")
    try:
        interp.info = {
            "pytest": _probe(str(python), env, "import pytest; print(pytest.__version__)")
        }
    except (RuntimeError, subprocess.SubprocessError) as e:
        interp.error = f"probe failed: {e}"
    return interp


# ---------------------------------------------------------------------------- runs


_ERROR_PATTERNS = (
    re.compile(r"^\S*: error: .+"),  # argparse usage errors ("pytest: error: unrecognized ...")
    re.compile(r"^(?:INTERNALERROR>\s*)?(?:E\s+)?[\w.]*(?:Error|Exception|Exit)\b:? .*"),
    re.compile(r"^E\s+\S.*"),
    re.compile(r"^(?:ERROR|FAILED)\b.*"),
)


def first_error_line(text: str, width: int = 160) -> str:
    """The line of pytest/Python output that best says why a run failed.

    The literal first line is usually useless ("ERROR: usage: ..." or "Traceback ..."),
    so look for the argparse message, then an exception line, then pytest's "E" lines.
    """
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    for pat in _ERROR_PATTERNS:
        for ln in lines:
            if pat.match(ln) and not ln.startswith("INTERNALERROR> Traceback"):
                return ln[:width]
    return (lines[-1] if lines else "no output")[:width]


_PASSED_RE = re.compile(r"\b(\d+) passed\b")


@dataclass
class Run:
    wall: float | None
    error: str | None = None


def run_pytest(
    cmd: Sequence[str], cwd: Path, env: dict[str, str], expect: int, timeout: float
) -> Run:
    """One timed pytest run; a run is only valid if all ``expect`` tests passed."""
    t0 = time.perf_counter()
    # Own session so a hung run can be stopped as a group (its workers and sandboxes too).
    proc = subprocess.Popen(
        cmd,
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        out, err = _stop(proc)
        return Run(None, f"timed out after {timeout:g} s; {first_error_line(err + out)}")
    wall = time.perf_counter() - t0
    text = err + "\n" + out
    if proc.returncode != 0:
        return Run(None, f"exit {proc.returncode}: {first_error_line(text)}")
    m = _PASSED_RE.findall(out)
    if not m or int(m[-1]) != expect:
        return Run(
            None, f"expected {expect} passed, got {m[-1] if m else 0}: {first_error_line(out)}"
        )
    return Run(wall)


def _stop(proc: subprocess.Popen[str]) -> tuple[str, str]:
    """SIGTERM first so pytest's session-end clean-up (the plugin's sweep) can run."""
    for sig, grace in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 10.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass
        try:
            return proc.communicate(timeout=grace)
        except subprocess.TimeoutExpired:
            continue
    return "", ""


def command(cfg: Config, interp: Interp, suite: Path) -> list[str]:
    assert interp.python
    plugins = [a for mod in cfg.plugins for a in ("-p", mod)]
    ours = OURS_ARGS if OURS in cfg.plugins and cfg.env == SELF else ()
    return [interp.python, "-m", "pytest", "-q", *plugins, *ours, *cfg.args, suite.name]


# ---------------------------------------------------------------------------- table


@dataclass
class Row:
    cfg: Config
    tests: int
    walls: list[float] = field(default_factory=list)
    error: str | None = None

    @property
    def wall(self) -> float | None:
        return statistics.median(self.walls) if self.walls and not self.error else None


def select(names: Sequence[str] | None) -> list[Config]:
    """The rows asked for, plus every row their numbers depend on, in table order."""
    by_name = {c.name: c for c in CONFIGS}
    if not names:
        wanted = {c.name for c in CONFIGS if c.default}
    else:
        wanted = set()
        for pat in names:
            hits = [c.name for c in CONFIGS if fnmatch.fnmatchcase(c.name, pat)]
            if not hits:
                raise SystemExit(f"bench: no row matches {pat!r} (see --list)")
            wanted.update(hits)
    todo = list(wanted)
    while todo:
        c = by_name[todo.pop()]
        for dep in [c.ref, *(t.against for t in c.targets)]:
            if dep and dep not in wanted:
                wanted.add(dep)
                todo.append(dep)
    return [c for c in CONFIGS if c.name in wanted]


def evaluate(t: Target, row: Row, rows: dict[str, Row]) -> dict[str, Any]:
    """One target's measured value and verdict (PASS/MISS/INFO/n/a)."""
    other = rows.get(t.against) if t.against else None
    out: dict[str, Any] = {
        "kind": t.kind,
        "limit": t.limit,
        "against": t.against,
        "value": None,
        "verdict": "n/a",
    }
    if t.kind == "overhead_ms":
        out["text"] = f"overhead <= {t.limit:g} ms/test"
        out["value"] = overhead_ms(row, rows)
    elif t.kind == "overhead_ratio":
        out["text"] = f"overhead <= {t.limit:g}x {t.against}'s"
        mine = overhead_ms(row, rows)
        theirs = overhead_ms(other, rows) if other else None
        if mine is not None and theirs:
            out["value"] = mine / theirs
            out["against_value"] = theirs
    elif t.kind == "over_ms":
        bound = f" <= {t.limit:g} ms/test" if t.limit is not None else " (ms/test)"
        out["text"] = f"overhead - {t.against}'s{bound}"
        mine = overhead_ms(row, rows)
        theirs = overhead_ms(other, rows) if other else None
        if mine is not None and theirs is not None:
            out["value"] = mine - theirs
            out["against_value"] = theirs
    elif t.kind == "saves_ms":
        out["text"] = f"{t.label or 'difference'} <= {t.limit:g} ms/test"
        if row.wall is not None and other and other.wall is not None:
            out["value"] = (other.wall - row.wall) * 1000.0 / row.tests
    elif t.kind == "speedup":
        bound = f" >= {t.limit:g}x" if t.limit is not None else ""
        out["text"] = f"speedup {t.label or 'vs ' + str(t.against)}{bound}"
        if row.wall and other and other.wall is not None:
            out["value"] = other.wall / row.wall
    else:
        raise ValueError(f"unknown target kind {t.kind!r}")
    v = out["value"]
    if v is not None:
        if t.limit is None:
            out["verdict"] = "INFO"
        elif t.kind == "speedup":
            out["verdict"] = "PASS" if v >= t.limit else "MISS"
        else:
            out["verdict"] = "PASS" if v <= t.limit else "MISS"
    return out


def overhead_ms(row: Row, rows: dict[str, Row]) -> float | None:
    ref = rows.get(row.cfg.ref) if row.cfg.ref else None
    if row.wall is None or ref is None or ref.wall is None:
        return None
    return (row.wall - ref.wall) * 1000.0 / row.tests


def render(rows: dict[str, Row]) -> str:
    head = (
        f"{'row':<21} {'env':<9} {'tests':>5} {'wall s':>8} {'ovh ms/test':>11} {'x ref':>6}  ref"
    )
    lines = [head, "-" * len(head)]
    for row in rows.values():
        c = row.cfg
        env = c.env
        if row.wall is None:
            lines.append(f"{c.name:<21} {env:<9} {row.tests:>5} n/a ({row.error})")
        else:
            ref = rows.get(c.ref) if c.ref else None
            ovh = overhead_ms(row, rows)
            ratio = row.wall / ref.wall if ref and ref.wall else None
            lines.append(
                f"{c.name:<21} {env:<9} {row.tests:>5} {row.wall:>8.3f} "
                f"{_fmt(ovh, '.2f'):>11} {_fmt(ratio, '.2f'):>6}  {c.ref or '-'}"
            )
        for t in c.targets:
            r = evaluate(t, row, rows)
            unit = "x" if t.kind in ("overhead_ratio", "speedup") else " ms"
            val = f"{r['value']:.2f}{unit} -> {r['verdict']}" if r["value"] is not None else "n/a"
            extra = (
                f" (its overhead {r['against_value']:.2f} ms/test)" if "against_value" in r else ""
            )
            lines.append(f"{'':<21}   target: {r['text']}{extra}: {val}")
    return "\n".join(lines)


def issue6(rows: dict[str, Row]) -> dict[str, Any]:
    """The figures issue 6 asks for, from rows of this run (absent rows give None).

    ``readings_ms``: per tier, (wall with readings - wall without) / tests; ``xdist``:
    wall of the 2N-test zone suite at ``-n 1`` and ``-n 2``.
    """
    readings: dict[str, Any] = {}
    for tier in READINGS_TIERS:
        on, off = rows.get(tier), rows.get(f"{tier}-readings-off")
        if on is None or off is None:
            continue
        cost = (on.wall - off.wall) * 1000.0 / on.tests if on.wall and off.wall else None
        # Paired: round i of "on" minus round i of "off" (timed back to back), per test.
        pairs = (
            [(a - b) * 1000.0 / on.tests for a, b in zip(on.walls, off.walls, strict=True)]
            if cost is not None and len(on.walls) == len(off.walls)
            else []
        )
        readings[tier] = {
            "on_s": on.wall,
            "off_s": off.wall,
            "tests": on.tests,
            "cost_ms": cost,
            "paired_ms": pairs,
            "paired_median_ms": statistics.median(pairs) if pairs else None,
        }
    n1, n2 = rows.get("zone-n1-2x"), rows.get("zone-n2-2x")
    xdist = None
    if n1 is not None or n2 is not None:
        w1 = n1.wall if n1 else None
        w2 = n2.wall if n2 else None
        xdist = {
            "tests": (n1 or n2).tests,  # type: ignore[union-attr]
            "n1_s": w1,
            "n2_s": w2,
            "speedup": w1 / w2 if w1 and w2 else None,
        }
    return {"readings_ms": readings, "xdist": xdist}


def render_issue6(fig: dict[str, Any]) -> str:
    lines = ["issue 6 figures (rows of this run):"]
    if fig["readings_ms"]:
        lines.append("  measurement overhead per test, readings on - off (target <= 1 ms):")
        for tier, r in fig["readings_ms"].items():
            if r["cost_ms"] is None:
                lines.append(f"    {tier:<8} n/a (a row failed)")
                continue
            verdict = "PASS" if r["cost_ms"] <= 1.0 else "MISS"
            pairs = r["paired_ms"]
            spread = (
                f"; paired rounds median {r['paired_median_ms']:+.2f}, range "
                f"{min(pairs):+.2f} .. {max(pairs):+.2f}"
                if pairs
                else ""
            )
            lines.append(
                f"    {tier:<8} {r['cost_ms']:+6.2f} ms  (on {r['on_s']:.3f} s, off {r['off_s']:.3f} s, "
                f"{r['tests']} tests{spread}) -> {verdict}"
            )
        lines.append(
            "    (a range wider than the target means this host was too noisy to resolve it: "
            "raise --repeat)"
        )
    x = fig["xdist"]
    if x:
        lines.append(
            f"  {x['tests']}-test zone suite wall time: -n 1 {_fmt(x['n1_s'], '.2f')} s, "
            f"-n 2 {_fmt(x['n2_s'], '.2f')} s (speedup {_fmt(x['speedup'], '.2f')}x)"
        )
    return "\n".join(lines)


def direct_readings_cost(rounds: int = 200) -> dict[str, Any]:
    """The readings' own work, timed in this process (median of ``rounds``, in µs).

    Why next to the on - off rows: on a shared 2-core host one run of 200 trivial tests
    varies by several ms per test, so the rows cannot resolve a 1 ms target, and in a
    zone ``--isolate-readings=off`` leaves the cgroup's figures on (they come with the
    cgroup the zone needs anyway), so zone - zone-readings-off is noise by construction.
    What a test pays is: one ``TreeSampler.sample`` per process per sampling period of
    its run time (process/chroot/jail; none for a test shorter than one period), one
    cgroup ``read`` (zone), and ``merge`` + ``check`` (every tier).
    """
    sys.path.insert(0, str(REPO))
    try:
        import resource

        from pytest_isolate.forkserver import SAMPLE_INTERVAL
        from pytest_isolate.observe import usage
        from pytest_isolate.spec import IsolationSpec
        from pytest_isolate.tiers.base import rusage_dict
    except ImportError as e:
        return {"error": f"cannot import the plugin: {e}"}
    finally:
        sys.path.remove(str(REPO))

    def median_us(fn: Any, n: int = rounds) -> float:
        ts = []
        for _ in range(n):
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
        return statistics.median(ts) * 1e6

    out: dict[str, Any] = {"sample_interval_s": SAMPLE_INTERVAL}
    # A process of pytest's size (40 MiB touched) to sample.
    child = subprocess.Popen(
        [sys.executable, "-c", "import sys; b = b'x' * (40 << 20); print(flush=True); sys.stdin.read()"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    try:
        assert child.stdout is not None
        child.stdout.readline()
        sampler = usage.TreeSampler(None)
        out["sample_us"] = median_us(lambda: sampler.sample(child.pid))
        ru = rusage_dict(resource.getrusage(resource.RUSAGE_SELF))
        spec = IsolationSpec(tier="process", memory=1 << 30, pids=64)
        out["merge_check_us"] = median_us(
            lambda: usage.check(spec, usage.merge(ru, None, sampler.result(), 0.01), {"memory"})
        )
        try:
            from pytest_isolate.facets import cgroup_host, cgroup_sweep, cgroups

            run_id = f"bench{os.getpid()}"
            cg = cgroups.TestCgroup(cgroup_host.detect(), run_id, "readings", cgroup_host.Limits())
            try:
                cg.attach(child.pid)
                out["cgroup_read_us"] = median_us(cg.read)
            finally:
                child.kill()
                child.wait()
                cg.remove()
                cgroup_sweep.sweep(run_id)
        except Exception as e:  # noqa: BLE001 - a host without cgroups: say so, go on
            out["cgroup_error"] = f"{type(e).__name__}: {e}"
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    return out


def render_direct(d: dict[str, Any]) -> str:
    if "error" in d:
        return f"  readings' own work, timed directly: n/a ({d['error']})"
    per = d["sample_interval_s"] * 1000.0
    lines = [
        "  readings' own work, timed directly (median, this process):",
        f"    /proc sample of one 40 MiB process: {d['sample_us']:.1f} us, once per {per:.0f} ms of a "
        f"test's run time per process (process, chroot, jail; a shorter test takes none)",
        f"    merge + check (every tier):          {d['merge_check_us']:.1f} us per test",
    ]
    if "cgroup_read_us" in d:
        lines.append(f"    cgroup read (zone):                  {d['cgroup_read_us']:.1f} us per test")
    else:
        lines.append(f"    cgroup read (zone): n/a ({d.get('cgroup_error')})")
    return "\n".join(lines)


def _fmt(v: float | None, spec: str) -> str:
    return "-" if v is None else format(v, spec)


# ---------------------------------------------------------------------------- main


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tests", type=int, default=200, help="trivial tests per suite (default 200)")
    ap.add_argument("--repeat", type=int, default=3, help="timed runs per row; median (default 3)")
    ap.add_argument(
        "--only",
        action="append",
        metavar="ROW[,ROW]",
        help="rows to run (names or globs; dependencies are added)",
    )
    ap.add_argument("--json", type=Path, metavar="PATH", help="also write the numbers here")
    ap.add_argument(
        "--timeout", type=float, help="seconds per pytest run (default 300; 1200 with --scaling)"
    )
    ap.add_argument(
        "--scaling",
        action="store_true",
        help="instead of the table: wall(3,000 tests) / wall(300 tests) per tier (bench/scaling.py)",
    )
    ap.add_argument(
        "--rebuild-baselines",
        action="store_true",
        help=f"recreate {BASELINES_VENV.relative_to(REPO)}",
    )
    ap.add_argument("--list", action="store_true", help="list the rows and exit")
    opts = ap.parse_args(argv)
    if opts.tests < 1 or opts.repeat < 1:
        ap.error("--tests and --repeat must be >= 1")
    if opts.scaling:
        # Issue 12's linearity check: the same rows at 300 and 3,000 tests. Its own
        # script, because its runs take minutes where the table's take seconds.
        import scaling

        only = [n for chunk in opts.only or () for n in chunk.split(",") if n]
        timeout = opts.timeout if opts.timeout is not None else 1200.0
        return scaling.run(scaling.SMALL, scaling.LARGE, opts.repeat, timeout, only, opts.json)
    if opts.timeout is None:
        opts.timeout = 300.0

    if opts.list:
        interps_for_list = {SELF: Interp(SELF, "python", {}), BASELINES: Interp(BASELINES, "python", {})}
        for c in CONFIGS:
            flag = "" if c.default else "  (only with --only)"
            print(
                f"{c.name:<21} {c.env:<9} {' '.join(command(c, interps_for_list[c.env], Path('SUITE'))[3:-1])}{flag}"
            )
        return 0

    only = [n for chunk in opts.only or () for n in chunk.split(",") if n]
    configs = select(only)
    log = sys.stderr
    interps: dict[str, Interp] = {SELF: self_interp()}
    if any(c.env == BASELINES for c in configs):
        interps[BASELINES] = baselines_interp(opts.rebuild_baselines, log)

    rows = {c.name: Row(c, c.factor * opts.tests) for c in configs}
    for row in rows.values():
        interp = interps[row.cfg.env]
        if interp.error:
            row.error = f"{interp.name} interpreter: {interp.error}"

    root, suites = make_workspace(r.tests for r in rows.values())
    if BASELINES in interps:
        # PyPI's pytest-isolate leaves pytest_isolate_resources_<pid>.json(.lock) in
        # TMPDIR after every run: give it one inside the workspace, removed with it.
        (root / "tmp").mkdir()
        interps[BASELINES].env["TMPDIR"] = str(root / "tmp")
    # This checkout's modules as an installed plugin has them: compiled. pip compiles a
    # package when it installs it; a checkout on PYTHONPATH is compiled at first import
    # only if bytecode may be written, and under PYTHONDONTWRITEBYTECODE (set in many CI
    # images) every pytest process of our rows compiled ~20 modules from source: ~45 ms
    # per process, twice per run (controller and fork server), that no user pays.
    import compileall

    for pkg in (REPO / "pytest_isolate", BENCH_DIR):
        compileall.compile_dir(str(pkg), quiet=1, workers=1)
    try:
        # Untimed warm-up of each reference row: writes the suites' rewritten .pyc (per
        # pytest version) and warms the page cache, so run 1 is not an outlier.
        for row in rows.values():
            if row.cfg.ref is None and not row.error:
                interp = interps[row.cfg.env]
                run_pytest(
                    command(row.cfg, interp, suites[row.tests]),
                    root,
                    interp.env,
                    row.tests,
                    opts.timeout,
                )
        # Round-robin, so drift on a noisy host spreads over all rows alike.
        for rep in range(opts.repeat):
            for row in rows.values():
                if row.error:
                    continue
                interp = interps[row.cfg.env]
                r = run_pytest(
                    command(row.cfg, interp, suites[row.tests]),
                    root,
                    interp.env,
                    row.tests,
                    opts.timeout,
                )
                shown = f"{r.wall:.3f} s" if r.wall is not None else f"FAILED {r.error}"
                print(
                    f"bench: [{rep + 1}/{opts.repeat}] {row.cfg.name}: {shown}",
                    file=log,
                    flush=True,
                )
                if r.wall is None:
                    row.error = r.error  # a broken row stays broken; don't burn time on it
                else:
                    row.walls.append(r.wall)
    finally:
        shutil.rmtree(root, ignore_errors=True)

    meta = {
        "tests": opts.tests,
        "repeat": opts.repeat,
        "host": platform.node(),
        "kernel": platform.release(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "interpreters": {
            k: {"python": v.python, "error": v.error, **v.info} for k, v in interps.items()
        },
    }
    s = interps[SELF].info
    print(
        f"\npytest-isolate bench: {opts.tests} trivial tests, median of {opts.repeat}, "
        f"{os.cpu_count()} CPUs, kernel {platform.release()}"
    )
    print(
        f"self: Python {platform.python_version()}, pytest {s.get('pytest', '?')}, plugin from "
        f"{s.get('package') or 'nowhere (not importable)'}"
    )
    if BASELINES in interps:
        b = interps[BASELINES]
        status = f"unavailable: {b.error}" if b.error else f"pytest {b.info.get('pytest', '?')}"
        print(f"baselines: {BASELINES_VENV.relative_to(REPO)}, {status}")
    print("overhead = (wall - ref wall) / tests; x ref = wall / ref wall\n")
    print(render(rows))
    fig = issue6(rows)
    if fig["readings_ms"] or fig["xdist"]:
        if fig["readings_ms"]:
            fig["direct"] = direct_readings_cost()
        print()
        print(render_issue6(fig))
        if "direct" in fig:
            print(render_direct(fig["direct"]))

    if opts.json:
        data = {
            "meta": meta,
            "rows": [
                {
                    "name": r.cfg.name,
                    "env": r.cfg.env,
                    "plugins": list(r.cfg.plugins),
                    "args": list(r.cfg.args),
                    "tests": r.tests,
                    "ref": r.cfg.ref,
                    "walls_s": r.walls,
                    "wall_s": r.wall,
                    "overhead_ms_per_test": overhead_ms(r, rows),
                    "ratio_vs_ref": (
                        r.wall / rows[r.cfg.ref].wall
                        if r.wall and r.cfg.ref and rows[r.cfg.ref].wall
                        else None
                    ),
                    "error": r.error,
                    "targets": [evaluate(t, r, rows) for t in r.cfg.targets],
                }
                for r in rows.values()
            ],
            "issue6": fig,
        }
        opts.json.parent.mkdir(parents=True, exist_ok=True)
        opts.json.write_text(json.dumps(data, indent=2) + "\n")
        print(f"\nwrote {opts.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Fidelity harness: do real projects' test suites behave isolated as they do in-process?

The promise of pytest-isolate is that a test behaves as it does in-process, only
contained (issue 11). This repo's own tests cannot show that for configurations and
plugins nobody here thought of, so this script takes the suites of popular PyPI
projects as they ship in their sdists and runs each one as its own config says:

1. ``pip download --no-binary :all: --no-deps name==version`` (pinned in
   ``fidelity_projects.py``, so the table is reproducible; everything comes through
   pip and nothing else),
2. a throwaway venv per project under ``--workdir`` with the project, its test
   dependencies and a wheel of this repo's working tree (built once, from a copy, so
   edits other people make to the tree while the harness runs do not mix into a run),
3. ``python -m pytest`` in-process (no ``--isolate``: what a user gets with the plugin
   installed) and once per tier with ``--isolate=TIER``, each run in a fresh copy of the
   extracted sdist (``fresh_tree``) and a network namespace of its own (``offline``),
4. per-test outcomes from a tiny ``-p`` plugin the harness writes into the venv: the
   comparison is by nodeid, not by counts, because equal counts can hide swapped
   outcomes.

It prints one table (outcome counts, tests whose outcome differs from in-process, time
ratio to in-process) and below it each differing nodeid with both outcomes and the
first line of the isolated failure. ``--json`` writes all raw data.

It needs the package index, so it is not part of the test command.

    python bench/fidelity.py                               # all projects, process,jail,zone
    python bench/fidelity.py --projects iniconfig --tiers process
    python bench/fidelity.py --json bench/out/fidelity.json --keep --workdir /var/lib/isolate-fidelity/fid
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
from collections import Counter
from pathlib import Path
from typing import Any

from fidelity_projects import PROJECTS, Project  # beside this script

REPO = Path(__file__).resolve().parent.parent
OUTCOMES = ("passed", "failed", "skipped", "xfailed", "xpassed", "error", "missing")
DEFAULT_TIERS = ("process", "jail", "zone")
RECORDER_MODULE = "_fidelity_recorder"


#: Where runs go by default: outside the temp dirs, below root-owned directories, as a
#: CI checkout often is (readable by the ``--user`` a run may take).
FIDELITY_HOME = Path("/var/lib/isolate-fidelity")
TEMP_DIRS = ("/tmp/", "/var/tmp/", "/dev/shm/")

RECORDER = '''\
"""Written by bench/fidelity.py: one JSON line per test outcome, from the controller only.

The file name carries this process's pid and the harness reads the file of the pid it
started, so anything a sandbox or a nested pytest writes is ignored.
"""
import glob
import json
import os
import re

import pytest

_fh = None
_pid = None
#: A forked process's inherited handle, kept referenced: collected, it would warn
#: ("unclosed file"), an error under a suite's filterwarnings=error.
_inherited = []


_silent = None
#: The session's controller: the first process configured as no worker. Sandboxes (forks
#: of a fork server configured as a worker) never open the file: outside the temp dirs
#: that write would be an escape of the harness's own.
_controller = None


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config):
    global _controller
    if _controller is None and not hasattr(config, "workerinput"):
        _controller = os.getpid()


def _emit(rec):
    # The pid when the record is written, not when this module was imported: a worker
    # forked from the controller (the plugin's stem) inherits the module as it was.
    global _fh, _pid, _silent
    if _silent == os.getpid() or _controller != os.getpid():
        return
    if _fh is None or _pid != os.getpid():
        if _fh is not None:
            _inherited.append(_fh)
        _pid = os.getpid()
        try:
            _fh = open(os.path.join(os.environ["FIDELITY_OUT_DIR"], "outcomes-%d.jsonl" % _pid), "a", encoding="utf-8")
        except (OSError, KeyError):
            # A sandbox that does not see the out dir (an unprivileged jail's /tmp is a
            # fresh tmpfs when mounts sit below the host's), or a test that emptied the
            # environment: only the controller's records are read, so this process
            # records nothing.
            _fh, _silent = None, os.getpid()
            return
    _fh.write(json.dumps(rec) + "\\n")
    _fh.flush()


def _text(rep):
    try:
        text = rep.longreprtext or ""
    except Exception:
        text = str(rep.longrepr or "")
    crash = getattr(getattr(rep, "longrepr", None), "reprcrash", None)
    msg = getattr(crash, "message", None) if crash is not None else None
    if not msg:
        lines = [ln for ln in text.splitlines() if ln.strip()]
        msg = lines[-1] if lines else ""
    if isinstance(rep.longrepr, tuple) and len(rep.longrepr) == 3:
        msg = str(rep.longrepr[2])
    return msg.splitlines()[0] if msg else "", "\\n".join(text.splitlines()[-40:])


def pytest_collection_finish(session):
    _emit({"kind": "collected", "nodeids": [i.nodeid for i in session.items]})


def pytest_collectreport(report):
    if report.failed:
        first, detail = _text(report)
        _emit({"kind": "collecterror", "nodeid": report.nodeid, "first": first, "detail": detail})


def _key(report):
    """A subtest (pytest 9 ``subtests``, unittest ``subTest``) is an entry of its own.
    Its label may hold an object's repr, whose address differs from run to run: the
    address is masked, and so is a pid (psutil's ``Process(pid=..., ...)``: the test's
    own process is another one isolated) (and ``parse_records`` numbers the labels that
    then repeat)."""
    describe = getattr(report, "_sub_test_description", None)
    if getattr(report, "context", None) is not None and callable(describe):
        try:
            label = re.sub(r" at 0x[0-9a-fA-F]+", " at 0x?", describe())
            return "%s %s" % (report.nodeid, re.sub(r"\\bpid=\\d+", "pid=?", label)), True
        except Exception:
            return report.nodeid + " [subtest]", True
    return report.nodeid, False


def pytest_runtest_logreport(report):
    key, sub = _key(report)
    rec = {"kind": "report", "nodeid": key, "sub": sub, "when": report.when,
           "outcome": report.outcome, "wasxfail": hasattr(report, "wasxfail")}
    if report.outcome != "passed":
        rec["first"], rec["detail"] = _text(report)
    _emit(rec)


_tries = 0


def _find_run_id():
    """The plugin's run id: its run dir's ``owner`` file names this process."""
    global _tries
    if _tries < 0:
        return
    _tries += 1
    for owner in glob.glob("/tmp/pytest-isolate-*/owner"):
        try:
            with open(owner, encoding="utf-8") as fh:
                pid = int(fh.read().split()[0])
        except (OSError, ValueError, IndexError):
            continue
        if pid == os.getpid():
            _emit({"kind": "run_id", "run_id": owner.split("/")[2].split("-")[-1]})
            _tries = -1
            return
    if _tries >= 5:
        _tries = -1


def pytest_runtest_logfinish(nodeid, location):
    _find_run_id()


@pytest.hookimpl(tryfirst=True)
def pytest_sessionfinish(session, exitstatus):
    if _tries >= 0:
        _find_run_id()
    _emit({"kind": "finish", "exitstatus": int(exitstatus)})


def pytest_unconfigure(config):
    global _fh
    if _fh is not None:
        _fh.close()
        _fh = None
'''


@dataclasses.dataclass
class Run:
    """One pytest invocation of one project at one tier, as measured."""

    project: str
    tier: str
    wall: float
    returncode: int | None
    timed_out: bool
    outcomes: dict[str, str]
    firsts: dict[str, str]
    details: dict[str, str]
    collect_errors: dict[str, str]
    exitstatus: int | None
    run_id: str | None
    output_tail: str
    leftovers: list[str]

    def counts(self) -> Counter[str]:
        return Counter(self.outcomes.values())


def log(msg: str) -> None:
    """Progress goes to stderr so that stdout is just the table."""
    print(f"[fidelity {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def sh(cmd: list[str], cwd: Path | None = None, env: dict[str, str] | None = None) -> str:
    """Run a setup step; its output is only shown when it fails."""
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(
            f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        )
    return proc.stdout


def build_plugin_wheel(src: Path, work: Path, ref: str | None) -> Path:
    """A wheel of the working tree as it is now, built from a copy.

    Building in place would write build/ and egg-info into the shared tree; an editable
    install would let edits made during a long harness run change later runs.
    """
    copy = work / "plugin-src"
    copy.mkdir(parents=True, exist_ok=True)
    if ref:
        archive = work / "plugin-src.tar"
        sh(["git", "-C", str(src), "archive", "--format=tar", "-o", str(archive), ref])
        with tarfile.open(archive) as tf:
            tf.extractall(copy, filter="data")
    else:
        files = sh(["git", "-C", str(src), "ls-files", "-co", "--exclude-standard"]).splitlines()
        for rel in files:
            path = src / rel
            if path.is_file():
                (copy / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(path, copy / rel)
    out = work / "wheels"
    sh([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(out), str(copy)])
    (wheel,) = out.glob("*.whl")
    return wheel


def fetch_sdist(proj: Project, work: Path) -> Path:
    """Download (through pip only) and extract the sdist; return the source dir.

    This tree stays as extracted (and as the venv's install built it): every run works
    in a fresh copy of it (``fresh_tree``).
    """
    dl = work / "sdists"
    dl.mkdir(exist_ok=True)
    sh(
        [
            sys.executable,
            "-m",
            "pip",
            "download",
            "-q",
            "--no-binary",
            ":all:",
            "--no-deps",
            "-d",
            str(dl),
            f"{proj.name}=={proj.version}",
        ]
    )
    norm = proj.name.replace("-", "_").lower()
    archives = [
        p
        for p in dl.iterdir()
        if p.name.lower().replace("-", "_").startswith(f"{norm}_{proj.version}")
    ]
    if not archives:
        raise RuntimeError(f"no sdist for {proj.name} {proj.version} in {dl}")
    archive = archives[0]
    dest = work / "pristine" / proj.name
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    if archive.name.endswith(".zip"):
        with zipfile.ZipFile(archive) as zf:
            zf.extractall(dest)
    else:
        with tarfile.open(archive) as tf:
            tf.extractall(dest, filter="data")
    (top,) = list(dest.iterdir())
    return top


def fresh_tree(pristine: Path, work: Path, name: str) -> Path:
    """A copy of the extracted sdist for one run, always at the same path.

    A run leaves state in the tree that changes the next one: hypothesis's example
    database (``.hypothesis``), pytest's cache (``--lf``, ``--sw``), pytest-benchmark's
    saved runs. Measured on cattrs: in-process 340 s with no ``.hypothesis``, 168 s right
    after a run had filled it; the in-process run, always first, looked twice as slow as
    the isolated ones for that alone. Each run starts from what the sdist shipped.
    """
    dest = work / "src" / name / pristine.name
    if dest.parent.exists():
        shutil.rmtree(dest.parent)
    dest.parent.mkdir(parents=True)
    shutil.copytree(pristine, dest, symlinks=True)
    return dest


def make_venv(
    proj: Project, src: Path, wheel: Path, work: Path, base: str = sys.executable
) -> tuple[Path, list[str]]:
    """A fresh venv with the project, its test deps and the plugin; returns (python, freeze).
    ``base``: the interpreter it is made from (``--python``)."""
    venv = work / "venvs" / proj.name
    if venv.exists():
        shutil.rmtree(venv)
    sh([base, "-m", "venv", str(venv)])
    py = venv / "bin" / "python"
    target = f"{src}[{','.join(proj.extras)}]" if proj.extras else str(src)
    sh([str(py), "-m", "pip", "install", "-q", target, *proj.test_deps, str(wheel)])
    site = sh([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).strip()
    Path(site, f"{RECORDER_MODULE}.py").write_text(RECORDER)
    if proj.prepare:
        sh([str(py), *proj.prepare], cwd=src)
    freeze = sh([str(py), "-m", "pip", "freeze"]).splitlines()
    return py, freeze


def leftovers_of(run_id: str | None, venv: str) -> list[str]:
    """What a finished run left: mounts, cgroups and the run dir named with its run id,
    and processes still running its venv's interpreter.

    Other sessions on the same host run the plugin too; only names that carry this run's
    id (the recorder reads it from the run dir's ``owner`` file) are counted.
    """
    found = stray_processes(venv)
    if not run_id:
        return found
    tag = f"pytest-isolate-{run_id}"
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        if tag in line.split()[4]:
            found.append(f"mount {line.split()[4]}")
    root = Path("/sys/fs/cgroup")
    for pattern in (tag, f"*/{tag}", f"*/*/{tag}", f"*/*/*/{tag}"):
        found += [f"cgroup {p}" for p in root.glob(pattern)]
    for path in (Path("/tmp") / tag, Path("/run/netns") / tag):
        if path.exists():
            found.append(f"path {path}")
    return found


def stray_processes(venv_bin: str) -> list[str]:
    """Processes still running the project's venv interpreter after its run ended."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if venv_bin in cmd:
            found.append(f"pid {proc.name}: {cmd[:200]}")
    return found


def stop_group(proc: subprocess.Popen[str]) -> None:
    """SIGTERM the run's own process group (the plugin can clean up), SIGKILL if it won't."""
    for sig, wait in ((signal.SIGTERM, 30.0), (signal.SIGKILL, 10.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def uml_kernel() -> str:
    """The UML kernel pytest-isolate would boot when run from this repo."""
    sys.path.insert(0, str(REPO))
    try:
        from pytest_isolate.tiers.uml_kernel import find_kernel
    finally:
        sys.path.remove(str(REPO))
    return find_kernel()


def offline(cmd: list[str]) -> list[str]:
    """``cmd`` in a network namespace of its own with only loopback up.

    Real suites open sockets (werkzeug's dev server, h11, execnet) and some reach for the
    Internet behind markers nobody set; in-process or isolated, none of that traffic may
    leave a namespace this run made. ``unshare`` then ``exec``: pytest keeps the pid the
    recorder file is named by. Unprivileged, a user namespace would make the suite root,
    which changes what it tests: then the run shares the host's network, and says so.
    """
    if os.geteuid() != 0:
        log("not root: the suite runs in the host's network namespace")
        return cmd
    return ["unshare", "--net", "sh", "-c", 'ip link set lo up && exec "$@"', "sh", *cmd]


def as_user(cmd: list[str], user: tuple[int, int] | None) -> list[str]:
    """``cmd`` run as ``(uid, gid)`` with no supplementary groups and no capabilities, as
    a rootless user runs pytest; unchanged without a user."""
    if user is None:
        return cmd
    uid, gid = user
    return ["setpriv", f"--reuid={uid}", f"--regid={gid}", "--clear-groups", "--", *cmd]


def chown_tree(path: Path, user: tuple[int, int]) -> None:
    """The user's own tree: the suite writes into it, as in a checkout of theirs."""
    os.chown(path, *user, follow_symlinks=False)
    for root, dirs, files in os.walk(path):
        for n in (*dirs, *files):
            os.chown(os.path.join(root, n), *user, follow_symlinks=False)


def run_suite(
    proj: Project, py: Path, src: Path, tier: str | None, work: Path, timeout: float,
    user: tuple[int, int] | None = None,
) -> Run:
    """One pytest run; outcomes come from the recorder file of the pid we started.
    ``user``: run it as this uid and gid instead of root (``--user``)."""
    name = tier or "inproc"
    out_dir = work / "out" / proj.name / name
    if out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True)
    cmd = [str(py), "-m", "pytest", "-p", RECORDER_MODULE, *proj.args]
    if tier:
        cmd.append(f"--isolate={tier}")
    if tier == "uml":
        # The project's venv has no kernel beside its python: the one this repo's
        # set-up found (scripts/uml-kernel.sh's, where the distribution's cannot boot here).
        cmd.append(f"--isolate-uml-kernel={uml_kernel()}")
    env = {
        k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_", "VIRTUAL_ENV", "COV_"))
    }
    # As a user's pytest runs: Python writes bytecode. This machine's environment sets
    # PYTHONDONTWRITEBYTECODE=1, which hid what a test's first import of a module writes
    # (its __pycache__, reported from chroot up until 8351549).
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    env.update(proj.env)
    env["FIDELITY_OUT_DIR"] = str(out_dir)
    env["PATH"] = f"{py.parent}:{env.get('PATH', '/usr/bin:/bin')}"
    if user is not None:
        home = work / "home" / proj.name
        if home.exists():
            shutil.rmtree(home)
        home.mkdir(parents=True)
        for path in (src, out_dir, home):
            chown_tree(path, user)
        env["HOME"] = str(home)
        env.pop("XDG_RUNTIME_DIR", None)
    log(f"{proj.name} {name}: {' '.join(cmd[1:])}" + (f" (as uid {user[0]})" if user else ""))
    with open(out_dir / "output.txt", "w") as outf:
        t0 = time.monotonic()
        proc = subprocess.Popen(
            offline(as_user(cmd, user)),
            cwd=src,
            env=env,
            stdout=outf,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            text=True,
            start_new_session=True,
        )
        timed_out = False
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
            stop_group(proc)
        except BaseException:  # harness interrupted: leave no pytest of ours running
            stop_group(proc)
            raise
        wall = time.monotonic() - t0
    rec = parse_records(out_dir / f"outcomes-{proc.pid}.jsonl")
    leftovers: list[str] = []
    for pause in (1.0, 5.0):  # a released zone's cgroup goes away once its init is reaped
        time.sleep(pause)
        leftovers = leftovers_of(rec.run_id, str(py.parent.parent))
        if not leftovers:
            break
    text = (out_dir / "output.txt").read_text(errors="replace")
    tail = "\n".join(text.splitlines()[-30:])
    run = Run(
        proj.name,
        name,
        wall,
        proc.returncode,
        timed_out,
        rec.outcomes,
        rec.firsts,
        rec.details,
        rec.collect_errors,
        rec.exitstatus,
        rec.run_id,
        tail,
        leftovers,
    )
    c = run.counts()
    log(
        f"{proj.name} {name}: {wall:.1f}s rc={proc.returncode}{' TIMEOUT' if timed_out else ''} "
        + " ".join(f"{k}={c[k]}" for k in OUTCOMES if c[k])
        + (f" LEFTOVERS={leftovers}" if leftovers else "")
    )
    return run


@dataclasses.dataclass
class Records:
    """What the recorder wrote for one run, folded per nodeid."""

    outcomes: dict[str, str] = dataclasses.field(default_factory=dict)
    firsts: dict[str, str] = dataclasses.field(default_factory=dict)
    details: dict[str, str] = dataclasses.field(default_factory=dict)
    collect_errors: dict[str, str] = dataclasses.field(default_factory=dict)
    exitstatus: int | None = None
    run_id: str | None = None


def parse_records(path: Path) -> Records:
    """Fold the recorder's reports into one outcome per nodeid, as pytest counts them.

    setup failed → error; skipped anywhere → skipped (xfailed when it was an xfail);
    call passed as xfail → xpassed; call failed → failed; a teardown failure on top of
    anything → error. A collected test without any report (the run died) → missing.
    """
    r = Records()
    outcomes, firsts, details, cerrs = r.outcomes, r.firsts, r.details, r.collect_errors
    collected: list[str] = []
    phases: dict[str, dict[str, tuple[str, bool]]] = {}
    sub_seen: dict[str, int] = {}
    if not path.exists():
        return r
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        kind = rec["kind"]
        if kind == "collected":
            collected = rec["nodeids"]
        elif kind == "collecterror":
            cerrs[rec["nodeid"]] = rec["first"]
            outcomes[rec["nodeid"]] = "error"
            firsts[rec["nodeid"]] = rec["first"]
            details[rec["nodeid"]] = rec["detail"]
        elif kind == "finish":
            r.exitstatus = rec["exitstatus"]
        elif kind == "run_id":
            r.run_id = rec["run_id"]
        elif kind == "report":
            nid = rec["nodeid"]
            if rec.get("sub"):  # a masked subtest label seen before in this run: the next one
                n = sub_seen[nid] = sub_seen.get(nid, 0) + 1
                if n > 1:
                    nid = f"{nid} #{n}"
            phases.setdefault(nid, {})[rec["when"]] = (rec["outcome"], rec["wasxfail"])
            if rec["outcome"] == "failed" or (rec["outcome"] == "skipped" and nid not in firsts):
                firsts[nid] = rec.get("first", "")
                details[nid] = rec.get("detail", "")
    for nid, ph in phases.items():
        outcomes[nid] = fold(ph)
    for nid in collected:
        outcomes.setdefault(nid, "missing")
    return r


def fold(phases: dict[str, tuple[str, bool]]) -> str:
    """One test's outcome from its setup/call/teardown reports, as pytest's summary counts it."""
    out, xf = phases.get("setup", ("passed", False))
    if out == "failed":
        return "error"
    if out == "skipped":
        return "xfailed" if xf else "skipped"
    out, xf = phases.get("call", ("missing", False))
    main = {
        "failed": "failed",
        "skipped": "xfailed" if xf else "skipped",
        "passed": "xpassed" if xf else "passed",
    }.get(out, "missing")
    if phases.get("teardown", ("passed", False))[0] == "failed" and main != "failed":
        return "error"
    return main


def diffs(base: Run, run: Run) -> list[tuple[str, str, str, str]]:
    """(nodeid, in-process outcome, isolated outcome, isolated first line) per difference."""
    out = []
    for nid in sorted(set(base.outcomes) | set(run.outcomes)):
        a, b = base.outcomes.get(nid, "absent"), run.outcomes.get(nid, "absent")
        if a != b:
            out.append((nid, a, b, run.firsts.get(nid, "")))
    return out


def print_table(runs: dict[str, dict[str, Run]], cap: int) -> None:
    """The one table, then the differences row by row."""
    head = ["project", "tier", *OUTCOMES, "differ", "wall s", "x inproc", "rc"]
    rows: list[list[str]] = []
    for proj, by_tier in runs.items():
        base = by_tier.get("inproc")
        for tier, run in by_tier.items():
            c = run.counts()
            ndiff = "-" if base is None or tier == "inproc" else str(len(diffs(base, run)))
            ratio = (
                "-"
                if base is None or tier == "inproc" or not base.wall
                else f"{run.wall / base.wall:.2f}"
            )
            rc = "T/O" if run.timed_out else str(run.returncode)
            rows.append(
                [proj, tier, *(str(c[k]) for k in OUTCOMES), ndiff, f"{run.wall:.1f}", ratio, rc]
            )
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    print("| " + " | ".join(h.ljust(w) for h, w in zip(head, widths, strict=True)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for r in rows:
        print("| " + " | ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)) + " |")
    print()
    for proj, by_tier in runs.items():
        base = by_tier.get("inproc")
        if base is None:
            continue
        for tier, run in by_tier.items():
            if tier == "inproc":
                continue
            d = diffs(base, run)
            if run.leftovers:
                print(f"{proj} @ {tier}: LEFT BEHIND: {run.leftovers}")
            if not d:
                continue
            print(f"{proj} @ {tier}: {len(d)} differ" + (f" (first {cap})" if len(d) > cap else ""))
            for nid, a, b, first in d[:cap]:
                print(f"  {nid}: {a} -> {b}" + (f": {first[:200]}" if first else ""))
    print()


def _interrupted(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument(
        "--projects",
        help="comma-separated names (default: all): " + ",".join(p.name for p in PROJECTS),
    )
    ap.add_argument(
        "--tiers",
        default=",".join(DEFAULT_TIERS),
        help="comma-separated tiers (default %(default)s)",
    )
    ap.add_argument(
        "--timeout", type=float, default=1200.0, help="seconds per pytest run (default %(default)s)"
    )
    ap.add_argument("--workdir", type=Path, help=f"where venvs and sources go (default: a new dir in {FIDELITY_HOME}; not below /tmp)")
    ap.add_argument("--keep", action="store_true", help="keep the work dir")
    ap.add_argument("--json", type=Path, help="write the raw data here")
    ap.add_argument(
        "--cap", type=int, default=10, help="differing nodeids listed per row (default %(default)s)"
    )
    ap.add_argument(
        "--plugin-src",
        type=Path,
        default=REPO,
        help="pytest-isolate source tree (default: this repo)",
    )
    ap.add_argument(
        "--plugin-ref",
        help="build the plugin from this git ref (default: the working tree as it is)",
    )
    ap.add_argument(
        "--user",
        help="run every pytest (in-process and isolated) as this UID[:GID], unprivileged, "
        "in a tree that user owns (needs root; see --python)",
    )
    ap.add_argument(
        "--python",
        default=sys.executable,
        help="the interpreter the venvs are made from (default: this one); with --user, one "
        "that user can run, e.g. /usr/bin/python3",
    )
    ns = ap.parse_args(argv)
    user = None
    if ns.user:
        uid_s, _, gid_s = ns.user.partition(":")
        try:
            user = (int(uid_s), int(gid_s or uid_s))
        except ValueError:
            ap.error(f"--user {ns.user!r}: expected UID or UID:GID, numbers")
        if os.geteuid() != 0:
            ap.error("--user needs root: the runs switch to that user")
        if user[0] == 0:
            ap.error("--user 0 is root: leave --user out")

    # SIGTERM (and SIGINT, which a background job ignores) unwind through ``finally``:
    # the running pytest is stopped and the table of what finished is still printed.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, _interrupted)
    wanted = PROJECTS
    if ns.projects:
        names = ns.projects.split(",")
        unknown = set(names) - {p.name for p in PROJECTS}
        if unknown:
            ap.error(f"unknown projects: {sorted(unknown)}")
        wanted = tuple(p for p in PROJECTS if p.name in names)
    tiers = [t for t in ns.tiers.split(",") if t]

    # Real projects live outside the temp dirs, where the audit layer lets a test write
    # anything: run from /tmp, a write into the project's tree is never an escape, and
    # the harness missed that at `process` every such test failed (session 25).
    if ns.workdir is None:
        FIDELITY_HOME.mkdir(mode=0o755, parents=True, exist_ok=True)
    work = ns.workdir or Path(tempfile.mkdtemp(prefix="run-", dir=FIDELITY_HOME))
    if str(work.resolve()).startswith(TEMP_DIRS):
        print(f"fidelity: --workdir {work} is below a temp dir ({', '.join(TEMP_DIRS)}): writes into the "
              "projects' trees are never escapes there, as they are where real projects live", file=sys.stderr)
    configs = ("pytest.ini", ".pytest.ini", "pyproject.toml", "tox.ini", "setup.cfg")
    above = [d / c for d in work.resolve().parents for c in configs if (d / c).is_file()]
    if above:
        # pytest looks up from a project without a config of its own and takes the first
        # it finds as its rootdir and inifile: the runs would measure another config.
        ap.error(f"--workdir {work}: {above[0]} is above it; pick a directory outside any project")
    work.mkdir(parents=True, exist_ok=True)
    started = datetime.datetime.now(datetime.timezone.utc)
    t_all = time.monotonic()
    runs: dict[str, dict[str, Run]] = {}
    meta: dict[str, Any] = {
        "started": started.isoformat(timespec="seconds"),
        "command": " ".join(
            [Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]
        ),
        "python": sh([ns.python, "-c", "import sys; print(sys.version.split()[0])"]).strip(),
        "user": list(user) if user else None,
        "plugin_head": sh(
            ["git", "-C", str(ns.plugin_src), "rev-parse", ns.plugin_ref or "HEAD"]
        ).strip(),
        "plugin_dirty": []
        if ns.plugin_ref
        else sh(
            ["git", "-C", str(ns.plugin_src), "status", "--porcelain", "--", "pytest_isolate"]
        ).splitlines(),
        "projects": {},
    }
    try:
        log(f"work dir {work}; building the plugin wheel from {ns.plugin_src}")
        wheel = build_plugin_wheel(ns.plugin_src, work, ns.plugin_ref)
        for proj in wanted:
            try:
                src = fetch_sdist(proj, work)
                py, freeze = make_venv(proj, src, wheel, work, ns.python)
            except Exception as exc:  # a project that cannot be set up is reported, not fatal
                log(f"{proj.name}: setup failed: {exc}")
                meta["projects"][proj.name] = {"version": proj.version, "setup_error": str(exc)}
                continue
            meta["projects"][proj.name] = {
                "version": proj.version,
                "why": proj.why,
                "freeze": freeze,
            }
            runs[proj.name] = {}
            for tier in [None, *tiers]:
                tree = fresh_tree(src, work, proj.name)
                run = run_suite(proj, py, tree, tier, work, ns.timeout, user)
                runs[proj.name][run.tier] = run
    finally:
        meta["total_seconds"] = round(time.monotonic() - t_all, 1)
        left = sorted(
            {
                x
                for bt in runs.values()
                for r in bt.values()
                for x in leftovers_of(r.run_id, str(work / "venvs" / r.project))
            }
        )
        meta["left_at_end"] = left
        if left:
            log(f"LEFT BEHIND at the end: {left}")
        if runs:
            print(
                f"fidelity: {meta['started']}, plugin {meta['plugin_head'][:10]}"
                f"{' (+uncommitted changes in pytest_isolate/)' if meta['plugin_dirty'] else ''}, "
                f"python {meta['python']}, total {meta['total_seconds']} s\n"
            )
            print_table(runs, ns.cap)
        if ns.json:
            ns.json.parent.mkdir(parents=True, exist_ok=True)
            data = {
                "meta": meta,
                "runs": {
                    p: {t: dataclasses.asdict(r) for t, r in bt.items()} for p, bt in runs.items()
                },
                "diffs": {
                    p: {t: diffs(bt["inproc"], r) for t, r in bt.items() if t != "inproc"}
                    for p, bt in runs.items()
                    if "inproc" in bt
                },
            }
            ns.json.write_text(json.dumps(data, indent=1))
            log(f"raw data in {ns.json}")
        if not ns.keep:
            shutil.rmtree(work, ignore_errors=True)
        else:
            log(f"kept {work}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

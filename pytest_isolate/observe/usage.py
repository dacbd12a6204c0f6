"""Resource readings in one shape for every tier, and verdicts against budgets.

Where a figure comes from differs per tier (``READINGS`` says which is exact and which
sampled); what a report shows does not: ``merge`` builds the same keys whatever the
sources, and ``check`` turns readings + budgets into overuse records.

Sources, best first:

- a cgroup (zone): exact totals over the whole group, including processes that left
  the process tree (double-forked daemons);
- ``wait4`` rusage of the runner: exact, but per process tree *as reaped*, and
  ``max_rss`` is the peak of the single largest process, not a sum;
- ``TreeSampler``: polls /proc while the test runs: sums over the tree, but a peak
  shorter than the sampling period can be missed.
"""

from __future__ import annotations

import os
import signal
from typing import Any

from pytest_isolate.spec import IsolationSpec, format_size

_NO_CG = ("process", "chroot", "jail")
_TIERS = (*_NO_CG, "zone", "uml")


def _per_tier(no_cgroup: str, zone: str, uml: str | None = None) -> dict[str, str]:
    out = {t: no_cgroup for t in _NO_CG}
    out["zone"] = zone
    out["uml"] = uml if uml is not None else f"{no_cgroup} (guest kernel)"
    return out


#: Every reading: unit, meaning, and per tier its source ("exact: …" / "sampled: …" /
#: "n/a"). Rendered by the docs; the keys are those ``merge`` may return.
READINGS: dict[str, dict[str, Any]] = {
    "wall": {
        "unit": "s",
        "what": "wall-clock time from fork to reap of the test's process",
        "sources": {t: "exact: monotonic clock of the fork server" for t in _TIERS},
    },
    "cpu_user": {
        "unit": "s",
        "what": "user-mode CPU time of the test's processes",
        "sources": _per_tier(
            "exact: wait4 rusage of the reaped tree (processes not reaped by it are missed)",
            "exact: cgroup (v1 cpuacct.usage split by usage_user/usage_sys, v2 cpu.stat user_usec)",
        ),
    },
    "cpu_sys": {
        "unit": "s",
        "what": "kernel-mode CPU time of the test's processes",
        "sources": _per_tier(
            "exact: wait4 rusage of the reaped tree",
            "exact: cgroup (v1 cpuacct, v2 cpu.stat system_usec)",
        ),
    },
    "peak_memory": {
        "unit": "bytes",
        "what": "peak memory of the test",
        "sources": _per_tier(
            "sampled: sum of RSS over the process tree every sampling period, less the pages "
            "a forked runner shares with the fork server (Pss-refined near the budget), or "
            "rusage max_rss of the largest process, less the same, if higher",
            "exact: cgroup peak (v1 memory.max_usage_in_bytes, v2 memory.peak; includes page "
            "cache and kernel memory the test caused, not pages inherited from the fork server)",
        ),
    },
    "peak_pids": {
        "unit": "tasks",
        "what": "peak number of tasks (threads count) alive at once",
        "sources": _per_tier(
            "sampled: tasks in the process tree",
            "exact: cgroup pids.peak (kernel >= 6.13; else sampled)",
        ),
    },
    "write_bytes": {
        "unit": "bytes",
        "what": "bytes written towards block devices (dirtied page cache counts; tmpfs does not)",
        "sources": _per_tier(
            "exact: wait4 rusage ru_oublock x 512 of the reaped tree",
            "exact: the larger of rusage and the cgroup's io.stat wbytes (v2) / blkio (v1)",
        ),
    },
    "oom_kills": {
        "unit": "count",
        "what": "processes the kernel OOM-killed for exceeding the memory budget",
        "sources": _per_tier(
            "n/a (RLIMIT_AS makes over-allocation a MemoryError instead)",
            "exact: cgroup (v1 memory.oom_control oom_kill, v2 memory.events oom_kill)",
            "n/a",
        ),
    },
    "cpu_throttled": {
        "unit": "s",
        "what": "time the test was held back by its CPU share",
        "sources": _per_tier(
            "n/a (no CPU share without a cgroup)",
            "exact: cgroup (v1 cpu.stat throttled_time, v2 cpu.stat throttled_usec)",
            "n/a",
        ),
    },
    "pids_max_hits": {
        "unit": "count",
        "what": "forks refused because the pids budget was reached",
        "sources": _per_tier(
            "n/a (RLIMIT_NPROC refusals are not counted by the kernel)",
            "exact: cgroup pids.events max",
            "n/a",
        ),
    },
    "fds_peak": {
        "unit": "descriptors",
        "what": "most descriptors one process of the test held open at once",
        "sources": {t: "sampled: /proc/<pid>/fd of each process of the tree" for t in _TIERS},
    },
}


def readings_markdown() -> str:
    """``READINGS`` as a Markdown table (key, unit, meaning, then one column per tier)."""
    head = ["reading", "unit", "what", *_TIERS]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for key, doc in READINGS.items():
        cells = [f"`{key}`", doc["unit"], doc["what"], *(doc["sources"][t] for t in _TIERS)]
        rows.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(rows)


#: Bytes of a page, for /proc/<pid>/stat rss.
_PAGE = os.sysconf("SC_PAGE_SIZE")
#: Refine the (over-counting) RSS sum with Pss when it passes this share of the budget.
REFINE_AT = 0.8


def _read(path: str) -> bytes:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return os.read(fd, 4096)
    finally:
        os.close(fd)


class TreeSampler:
    """Peak memory/tasks/fds of a process tree, polled from /proc.

    One sample reads ``/proc/<pid>/stat`` (rss, threads, start time), the children
    lists and lists ``/proc/<pid>/fd``, per process: ~25 µs per process here.

    RSS double-counts pages shared between processes of the tree (a fork child shares
    its parent's pages until it writes them). Exact sharing needs
    ``/proc/<pid>/smaps_rollup`` (Pss), which walks page tables: ~0.5 ms for a 100 MiB
    process, 20x the whole cheap sample. So the sum of RSS is used while it is below
    ``REFINE_AT`` × ``memory_budget``; above it, and only for trees of several
    processes, the sample is refined to max(largest RSS, sum of Pss) — a verdict never
    rests on the over-count alone.

    Processes once seen are remembered (with their start time, against PID reuse), so
    a child that double-forks away from the tree is still counted after its parent
    exits. A process that is born and orphaned between two samples is missed.

    A runner forked (not exec'd) from the sampling process — the fork server — starts
    with the fork server's pages mapped: ~40 MiB of interpreter and pytest the test did
    not cause, which the zone's cgroup never charges to it either. Such a process is
    recognised at first sight by its command line (a fork keeps its parent's argv, an
    exec replaces it), and the pages it then shares, capped at the sampler's own RSS,
    are its ``inherited`` baseline, left out of every later sample. One smaps_rollup
    read per such process (~0.1–0.5 ms), not per sample.
    """

    def __init__(self, memory_budget: int | None = None) -> None:
        self.memory_budget = memory_budget
        self._known: dict[int, int] = {}  # pid → start time
        self.peak_memory = 0
        self.peak_pids = 0
        self.peak_procs = 0
        self.fds_peak = 0
        self.samples = 0
        self.refined = 0
        self.last: dict[str, int] = {}  # the latest sample: memory, tasks, procs
        self.inherited = 0  # largest baseline of one process, for rusage's max_rss
        self._base: dict[int, tuple[int, int]] = {}  # pid → inherited (rss, pss)
        try:
            self._cmdline = _read("/proc/self/cmdline")
        except OSError:
            self._cmdline = b""

    def sample(self, root_pid: int) -> None:
        """Take one sample of ``root_pid``'s tree (plus processes seen before)."""
        todo = [root_pid, *self._known]
        seen: set[int] = set()
        rss_sum = rss_max = tasks = procs = 0
        live: list[int] = []
        while todo:
            pid = todo.pop()
            if pid in seen:
                continue
            seen.add(pid)
            try:
                raw = _read(f"/proc/{pid}/stat")
            except OSError:
                self._known.pop(pid, None)
                self._base.pop(pid, None)
                continue
            rest = raw[raw.rfind(b")") + 2 :].split()
            start = int(rest[19])
            known = self._known.get(pid)
            if known is not None and known != start:  # PID reused by a stranger
                del self._known[pid]
                self._base.pop(pid, None)
                if pid != root_pid:
                    continue
            self._known[pid] = start
            if rest[0] in (b"Z", b"X"):
                continue
            nthreads = int(rest[17])
            base = self._base.get(pid)
            if base is None:
                base = self._base[pid] = self._inherited_by(pid)
                self.inherited = max(self.inherited, base[0])
            elif base[0] and self._execd(pid):
                # Seen between its fork and its exec: what it shared then is gone now.
                base = self._base[pid] = (0, 0)
                self.inherited = max((b[0] for b in self._base.values()), default=0)
            rss = max(0, int(rest[21]) * _PAGE - base[0])
            rss_sum += rss
            rss_max = max(rss_max, rss)
            tasks += nthreads
            procs += 1
            live.append(pid)
            try:
                fds = len(os.listdir(f"/proc/{pid}/fd"))
            except OSError:
                fds = 0
            if fds > self.fds_peak:
                self.fds_peak = fds
            tids = [pid] if nthreads == 1 else self._tids(pid)
            for tid in tids:
                try:
                    kids = _read(f"/proc/{pid}/task/{tid}/children").split()
                except OSError:
                    continue
                todo.extend(int(k) for k in kids)
        memory = rss_sum
        budget = self.memory_budget
        if budget is not None and procs > 1 and rss_sum > REFINE_AT * budget:
            pss = self._pss(live)
            if pss is not None:
                memory = max(rss_max, pss)
                self.refined += 1
        self.samples += 1
        self.last = {"memory": memory, "tasks": tasks, "procs": procs}
        self.peak_memory = max(self.peak_memory, memory)
        self.peak_pids = max(self.peak_pids, tasks)
        self.peak_procs = max(self.peak_procs, procs)

    @staticmethod
    def _tids(pid: int) -> list[str | int]:
        try:
            return list(os.listdir(f"/proc/{pid}/task"))
        except OSError:
            return []

    def _inherited_by(self, pid: int) -> tuple[int, int]:
        """(RSS, Pss) of the pages ``pid`` still shares with us since it was forked from
        us; (0, 0) for a process that exec'd or was never ours."""
        try:
            if not self._cmdline or _read(f"/proc/{pid}/cmdline") != self._cmdline:
                return (0, 0)
            roll = _rollup(pid)
            mine = int(_read("/proc/self/statm").split()[1]) * _PAGE
        except (OSError, ValueError, IndexError):
            return (0, 0)
        shared = roll.get(b"Shared_Clean", 0) + roll.get(b"Shared_Dirty", 0)
        if shared <= 0:
            return (0, 0)
        rss = min(shared, mine)
        private = roll.get(b"Private_Clean", 0) + roll.get(b"Private_Dirty", 0)
        pss = max(0, roll.get(b"Pss", 0) - private) * rss // shared
        return (rss, pss)

    def _execd(self, pid: int) -> bool:
        try:
            return _read(f"/proc/{pid}/cmdline") != self._cmdline
        except OSError:
            return False

    def _pss(self, pids: list[int]) -> int | None:
        total = 0
        for pid in pids:
            try:
                pss = _rollup(pid).get(b"Pss", 0)
            except OSError:
                continue
            total += max(0, pss - self._base.get(pid, (0, 0))[1])
        return total

    def result(self) -> dict[str, int]:
        """Peaks over all samples. A test shorter than one period has none; its runner
        still shared every page this (forking) process had resident, so that is the
        ``inherited`` part of its rusage ``max_rss``: one statm read, no smaps walk."""
        if not self.samples:
            try:
                return {"inherited": int(_read("/proc/self/statm").split()[1]) * _PAGE}
            except (OSError, ValueError, IndexError):
                return {}
        return {
            "peak_memory": self.peak_memory,
            "peak_pids": self.peak_pids,
            "peak_procs": self.peak_procs,
            "fds_peak": self.fds_peak,
            "samples": self.samples,
            "inherited": self.inherited,
        }


def _rollup(pid: int) -> dict[bytes, int]:
    """/proc/<pid>/smaps_rollup in bytes by field (the kB lines only)."""
    out: dict[bytes, int] = {}
    with open(f"/proc/{pid}/smaps_rollup", "rb") as f:
        for line in f:
            parts = line.split()
            if len(parts) == 3 and parts[2] == b"kB":
                out[parts[0].rstrip(b":")] = int(parts[1]) * 1024
    return out


def merge(
    rusage: dict[str, Any] | None,
    cgroup: dict[str, Any] | None,
    sampler: dict[str, Any] | None,
    wall: float,
) -> dict[str, Any]:
    """The readings dict (keys of ``READINGS``) from whatever sources a tier has.

    A cgroup wins where it has the figure (exact, whole group); otherwise rusage for
    CPU/writes and the larger of rusage max_rss and the sampler's tree sum for memory.
    Keys no source could give are absent, never 0.
    """
    ru = rusage or {}
    cg = cgroup or {}
    sm = sampler or {}
    out: dict[str, Any] = {"wall": wall}
    for key in ("cpu_user", "cpu_sys"):
        if key in cg:
            out[key] = cg[key]
        elif key in ru:
            out[key] = ru[key]
    if "peak_memory" in cg:
        out["peak_memory"] = cg["peak_memory"]
    else:
        # max_rss counts the pages a forked runner inherited; the sampler knows how many.
        max_rss = ru.get("max_rss")
        if max_rss is not None:
            max_rss = max(0, max_rss - int(sm.get("inherited") or 0))
        mem = [v for v in (max_rss, sm.get("peak_memory")) if v is not None]
        if mem:
            out["peak_memory"] = max(mem)
    if "peak_pids" in cg:
        out["peak_pids"] = cg["peak_pids"]
    elif "peak_pids" in sm:
        out["peak_pids"] = sm["peak_pids"]
    writes = [v for v in (ru.get("write_bytes"), cg.get("write_bytes")) if v is not None]
    if writes:
        out["write_bytes"] = max(writes)
    for key in ("oom_kills", "cpu_throttled", "pids_max_hits"):
        if key in cg:
            out[key] = cg[key]
    if "fds_peak" in sm:
        out["fds_peak"] = sm["fds_peak"]
    return out


def timeout_message(limit: float, wall: float) -> str:
    """What a test killed at its ``timeout`` is told, in one wording everywhere.

    The fork server's failure for the killed test and the overuse record ``check``
    makes both say it with this line, so the policy sees the failure already says it
    and does not say it a second time (and the terminal, JSON and junit agree).
    """
    return f"timeout {_dur(limit)} exceeded: still running after {_dur(wall)}, killed"


def _dur(s: float) -> str:
    if s < 1:
        return f"{s * 1e3:.0f} ms"
    if s == int(s):
        return f"{int(s)} s"
    return f"{s:.1f} s"


def _times(n: int) -> str:
    return "1 time" if n == 1 else f"{n} times"


def _signum(sig: Any) -> int | None:
    """The fork server reports a signal by name, unit tests by number: compare numbers."""
    if sig is None or isinstance(sig, int):
        return sig
    try:
        return int(signal.Signals[str(sig)])
    except KeyError:
        return None


def _disk_used(tier: str, readings: dict[str, Any]) -> int | float | None:
    """Bytes the test put on disk, from the overlay's upper layer and block writes.

    The two see different files: the upper layer (a tmpfs, so no ``write_bytes``) holds
    what the test wrote into the sandbox's own tree, ``write_bytes`` what it wrote
    through binds of host directories, ``tmp_path`` above all. So they add up. Not in
    ``uml``, where the guest's writes into its upper layer are host writes of the UML
    kernel and show in both: there the larger one is the better figure.
    """
    upper = readings.get("disk_used")
    writes = readings.get("write_bytes")
    if upper is None or writes is None:
        return upper if writes is None else writes
    return max(upper, writes) if tier == "uml" else upper + writes


#: A CPU share is only called exceeded (tiers without a cgroup) past this much extra CPU,
#: so that millisecond-long tests at 100% of a core do not all trip a 0.5 CPU budget.
CPU_SLACK = 0.05


def check(
    spec: IsolationSpec, readings: dict[str, Any], enforced: set[str]
) -> list[dict[str, Any]]:
    """Overuse records for the budgets of ``spec`` that ``readings`` show exceeded.

    Each record: budget, limit, used, enforced (the tier stood behind the budget),
    kind ("exceeded", "reached" when a hard limit stopped the test at it, or
    "throttled" for a CPU share) and a one-line message. ``readings`` may carry the
    flags ``timed_out`` (bool) and ``signal`` (what killed the runner, number or name).
    ``io`` is a rate limit with no overuse reading and is not checked.

    ``enforced`` names the budgets the tier holds *as the reading counts them* (a
    total). A per-process rlimit does not hold a total, but when its own signal killed
    the runner (SIGXCPU, SIGXFSZ) the limit evidently stopped the test: that record is
    enforced whatever ``enforced`` says.
    """
    out: list[dict[str, Any]] = []
    tier = spec.tier

    def rec(budget: str, limit: Any, used: Any, kind: str, message: str, hard: bool = False) -> None:
        is_enf = hard or budget in enforced
        if not is_enf:
            message += f" (not enforced by the {tier} tier)"
        out.append(
            {
                "budget": budget,
                "limit": limit,
                "used": used,
                "enforced": is_enf,
                "kind": kind,
                "message": message,
            }
        )

    wall = readings.get("wall")
    cpu = None
    if "cpu_user" in readings or "cpu_sys" in readings:
        cpu = readings.get("cpu_user", 0.0) + readings.get("cpu_sys", 0.0)
    sig = _signum(readings.get("signal"))

    if spec.timeout is not None and wall is not None:
        if readings.get("timed_out"):
            rec(
                "timeout",
                spec.timeout,
                wall,
                "reached",
                timeout_message(spec.timeout, wall),
            )
        elif wall > spec.timeout:
            rec(
                "timeout",
                spec.timeout,
                wall,
                "exceeded",
                f"timeout {_dur(spec.timeout)} exceeded: ran {_dur(wall)}",
            )

    if spec.cpu_time is not None and cpu is not None:
        if sig == signal.SIGXCPU:
            rec(
                "cpu_time",
                spec.cpu_time,
                cpu,
                "reached",
                f"cpu_time budget {_dur(spec.cpu_time)} exceeded: used {_dur(cpu)} CPU, killed by SIGXCPU",
                hard=True,
            )
        elif cpu > spec.cpu_time:
            rec(
                "cpu_time",
                spec.cpu_time,
                cpu,
                "exceeded",
                f"cpu_time budget {_dur(spec.cpu_time)} exceeded: used {_dur(cpu)} CPU",
            )

    if spec.memory is not None:
        used = readings.get("peak_memory")
        ooms = int(readings.get("oom_kills") or 0)
        if ooms or (used is not None and used > spec.memory):
            msg = f"memory budget {format_size(spec.memory)} exceeded: peak {format_size(used)}"
            if ooms:
                msg += ", OOM-killed" if ooms == 1 else f", OOM-killed {ooms} processes"
            rec("memory", spec.memory, used, "reached" if ooms else "exceeded", msg)

    elif readings.get("oom_kills"):
        # No budget, yet the kernel killed for memory: in uml the guest's RAM (256M by
        # default) ran out. Without a record the failure would read as a bare SIGKILL.
        ooms = int(readings["oom_kills"])
        used = readings.get("peak_memory")
        msg = "OOM-killed" if ooms == 1 else f"OOM-killed {ooms} processes"
        msg += " with no memory budget"
        if used is not None:
            msg += f": peak {format_size(used)}"
        if tier == "uml":
            msg += " (the guest's RAM ran out: give the test memory=)"
        rec("memory", None, used, "reached", msg, hard=True)

    if spec.pids is not None:
        used = readings.get("peak_pids")
        hits = int(readings.get("pids_max_hits") or 0)
        if hits:
            rec(
                "pids",
                spec.pids,
                used,
                "reached",
                f"pids budget {spec.pids} reached: fork failed {_times(hits)}",
            )
        elif used is not None and used > spec.pids:
            rec(
                "pids",
                spec.pids,
                used,
                "exceeded",
                f"pids budget {spec.pids} exceeded: peak {used} tasks",
            )

    if spec.disk is not None:
        used = _disk_used(tier, readings)
        if sig == signal.SIGXFSZ:
            rec(
                "disk",
                spec.disk,
                used,
                "reached",
                f"disk budget {format_size(spec.disk)} reached: a file hit the size limit, killed by SIGXFSZ",
                hard=True,
            )
        elif used is not None and used > spec.disk:
            rec(
                "disk",
                spec.disk,
                used,
                "exceeded",
                f"disk budget {format_size(spec.disk)} exceeded: wrote {format_size(used)}",
            )

    if spec.fds is not None:
        used = readings.get("fds_peak")
        if used is not None and used >= spec.fds:
            kind = "reached" if used == spec.fds else "exceeded"
            rec(
                "fds",
                spec.fds,
                used,
                kind,
                f"fds budget {spec.fds} {kind}: a process held {used} open descriptors",
            )

    if spec.cpu is not None and cpu is not None and wall:
        share = cpu / wall
        throttled = float(readings.get("cpu_throttled") or 0.0)
        if "cpu" in enforced:
            if throttled > 0:
                rec(
                    "cpu",
                    spec.cpu,
                    round(share, 3),
                    "throttled",
                    f"cpu budget {spec.cpu:g} CPU: throttled for {_dur(throttled)} "
                    f"(used {_dur(cpu)} CPU in {_dur(wall)})",
                )
        elif cpu > spec.cpu * wall + CPU_SLACK:
            rec(
                "cpu",
                spec.cpu,
                round(share, 3),
                "exceeded",
                f"cpu budget {spec.cpu:g} CPU exceeded: averaged {share:.2f} CPU over {_dur(wall)}",
            )
    return out

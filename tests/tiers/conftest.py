"""Drive tiers directly, the way the fork server does, and check nothing is left behind."""

from __future__ import annotations

import ctypes
import os
import select
import shutil
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from pytest_isolate import wire
from pytest_isolate.facets import cgroup_sweep
from pytest_isolate.spec import IsolationSpec
from pytest_isolate.tiers.base import Box, Tier, WorkerContext, descendants
from tests.forked import in_child

SYSTEM_MOUNTS = ("/", "/proc", "/sys", "/dev")


def _mountpoint(line: str) -> str:
    return line.split()[4]


@dataclass
class Outcome:
    """What one test in a tier produced, as the fork server would see it."""

    box: Box
    pid: int
    status: int
    messages: list[dict[str, Any]]
    seconds: float

    def result(self) -> dict[str, Any]:
        """The dict the test's ``run`` body returned (fails with its traceback if it raised)."""
        for m in self.messages:
            if m.get("t") == "error":
                raise AssertionError("run body raised inside the sandbox:\n" + m["tb"])
            if m.get("t") == "internal":
                raise AssertionError("tier failed inside the child:\n" + m["error"])
        for m in self.messages:
            if m.get("t") == "result":
                return m["data"]
        raise AssertionError(f"no result (status {self.status:#x}, messages {self.messages})")

    def of(self, kind: str) -> list[dict[str, Any]]:
        return [m for m in self.messages if m.get("t") == kind]

    def exit_signal(self) -> int | None:
        """Signal that ended the runner, from the init's exit message (jail/zone)."""
        (m,) = self.of("exit")
        st = m["status"]
        return os.WTERMSIG(st) if os.WIFSIGNALED(st) else None


@dataclass
class Harness:
    """A fake fork server: one WorkerContext, tiers built on it, tests run one by one."""

    run_id: str
    rundir: Path
    ctx: WorkerContext
    tiers: dict[str, Tier] = field(default_factory=dict)
    index: int = 0

    def tier(self, cls: type[Tier]) -> Tier:
        if cls.name not in self.tiers:
            self.tiers[cls.name] = cls(self.ctx)
        return self.tiers[cls.name]

    def run(
        self,
        cls: type[Tier],
        body: Callable[[Box], dict[str, Any]],
        timeout: float = 30.0,
        **spec: Any,
    ) -> Outcome:
        """prepare → spawn → wait → finish, with ``body``'s dict sent back as a message."""
        tier = self.tier(cls)
        self.index += 1
        r, w = os.pipe()
        box = Box(
            nodeid=f"tests/x.py::t{self.index}",
            spec=IsolationSpec(tier=cls.name, **spec),
            index=self.index,
            hostname=f"isolate-{self.run_id}-{self.index}",
            result_fd=w,
        )

        def run() -> Any:
            try:
                data = body(box)
                wire.send(w, {"t": "result", "data": data})
            except BaseException:  # noqa: BLE001 - report to the test, never re-raise
                wire.send(w, {"t": "error", "tb": traceback.format_exc()})
            os._exit(0)

        t0 = time.perf_counter()
        tier.prepare(box)
        try:
            pid = tier.spawn(box, run)
        finally:
            os.close(w)
        reader = wire.Reader()
        messages: list[dict[str, Any]] = []
        deadline = time.monotonic() + timeout
        status, ru = None, None
        try:
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    tier.kill(box, pid)
                    break
                ready, _, _ = select.select([r], [], [], min(left, 0.5))
                if ready:
                    chunk = os.read(r, 1 << 16)
                    if not chunk:
                        break
                    messages.extend(reader.feed(chunk))
        finally:
            os.close(r)
            _, status, ru = os.wait4(pid, 0)
            # As the fork server does: an init's last frame is its report (jail.py).
            released = [m for m in messages if isinstance(m, dict) and m.get("t") == "released"]
            if released:
                box.state["released"] = released[-1]
            tier.finish(box, pid, status, ru)
        return Outcome(box, pid, status, messages, time.perf_counter() - t0)

    @staticmethod
    def as_nobody(fn: Callable[[], Any], owned: list[Path]) -> Any:
        """Run ``fn`` in a forked child turned into uid/gid 65534; return its JSON result.

        The interpreter lives under /root (mode 700) here, so nothing can be imported after
        the switch: everything ``fn`` needs is imported by the test module beforehand.
        """
        for p in owned:
            for dirpath, dirnames, filenames in os.walk(p):
                for n in [dirpath, *(os.path.join(dirpath, x) for x in dirnames + filenames)]:
                    os.lchown(n, 65534, 65534)
        def drop_to_nobody() -> None:
            os.setgroups([])
            os.setresgid(65534, 65534, 65534)
            os.setresuid(65534, 65534, 65534)
            # A uid change makes the process non-dumpable, and /proc/self/* root-owned:
            # it could not write its own uid_map. A user who starts pytest is dumpable.
            ctypes.CDLL(None).prctl(4, 1, 0, 0, 0)  # PR_SET_DUMPABLE

        return in_child(fn, drop_to_nobody)

    def close(self) -> None:
        for t in self.tiers.values():
            t.close()
        self.tiers.clear()


def make_harness(tag: str) -> Harness:
    run_id = f"{tag}{os.getpid()}x{time.monotonic_ns() % 100000}"
    rundir = Path(f"/tmp/pytest-isolate-{run_id}")
    rundir.mkdir(mode=0o755)
    (rundir / "basetemp").mkdir()
    workdir = rundir / "w0"
    workdir.mkdir()
    ctx = WorkerContext(
        run_id=run_id,
        rundir=rundir,
        workdir=workdir,
        rootdir=Path(__file__).resolve().parents[2],
        basetemp=rundir / "basetemp",
        invocation_dir=Path.cwd(),
        extra={"worker_index": 0},
    )
    return Harness(run_id, rundir, ctx)


def _cgroup_dirs(run_id: str) -> list[str]:
    out = []
    for dirpath, dirnames, _ in os.walk("/sys/fs/cgroup"):
        for d in dirnames:
            if run_id in d:
                out.append(os.path.join(dirpath, d))
    return out


@pytest.fixture
def leakcheck() -> Iterator[None]:
    """Fail the test if it left a mount, a process, or took down a host mount."""
    before = set(open("/proc/self/mountinfo").read().splitlines())
    yield
    deadline = time.monotonic() + 2
    while descendants(os.getpid()) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert descendants(os.getpid()) == [], "processes left behind"
    after = set(open("/proc/self/mountinfo").read().splitlines())
    added = [line for line in after - before if "pytest-isolate-" in line]
    removed = [line for line in before - after if _mountpoint(line).startswith(SYSTEM_MOUNTS)]
    assert added == [], f"mounts left behind: {added}"
    assert removed == [], f"host mounts gone: {removed}"


@pytest.fixture
def harness(leakcheck: None) -> Iterator[Harness]:
    h = make_harness("td")
    try:
        yield h
    finally:
        h.close()
        left_cg = [d for d in _cgroup_dirs(h.run_id) if not d.endswith(f"pytest-isolate-{h.run_id}")]
        cgroup_sweep.sweep(h.run_id)
        mounts_left = [ln for ln in open("/proc/self/mountinfo") if str(h.rundir) in ln]
        leftovers = sorted(p.name for p in h.ctx.workdir.iterdir())
        if not mounts_left:
            shutil.rmtree(h.rundir)
        assert mounts_left == [], f"mounts under the run dir: {mounts_left}"
        assert left_cg == [], f"per-test cgroups not removed: {left_cg}"
        assert _cgroup_dirs(h.run_id) == [], "run cgroups not swept"
        assert leftovers == [], f"per-test dirs not removed: {leftovers}"



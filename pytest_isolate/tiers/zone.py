"""`zone` tier: a jail plus its own cgroup, a minimal /dev, masked /proc, dropped
capabilities, no_new_privs and a session of its own.

On top of the jail (see jail.py for the process layout):

- cgroup (facets.cgroups): created in ``prepare``; the host side moves the init into it
  right after the fork (the middle process, unprivileged with ``network="ip"``), while
  the init builds its root; the init forks the runner only once that is done (a pipe),
  so everything the test starts is in the group before it runs a single instruction.
  A holder's zygote (jail.py) joins the group itself, before its job: the server never
  waits for a holder's fork to learn a pid to move.
  Limits come from the spec (memory, pids, cpu share, io bytes/s); ``finish`` records
  the group's readings, ``kill`` kills the whole group (nothing can double-fork out of
  it).
- /dev: tmpfs with null, zero, full, random, urandom, tty, a private devpts, shm
  (facets.devices) instead of the host's (which would hand uid 0 the host's disks).
- /proc: /proc/sys, sysrq-trigger, ... read-only, kcore, kmsg, keys, ... covered
  (mounts.mask_paths).
- capabilities: caps.ZONE_DROP from the bounding, effective, permitted, inheritable and
  ambient sets; then no_new_privs; then setsid() (no controlling tty: no TIOCSTI).
- seccomp (facets.seccomp): last, once no_new_privs allows a filter: add_key,
  request_key and keyctl fail with EPERM (keyrings are per uid, not per namespace, so
  root here would otherwise write the host root's keyring).
"""

from __future__ import annotations

import os
import re
import resource
import sys
from typing import Any

from pytest_isolate.facets import caps, cgroup_host, cgroups, seccomp
from pytest_isolate.tiers.base import Box, Unavailable, WorkerContext, kill_tree
from pytest_isolate.tiers.jail import JailTier

#: Tests after its own that a holder runner's cgroup may stay busy before ``tidy`` kills
#: what is left in it (its runner said "end" and exits; see ``tidy``).
TIDY_TRIES = 3


def limits_for(spec) -> cgroup_host.Limits:  # type: ignore[no-untyped-def]
    return cgroup_host.Limits(memory=spec.memory, pids=spec.pids, cpu=spec.cpu, io=spec.io)


class ZoneTier(JailTier):
    name = "zone"
    drop_caps = caps.ZONE_DROP
    dev_mode = "minimal"
    mask = True

    def __init__(self, ctx: WorkerContext) -> None:
        super().__init__(ctx)
        self._exiting: list[tuple[cgroups.TestCgroup, int]] = []

    @classmethod
    def availability(cls) -> str | None:
        reason = super().availability()
        if reason:
            return reason
        host = cgroup_host.detect()
        problem = host.missing(cgroup_host.Limits())
        if problem:
            return f"the zone tier needs a cgroup of its own per test: {problem}"
        return None

    @staticmethod
    def spec_problem(spec) -> str | None:  # type: ignore[no-untyped-def]
        """None when this host can enforce every limit ``spec`` asks for, else why not."""
        return cgroup_host.detect().missing(limits_for(spec))

    def prepare(self, box: Box) -> None:
        super().prepare(box)
        host = cgroup_host.detect()
        limits = limits_for(box.spec)
        problem = host.missing(limits)
        if problem:
            raise Unavailable(problem)
        name = re.sub(r"[^A-Za-z0-9_.-]", "_", f"w{os.getpid()}-{box.index}")
        try:
            box.state["zone_cg"] = cgroups.TestCgroup(host, self.ctx.run_id, name, limits)
        except cgroup_host.CgroupUnavailable as exc:
            raise Unavailable(str(exc)) from None

    def _sync_needed(self, box: Box) -> bool:
        return "zone_cg" in box.state

    def _after_fork(self, box: Box, pid: int) -> None:
        box.state["zone_cg"].attach(pid)

    def _holder_plan(self, box: Box) -> dict[str, Any]:
        return {"cgroup": box.state["zone_cg"].paths()}

    def _join_host_side(self, plan: dict[str, Any]) -> None:
        # The zygote joins its group itself, before it unshares anything: the server
        # would have to wait for its holder to fork it to learn its pid (~2 ms a test).
        cgroups.join(plan["cgroup"])

    def _confine_runner(self) -> None:
        if self._privileged:
            caps.drop(self.drop_caps)
        else:
            self._as_the_user()
        caps.no_new_privs()
        caps.new_session()
        # Last: the filter needs no_new_privs, and nothing after it may need a key call.
        # On a machine without syscall tables (not x86_64/aarch64) it installs nothing.
        seccomp.install()

    def kill(self, box: Box, pid: int) -> None:
        cg: cgroups.TestCgroup | None = box.state.get("zone_cg")
        if cg is not None:
            cg.kill()
        kill_tree(pid)  # anything that was not (yet) in the group: the init itself

    def finish(self, box: Box, pid: int, status: int, rusage: resource.struct_rusage | None) -> None:
        try:
            super().finish(box, pid, status, rusage)
        finally:
            cg: cgroups.TestCgroup | None = box.state.pop("zone_cg", None)
            if cg is not None:
                try:
                    box.usage.update(cg.read())
                finally:
                    if box.state.get("holder"):
                        self._exiting.append((cg, 0))  # its runner is still exiting: ``tidy``
                    elif box.state.get("released"):
                        box.state["zone_cg_exiting"] = cg  # its init is still in it
                    else:
                        self._remove(box, cg)

    def tidy(self, wait: bool = False) -> None:
        """The groups of runners that a holder forked (jail.py): the runner said "end"
        and is exiting, and no status of it reaches this server to say when it is gone,
        so its group goes while the next tests run. One still busy (the exit of a big
        heap takes milliseconds) is tried again next time; after ``TIDY_TRIES``, or
        with ``wait``, ``remove`` kills what is left and waits."""
        exiting, self._exiting = self._exiting, []
        for cg, tries in exiting:
            if not wait and tries < TIDY_TRIES and not cg.try_remove():
                self._exiting.append((cg, tries + 1))
                continue
            cg.remove()
            if cg.leftover:
                sys.stderr.write(f"zone: cgroup not removed: {', '.join(cg.leftover)}\n")  # the server's log

    def close(self) -> None:
        self.tidy(wait=True)
        super().close()

    def release(self, box: Box) -> None:
        cg: cgroups.TestCgroup | None = box.state.pop("zone_cg_exiting", None)
        if cg is not None:
            cg.remove()
            if cg.leftover:
                # The test's result is out already: its notes would go nowhere. The
                # server's log is shown if the worker dies, and the session's sweep
                # removes the run's cgroups whatever is left.
                sys.stderr.write(f"{box.nodeid}: zone: cgroup not removed: {', '.join(cg.leftover)}\n")

    @staticmethod
    def _remove(box: Box, cg: cgroups.TestCgroup) -> None:
        cg.remove()
        if cg.leftover:
            box.notes.append(f"zone: cgroup not removed: {', '.join(cg.leftover)}")

"""What a probe test reads of the controller and its fork servers, from /proc.

Copied next to the inner suites of test_growth.py and test_soak.py, whose probe tests
(marked ``isolate("none")``: they run in the controller, which sees every fork server
whatever the tier) sample the processes a run keeps, to show they do not grow.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any


def children(pid: int) -> list[int]:
    out: list[int] = []
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as f:
                out += [int(x) for x in f.read().split()]
    except OSError:
        pass
    return out


def cmdline(pid: int | str) -> str:
    """A process's command line, "" once it is gone."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def comm(pid: int | str) -> str:
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()
    except OSError:
        return ""


def fork_servers() -> list[int]:
    """The controller's descendants that run the fork server (not its test children):
    spawned (its argv names the module) or forked by a gateway of the stem."""
    todo, found = [os.getpid()], []
    while todo:
        parent = todo.pop()
        for c in children(parent):
            server = "pytest_isolate.forkserver" in cmdline(c) or (
                comm(parent) == "isolate-gateway" and comm(c) != "isolate-gateway"
            )
            (found if server else todo).append(c)
    return found


def _rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def sample(pid: int, kids: bool = False) -> dict[str, Any]:
    out: dict[str, Any] = {
        "pid": pid,
        "fds": len(os.listdir(f"/proc/{pid}/fd")),
        "threads": len(os.listdir(f"/proc/{pid}/task")),
        "children": len(children(pid)),
        "rss": _rss(pid),
    }
    if kids:  # the spawner, a sandbox built ahead, an init still exiting
        out["kids"] = [sample(c) for c in children(pid)]
    return out


def install(root: Path) -> None:
    """This module beside an inner suite, importable from its tests (rootdir on path)."""
    (root / "procprobe.py").write_text(Path(__file__).read_text())

"""A run inside a UML guest of another run: the inner runs must leave the outer alone.

The guest sees the host's /tmp read-only, the outer run's record included, but neither
the host's kernel nor its pids. Before the owner record carried the boot id and pid
namespace, an inner run took the outer run for dead, swept the guest's cgroups named
after it, and the outer test (in one of them) died with SIGKILL.
"""

from __future__ import annotations

from typing import Any

import pytest

from tests.test_leaks import (
    ESCAPE,
    Owner,
    _holding,
    _intact,
    _read,
    _wait_exit,
    host_state,
    leaks,
    ours,
    popen_pytest,
    reaped,
    run_ids,
    wait_for,
)


def test_run_inside_a_guest_leaves_the_outer_run_alone(tmp_path_factory: pytest.TempPathFactory, h: Any) -> None:
    """A uml test runs pytest at the process tier and at the zone tier inside its guest
    while the outer run holds its objects: the outer test passes, its guest cgroup is
    still there after the inner runs, and so is every host object of the outer run until
    it ends; then nothing is left."""
    path, tok = _holding(tmp_path_factory, h, "nested-uml", '"uml"', ("process", "zone"))
    before = host_state(path, tok)
    snap = h.LeakSnapshot(path)
    with reaped(popen_pytest(path, ESCAPE, "-rA")) as proc:
        base = wait_for("started", path, timeout=120).parent
        owner = Owner(path, tok, run_ids(path))
        assert len(owner.ids) == 1, owner.ids
        held = ours(owner, before, host_state(path, tok))
        assert {"file", "process"} <= {line.split(":", 1)[0] for line in held}, held
        (base / "go-inner").touch()
        wait_for("inner-done", path, timeout=120)
        gone = _intact(owner, before, held)
        (base / "go").touch()
        rc = _wait_exit(proc, path, timeout=60)
    out = _read(str(path / "out.txt"))
    inner_out = "\n".join(_read(str(p)) for p in sorted(path.rglob("inner-*.txt")))
    assert rc == 0, out + inner_out
    assert "1 passed" in out, out
    assert gone == [], inner_out
    assert leaks(owner, before) == []
    assert snap.leaks() == []

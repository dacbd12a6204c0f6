"""``escapes.verdicts`` and ``escapes.merge`` on hand-made layer inputs."""

from __future__ import annotations

from typing import Any

import pytest

from pytest_isolate.observe.escapes import TECHNIQUES, TIER_ESCAPES, merge, verdicts


def audit(technique: str, detail: str = "d", where: str | None = "t.py:1", **extra: Any) -> dict[str, Any]:
    return {"t": "audit", "technique": technique, "detail": detail, "where": where, **extra}


def by(records: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    out = {r["technique"]: r for r in records}
    assert len(out) == len(records), "one record per technique"
    return out


def test_record_shape() -> None:
    (r,) = verdicts("jail", [audit("mount", ok=False)], [], [], [])
    assert set(r) == {"technique", "verdict", "evidence", "where", "layer"}
    assert r["layer"] == "audit" and r["where"] == "t.py:1"


@pytest.mark.parametrize("tier", ["process", "chroot", "jail", "zone", "uml"])
def test_what_the_sandbox_knows_wins_over_the_tier(tier: str) -> None:
    recs = by(verdicts(tier, [audit("mount", ok=False), audit("signal", host=False)], [], [], []))
    assert recs["mount"]["verdict"] == "blocked"
    assert recs["signal"]["verdict"] == "blocked"
    host = by(verdicts(tier, [audit("ptrace", host=True)], [], [], []))["ptrace"]
    assert host["verdict"] == ("blocked" if tier == "uml" else "escaped")


def test_unknown_outcome_follows_the_tier() -> None:
    for tier in ("process", "chroot", "jail", "zone", "uml"):
        (r,) = verdicts(tier, [audit("keyring")], [], [], [])
        want = "escaped" if tier == "process" or tier in TIER_ESCAPES["keyring"] else "blocked"
        assert r["verdict"] == want, tier
    assert verdicts("chroot", [audit("write-host-file")], [], [], [])[0]["verdict"] == "blocked"
    assert verdicts("process", [audit("write-host-file")], [], [], [])[0]["verdict"] == "escaped"


def test_after_leaving_the_root_paths_are_the_hosts() -> None:
    msgs = [audit("chroot", "chroot(.)", host=True, ok=True), audit("write-host-file", "open for write /etc/x")]
    recs = by(verdicts("chroot", msgs, [], [], []))
    assert recs["write-host-file"]["verdict"] == "escaped"
    assert "after leaving" in recs["write-host-file"]["evidence"]


def test_overlay_changes_are_blocked_writes() -> None:
    changes = ["created /etc/x", "modified /usr/lib/y", "... and 3 more"]
    (r,) = verdicts("jail", [], changes, [], [])
    assert r["technique"] == "write-host-file" and r["verdict"] == "blocked" and r["layer"] == "overlay"
    assert "created /etc/x" in r["evidence"] and "and 3 more" in r["evidence"]


@pytest.mark.parametrize(("tier", "verdict"), [("process", "escaped"), ("chroot", "escaped"), ("jail", "blocked"),
                                               ("zone", "blocked"), ("uml", "blocked")])
def test_daemons(tier: str, verdict: str) -> None:
    msgs = [audit("spawn", "sleep 30", where="t.py:9")]
    (r,) = verdicts(tier, msgs, [], [{"pid": 42, "cmdline": "sleep 30"}], [])
    assert (r["technique"], r["verdict"], r["layer"], r["where"]) == ("daemon", verdict, "process", "t.py:9")
    assert "pid 42" in r["evidence"]


def test_a_daemon_caught_before_its_exec_is_placed_where_the_test_forked() -> None:
    """A busy host can end a test while its daemon is still a fork of the test's process
    (not yet through ``execve``): no spawn's command matches it, and it began at the
    test's first fork."""
    msgs = [audit("spawn", "fork", where="t.py:4", kind="fork"), audit("spawn", "fork", where="t.py:6", kind="fork"),
            audit("spawn", "sleep 60", where="t.py:7", kind="exec")]
    (r,) = verdicts("zone", msgs, [], [{"pid": 3, "cmdline": "python -m pytest -q"}], [])
    assert (r["technique"], r["where"]) == ("daemon", "t.py:4")
    # A fork's "detail" is the word "fork": a path that holds it is no match.
    left = [{"pid": 3, "cmdline": "python -m pytest --basetemp=/tmp/test_fork0"}]
    assert verdicts("zone", [msgs[2], msgs[1]], [], left, [])[0]["where"] == "t.py:7"
    (r,) = verdicts("zone", [], [], [{"pid": 3, "cmdline": "python -m pytest -q"}], [])
    assert r["where"] is None  # no spawn seen: nowhere to point


def test_contacts_are_escapes_and_merge_with_audit() -> None:
    contacts = [{"technique": "signal", "evidence": "SIGUSR1 to the host canary", "layer": "canary"}]
    msgs = [audit("signal", "kill(7, 10)", host=False)]
    (r,) = verdicts("jail", msgs, [], [], contacts)
    assert r["verdict"] == "escaped" and r["layer"] == "canary"
    assert r["evidence"].startswith("SIGUSR1") and "kill(7, 10)" in r["evidence"]
    assert r["where"] == "t.py:1"  # from the audit record


def test_tamper_is_always_blocked_and_spawns_are_not_records() -> None:
    recs = verdicts("process", [audit("tamper", "replaced sys.addaudithook"), audit("spawn", "ls")], [], [], [])
    assert [(r["technique"], r["verdict"]) for r in recs] == [("tamper", "blocked")]


def test_garbage_messages_are_ignored() -> None:
    msgs: list[Any] = [{"t": "report"}, {"t": "audit"}, {"t": "audit", "technique": 3}, "x", audit("mount", ok=False)]
    assert [r["technique"] for r in verdicts("zone", msgs, [], [], [])] == ["mount"]


def test_merge_keeps_one_line_per_technique_and_caps_evidence() -> None:
    recs = [
        {"technique": "network", "verdict": "blocked", "evidence": "a" * 400, "where": None, "layer": "audit"},
        {"technique": "network", "verdict": "escaped", "evidence": "b" * 400, "where": "x.py:2", "layer": "canary"},
        {"technique": "mount", "verdict": "blocked", "evidence": "m", "where": None, "layer": "audit"},
    ]
    out = by(merge(recs))
    assert out["network"]["verdict"] == "escaped" and out["network"]["evidence"].startswith("b")
    assert len(out["network"]["evidence"]) <= 500 and out["network"]["where"] == "x.py:2"
    assert out["mount"]["evidence"] == "m"


def test_every_technique_has_a_tier_entry() -> None:
    assert set(TIER_ESCAPES) == set(TECHNIQUES)

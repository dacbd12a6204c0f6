"""The escape matrix: every technique at every tier, the plugin's verdict against reality.

One inner pytest run per tier executes ``sandbox_techniques.py`` (one test per
technique) with ``--isolate=<tier>``. The matrix's ``Oracle`` watches the host on its
own (its files, sockets, a signal-recording process, the mount table, the keyring, a
pty) and the few effects only the sandbox can observe come back as facts files. For
every cell the plugin's verdict in the JSON report must equal what happened.

``DESIGN`` is design.md §6; ``DIFFERENCES`` lists the cells where this host's reality
differs from it (each asserted, so a tier that gets fixed shows up here too).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from pytest_isolate import tiers

from .oracle import Oracle

HERE = Path(__file__).parent
TIERS = ("process", "chroot", "jail", "zone", "uml")
TECHNIQUES = (
    "chroot", "proc-root", "signal", "ptrace", "mount", "setns", "raw-socket", "network",
    "abstract-socket", "unix-socket", "device", "keyring", "core-pattern", "release-agent",
    "tiocsti", "write-host-file", "daemon",
)

E, B = "escaped", "blocked"
#: design.md §6 (``process`` confines nothing: everything reaches the host).
DESIGN: dict[str, dict[str, str]] = {
    t: {"process": E, "chroot": E, "jail": B, "zone": B, "uml": B} for t in TECHNIQUES
}
DESIGN["keyring"]["jail"] = E  # "escaped unless in a user ns": root jails have none
DESIGN["tiocsti"]["jail"] = E  # "escaped unless setsid": the jail does not setsid

_NO_DISKS = ("this host refuses opening block devices even to root (its device policy) and has no "
             "/dev/mem (no CONFIG_DEVMEM); on an ordinary host root opens the host's disk: escaped")

#: Cells where this host differs from §6: (technique, tier) -> (reality, why). Each is
#: asserted, so a tier that gets fixed shows up here. The lead decides: fix the tier, or
#: correct the docs.
DIFFERENCES: dict[tuple[str, str], tuple[str, str]] = {
    ("device", "process"): (B, _NO_DISKS),
    ("device", "chroot"): (B, _NO_DISKS),
    ("unix-socket", "chroot"): (B, "a host socket file seen through the overlay cannot be connected to "
                                   "(the overlay's inode is not the socket's)"),
    ("write-host-file", "chroot"): (B, "a plain write lands in the overlay; it reaches the host only after "
                                       "another escape (double chroot, /proc/<pid>/root, setns), rows that say escaped"),
    ("core-pattern", "jail"): (E, "the jail's /proc/sys is read-only, but the jail keeps CAP_SYS_ADMIN: root "
                                  "remounts it read-write in a mount namespace of its own and opens the host's "
                                  "core_pattern for writing (host code execution). Fix: drop CAP_SYS_ADMIN, or a "
                                  "user namespace for root jails too"),
    ("release-agent", "jail"): (E, "CAP_SYS_ADMIN lets the jail mount the host's cgroup v1 'pids' hierarchy and "
                                   "open its release_agent for writing (host code execution). Fix: drop "
                                   "CAP_SYS_ADMIN, or a user namespace for root jails too"),
}

#: Cells where the plugin's verdict is known to differ from reality: (technique, tier) ->
#: (why, strict). xfail; a strict one turns into a failure once fixed (remove it here).
PLUGIN_GAPS: dict[tuple[str, str], tuple[str, bool]] = {
    ("daemon", "uml"): ("uml: the test's leftover processes are listed from its guest cgroup before it is "
                        "killed, and from the runner's children; once in four full runs (loaded host) the "
                        "daemon was in neither list, not reproduced alone: a race remains", False),
}


def _availability(tier: str) -> str | None:
    try:
        return tiers.availability(tier)
    except Exception as exc:  # noqa: BLE001 - e.g. uml.py not there yet
        return f"{tier}: {exc}"


def _facts(output: str) -> dict[str, dict[str, Any]]:
    """The sandbox tests' ``MATRIX-FACTS <name> <json>`` lines (the last one wins)."""
    out: dict[str, dict[str, Any]] = {}
    for line in output.splitlines():
        if line.startswith("MATRIX-FACTS "):
            _, name, data = line.split(" ", 2)
            try:
                out[name] = json.loads(data)
            except ValueError:
                continue
    return out


def _reality(technique: str, oracle: Oracle, facts: dict[str, Any], host_boot: str) -> str:
    """What actually happened to the host, from the oracle (and, where only the sandbox
    can see the effect, its facts checked against the host's identity)."""
    same_kernel = facts.get("boot_id") == host_boot
    d = oracle.dir
    if technique in ("chroot", "proc-root", "setns"):
        return E if (d / technique).exists() else B
    if technique == "write-host-file":
        return E if (d / "direct").exists() else B
    if technique == "signal":
        return E if any(sig == 10 and pid != os.getpid() for sig, pid in oracle.signals) else B
    if technique == "ptrace":
        return E if oracle.tracers else B
    if technique == "mount":
        return E if oracle.mounts else B
    if technique == "network":
        return E if any(oracle.token.encode() in r for r in oracle.received["tcp"]) else B
    if technique == "abstract-socket":
        return E if any(oracle.token.encode() in r for r in oracle.received["abstract"]) else B
    if technique == "unix-socket":
        return E if any(oracle.token.encode() in r for r in oracle.received["unix"]) else B
    if technique == "raw-socket":
        return E if facts.get("saw_host_traffic") else B
    if technique == "device":
        return E if facts.get("host_disk") else B
    if technique == "keyring":
        return E if oracle.keys else B
    if technique in ("core-pattern", "release-agent"):
        return E if facts.get("open") == "ok" and same_kernel else B
    if technique == "tiocsti":
        return E if f"tiocsti-{oracle.token}".encode() in oracle.read_pty_input() else B
    if technique == "daemon":
        return E if str(facts.get("pidns")) == oracle.env()["MATRIX_HOST_PIDNS"] and same_kernel else B
    raise AssertionError(technique)


class TierRun:
    def __init__(self, tier: str, verdicts: dict[str, str], reality: dict[str, str], records: dict[str, Any],
                 facts: dict[str, dict[str, Any]], output: str, leftovers: list[str]) -> None:
        self.tier = tier
        self.verdicts = verdicts
        self.reality = reality
        self.records = records
        self.facts = facts
        self.output = output
        self.leftovers = leftovers


@pytest.fixture(scope="module", params=TIERS)
def tier_run(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> TierRun:
    tier = request.param
    reason = _availability(tier)
    if reason:
        pytest.skip(f"tier {tier} unavailable here: {reason}")
    work = tmp_path_factory.mktemp(f"matrix-{tier}")
    shutil.copy(HERE / "sandbox_techniques.py", work / "test_techniques.py")
    report_path = work / "report.json"
    oracle = Oracle(tier)
    try:
        env = {**os.environ, **oracle.env()}
        env.pop("PYTEST_ADDOPTS", None)
        for k in [k for k in env if k.startswith("PYTEST_ISOLATE_")]:
            env.pop(k)  # the inner run plants its own canaries
        cmd = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", f"--isolate={tier}",
               f"--isolate-report={report_path}", "--isolate-on-escape=warn",
               "-rA", "-q", "test_techniques.py"]
        proc = subprocess.run(cmd, cwd=work, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                              stderr=oracle.slave, timeout=900, check=False)
        output = proc.stdout.decode(errors="replace")
        (work / "output.txt").write_text(output)
        oracle.settle()
        report = json.loads(report_path.read_text())
        host_boot = oracle.env()["MATRIX_BOOT_ID"]
        verdicts: dict[str, str] = {}
        records: dict[str, Any] = {}
        all_facts = _facts(output)
        facts: dict[str, dict[str, Any]] = {}
        reality: dict[str, str] = {}
        for technique in TECHNIQUES:
            name = technique.replace("-", "_")
            rec = next((r for r in report["tests"] if r["nodeid"].endswith(f"::test_{name}")), None)
            assert rec is not None, f"no record for test_{name}:\n{output[-3000:]}"
            records[technique] = rec
            mine = [e for e in rec["escapes"] if e["technique"] == technique]
            verdicts[technique] = "escaped" if any(e["verdict"] == E for e in mine) else (
                "blocked" if mine else "none")
            facts[technique] = all_facts.get(name, {})
            reality[technique] = _reality(technique, oracle, facts[technique], host_boot)
        leftovers = oracle.cleanup_host()
        run = TierRun(tier, verdicts, reality, records, facts, output, leftovers)
        print(f"\n[{tier}] reality:  " + "  ".join(f"{t}={reality[t][0].upper()}" for t in TECHNIQUES))
        print(f"[{tier}] plugin:   " + "  ".join(f"{t}={verdicts[t][0].upper()}" for t in TECHNIQUES))
        return run
    finally:
        oracle.close()


@pytest.mark.parametrize("technique", TECHNIQUES)
def test_cell(tier_run: TierRun, technique: str, request: pytest.FixtureRequest) -> None:
    tier = tier_run.tier
    gap = PLUGIN_GAPS.get((technique, tier))
    if gap:
        request.applymarker(pytest.mark.xfail(reason=gap[0], strict=gap[1]))
    rec = tier_run.records[technique]
    facts = tier_run.facts[technique]
    context = (f"\nrecord: {json.dumps(rec['escapes'], indent=1)}\nfacts: {json.dumps(facts)}"
               f"\noutcome: {rec['outcome']}")
    # The technique must actually have been tried: an error in the inner test would make
    # "blocked" vacuous.
    assert rec["outcome"] == "passed", f"{tier}/{technique}: the inner test did not run through" + context + (
        "\n" + tier_run.output[-2000:])
    assert tier_run.verdicts[technique] == tier_run.reality[technique], (
        f"{tier}/{technique}: the plugin said {tier_run.verdicts[technique]}, "
        f"the host saw {tier_run.reality[technique]}" + context)
    expected = DESIGN[technique][tier]
    known = DIFFERENCES.get((technique, tier))
    if known is not None:
        assert tier_run.reality[technique] == known[0], f"{tier}/{technique}: known difference changed" + context
    else:
        assert tier_run.reality[technique] == expected, (
            f"{tier}/{technique}: design.md §6 says {expected}, reality is {tier_run.reality[technique]}" + context)


def test_nothing_left(tier_run: TierRun) -> None:
    """No mount, key or process of the matrix survives a tier's run."""
    assert tier_run.leftovers == []


#: Techniques whose escape the host-side layer (canaries, mount table, keyring) must see
#: on its own, whatever the audit hook said: tier -> techniques.
KERNEL_SEEN: dict[str, set[str]] = {
    "process": {"chroot", "proc-root", "signal", "ptrace", "mount", "setns", "network", "abstract-socket",
                "keyring", "write-host-file"},
    # chroot: the test's mount lands under the run's own dir (the tier's root), which the
    # mount-table watch leaves to the tier's clean-up.
    "chroot": {"chroot", "proc-root", "signal", "ptrace", "setns", "network", "abstract-socket", "keyring"},
    "jail": {"keyring"},
}


@pytest.mark.parametrize("technique", TECHNIQUES)
def test_host_side_layer_sees_escapes_on_its_own(tier_run: TierRun, technique: str) -> None:
    """Canaries and host-state watches are what catch C code and subprocesses: for the
    techniques they cover, an escape must show up there too, not only in the audit."""
    if technique not in KERNEL_SEEN.get(tier_run.tier, set()):
        return
    assert tier_run.reality[technique] == E
    layers = {e["layer"] for e in tier_run.records[technique]["escapes"] if e["verdict"] == E}
    assert layers & {"canary", "kernel"}, tier_run.records[technique]["escapes"]

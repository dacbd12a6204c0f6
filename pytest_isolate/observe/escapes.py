"""Escape verdicts: the catalogue of techniques, and the judgement of every layer's findings.

``verdicts`` runs on the host side and turns the layers (audit messages from audit.py,
the overlay's change list, processes that outlived the test, canary contacts) into one
record per technique: ``blocked`` when the attempt stayed inside the sandbox,
``escaped`` when its effect reached the host. Where the sandbox could tell by itself the
audit message carries ``ok``/``host`` and the verdict follows it; otherwise the verdict
is what the tier is known to allow (``TIER_ESCAPES``, measured by
``tests/escapes/test_matrix.py``).
"""

from __future__ import annotations

from typing import Any

from pytest_isolate.observe.canaries import Canaries

__all__ = ["Canaries", "TECHNIQUES", "TIER_ESCAPES", "merge", "verdicts"]

#: Stable short names, with what each one is (docs/escapes.md has the long form).
TECHNIQUES: dict[str, str] = {
    "chroot": "chroot out of the sandbox root (double chroot, fchdir)",
    "proc-root": "another process's root/cwd/fds through /proc/<pid>/",
    "signal": "signal a process outside the test",
    "ptrace": "trace or poke the memory of a process outside the test",
    "mount": "mount, umount or pivot_root",
    "setns": "join another process's namespaces (/proc/<pid>/ns/*)",
    "unshare": "create new namespaces",
    "raw-socket": "raw or packet socket",
    "network": "connect to (or listen on) the host's network",
    "abstract-socket": "connect to an abstract unix socket",
    "unix-socket": "connect to a unix socket file of a host service",
    "device": "create or open a device node (host disks, /dev/mem)",
    "keyring": "kernel keyring (add_key, keyctl)",
    "core-pattern": "kernel usermode helpers: core_pattern, modprobe, binfmt_misc",
    "release-agent": "cgroup v1 release_agent / notify_on_release",
    "sysctl": "write a kernel tunable under /proc/sys",
    "sysrq": "write /proc/sysrq-trigger",
    "sysfs": "write under /sys",
    "kernel-module": "load or remove a kernel module",
    "reboot": "reboot or kexec",
    "tiocsti": "inject input into a terminal (TIOCSTI, TIOCLINUX)",
    "write-host-file": "write a file outside tmp_path and the temp dirs",
    "daemon": "a process that outlived its test",
    "tamper": "tamper with the escape detector itself",
}

_PRIVILEGED = frozenset({"process", "chroot"})

#: Tiers at which an attempt, when the sandbox could not tell the outcome itself, reaches
#: the host. Measured by tests/escapes/test_matrix.py on a root host; ``uml`` is absent
#: everywhere (a guest kernel sits between the test and the host).
TIER_ESCAPES: dict[str, frozenset[str]] = {
    "chroot": _PRIVILEGED,
    "proc-root": _PRIVILEGED,
    "signal": _PRIVILEGED,
    "ptrace": _PRIVILEGED,
    "mount": _PRIVILEGED,
    "setns": _PRIVILEGED,
    "unshare": frozenset(),
    "raw-socket": _PRIVILEGED,
    "network": _PRIVILEGED,
    "abstract-socket": _PRIVILEGED,
    # Through an overlay a host socket file cannot be connected to (the overlay's inode
    # is not the socket's): only the host's own root reaches host services this way.
    "unix-socket": frozenset({"process"}),
    "device": _PRIVILEGED | {"jail"},
    # The zone's seccomp filter refuses add_key/request_key/keyctl (facets.seccomp).
    "keyring": _PRIVILEGED | {"jail"},
    # The jail's /proc/sys is read-only, but its root keeps CAP_SYS_ADMIN and remounts it.
    "core-pattern": _PRIVILEGED | {"jail"},
    "release-agent": _PRIVILEGED | {"jail"},
    "sysctl": _PRIVILEGED | {"jail"},
    "sysrq": _PRIVILEGED | {"jail"},
    "sysfs": _PRIVILEGED,
    "kernel-module": _PRIVILEGED | {"jail"},
    "reboot": _PRIVILEGED | {"jail"},
    "tiocsti": _PRIVILEGED | {"jail"},
    "write-host-file": frozenset({"process"}),
    "daemon": _PRIVILEGED,
    "tamper": frozenset(),
}

#: Techniques whose effect depends on *where* the process is (root, namespaces): once a
#: test reached the host's root, these reach the host too, whatever the tier.
_FOLLOW_ROOT = frozenset({"write-host-file", "device", "unix-socket", "sysfs"})

#: A merged record's evidence is cut to this many characters.
MAX_EVIDENCE = 500

# --- verdicts ---------------------------------------------------------------------------


def _record(technique: str, verdict: str, evidence: str, where: str | None, layer: str) -> dict[str, Any]:
    return {"technique": technique, "verdict": verdict, "evidence": evidence, "where": where, "layer": layer}


def _tier_allows(tier: str, technique: str) -> bool:
    if tier == "process":
        return True
    return tier in TIER_ESCAPES.get(technique, frozenset({"process"}))


def verdicts(
    tier: str,
    msgs: list[dict[str, Any]],
    changes: list[str],
    leftovers: list[dict[str, Any]],
    contacts: list[dict[str, Any]],
) -> list[dict[str, Any]]:
    """One escape record per technique the test tried, from every layer's findings."""
    recs: list[dict[str, Any]] = []
    audits = [m for m in msgs if isinstance(m, dict) and m.get("t") == "audit" and isinstance(m.get("technique"), str)]
    spawns = [m for m in audits if m["technique"] == "spawn"]
    # Once a test stood on the host's root (chroot escape, setns), what it writes or
    # opens by path afterwards is the host's, whatever the tier would otherwise stop.
    at_host = tier != "uml" and any(m.get("host") and m["technique"] in ("chroot", "setns", "mount") for m in audits)
    for m in audits:
        technique = m["technique"]
        if technique == "spawn":
            continue
        detail = str(m.get("detail", ""))
        if tier == "uml" and m.get("host") is True:
            # The audit hook's "host" is the kernel it runs on: in UML, the guest's.
            verdict, why = "blocked", " (the guest kernel's, not the host's)"
        elif m.get("ok") is False:
            verdict, why = "blocked", ""
        elif m.get("host") is True:
            verdict, why = "escaped", ""
        elif m.get("host") is False:
            verdict, why = "blocked", " (stayed inside the sandbox)"
        elif at_host and technique in _FOLLOW_ROOT:
            verdict, why = "escaped", " (after leaving the sandbox root)"
        else:
            verdict, why = ("escaped" if _tier_allows(tier, technique) else "blocked"), ""
        if technique == "tamper":
            verdict = "blocked"  # the hook is still installed: nothing got past it
        recs.append(_record(technique, verdict, detail + why, m.get("where"), "audit"))
    for line in changes:
        if line.startswith("... and"):
            if recs and recs[-1]["layer"] == "overlay":
                recs[-1]["evidence"] += f", {line[4:]}"
            continue
        recs.append(_record("write-host-file", "blocked", f"{line} (kept in the sandbox's overlay)", None, "overlay"))
    for p in leftovers:
        cmdline = str(p.get("cmdline", ""))
        where = None
        for s in spawns:
            d = str(s.get("detail", ""))
            if s.get("kind") == "fork":
                continue  # no command to match ("fork" was found in a path)
            if d and (d in cmdline or cmdline.startswith(d.split(" ")[0])):
                where = s.get("where")
                break
        else:
            # None ran it: a fork not yet through its exec (its command line is still the
            # test's own), caught by a busy host's scheduler; it began where the test
            # first forked or spawned.
            where = spawns[0].get("where") if spawns else None
        escaped = tier in ("process", "chroot")
        how = "outlived its test; killed by the fork server" if escaped else "killed with the sandbox's PID namespace"
        recs.append(_record("daemon", "escaped" if escaped else "blocked",
                            f"pid {p.get('pid')} {cmdline[:200]!r} {how}", where, "process"))
    for c in contacts:
        technique = str(c.get("technique", "unknown"))
        if technique == "mount" and tier in _OWN_MOUNT_NS and not at_host:
            # The host's mount table is shared by everything on the machine. A test with a
            # mount namespace of its own changes it only after reaching the host's (setns,
            # a chroot escape), which its own record shows; otherwise the mount was made by
            # someone else (another run, systemd, the user) and is not this test's escape.
            continue
        recs.append(_record(technique, "escaped", str(c.get("evidence", "")),
                            c.get("where"), str(c.get("layer", "canary"))))
    return merge(recs)


#: Tiers whose tests have a mount namespace of their own (a UML guest: a kernel of its own).
_OWN_MOUNT_NS = frozenset({"jail", "zone", "uml"})


def merge(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One record per technique: ``escaped`` wins; its evidence first, the rest after.

    Exposed for callers that get records from two places (the fork server's and the
    controller's canary verdicts) and want one line per technique in the report.
    """
    by: dict[str, list[dict[str, Any]]] = {}
    for r in records:
        by.setdefault(r["technique"], []).append(r)
    out: list[dict[str, Any]] = []
    for technique, rs in by.items():
        if len(rs) == 1:
            out.append(dict(rs[0]))
            continue
        escaped = [r for r in rs if r["verdict"] == "escaped"]
        lead = escaped or rs
        ordered = lead + [r for r in rs if r not in lead]
        evidence: list[str] = []
        for r in ordered:
            e = r.get("evidence") or ""
            if e and e not in evidence:
                evidence.append(e)
        text = "; ".join(evidence)
        if len(text) > MAX_EVIDENCE:
            text = text[: MAX_EVIDENCE - 3] + "..."
        where = next((r.get("where") for r in ordered if r.get("where")), None)
        out.append(_record(technique, lead[0]["verdict"], text, where, lead[0].get("layer", "audit")))
    return out

"""Seccomp facet on the real kernel: filters are installed in forked children only
(a filter can never be removed, so the pytest process must never get one)."""

from __future__ import annotations

import ctypes
import errno
import os
import subprocess
import uuid
from typing import Any

import pytest

from pytest_isolate.facets import caps, seccomp
from tests.forked import in_child

pytestmark = pytest.mark.skipif(not seccomp.supported(), reason="no seccomp syscall table for this machine")

KEY_SPEC_PROCESS_KEYRING = -2
KEY_SPEC_USER_KEYRING = -4
KEYCTL_GET_KEYRING_ID = 0
KEYCTL_INVALIDATE = 21

_libc = ctypes.CDLL(None, use_errno=True)
_syscall = _libc.syscall
_syscall.restype = ctypes.c_long
_NATIVE = seccomp.SYSCALLS[seccomp.machine_abis()[0]]


def _add_key(desc: bytes, keyring: int) -> tuple[int, int]:
    """(result, errno) of add_key("user", desc, "x", keyring) straight through syscall(2)."""
    ctypes.set_errno(0)
    ret = _syscall(_NATIVE["add_key"], b"user", desc, b"x", ctypes.c_size_t(1), ctypes.c_int(keyring))
    return ret, ctypes.get_errno()


def _keys_listed(desc: str) -> bool:
    try:
        with open("/proc/keys") as f:
            return any(desc in line for line in f)
    except FileNotFoundError:
        pytest.skip("no /proc/keys (kernel without CONFIG_KEYS)")


def _filtered() -> None:
    caps.no_new_privs()
    assert seccomp.install()


def test_keyring_calls_fail_with_eperm_and_the_rest_runs() -> None:
    desc = f"pytest-isolate-seccomp-{uuid.uuid4().hex}"

    def child() -> dict[str, Any]:
        added = _add_key(desc.encode(), KEY_SPEC_USER_KEYRING)
        ctypes.set_errno(0)
        req = _syscall(_NATIVE["request_key"], b"user", desc.encode(), None, ctypes.c_int(0))
        req_err = ctypes.get_errno()
        ctypes.set_errno(0)
        ctl = _syscall(_NATIVE["keyctl"], KEYCTL_GET_KEYRING_ID, ctypes.c_long(KEY_SPEC_USER_KEYRING), 0)
        ctl_err = ctypes.get_errno()
        if added[0] >= 0:  # the filter failed: do not leave the key in the host's keyring
            _syscall(_NATIVE["keyctl"], KEYCTL_INVALIDATE, ctypes.c_long(added[0]))
        return {
            "add_key": list(added),
            "request_key": [req, req_err],
            "keyctl": [ctl, ctl_err],
            "getpid": _syscall(39 if seccomp.machine_abis()[0] == seccomp.AUDIT_ARCH_X86_64 else 172) == os.getpid(),
            "mode": seccomp.mode(),
        }

    got = in_child(child, setup=_filtered)
    assert got["add_key"] == [-1, errno.EPERM]
    assert got["request_key"] == [-1, errno.EPERM]
    assert got["keyctl"] == [-1, errno.EPERM]
    assert got["getpid"] is True
    assert got["mode"] == seccomp.SECCOMP_MODE_FILTER
    assert not _keys_listed(desc), "the key reached the host's keyring"


def test_without_the_filter_the_key_is_seen() -> None:
    """The control for the test above: another process's /proc/keys does list a key a
    child adds (to its own process keyring, which a fork does not inherit and which dies
    with the child: no host keyring is touched)."""
    desc = f"pytest-isolate-seccomp-{uuid.uuid4().hex}"

    def child() -> list[Any]:
        key, err = _add_key(desc.encode(), KEY_SPEC_PROCESS_KEYRING)
        if key < 0:
            return ["add_key", os.strerror(err)]
        try:
            r, w = os.pipe()
            pid = os.fork()
            if pid == 0:  # pragma: no cover - grandchild: an outsider to the key
                os.write(w, b"1" if _keys_listed(desc) else b"0")
                os._exit(0)
            os.close(w)
            seen = os.read(r, 1) == b"1"
            os.waitpid(pid, 0)
            return ["listed", seen]
        finally:
            _syscall(_NATIVE["keyctl"], KEYCTL_INVALIDATE, ctypes.c_long(key))

    got = in_child(child)
    if got[0] == "add_key":
        pytest.skip(f"add_key refused here without a filter: {got[1]}")
    assert got == ["listed", True]


def test_the_filter_survives_exec_and_fork() -> None:
    def child() -> list[str]:
        out = subprocess.run(
            ["/bin/sh", "-c", "grep '^Seccomp:' /proc/self/status"],
            capture_output=True, text=True, check=False,
        ).stdout
        return [line.strip() for line in out.splitlines()]

    got = in_child(child, setup=_filtered)
    assert got[0].split() == ["Seccomp:", "2"]


def test_needs_no_new_privs_without_cap_sys_admin() -> None:
    """Without no_new_privs an unprivileged filter is refused (EACCES): the zone must keep
    its order (drop SYS_ADMIN, no_new_privs, then the filter)."""

    def child() -> str:
        caps.drop([caps.CAP_SYS_ADMIN])
        try:
            seccomp.install()
        except OSError as exc:
            return errno.errorcode[exc.errno]
        return "installed"

    assert in_child(child) == "EACCES"


def test_program_shape() -> None:
    """One block per ABI ending in ALLOW, an unknown ABI killed, every jump in range."""
    prog = seccomp.build(seccomp.machine_abis("x86_64"))
    assert prog[0] == (seccomp.BPF_LD_W_ABS, 0, 0, 4)
    assert prog[1][:2] == (seccomp.BPF_JEQ_K, 0) and prog[1][3] == seccomp.AUDIT_ARCH_X86_64
    rets = [i for i, insn in enumerate(prog) if insn[0] == seccomp.BPF_RET_K]
    assert [prog[i][3] for i in rets] == [seccomp.SECCOMP_RET_ALLOW, seccomp.SECCOMP_RET_ALLOW,
                                          seccomp.SECCOMP_RET_KILL_PROCESS,
                                          seccomp.SECCOMP_RET_ERRNO | errno.EPERM]
    deny = rets[-1]
    denied = {insn[3] for i, insn in enumerate(prog) if insn[0] == seccomp.BPF_JEQ_K and i + 1 + insn[1] == deny
              and insn[1]}
    assert denied == set(seccomp.SYSCALLS[seccomp.AUDIT_ARCH_X86_64].values()) | set(
        seccomp.SYSCALLS[seccomp.AUDIT_ARCH_I386].values())
    assert set(seccomp.DENIED) == {"add_key", "request_key", "keyctl"}
    assert seccomp.machine_abis("riscv64") == ()

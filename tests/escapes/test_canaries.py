"""The host-side tripwires, contacted for real."""

from __future__ import annotations

import contextlib
import ctypes
import os
import secrets
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pytest_isolate.observe.canaries import Canaries

libc = ctypes.CDLL(None, use_errno=True)


@pytest.fixture
def canaries(tmp_path: Path) -> Iterator[Canaries]:
    c = Canaries(tmp_path / "rundir", f"t{secrets.token_hex(4)}")
    try:
        assert c.problems == []
        yield c
    finally:
        c.close()


def wait_contacts(c: Canaries, n: int = 1, timeout: float = 2.0) -> list[dict]:
    got: list[dict] = []
    end = time.monotonic() + timeout
    while len(got) < n and time.monotonic() < end:
        got += c.contacts()
        time.sleep(0.01)
    return got


def test_env_names_every_tripwire(canaries: Canaries) -> None:
    env = canaries.env
    for key in ("PYTEST_ISOLATE_CANARY_FILE", "PYTEST_ISOLATE_CANARY_DIR", "PYTEST_ISOLATE_CANARY_PORT",
                "PYTEST_ISOLATE_CANARY_UNIX", "PYTEST_ISOLATE_CANARY_PID", "PYTEST_ISOLATE_HOST_PORTS"):
        assert key in env
    assert canaries.token in Path(env["PYTEST_ISOLATE_CANARY_FILE"]).read_text()
    assert int(env["PYTEST_ISOLATE_CANARY_PORT"]) in {int(p) for p in env["PYTEST_ISOLATE_HOST_PORTS"].split(",")}
    assert env["PYTEST_ISOLATE_CANARY_UNIX"] in env["PYTEST_ISOLATE_HOST_ABSTRACT"].split("\n")


def test_quiet_without_contact(canaries: Canaries) -> None:
    Path(canaries.env["PYTEST_ISOLATE_CANARY_FILE"]).read_text()  # reading is no contact
    os.listdir(canaries.env["PYTEST_ISOLATE_CANARY_DIR"])
    time.sleep(0.15)
    assert canaries.contacts() == []


def test_file_written_or_created(canaries: Canaries) -> None:
    with open(canaries.env["PYTEST_ISOLATE_CANARY_FILE"], "a") as f:
        f.write("x")
    (Path(canaries.env["PYTEST_ISOLATE_CANARY_DIR"]) / "new").write_text("y")
    got = canaries.contacts()
    assert {c["technique"] for c in got} == {"write-host-file"}
    text = " ".join(c["evidence"] for c in got)
    assert "marker modified" in text and "new created" in text


def test_tcp_and_abstract_socket(canaries: Canaries) -> None:
    with socket.create_connection(("127.0.0.1", int(canaries.env["PYTEST_ISOLATE_CANARY_PORT"]))) as s:
        s.sendall(b"hello")
    with socket.socket(socket.AF_UNIX) as u:
        u.connect("\0" + canaries.env["PYTEST_ISOLATE_CANARY_UNIX"])
    got = canaries.contacts()
    kinds = {c["technique"]: c["evidence"] for c in got}
    assert "b'hello'" in kinds["network"]
    assert f"pid {os.getpid()}" in kinds["abstract-socket"]


def test_signal_is_attributed_to_the_sender(canaries: Canaries) -> None:
    pid = int(canaries.env["PYTEST_ISOLATE_CANARY_PID"])
    os.kill(pid, signal.SIGUSR1)
    got = canaries.contacts()  # contacts() waits for a signal still pending
    assert [c["technique"] for c in got] == ["signal"]
    assert "SIGUSR1" in got[0]["evidence"] and f"from pid {os.getpid()}" in got[0]["evidence"]


def test_signal_from_a_short_lived_subprocess(canaries: Canaries) -> None:
    subprocess.run(["kill", "-USR2", canaries.env["PYTEST_ISOLATE_CANARY_PID"]], check=True)
    got = wait_contacts(canaries)
    assert got and "SIGUSR2" in got[0]["evidence"]


def test_ptrace_attach_and_stop(canaries: Canaries) -> None:
    pid = int(canaries.env["PYTEST_ISOLATE_CANARY_PID"])
    libc.ptrace.argtypes = [ctypes.c_long, ctypes.c_long, ctypes.c_void_p, ctypes.c_void_p]
    assert libc.ptrace(16, pid, None, None) == 0  # PTRACE_ATTACH
    try:
        os.waitpid(pid, 0x40000000)
        got = canaries.contacts()
    finally:
        libc.ptrace(17, pid, None, None)  # PTRACE_DETACH
    assert [c["technique"] for c in got] == ["ptrace"]
    assert f"traced by pid {os.getpid()}" in got[0]["evidence"]
    os.kill(pid, signal.SIGSTOP)
    got = wait_contacts(canaries)
    assert any("stopped" in c["evidence"] for c in got)
    time.sleep(0.1)
    with open(f"/proc/{pid}/status") as f:
        assert "\nState:\tS" in f.read()  # resumed by the canaries


def test_killed_canary_process_is_a_contact(canaries: Canaries) -> None:
    os.kill(int(canaries.env["PYTEST_ISOLATE_CANARY_PID"]), signal.SIGKILL)
    got = wait_contacts(canaries)
    assert got and "was killed" in got[0]["evidence"]


def test_mount_in_the_host_namespace(canaries: Canaries, tmp_path: Path) -> None:
    target = tmp_path / "m"
    target.mkdir()
    assert libc.mount(b"pytest-isolate-canary-test", str(target).encode(), b"tmpfs", 0, None) == 0
    try:
        got = canaries.contacts()
    finally:
        libc.umount2(str(target).encode(), 2)
    assert [(c["technique"], c["layer"]) for c in got] == [("mount", "kernel")]
    assert str(target) in got[0]["evidence"]
    assert canaries.contacts() == []  # an unmount is no new contact


def test_mounts_of_the_run_itself_are_not_contacts(tmp_path: Path) -> None:
    rundir = tmp_path / "rundir"
    (rundir / "x").mkdir(parents=True)
    with Canaries(rundir, f"t{secrets.token_hex(4)}") as c:
        assert libc.mount(b"run-own", str(rundir / "x").encode(), b"tmpfs", 0, None) == 0
        try:
            assert c.contacts() == []
        finally:
            libc.umount2(str(rundir / "x").encode(), 2)


def test_contacts_cost_little(canaries: Canaries) -> None:
    t0 = time.perf_counter()
    for _ in range(100):
        canaries.contacts()
    per = (time.perf_counter() - t0) / 100
    print(f"\ncontacts(): {per * 1e3:.3f} ms per call")
    assert per < 0.005


def test_close_leaves_nothing(tmp_path: Path) -> None:
    run_id = f"t{secrets.token_hex(4)}"
    c = Canaries(tmp_path / "rundir", run_id)
    pid = int(c.env["PYTEST_ISOLATE_CANARY_PID"])
    port = int(c.env["PYTEST_ISOLATE_CANARY_PORT"])
    c.close()
    c.close()  # idempotent
    assert c.contacts() == []
    assert not Path(c.env["PYTEST_ISOLATE_CANARY_DIR"]).exists()
    assert not os.path.exists(f"/proc/{pid}")
    with pytest.raises(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
        pass
    with open("/proc/net/unix") as f:
        assert f"@pytest-isolate-{run_id}" not in f.read()
    with contextlib.suppress(OSError):
        assert not [p for p in os.listdir("/proc") if p.isdigit() and run_id.encode() in
                    open(f"/proc/{p}/cmdline", "rb").read()]


def test_kernel_hook_change_is_reported_and_undone(tmp_path: Path) -> None:
    """A stand-in file (changing the real core_pattern in a test is not an option)."""
    hook = tmp_path / "core_pattern"
    hook.write_text("core\n")
    with Canaries(tmp_path / "rundir", f"t{secrets.token_hex(4)}", hooks=[str(hook)]) as c:
        hook.write_text("|/tmp/evil %p\n")
        got = c.contacts()
        assert [(x["technique"], x["layer"]) for x in got] == [("core-pattern", "kernel")]
        assert "'|/tmp/evil %p'" in got[0]["evidence"] and "(restored)" in got[0]["evidence"]
        assert hook.read_text() == "core\n"
        assert c.contacts() == []


def test_the_real_kernel_hooks_are_watched() -> None:
    from pytest_isolate.observe.canaries import kernel_hooks

    hooks = kernel_hooks()
    assert "/proc/sys/kernel/core_pattern" in hooks
    assert any(h.endswith("/release_agent") for h in hooks) or not os.path.isdir("/sys/fs/cgroup/pids")


def test_new_key_in_the_hosts_keyring(canaries: Canaries) -> None:
    nr = {"x86_64": (248, 250), "aarch64": (217, 219)}[os.uname().machine]
    libc.syscall.restype = ctypes.c_long
    desc = f"pytest-isolate-canary-test-{secrets.token_hex(4)}".encode()
    key = libc.syscall(nr[0], b"user", desc, b"x", ctypes.c_size_t(1), ctypes.c_int(-4))  # KEY_SPEC_USER_KEYRING
    assert key > 0, os.strerror(ctypes.get_errno())
    try:
        got = canaries.contacts()
    finally:
        libc.syscall(nr[1], 21, ctypes.c_long(key))  # KEYCTL_INVALIDATE
    assert [c["technique"] for c in got] == ["keyring"]
    assert desc.decode() in got[0]["evidence"]


def test_unsettled_canaries_are_armed_by_the_first_contacts(tmp_path: Path) -> None:
    """The controller plants without waiting for the canary process (its start-up then
    overlaps the worker's); the first ``contacts`` waits until it is armed, so a signal
    sent after it is reported with its sender, never as a killed canary."""
    c = Canaries(tmp_path, "unsettled", settle=False)
    try:
        assert c.contacts() == []
        os.kill(int(c.env["PYTEST_ISOLATE_CANARY_PID"]), signal.SIGUSR1)
        got = wait_contacts(c)
        assert [x["technique"] for x in got] == ["signal"]
        assert "SIGUSR1" in got[0]["evidence"] and f"from pid {os.getpid()}" in got[0]["evidence"]
        assert c.problems == []
    finally:
        c.close()


def test_host_listeners_from_sock_diag_match_proc() -> None:
    """The listening ports the sandboxes' audit hook is told about come from sock_diag
    (fast); they are the ones ``/proc/net/tcp{,6}`` lists, beyond one netlink buffer."""
    from pytest_isolate.observe import canaries

    with contextlib.ExitStack() as stack:
        opened = []
        for family, addr, n in ((socket.AF_INET, "127.0.0.1", 300), (socket.AF_INET6, "::1", 5)):
            for _ in range(n):
                s = stack.enter_context(socket.socket(family))
                s.bind((addr, 0))
                s.listen()
                opened.append(s.getsockname()[1])
        connected = stack.enter_context(socket.create_connection(("127.0.0.1", opened[0])))
        ports = canaries._listening_ports()
        assert set(opened) <= ports
        assert connected.getsockname()[1] not in ports  # not a listener
        assert ports == canaries._proc_listening_ports()
        env = canaries._host_services_env()
        assert {int(p) for p in env["PYTEST_ISOLATE_HOST_PORTS"].split(",")} >= set(opened)

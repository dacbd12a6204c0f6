"""Every fault a test can inflict on its sandbox is named, and the run goes on (issue 12).

One inner run per host tier holds every fault, each followed by a sentinel that must
pass (in the same worker, except where the fault killed the worker itself): garbage and
an oversized frame on the result channel, the channel closed, ``os._exit(0)`` mid-test,
the parent killed, the process group killed, SIGSTOP, SIGTERM ignored past the timeout,
a double-forked daemon, 20 MB of output each way, invalid UTF-8, a forked child that
returns into pytest, ``RLIMIT_NOFILE`` at 16 and ``sys.modules`` wiped. A second run
per tier does the output faults with ``-s``.

Each fault's failure is one line in the plugin's words (or the test's own traceback
where pytest in-process would show one); never a traceback of the plugin's own code,
never ``INTERNALERROR``; the run ends with exit code 1 and pytest's usual summary, and
nothing is left behind (the conftest's leak check, and the daemon's own token).

A test finds its channel the way a hostile test would not even need to: the forwarder
plugin holds its number (``/proc/self/fd`` lists it too).
"""

from __future__ import annotations

import re
import struct
from pathlib import Path
from typing import Any

import pytest

from pytest_isolate import child, wire
from pytest_isolate.outcome import _frame_ok
from tests.outputs import records, section, token

TIERS = ["process", "chroot", "jail", "zone"]
ESCAPE = "--isolate-on-escape=warn"  # host mounts of other runs on this machine are not ours
#: 20 MB: lines of 1,000 bytes.
BIG_LINES = 20_000

INNER = '''
import os
import resource
import signal
import struct
import sys
import time

import pytest

TOKEN = "{token}"


def channel(request):
    return request.config.pluginmanager.get_plugin("isolate-forwarder").fd


def test_garbage(request):
    os.write(channel(request), b"not a frame!")

def test_after_garbage():
    pass

def test_oversized(request):
    os.write(channel(request), struct.pack("!I", 1541361635) + b'{{"t":"report"}}')

def test_after_oversized():
    pass

def test_bad_frame(request):
    os.write(channel(request), struct.pack("!I", 5) + b"{{bad}}")

def test_after_bad_frame():
    pass

def test_forged_report(request):
    body = b'{{"t":"report","data":5}}'
    os.write(channel(request), struct.pack("!I", len(body)) + body)

def test_after_forged_report():
    pass

def test_closed_channel(request):
    os.close(channel(request))

def test_after_closed_channel():
    pass

def test_replaced_channel(request, tmp_path):
    fd = channel(request)
    os.close(fd)
    f = os.open(tmp_path / "f", os.O_WRONLY | os.O_CREAT)
    if f != fd:
        os.dup2(f, fd)

def test_after_replaced_channel():
    pass

def test_exit0():
    os._exit(0)

def test_after_exit0():
    pass

def test_kill_parent():
    os.kill(os.getppid(), signal.SIGKILL)
    time.sleep(0.5)

def test_after_kill_parent():
    pass

def test_killpg():
    os.killpg(0, signal.SIGKILL)

def test_after_killpg():
    pass

@pytest.mark.isolate(timeout=1)
def test_sigstop():
    os.kill(os.getpid(), signal.SIGSTOP)

def test_after_sigstop():
    pass

@pytest.mark.isolate(timeout=1)
def test_ignore_sigterm():
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    time.sleep(30)

def test_after_ignore_sigterm():
    pass

def test_daemon():
    if os.fork() == 0:
        os.setsid()
        if os.fork() == 0:
            os.execv(sys.executable, [sys.executable, "-c", "import time; time.sleep(60)", TOKEN])
        os._exit(0)
    os.wait()

def test_after_daemon():
    pass

def test_big_output():
    line = "x" * 999 + "\\n"
    for _ in range({lines}):
        sys.stdout.write(line)
        sys.stderr.write(line)
    print("END-OF-BIG-STDOUT")
    print("END-OF-BIG-STDERR", file=sys.stderr)
    assert 0

def test_after_big_output():
    pass

def test_bad_utf8_output():
    sys.stdout.buffer.write(b"out \\xff\\xfe end\\n")
    sys.stdout.flush()
    os.write(2, b"err \\xc3\\x28 end\\n")
    assert 0

def test_bad_utf8_assert():
    assert False, "bad \\udcff utf8"

def test_bad_utf8_bytes():
    assert b"\\xff\\xfe" == b"\\xfe"

def test_after_bad_utf8():
    pass

def test_fork_returns():
    pid = os.fork()
    if pid == 0:
        return  # into pytest's protocol, as the test
    os.waitpid(pid, 0)

def test_after_fork_returns():
    pass

def test_nofile():
    resource.setrlimit(resource.RLIMIT_NOFILE, (16, 16))

def test_nofile_fails():
    resource.setrlimit(resource.RLIMIT_NOFILE, (16, 16))
    assert 0, "nofile"

def test_after_nofile():
    pass

def test_modules_wiped():
    sys.modules.clear()

def test_modules_wiped_fails():
    sys.modules.clear()
    assert 0, "wiped"

def test_after_modules_wiped():
    pass
'''

INNER_S = '''
import os
import sys


def test_big_output_s():
    line = "y" * 999 + "\\n"
    for _ in range({lines}):
        sys.stdout.write(line)
        sys.stderr.write(line)
    print("END-OF-BIG-STDOUT-S")
    print("END-OF-BIG-STDERR-S", file=sys.stderr)

def test_bad_utf8_output_s():
    sys.stdout.buffer.write(b"out-s \\xff\\xfe end\\n")
    sys.stdout.flush()
    os.write(2, b"err-s \\xc3\\x28 end\\n")

def test_after_s():
    pass
'''

CHANNEL = "{tier}: the test wrote {n} bytes that are not a result frame onto its result channel (fd *)"
#: Per test: the outcome in the JSON report, and lines its failure section must hold.
#: ``None`` for a tier-dependent entry (``_expected``).
EXPECTED: dict[str, tuple[str, list[str]]] = {
    "test_garbage": ("failed", [CHANNEL.replace("{n}", "12")]),
    "test_oversized": ("failed", [
        "{tier}: the test wrote a frame of 1541361635 bytes onto its result channel (fd *), "
        f"over the {wire.MAX_MESSAGE} byte limit",
    ]),
    "test_bad_frame": ("failed", [CHANNEL.replace("{n}", "9")]),
    "test_forged_report": ("failed", [CHANNEL.replace("{n}", "27")]),
    "test_closed_channel": ("failed", ["{tier}: the test closed its result channel (fd *)"]),
    "test_replaced_channel": ("failed", [
        "{tier}: the test closed its result channel (fd *) and reused the number for another file",
    ]),
    "test_exit0": ("failed", ["{tier}: exited with code 0 before the test finished"]),
    "test_killpg": ("failed", ["{tier}: crashed with SIGKILL (signal 9)"]),
    "test_sigstop": ("failed", ["{tier}: timeout 1 s exceeded: still running after *, killed"]),
    "test_ignore_sigterm": ("failed", [
        "{tier}: timeout 1 s exceeded: still running after *, killed",
        "*line * in test_ignore_sigterm",
    ]),
    "test_big_output": ("failed", ["E       assert 0", "END-OF-BIG-STDOUT", "END-OF-BIG-STDERR"]),
    "test_bad_utf8_output": ("failed", ["out \ufffd\ufffd end", "err \ufffd( end"]),
    "test_bad_utf8_assert": ("failed", ["E       AssertionError: bad \ufffd utf8"]),
    "test_bad_utf8_bytes": ("failed", ["E       AssertionError: assert b'\\xff\\xfe' == b'\\xfe'"]),
    "test_fork_returns": ("failed", [
        "{tier}: a process the test forked (pid *) returned into pytest instead of exiting; "
        "it was ended before it could report as the test or run another",
    ]),
    "test_nofile": ("passed", []),
    "test_nofile_fails": ("failed", ["E       AssertionError: nofile"]),
    "test_modules_wiped": ("passed", []),
    # In-process, pytest's own reporting then fails (INTERNALERROR): the sandbox names it.
    "test_modules_wiped_fails": ("failed", [
        "{tier}: the isolated child failed before it could report",
        "pytest failed in the sandbox outside the test's phases: *Error: *",
    ]),
    "test_kill_parent": ("", []),  # _expected
    "test_daemon": ("passed", []),  # a warning names it: _expected
}


#: Faults whose whole failure text is one line.
ONE_LINE = {
    "test_garbage", "test_oversized", "test_bad_frame", "test_forged_report", "test_closed_channel",
    "test_replaced_channel", "test_exit0", "test_killpg", "test_fork_returns", "test_kill_parent",
}


def _expected(tier: str) -> dict[str, tuple[str, list[str]]]:
    exp = {name: (outcome, [line.replace("{tier}", tier) for line in lines]) for name, (outcome, lines) in EXPECTED.items()}
    # The parent of a test's process: the spawner (process, and chroot when the sandbox
    # was built ahead, as here: not the suite's first test), the fork server itself
    # (uml: the worker is replaced), or its namespace's init, which the kernel protects
    # from a SIGKILL sent from inside (jail, zone).
    exp["test_kill_parent"] = {
        "process": ("failed", ["process: killed with SIGKILL: the test killed its parent process (the worker's spawner)"]),
        "chroot": ("failed", ["chroot: killed with SIGKILL: the test killed its parent process (the worker's spawner)"]),
        "uml": ("failed", ["isolated worker died (fork server killed by SIGKILL; a test that can signal its worker may have done it)"]),
    }.get(tier, ("passed", []))
    return exp


def _no_plugin_traceback(result: pytest.RunResult) -> None:
    text = "\n".join(result.outlines + result.errlines)
    assert "INTERNALERROR" not in text
    assert "Traceback (most recent call last)" not in text
    ours = [ln for ln in result.outlines if re.search(r"pytest_isolate/\S+\.py", ln)]
    assert not ours, "the plugin's own code in the output:\n" + "\n".join(ours)


@pytest.mark.parametrize("tier", TIERS)
def test_every_fault_is_named_and_the_run_goes_on(tmp_path: Path, h: Any, tier: str) -> None:
    _run_faults(tmp_path, h, tier)


#: What a UML run holds (a guest per worker, and every frame crosses the guest's
#: channel): the channel faults, the crashes, a timeout, the protocol faults.
UML_SUBSET = (
    "garbage", "oversized", "bad_frame", "forged_report", "closed_channel", "replaced_channel", "exit0",
    "kill_parent", "killpg", "sigstop", "daemon", "bad_utf8", "fork_returns", "modules_wiped",
)


def test_faults_in_a_uml_guest(tmp_path: Path, h: Any) -> None:
    from pytest_isolate.tiers import uml_kernel

    try:
        uml_kernel.find_kernel()
    except Exception as exc:  # noqa: BLE001 - no kernel here: nothing to run
        pytest.skip(f"no UML kernel: {exc}")
    _run_faults(tmp_path, h, "uml", UML_SUBSET)


def _run_faults(tmp_path: Path, h: Any, tier: str, subset: tuple[str, ...] = ()) -> None:
    tok = token()
    h.write_files(tmp_path, {"test_faults_inner.py": INNER.format(token=tok, lines=BIG_LINES)})
    select = ["-k", " or ".join(subset)] if subset else []
    # run_pytest reads the output as pytest in-process writes it: a lone surrogate in an
    # assertion message reaches the terminal as the byte it stood for, not UTF-8.
    result = h.run_pytest(
        tmp_path, f"--isolate={tier}", ESCAPE, "--isolate-report=r.json", "-p", "no:cacheprovider", *select,
        timeout=120,
    )
    _no_plugin_traceback(result)
    recs = records(tmp_path / "r.json")
    exp = {n: e for n, e in _expected(tier).items() if not subset or any(k in n for k in subset)}
    names = {nodeid.split("::")[1]: rec for nodeid, rec in recs.items()}
    sentinels = [n for n in names if n.startswith("test_after_")]
    assert len(sentinels) == (len(subset) if subset else 17)
    for name in sentinels:
        assert names[name]["outcome"] == "passed", name
    got = {name: names[name]["outcome"] for name in exp}
    assert got == {name: outcome for name, (outcome, _) in exp.items()}
    for name, (outcome, lines) in exp.items():
        if outcome == "failed":
            text = section(result, name).splitlines()
            pytest.LineMatcher(text).fnmatch_lines(lines)
            if name in ONE_LINE:
                assert [ln for ln in text if ln.strip()] == text[:1], (name, text)
    # The daemon was named and ended with its sandbox (a guest's: with its cgroup).
    if tier != "uml":
        daemon = "escaped escape daemon" if tier in ("process", "chroot") else "blocked escape daemon"
        result.stdout.fnmatch_lines([f"*IsolationWarning: {tier}: {daemon} at test_faults_inner.py:*"])
    assert not h.wait_gone(tok)
    n_failed = sum(1 for o, _ in exp.values() if o == "failed")
    result.assert_outcomes(
        failed=n_failed, passed=len(recs) - n_failed, deselected=38 - len(recs) if subset else 0,
        warnings=result.parseoutcomes().get("warnings", 0),
    )
    assert result.ret == 1
    # Only the fault that kills the worker itself replaces it (uml: killing its parent).
    worker_died = [ln for ln in result.outlines if "worker died" in ln and ln.startswith("CRASHED")]
    assert len(worker_died) == (1 if tier == "uml" else 0), worker_died


@pytest.mark.parametrize("tier", TIERS)
def test_output_faults_with_capture_off(tmp_path: Path, h: Any, tier: str) -> None:
    h.write_files(tmp_path, {"test_faults_s.py": INNER_S.format(lines=BIG_LINES)})
    result = h.run_pytest(tmp_path, f"--isolate={tier}", ESCAPE, "-s", "-p", "no:cacheprovider", timeout=120)
    _no_plugin_traceback(result)
    result.assert_outcomes(passed=3)
    assert result.ret == 0
    out = result.outlines + result.errlines
    for marker in ("END-OF-BIG-STDOUT-S", "END-OF-BIG-STDERR-S", "out-s \ufffd\ufffd end", "err-s \ufffd( end"):
        assert any(marker in ln for ln in out), marker
    # The first stdout line follows the test's name on pytest's verbose line, as in-process.
    assert sum(1 for ln in out if ln.endswith("y" * 999)) == 2 * BIG_LINES


# -- the pieces, without a sandbox ---------------------------------------------------
def _read_all(chunks: list[bytes]) -> tuple[list[str], str | None]:
    reader = wire.Reader(limit=wire.MAX_MESSAGE, check=_frame_ok, strict=False)
    out = []
    for c in chunks:
        out += reader.feed(c)
    out += reader.close()
    return [m["t"] for m in out], reader.fault(7)


def test_reader_finds_the_frames_after_garbage() -> None:
    f = wire.encode
    end = f({"t": "end", "rusage": {}})
    assert _read_all([f({"t": "term", "text": "a"}), b"not a frame!", end]) == (
        ["term", "end"], "the test wrote 12 bytes that are not a result frame onto its result channel (fd 7)"
    )
    # byte by byte, as a pipe may deliver it
    data = f({"t": "term", "text": "a"}) + b"garbage!!" + end
    assert _read_all([bytes([b]) for b in data])[0] == ["term", "end"]
    # a bogus header that announces more than comes: the frames it swallowed are found
    assert _read_all([b"\0\0\x10\0abc", end, end]) == (
        ["end", "end"], "the test wrote 7 bytes that are not a result frame onto its result channel (fd 7)"
    )
    assert _read_all([f({"t": "report", "data": 5}), end])[0] == ["end"]
    assert _read_all([f([1, 2]), end, f({"t": "term"})])[0] == ["end"]
    assert _read_all([end, end]) == (["end", "end"], None)
    # between the plugin's own processes a bad frame is a bug, raised
    with pytest.raises(ValueError, match="exceeds"):
        wire.Reader(limit=16).feed(struct.pack("!I", 17) + b"{")


def test_child_cuts_a_report_that_would_exceed_the_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(wire, "MAX_MESSAGE", 3 << 20)
    monkeypatch.setattr(child, "_FRAME_SLACK", 1 << 16)
    data = {"when": "call", "outcome": "failed", "longrepr": "boom", "sections": [
        ["Captured stdout call", "o" * (4 << 20) + "LAST-OUT"], ["Captured stderr call", "e" * 1000],
    ]}
    msg = child._fitted({"t": "report", "data": data})
    assert len(wire.encode(msg)) <= (3 << 20) - (1 << 16)
    out = msg["data"]["sections"][0][1]
    assert out.startswith("ooo") and out.endswith("LAST-OUT") and "characters cut by pytest-isolate" in out
    assert msg["data"]["sections"][1][1] == "e" * 1000
    assert msg["data"]["longrepr"] == "boom"
    small = {"t": "report", "data": {"when": "call", "outcome": "passed", "sections": []}}
    assert child._fitted(small) is small

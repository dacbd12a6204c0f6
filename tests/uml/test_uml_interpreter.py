"""The guest runs the interpreter the host run runs.

A test inside a ``uml`` guest must see the same Python as the host run's worker: the
venv's ``sys.executable`` (a symlink into the base interpreter's install; the venv is
found through the ``pyvenv.cfg`` beside the *unresolved* path), its ``sys.prefix``, the
same ``sys.path`` and the same environment. Otherwise a test that starts
``[sys.executable, "-m", ...]`` gets the base interpreter, without the project's
packages. The ``process`` tier is the reference: it is the host worker as it is.
"""

from __future__ import annotations

import json
import os
import sys
import textwrap

import pytest

#: A value the guest's environment must carry through byte for byte (spaces, quotes,
#: "=", non-ASCII): the worker's environment travels as JSON, not on a command line.
PROBE = ("ISOLATE_UML_PROBE", "a b=c 'd' \"e\" ü")

#: Written by the inner test into pytest's basetemp, which the guest writes through to
#: the host (hostfs).
DUMP_TEST = textwrap.dedent(
    """
    import json, os, subprocess, sys

    def test_dump(tmp_path_factory):
        sub = subprocess.run(
            [sys.executable, "-c", "import pytest_isolate, sys; print(sys.prefix)"],
            capture_output=True, text=True,
        )
        info = {
            "release": os.uname().release,
            "executable": sys.executable,
            "prefix": sys.prefix,
            "exec_prefix": sys.exec_prefix,
            "path": sys.path,
            "environ": dict(os.environ),
            "sub": [sub.returncode, sub.stdout.strip(), sub.stderr[-2000:]],
        }
        out = tmp_path_factory.getbasetemp() / "info.json"
        out.write_text(json.dumps(info))
    """
)


def _run_dump(pytester: pytest.Pytester, tier: str) -> dict:
    basetemp = pytester.path / f"bt-{tier}"
    result = pytester.runpytest_subprocess(
        f"--isolate={tier}",
        f"--basetemp={basetemp}",
        "-o",
        "isolate_on_escape=ignore",
        "-p",
        "no:cacheprovider",
        # Its xdist-worker side dials the controller on 127.0.0.1, which in a guest is
        # the guest's own loopback: not what this test is about.
        "-p",
        "no:rerunfailures",
        "test_dump.py",
        timeout=300,
    )
    assert result.ret == 0, "\n".join(result.outlines + result.errlines)
    # The worker's basetemp is a directory of its own under ours.
    (dump,) = basetemp.rglob("info.json")
    return json.loads(dump.read_text())


def test_guest_sees_the_host_workers_interpreter_and_environment(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(*PROBE)
    pytester.makepyfile(test_dump=DUMP_TEST)
    host = _run_dump(pytester, "process")
    guest = _run_dump(pytester, "uml")

    assert guest["release"] != os.uname().release  # it did run in a guest
    assert host["executable"] == sys.executable  # the reference is the venv's python
    assert guest["executable"] == host["executable"]
    assert guest["prefix"] == host["prefix"] == sys.prefix
    assert guest["exec_prefix"] == host["exec_prefix"] == sys.exec_prefix
    assert guest["path"] == host["path"]
    assert guest["environ"][PROBE[0]] == PROBE[1]
    # The whole environment, not just the probe: only the run's own canaries (a run id,
    # a port, a pid) differ from one run to the next.
    per_run = {k for k in host["environ"] if k.startswith("PYTEST_ISOLATE_")}
    assert set(guest["environ"]) == set(host["environ"])
    assert {k: v for k, v in guest["environ"].items() if k not in per_run} == {
        k: v for k, v in host["environ"].items() if k not in per_run
    }
    # A test's own `python -c` in the guest has the venv and the project.
    assert guest["sub"] == host["sub"] == [0, sys.prefix, ""], guest["sub"]

"""The guest runs the interpreter the host run runs, and finds the kernel the venv holds.

A test inside a ``uml`` guest must see the same Python as the host run's worker: the
venv's ``sys.executable`` (a symlink into the base interpreter's install; the venv is
found through the ``pyvenv.cfg`` beside the *unresolved* path), its ``sys.prefix``, the
same ``sys.path`` and the same environment. Otherwise a test that starts
``[sys.executable, "-m", ...]`` gets the base interpreter, without the project's
packages. The ``process`` tier is the reference: it is the host worker as it is.

And the kernel ``scripts/uml-kernel.sh`` installs into the venv's ``bin`` is found when
pytest runs as ``.venv/bin/python -m pytest`` with a ``PATH`` that lacks that ``bin``
(the distribution's kernel cannot boot on every CPU).
"""

from __future__ import annotations

import json
import os
import sys
import textwrap
from pathlib import Path

import pytest

from pytest_isolate.tiers import uml_kernel

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
            "flags": list(sys.flags),
            "parent": open(f"/proc/{os.getppid()}/cmdline", "rb").read().decode().split(chr(0))[:2],
            "site": "site" in sys.modules,
        }
        out = tmp_path_factory.getbasetemp() / "info.json"
        out.write_text(json.dumps(info))
    """
)


#: A conftest that builds on a variable's own value when pytest configures, as
#: pytest-env's ``PATH=/opt/bin:{PATH}`` does: applied once in the controller, and the
#: sandbox's session (which configures again) must not apply it a second time.
STACKING_CONFTEST = textwrap.dedent(
    """
    import os

    def pytest_configure(config):
        os.environ["ISOLATE_UML_STACK"] = os.environ.get("ISOLATE_UML_STACK", "base") + ":conf"
    """
)


def _host_path_without_venv_bin() -> str:
    """The current PATH minus the directory of ``sys.executable`` (the venv's bin)."""
    venv_bin = os.path.dirname(os.path.abspath(sys.executable))
    keep = [d for d in os.environ.get("PATH", "").split(":") if d and os.path.abspath(d) != venv_bin]
    return ":".join(keep or ["/usr/bin", "/bin"])


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
    pytester.makeconftest(STACKING_CONFTEST)
    host = _run_dump(pytester, "process")
    guest = _run_dump(pytester, "uml")

    assert guest["release"] != os.uname().release  # it did run in a guest
    assert host["executable"] == sys.executable  # the reference is the venv's python
    assert guest["executable"] == host["executable"]
    assert guest["prefix"] == host["prefix"] == sys.prefix
    assert guest["exec_prefix"] == host["exec_prefix"] == sys.exec_prefix
    assert guest["path"] == host["path"]
    # Started as the host's worker was: with ``site``, and the same interpreter flags
    # (the guest's fork server is forked from its PID 1, which the kernel started with
    # the run's start-up environment).
    assert guest["site"] and host["site"]
    assert guest["flags"] == host["flags"]
    # The test's parent shows the controller's command line, as on the host (not the
    # guest's PID 1's, whose code a report would then name for a process left running).
    assert guest["parent"] == host["parent"] == [sys.executable, "-mpytest"], (guest["parent"], host["parent"])
    assert guest["environ"][PROBE[0]] == PROBE[1]
    assert host["environ"]["ISOLATE_UML_STACK"] == "base:conf"
    assert guest["environ"]["ISOLATE_UML_STACK"] == "base:conf"
    # The whole environment, not just the probe: only the run's own canaries (a run id,
    # a port, a pid) differ from one run to the next.
    per_run = {k for k in host["environ"] if k.startswith("PYTEST_ISOLATE_")}
    assert set(guest["environ"]) == set(host["environ"])
    assert {k: v for k, v in guest["environ"].items() if k not in per_run} == {
        k: v for k, v in host["environ"].items() if k not in per_run
    }
    # A test's own `python -c` in the guest has the venv and the project.
    assert guest["sub"] == host["sub"] == [0, sys.prefix, ""], guest["sub"]


def test_kernel_beside_the_interpreter_is_found_without_path(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`.venv/bin/python -m pytest` with the venv's bin off PATH boots the venv's kernel."""
    beside = Path(os.path.abspath(sys.executable)).parent / "linux.uml"
    if not beside.exists():
        pytest.skip(f"no kernel installed beside {sys.executable} (scripts/uml-kernel.sh)")
    monkeypatch.setenv("PATH", _host_path_without_venv_bin())
    assert uml_kernel.find_kernel() == os.path.realpath(beside)
    pytester.makepyfile(test_dump=DUMP_TEST)
    guest = _run_dump(pytester, "uml")
    assert guest["release"] != os.uname().release
    assert guest["environ"]["PATH"] == os.environ["PATH"]


def test_find_kernel_looks_beside_the_unresolved_interpreter_first(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A venv's bin/python is a symlink into the base install: the venv's bin, not the
    base's, is where scripts/uml-kernel.sh put the kernel. It wins over PATH's."""
    base = tmp_path / "base" / "bin"
    venv_bin = tmp_path / "venv" / "bin"
    on_path = tmp_path / "path"
    for d in (base, venv_bin, on_path):
        d.mkdir(parents=True)
    (base / "python3").symlink_to(sys.executable)
    (venv_bin / "python").symlink_to(base / "python3")
    for d in (venv_bin, on_path):
        k = d / "linux.uml"
        k.write_text("#!/bin/sh\nexit 0\n")
        k.chmod(0o755)
    monkeypatch.setenv("PATH", str(on_path))
    monkeypatch.setattr(sys, "executable", str(venv_bin / "python"))
    assert uml_kernel.find_kernel() == str(venv_bin / "linux.uml")
    (venv_bin / "linux.uml").unlink()
    assert uml_kernel.find_kernel() == str(on_path / "linux.uml")
    # An explicit kernel still wins.
    assert uml_kernel.find_kernel(str(on_path / "linux.uml")) == str(on_path / "linux.uml")

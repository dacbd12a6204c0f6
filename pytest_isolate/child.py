"""Runs inside the sandbox: one item's full protocol, reports sent up a pipe.

This is the last step of the confinement order: by the time ``run_items`` is called the
tier has already confined the process. It never returns; it ``os._exit``s so no
``atexit`` handler or pytest session teardown of the (forked) parent runs twice.
"""

from __future__ import annotations

import ctypes
import faulthandler
import os
import resource
import signal
import sys
from typing import Any, NoReturn

import pytest

from pytest_isolate import wire
from pytest_isolate.facets import rlimits
from pytest_isolate.spec import IsolationSpec

#: Signal the fork server sends a timed-out runner so it dumps its Python stack.
STACK_SIGNAL = signal.SIGRTMIN + 3
#: comm name of the process that runs the test, so the fork server finds it in the
#: sandbox's process tree whatever tier structure sits above it.
RUNNER_COMM = b"isolate-test"


class Forwarder:
    """Sends what pytest logs in a child to the controller instead.

    Registered once in the fork server (registering a plugin costs ~1 ms: pytest parses
    it for fixtures) and inherited by every child; ``fd`` is -1 in the server itself,
    which never runs tests, and set to the test's pipe in the child.
    """

    def __init__(self, config: pytest.Config) -> None:
        self.config = config
        self.fd = -1

    @pytest.hookimpl(tryfirst=True)
    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        if self.fd < 0:
            return
        data = self.config.hook.pytest_report_to_serializable(config=self.config, report=report)
        wire.send(self.fd, {"t": "report", "data": data})

    @pytest.hookimpl(tryfirst=True)
    def pytest_warning_recorded(self, warning_message: Any, when: str, nodeid: str, location: Any) -> None:
        if self.fd < 0:
            return
        wire.send(
            self.fd,
            {
                "t": "warning",
                "message": str(warning_message.message),
                "category": getattr(warning_message.category, "__name__", "UserWarning"),
                "category_module": getattr(warning_message.category, "__module__", "builtins"),
                "filename": warning_message.filename,
                "lineno": warning_message.lineno,
                "when": when,
                "nodeid": nodeid,
                "location": list(location) if location else None,
            },
        )


def _set_comm(name: bytes) -> None:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(15, ctypes.c_char_p(name), 0, 0, 0)  # PR_SET_NAME
    except Exception:  # noqa: BLE001 - cosmetic, never fatal
        pass


try:  # TEMP until observe/escapes.py lands
    from pytest_isolate.observe import escapes as _escapes
except Exception:  # noqa: BLE001
    _escapes = None  # type: ignore[assignment]


def _usage_now() -> dict[str, float]:
    me = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return {
        "cpu_user": me.ru_utime + kids.ru_utime,
        "cpu_sys": me.ru_stime + kids.ru_stime,
        "max_rss": max(me.ru_maxrss, kids.ru_maxrss) * 1024,
        "write_bytes": float((me.ru_oublock + kids.ru_oublock) * 512),
    }


def run_items(
    config: pytest.Config,
    forwarder: Forwarder,
    items: dict[str, pytest.Item],
    job: dict[str, Any] | None,
    result_fd: int,
    stack_fd: int,
    term_fd: int,
    enforced_by_cgroup: bool,
    go_fd: int = -1,
) -> NoReturn:
    """Run jobs in this (already confined) process, then exit.

    ``job`` is ``{"nodeid", "spec", "next"}``; ``None`` means "wait for the first job on
    ``go_fd``" (a pre-forked child). While a job names a ``next`` item, fixtures stay up
    for it (``scope="module"``/``"session"``): the child reports ``item_done`` and waits
    on ``go_fd`` for that next job.
    """
    code = 0
    session = None
    try:
        if job is None:
            job = wire.recv(go_fd)
        _set_comm(RUNNER_COMM)
        # Uncaptured output (-s, or anything outside pytest's capture) goes where the
        # user's terminal is, as it would in-process.
        os.dup2(term_fd, 1)
        os.dup2(term_fd, 2)
        # The server ignores SIGINT (the controller handles Ctrl-C); tests get Python's
        # usual handler back.
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        faulthandler.enable(file=stack_fd, all_threads=True)
        faulthandler.register(STACK_SIGNAL, file=stack_fd, all_threads=True, chain=False)
        # A tier with a cgroup (zone, uml) enforces memory and pids for the whole tree.
        rlimits.apply(
            IsolationSpec.from_dict(job["spec"]), cgroup_memory=enforced_by_cgroup, cgroup_pids=enforced_by_cgroup
        )
        forwarder.fd = result_fd
        if _escapes is not None:
            basetemp = str(config._tmp_path_factory.getbasetemp())  # type: ignore[attr-defined]
            _escapes.arm(result_fd, [basetemp])
        while True:
            item = items[job["nodeid"]]
            session = item.session
            nxt = items.get(job["next"]) if job.get("next") else None
            config.hook.pytest_runtest_protocol(item=item, nextitem=nxt)
            if nxt is None or go_fd < 0:
                break
            sys.stdout.flush()
            sys.stderr.flush()
            wire.send(result_fd, {"t": "item_done", "rusage": _usage_now()})
            try:
                job = wire.recv(go_fd)
            except EOFError:
                # The controller moved on (e.g. -x): tear down what was kept up.
                session._setupstate.teardown_exact(None)  # type: ignore[attr-defined]
                break
    except BaseException as exc:  # noqa: BLE001 - report, never fall back into the server
        code = 70
        try:
            import traceback

            wire.send(result_fd, {"t": "internal", "error": "".join(traceback.format_exception(exc))})
        except BaseException:  # noqa: BLE001
            pass
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        except BaseException:  # noqa: BLE001
            pass
    if code == 0:
        # Our own figures, so the server need not wait for the kernel to tear this
        # process down (~3 ms for a warm pytest heap) before answering.
        try:
            wire.send(result_fd, {"t": "end", "rusage": _usage_now()})
        except OSError:
            pass
    os._exit(code)

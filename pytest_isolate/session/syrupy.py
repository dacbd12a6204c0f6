"""syrupy's snapshots, asserted inside sandboxes, reach the controller's snapshot session.

syrupy keeps a session (``config._syrupy``) that records every snapshot assertion, and
at the session's end writes the snapshots ``--snapshot-update`` queued, works out which
snapshots no test used, reports them, and deletes them under ``--snapshot-update``. An
isolated test asserts in a child of the fork server, whose session ends with it: the
controller's session never hears of the assertion, reports its snapshots unused and,
under ``--snapshot-update``, deletes them. Writes a child made itself would not help in
``jail`` and ``zone`` either, where they land in an overlay thrown away with the child.

syrupy's own cross-process support (pytest-xdist's ``workeroutput``) is not used: it is
keyed on the ``PYTEST_XDIST_WORKER`` variable and on a session end per worker, its
report replaces the controller's record of which tests ran (so tests that ran
in-process beside isolated ones would count as not run), it names extension classes
that the controller imports, and it carries no writes. Instead, per test:

- in the child, after the protocol, each assertion the test made is summarised
  (its test, its extension class, per execution the snapshot's location and name and
  whether it was created, updated, matched or failed, and whether an xfail marker
  applied), with every write the test queued (its test, extension, index and the
  serialized data);
- in the controller, each summary becomes a stand-in for the assertion in syrupy's
  session (registered as syrupy registers its own, so the snapshot site is discovered
  the same way), and each write is queued in syrupy's session as the assertion would
  have queued it in-process. syrupy's own end of session then writes, reports and
  deletes exactly as in-process, on the host.

The sandbox is untrusted, so the controller resolves what a frame names against its
own state: the test by node id among the items syrupy collected, the extension class
among modules already imported (or syrupy's own), a subclass of syrupy's extension
base. A write's file is computed by that extension from the controller's item and the
index, as in-process: a frame can only write a snapshot of its own test, never a path.

The fork server's own session end must not act on syrupy's (empty) record there: no
test asserted in it, so every snapshot would look unused and ``--snapshot-update``
would delete them all. At that point (after the last child was forked, so no test can
see it) the server's options turn unused detection and updating off.
"""

from __future__ import annotations

import base64
import contextlib
import sys
from typing import Any

import pytest

from pytest_isolate.session.kind import PluginCollector

NAME = "syrupy"
#: Frames larger than this many snapshots are not ours to trust (a test forging them).
_MAX_ENTRIES = 100_000


def _session(config: pytest.Config) -> Any:
    """syrupy's session in this pytest session, if syrupy is active."""
    return getattr(config, "_syrupy", None) if config_has_syrupy(config) else None


def _class_name(cls: type) -> str:
    return f"{cls.__module__}:{cls.__qualname__}"


# -- controller ---------------------------------------------------------------------
class Collector(PluginCollector):
    """Controller side: carried assertions and writes, given to syrupy's session."""

    def loaded(self) -> bool:
        return config_has_syrupy(self.config)

    def merge(self, data: Any) -> None:
        session = _session(self.config)
        if session is None or not isinstance(data, dict):
            return
        # Another plugin's failure to make sense of a forged frame must never reach
        # the controller's test protocol: what cannot be merged is dropped.
        with contextlib.suppress(Exception):
            for entry in _list(data.get("assertions")):
                self._assertion(session, entry)
        with contextlib.suppress(Exception):
            for entry in _list(data.get("writes")):
                self._write(session, entry)


    def _resolve(self, session: Any, entry: dict[str, Any]) -> tuple[Any, Any] | None:
        """The controller's item and a fresh extension for what an entry names."""
        item = session._collected_items.get(entry.get("nodeid"))
        cls = _extension_class(entry.get("extension"))
        if item is None or cls is None:
            return None
        return item, cls()

    def _assertion(self, session: Any, entry: Any) -> None:
        if not isinstance(entry, dict) or not isinstance(entry.get("executions"), list):
            return
        resolved = self._resolve(session, entry)
        if resolved is None:
            return
        from syrupy.location import PyTestLocation

        item, extension = resolved
        location = PyTestLocation(item)
        results = {}
        for n, ex in enumerate(entry["executions"][:_MAX_ENTRIES]):
            result = _Result.checked(ex, location)
            if result is not None:
                results[n] = result
        session.register_request(_CarriedAssertion(session, extension, location, results))

    def _write(self, session: Any, entry: Any) -> None:
        if not isinstance(entry, dict):
            return
        index, data = entry.get("index"), _data(entry.get("data"))
        if type(index) not in (int, str) or data is None:
            return
        resolved = self._resolve(session, entry)
        if resolved is None:
            return
        from syrupy.location import PyTestLocation

        item, extension = resolved
        session.queue_snapshot_write(
            extension=extension, test_location=PyTestLocation(item), data=data, index=index
        )


def config_has_syrupy(config: pytest.Config) -> bool:
    """syrupy is a plugin of this session (``-p no:syrupy`` turns it off; registered
    by its module, whatever name loaded it)."""
    module = sys.modules.get("syrupy")
    return module is not None and config.pluginmanager.is_registered(module)


def _list(value: Any) -> list[Any]:
    return value[:_MAX_ENTRIES] if isinstance(value, list) else []


def _data(value: Any) -> str | bytes | None:
    """Serialized snapshot data as syrupy's extensions make it: text, or bytes (sent
    as base64 under ``"b64"``)."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("b64"), str):
        with contextlib.suppress(ValueError):
            return base64.b64decode(value["b64"], validate=True)
    return None


def _extension_class(name: Any) -> type | None:
    """The extension class a frame names, when the controller has it already (its
    test module or conftest imported it) or it is syrupy's own: nothing the sandbox
    names is imported otherwise."""
    if not isinstance(name, str) or name.count(":") != 1:
        return None
    modname, qualname = name.split(":")
    module = sys.modules.get(modname)
    if module is None and (modname == "syrupy" or modname.startswith("syrupy.")):
        import importlib

        with contextlib.suppress(Exception):
            module = importlib.import_module(modname)
    obj: Any = module
    for part in qualname.split("."):
        if obj is None or part.startswith("__"):
            return None
        obj = getattr(obj, part, None)
    from syrupy.extensions.base import AbstractSyrupyExtension

    if isinstance(obj, type) and issubclass(obj, AbstractSyrupyExtension):
        return obj
    return None


class _Xfail:
    """What syrupy's report reads of an item's xfail evaluation (``.run``)."""

    run = True


class _ItemStash:
    """The part of a test item syrupy's report reads for a failed snapshot: whether an
    xfail marker applied (the controller did not run the item's setup, the child did)."""

    def __init__(self, xfail: bool) -> None:
        from _pytest.skipping import xfailed_key

        self.stash: dict[Any, Any] = {xfailed_key: _Xfail()} if xfail else {}


class _Result:
    """One execution of a carried assertion: the fields syrupy's report reads of its
    ``AssertionResult``."""

    def __init__(self, location: str, name: str, flags: dict[str, bool], test_location: Any, xfail: bool) -> None:
        self.snapshot_location = location
        self.snapshot_name = name
        self.created = flags["created"]
        self.updated = flags["updated"]
        self.success = flags["success"]
        #: The report keeps names only; the data stays in the child.
        self.final_data = None
        self.test_location = _Location(test_location, xfail)

    @classmethod
    def checked(cls, ex: Any, test_location: Any) -> _Result | None:
        if not isinstance(ex, dict):
            return None
        location, name = ex.get("location"), ex.get("name")
        flags = {k: ex.get(k) for k in ("created", "updated", "success")}
        if not isinstance(location, str) or not isinstance(name, str):
            return None
        if not all(type(v) is bool for v in flags.values()):
            return None
        return cls(location, name, flags, test_location, ex.get("xfail") is True)  # type: ignore[arg-type]


class _Location:
    """The execution's test location as the report sees it: the controller's
    ``PyTestLocation`` with an ``item`` that tells whether an xfail applied."""

    def __init__(self, location: Any, xfail: bool) -> None:
        self._location = location
        self.item = _ItemStash(xfail)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._location, name)


class _CarriedAssertion:
    """Stands in for a ``SnapshotAssertion`` made in a sandbox: what syrupy's session
    (``register_request``) and report read of one."""

    def __init__(self, session: Any, extension: Any, test_location: Any, executions: dict[int, _Result]) -> None:
        self.session = session
        self.extension = extension
        self.test_location = test_location
        self.executions = executions


# -- fork server and its children ----------------------------------------------------
class Recorder:
    """Sandbox side: records in the child what its test asserted and queued."""

    def __init__(self, config: pytest.Config) -> None:
        self.config = config
        self.writes: list[dict[str, Any]] = []
        self.active = False

    def begin(self) -> None:
        """In a test's child, before its protocol: watch the writes syrupy queues (on
        this child's copy of the session only; they still happen here, so the test
        reads back what it wrote, as in-process)."""
        session = _session(self.config)
        if session is None:
            return
        self.active = True
        queue = session.queue_snapshot_write
        writes = self.writes

        def queue_snapshot_write(extension: Any, test_location: Any, data: Any, index: Any) -> None:
            with contextlib.suppress(Exception):
                writes.append(
                    {
                        "nodeid": test_location.item.nodeid,
                        "extension": _class_name(type(extension)),
                        "index": index,
                        "data": data if isinstance(data, str) else {"b64": base64.b64encode(bytes(data)).decode()},
                    }
                )
            queue(extension=extension, test_location=test_location, data=data, index=index)

        session.queue_snapshot_write = queue_snapshot_write

    def collect(self) -> dict[str, Any] | None:
        """In a test's child, after its protocol: its assertions and writes."""
        session = _session(self.config)
        if session is None or not self.active:
            return None
        from _pytest.skipping import xfailed_key

        assertions = []
        for assertion in session._assertions:
            item = assertion.test_location.item
            xfailed = item.stash.get(xfailed_key, None)
            xfail = bool(xfailed and xfailed.run)
            executions = [
                {
                    "location": str(r.snapshot_location),
                    "name": str(r.snapshot_name),
                    "created": bool(r.created),
                    "updated": bool(r.updated),
                    "success": bool(r.success),
                    "xfail": xfail,
                }
                for _, r in sorted(assertion.executions.items())
            ]
            assertions.append(
                {"nodeid": item.nodeid, "extension": _class_name(type(assertion.extension)), "executions": executions}
            )
        if not assertions and not self.writes:
            return None
        return {"assertions": assertions, "writes": self.writes}


class ServerHooks:
    """In the fork server's session: its own end of session leaves snapshots alone."""

    @pytest.hookimpl(wrapper=True, tryfirst=True)
    def pytest_sessionfinish(self, session: pytest.Session) -> Any:
        opt = session.config.option
        # No test ran here: syrupy would find every snapshot unused and, updating,
        # delete them (or publish that as an xdist worker's report).
        for name, value in (
            ("disable_unused_snapshots", True),
            ("update_snapshots", False),
            ("warn_unused_snapshots", True),
        ):
            setattr(opt, name, value)
        return (yield)


def sandbox(config: pytest.Config, init: dict[str, Any]) -> Recorder | None:
    """The sandbox side, made in the fork server before its session configures."""
    if not config_has_syrupy(config):
        return None
    config.pluginmanager.register(ServerHooks(), "isolate-carry-syrupy")
    return Recorder(config)

"""hypothesis's example database, written inside sandboxes, kept on the user's disk.

hypothesis saves each failing example (and the steps of its shrinking) in its example
database, by default ``.hypothesis/examples`` in the working directory, and replays
them first on the next run: a failure found once is found again at once. Isolated,
the database is written by the sandbox: at `chroot` and up into a root thrown away with
it (the next run searched afresh, and each failing test reported a blocked
``write-host-file`` escape for hypothesis's own files), at `process` on disk.

So in every sandbox the default database (the one at hypothesis's storage directory;
databases a test makes itself are left alone) writes nothing: the child keeps what it
saved, deleted and moved in memory, answers its own ``fetch`` with it, and sends the
operations back after its test. The controller applies them, in order, to its own
default database at the same path, as the test's process would have in-process. The
sandbox is untrusted: an operation is applied only to that one database, whose files
hypothesis names by hashing the key and value.
"""

from __future__ import annotations

import base64
import os
import sys
from collections.abc import Iterator
from typing import Any

import pytest

from pytest_isolate.session.kind import PluginCollector

NAME = "hypothesis"
#: Operations carried per sandbox at most (a test's search saves a few dozen).
_MAX_OPS = 10_000
_OPS = ("save", "delete", "move")


def default_path() -> str | None:
    """The default database's directory, where hypothesis would put it now."""
    configuration = sys.modules.get("hypothesis.configuration")
    if configuration is None or "hypothesis.database" not in sys.modules:
        return None
    try:
        try:
            where = configuration.storage_directory("examples", intent_to_write=False)
        except TypeError:  # before 6.131: no such argument, and a plain path
            where = configuration.storage_directory("examples")
        return os.path.abspath(str(getattr(where, "path", where)))
    except Exception:  # noqa: BLE001 - another hypothesis version
        return None


def _b64(raw: bytes) -> str:
    return base64.b64encode(bytes(raw)).decode()


# -- controller ---------------------------------------------------------------------
class Collector(PluginCollector):
    """Controller side: the sandbox's operations applied to the default database."""

    def loaded(self) -> bool:
        return True  # whether a test uses hypothesis is known only in the sandbox

    def server_init(self) -> dict[str, Any] | None:
        return {}

    def merge(self, data: Any) -> None:
        if not isinstance(data, dict) or not isinstance(data.get("ops"), list):
            return
        path = default_path()
        if path is None or data.get("path") != path:
            return
        from hypothesis import settings
        from hypothesis.database import DirectoryBasedExampleDatabase

        db = settings.default.database
        if not isinstance(db, DirectoryBasedExampleDatabase) or os.path.abspath(str(db.path)) != path:
            return
        for op in data["ops"][:_MAX_OPS]:
            if not (isinstance(op, list) and op and op[0] in _OPS and all(isinstance(x, str) for x in op)):
                continue
            try:
                args = [base64.b64decode(x, validate=True) for x in op[1:]]
                if op[0] == "move" and len(args) == 3:
                    db.move(*args)
                elif op[0] != "move" and len(args) == 2:
                    getattr(db, op[0])(*args)
            except Exception:  # noqa: BLE001 - a malformed entry, or the disk refused it
                continue


# -- sandbox ------------------------------------------------------------------------
class Recorder:
    """Sandbox side: the default database's operations, kept in memory."""

    def __init__(self) -> None:
        self.path: str | None = None
        self.ops: list[list[str]] = []
        self.added: dict[bytes, list[bytes]] = {}
        self.removed: dict[bytes, set[bytes]] = {}

    def ours(self, db: Any) -> bool:
        return self.path is not None and os.path.abspath(str(db.path)) == self.path

    def save(self, key: bytes, value: bytes) -> None:
        self.removed.get(key, set()).discard(value)
        values = self.added.setdefault(key, [])
        if value not in values:
            values.append(value)

    def delete(self, key: bytes, value: bytes) -> None:
        if value in self.added.get(key, ()):
            self.added[key].remove(value)
        self.removed.setdefault(key, set()).add(value)

    def move(self, src: bytes, dest: bytes, value: bytes) -> None:
        if src != dest:
            self.delete(src, value)
            self.save(dest, value)

    def record(self, name: str, *args: bytes) -> None:
        if len(self.ops) < _MAX_OPS:
            self.ops.append([name, *(_b64(a) for a in args)])

    def fetch(self, found: Iterator[bytes], key: bytes) -> Iterator[bytes]:
        gone = self.removed.get(key, set())
        seen = set()
        for value in found:
            if value not in gone:
                seen.add(value)
                yield value
        for value in list(self.added.get(key, ())):
            if value not in seen:
                yield value

    def prepare(self) -> None:
        """Find the default database and route its writes here, if hypothesis is
        imported: in the server once its session has collected (every child inherits
        it), or in a child whose test module is the first to import hypothesis."""
        if self.path is None:
            self.path = default_path()
            if self.path is not None:
                _install(self)

    @pytest.hookimpl(trylast=True)
    def pytest_collection_finish(self) -> None:
        self.prepare()

    # -- the carried kind's sandbox side --
    def begin(self) -> None:
        self.ops, self.added, self.removed = [], {}, {}
        self.prepare()

    def collect(self) -> dict[str, Any] | None:
        if not self.ops or self.path is None:
            return None
        return {"path": self.path, "ops": self.ops}


def _install(recorder: Recorder) -> None:
    """Route the default database's writes into ``recorder`` (once per class)."""
    module = sys.modules.get("hypothesis.database")
    cls = getattr(module, "DirectoryBasedExampleDatabase", None)
    if cls is None or getattr(cls, "_isolate_recorder", None) is recorder:
        return
    real = {name: getattr(cls, name) for name in ("save", "delete", "move", "fetch")}

    def routed(name: str) -> Any:
        def write(self: Any, *args: bytes) -> None:
            if not recorder.ours(self):
                return real[name](self, *args)
            getattr(recorder, name)(*args)
            recorder.record(name, *args)
            return None

        return write

    def fetch(self: Any, key: bytes) -> Any:
        if not recorder.ours(self):
            return real["fetch"](self, key)
        return recorder.fetch(iter(real["fetch"](self, key)), key)

    for name, fn in (*((n, routed(n)) for n in ("save", "delete", "move")), ("fetch", fetch)):
        fn.__name__ = fn.__qualname__ = name
        setattr(cls, name, fn)
    cls._isolate_recorder = recorder


def sandbox(config: pytest.Config, init: dict[str, Any]) -> Recorder:
    """The sandbox side, made in the fork server (a plugin of its session too, to
    prepare once it has collected)."""
    recorder = Recorder()
    config.pluginmanager.register(recorder, "isolate-carry-hypothesis")
    return recorder

"""pytest-memray's results, written inside sandboxes, reach the controller's report.

pytest-memray tracks each test's allocations in the test's process and writes them to a
result file (and a small JSON of the test's peak) in a directory its controller made,
which the controller reads for its "MEMRAY REPORT": that is how it works under
pytest-xdist. Isolated, the limits (``limit_memory``, ``limit_leaks``) are checked in
the sandbox as in-process, but from `chroot` up the files landed in the sandbox's own
``/tmp``, thrown away with it: the report was empty. So the sandbox sends the files its
test wrote there, the controller writes the ones it does not have yet into the same
directory and files each result as its own tests' are, in test order.

The sandbox is untrusted: file names are checked (one plain name, no path), files are
created only where none exists (never through a link), a result may only name a file
carried with it and is filed only when memray's own reader takes that file.
"""

from __future__ import annotations

import base64
import os
import stat
import sys
from pathlib import Path
from typing import Any

import pytest

from pytest_isolate.facets import keep
from pytest_isolate.session.kind import PluginCollector

NAME = "memray"
#: Bytes of result files one sandbox may send (a test's aggregated allocations are
#: kilobytes; with native traces more).
_MAX = 32 << 20


def _manager(config: pytest.Config) -> Any:
    """pytest-memray's plugin object, when it measures in this session (``--memray``)."""
    manager = config.pluginmanager.get_plugin("memray_manager")
    if manager is None or not isinstance(getattr(manager, "result_path", None), Path):
        return None
    value_or_ini = getattr(sys.modules.get("pytest_memray.utils"), "value_or_ini", None)
    try:
        on = value_or_ini(config, "memray") if value_or_ini is not None else config.getoption("memray", False)
    except (ValueError, KeyError, AttributeError):
        return None
    return manager if on else None


def _plain_name(name: Any) -> bool:
    """One file name, no path: it cannot lead out of the directory it is joined to."""
    return (
        isinstance(name, str) and 0 < len(name) <= 255 and name == os.path.basename(name)
        and not name.startswith(".") and "\0" not in name
    )


class Collector(PluginCollector):
    """Controller side: the sandbox's result files written here, its results filed."""

    def loaded(self) -> bool:
        return self.config.pluginmanager.get_plugin("memray_manager") is not None

    def merge(self, data: Any) -> None:
        manager = _manager(self.config)
        plugin = sys.modules.get("pytest_memray.plugin")
        result, reader = getattr(plugin, "Result", None), getattr(plugin, "FileReader", None)
        if manager is None or result is None or reader is None or not isinstance(data, dict):
            return
        files = data.get("files")
        results = data.get("results")
        if not isinstance(files, dict) or not isinstance(results, list):
            return
        written = {name for name, text in files.items() if self._write(manager.result_path, name, text)}
        for entry in results:
            if not isinstance(entry, dict):
                continue
            test_id, peak, name = entry.get("test_id"), entry.get("peak_memory"), entry.get("file")
            if not (isinstance(test_id, str) and isinstance(peak, int) and _plain_name(name)):
                continue
            path = manager.result_path / name
            if name in files and (name in written or path.is_file()) and self._readable(reader, path):
                manager.results[test_id] = result(test_id, peak, path)

    @staticmethod
    def _readable(reader: Any, path: Path) -> bool:
        """memray's own reader takes the file (a damaged one would fail the summary)."""
        try:
            reader(path).metadata  # noqa: B018 - reading the header is the check
        except Exception:  # noqa: BLE001 - whatever memray raises for a file not its own
            return False
        return True

    @staticmethod
    def _write(where: Path, name: Any, text: Any) -> bool:
        """Whether ``where/name`` now holds the carried bytes. A file of that name from an
        earlier run (a fixed ``--memray-bin-path`` and prefix) is replaced, as pytest-memray
        replaces it in-process; at `process` the sandbox wrote it here already."""
        if not _plain_name(name) or not isinstance(text, str):
            return False
        try:
            raw = base64.b64decode(text, validate=True)
        except ValueError:
            return False
        try:
            fd = os.open(where, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError:
            return False
        try:
            try:
                st = os.stat(name, dir_fd=fd, follow_symlinks=False)
            except FileNotFoundError:
                st = None
            if st is not None:
                if not stat.S_ISREG(st.st_mode):
                    return False  # never through a link
                if st.st_size == len(raw):
                    with open(os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd), "rb") as f:
                        if f.read() == raw:
                            return True
            keep.replace_at(fd, name, raw)
        except OSError:
            return False
        finally:
            os.close(fd)
        return True


class Recorder:
    """Sandbox side: the result files and results of the child's tests.

    pytest-memray keeps each test's ``Result`` in its manager's ``results`` (it also
    writes a metadata file per test, but that directory grows with the run: at
    ``process`` it is the host's, and listing it cost O(tests) per test)."""

    def __init__(self, config: pytest.Config) -> None:
        self.config = config
        self.before: set[str] = set()

    def begin(self) -> None:
        manager = _manager(self.config)
        results = getattr(manager, "results", None)
        self.before = set(results) if isinstance(results, dict) else set()

    def collect(self) -> dict[str, Any] | None:
        manager = _manager(self.config)
        found = getattr(manager, "results", None) if manager is not None else None
        if not isinstance(found, dict):
            return None
        results = []
        for test_id, res in found.items():
            if test_id in self.before:
                continue
            try:
                results.append(
                    {"test_id": res.test_id, "peak_memory": res.peak_memory, "file": Path(res.result_file).name}
                )
            except (AttributeError, TypeError):
                continue
        files: dict[str, str] = {}
        size = 0
        for entry in results:
            name = entry["file"]
            if name in files:
                continue
            try:
                raw = (manager.result_path / name).read_bytes()
            except OSError:
                continue
            size += len(raw)
            if size > _MAX:
                break
            files[name] = base64.b64encode(raw).decode("ascii")
        return {"files": files, "results": results} if results else None


def sandbox(config: pytest.Config, init: dict[str, Any]) -> Recorder | None:
    """The sandbox side, made in the fork server (pytest-memray is configured later)."""
    return Recorder(config) if config.pluginmanager.has_plugin("memray") else None

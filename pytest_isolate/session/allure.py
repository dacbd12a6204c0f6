"""allure-pytest's results, written inside sandboxes, land in the user's ``--alluredir``.

allure-pytest writes a test's result, its fixtures' containers and its attachments as
files into ``--alluredir`` from the process the test runs in, as the test goes. Isolated
that process is the sandbox, whose writes at `chroot`, `jail`, `zone` and `uml` are
thrown away with it (``--alluredir`` held only the controller's own half of each test,
below), and at `process` land as in-process. So, for every tier alike:

- in the fork server, allure's file writer is replaced by a recorder, and what a test's
  child would have written is sent back after its test (file name and content);
- the controller checks each name (a plain allure file name) and writes the file into
  its ``--alluredir`` as allure would have (a temporary name, then a rename);
- the controller's own allure listener wraps every test's protocol too, and would write
  a second, empty result (no status, no steps) for each isolated test: its scheduled
  result is dropped when the test is logged.

The server never cleans ``--alluredir`` (``--clean-alluredir`` is the controller's:
a server started later would delete what earlier tests wrote).
"""

from __future__ import annotations

import base64
import json
import os
import re
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest

from pytest_isolate.session.kind import PluginCollector

NAME = "allure"
#: At most this much file content per sandbox (attachments such as screenshots can be
#: large; a carried frame must stay well under the wire's limit).
_MAX_BYTES = 32 << 20
#: What allure names its files: ``<uuid>-result.json``, ``<uuid>-container.json``,
#: ``<uuid>-attachment.<ext>``, ``<uuid>-globals.json``.
_FILE = re.compile(r"[0-9a-f-]{36}-(result\.json|container\.json|globals\.json|attachment(\.[\w.-]{1,32})?)")


def _plugin(config: pytest.Config) -> Any:
    module = sys.modules.get("allure_pytest.plugin")
    if module is None or not config.pluginmanager.is_registered(module):
        return None
    return module


def _report_dir(config: pytest.Config) -> str | None:
    """The run's ``--alluredir``, when allure-pytest is on and writes one."""
    if _plugin(config) is None:
        return None
    report_dir = getattr(config.option, "allure_report_dir", None)
    return os.path.abspath(report_dir) if report_dir else None


# -- controller ---------------------------------------------------------------------
class ControllerHooks:
    """The controller's allure listener writes no result of its own for an isolated
    test: the sandbox's is the test's."""

    def __init__(self, config: pytest.Config, isolated: Any) -> None:
        self.config = config
        self.isolated = isolated
        self.items: dict[str, pytest.Item] = {}

    def item(self, nodeid: str) -> pytest.Item | None:
        """The session's item (made at the first isolated test, this plugin may come
        after collection: the items are read from pytest's session plugin)."""
        found = self.items.get(nodeid)
        if found is None:
            session = self.config.pluginmanager.get_plugin("session")
            self.items = {i.nodeid: i for i in getattr(session, "items", None) or ()}
            found = self.items.get(nodeid)
        return found

    @pytest.hookimpl(wrapper=True, trylast=True)
    def pytest_runtest_logfinish(self, nodeid: str, location: Any) -> Any:
        """Inside allure's own wrapper (which closes and writes the result after
        this returns): the isolated test's scheduled result is dropped first."""
        result = yield
        item = self.item(nodeid)
        listener = self.config.pluginmanager.get_plugin("allure_listener")
        if item is not None and listener is not None and self.isolated(item):
            try:
                key = listener._cache.pop(nodeid)  # allure keys it by the id() of this string
                if key:
                    listener.allure_logger.drop_test(key)
            except Exception:  # noqa: BLE001 - another allure version: its result stays
                pass
        return result


class Collector(PluginCollector):
    """Controller side: the sandbox's files written into ``--alluredir``."""

    def __init__(self, config: pytest.Config) -> None:
        super().__init__(config)
        self.dir = _report_dir(config)
        if self.dir is not None and not config.pluginmanager.has_plugin("isolate-carry-allure"):
            from pytest_isolate.plugin import _isolated

            config.pluginmanager.register(ControllerHooks(config, _isolated), "isolate-carry-allure")

    def loaded(self) -> bool:
        return self.dir is not None

    def merge(self, data: Any) -> None:
        if self.dir is None or not isinstance(data, list):
            return
        target = Path(self.dir)
        target.mkdir(parents=True, exist_ok=True)
        for entry in data:
            if not (isinstance(entry, list) and len(entry) == 2 and isinstance(entry[0], str)):
                continue
            name, content = entry
            if not _FILE.fullmatch(name) or not isinstance(content, str):
                continue
            try:
                body = base64.b64decode(content, validate=True) if not name.endswith(".json") else content.encode()
            except ValueError:  # not base64: a damaged or hostile frame, dropped
                continue
            tmp = target / f"{name}.tmp"
            tmp.write_bytes(body)
            os.replace(tmp, target / name)


# -- sandbox ------------------------------------------------------------------------
class Recorder:
    """Sandbox side, in allure's own plugin manager in place of its file writer: what
    it would have written, kept for the controller."""

    def __init__(self) -> None:
        self.files: list[list[str]] = []
        self.size = 0

    def _keep(self, name: str, content: str) -> None:
        if self.size + len(content) > _MAX_BYTES:
            return
        self.size += len(content)
        self.files.append([name, content])

    def _item(self, item: Any) -> None:
        from attr import asdict

        indent = 4 if os.environ.get("ALLURE_INDENT_OUTPUT") else None
        data = asdict(item, filter=lambda _, v: v or v is False)
        self._keep(item.file_pattern.format(prefix=uuid.uuid4()), json.dumps(data, indent=indent, ensure_ascii=False))

    def report_result(self, result: Any) -> None:
        self._item(result)

    def report_container(self, container: Any) -> None:
        self._item(container)

    def report_globals(self, globals_item: Any) -> None:
        self._item(globals_item)

    def report_attached_file(self, source: Any, file_name: str) -> None:
        try:
            body = Path(source).read_bytes()
        except OSError:
            return
        self._keep(file_name, base64.b64encode(body).decode())

    def report_attached_data(self, body: Any, file_name: str) -> None:
        raw = body.encode("utf-8") if isinstance(body, str) else bytes(body)
        self._keep(file_name, base64.b64encode(raw).decode())

    # -- the carried kind's sandbox side --
    def begin(self) -> None:
        self.files = []
        self.size = 0

    def collect(self) -> list[list[str]] | None:
        return self.files or None


class ServerHooks:
    """In the fork server: allure's file writer out, the recorder in."""

    def __init__(self, recorder: Recorder) -> None:
        self.recorder = recorder

    @pytest.hookimpl(trylast=True)
    def pytest_configure(self, config: pytest.Config) -> None:
        """After allure's own configure, which registered its file writer."""
        import allure_commons
        from allure_commons.logger import AllureFileLogger

        pm = allure_commons.plugin_manager
        for plugin in list(pm.get_plugins()):
            if isinstance(plugin, AllureFileLogger):
                pm.unregister(plugin)
        for name in _HOOKS:
            allure_commons.hookimpl(getattr(Recorder, name))  # marks the function, once
        if not pm.is_registered(self.recorder):
            pm.register(self.recorder)


#: allure's reporting hooks the recorder answers.
_HOOKS = ("report_result", "report_container", "report_globals", "report_attached_file", "report_attached_data")


def sandbox(config: pytest.Config, init: dict[str, Any]) -> Recorder | None:
    """The sandbox side, made in the fork server before its session configures."""
    if _report_dir(config) is None:
        return None
    config.option.clean_alluredir = False  # the controller's, once (see the module's doc)
    recorder = Recorder()
    config.pluginmanager.register(ServerHooks(recorder), "isolate-carry-allure")
    return recorder

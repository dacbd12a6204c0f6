"""The controller's junit XML as fixtures in the sandbox's session see it.

In-process, ``record_property`` and ``record_xml_attribute`` read the session's LogXML
(its junit family decides whether they warn) and ``record_xml_attribute`` and
``record_testsuite_property`` write to it. The fork server's session has no LogXML of
its own (it is an xdist worker: the controller writes the one junit file), so a stand-in
takes its place: the same family, the same warnings, and what is recorded sent to the
controller as frames.
"""

from __future__ import annotations

import pytest

from pytest_isolate.child import Forwarder
from pytest_isolate.session import node


def stand_in(config: pytest.Config, forwarder: Forwarder) -> None:
    """Put a ``_JunitFamily`` where junitxml keeps its LogXML, when the controller has one."""
    family = _controller_junit_family(config)
    if family is not None:
        from _pytest.junitxml import xml_key

        config.stash[xml_key] = _JunitFamily(family, forwarder)  # type: ignore[assignment]


def withdraw(config: pytest.Config) -> None:
    """Take the stand-in out again. Called before junitxml's own unconfigure, which would
    unregister it as if it were a registered LogXML."""
    from _pytest.junitxml import xml_key

    if isinstance(config.stash.get(xml_key, None), _JunitFamily):
        del config.stash[xml_key]


def _controller_junit_family(config: pytest.Config) -> str | None:
    """The junit family of the controller's LogXML, or None when it writes no junit XML.

    The server re-parsed the controller's command line and ini, so it sees the same
    ``--junitxml`` and ``junit_family``; junitxml itself makes no LogXML here because
    the server has ``workerinput``. The controller had one unless it is itself an xdist
    worker (``node.under_xdist``).
    """
    if not getattr(config.option, "xmlpath", None):
        return None
    if node.under_xdist(config):
        return None
    family = str(config.getini("junit_family"))
    return "xunit1" if family == "legacy" else family  # as LogXML normalises it


class _JunitFamily:
    """Stands in for the controller's LogXML in the server's ``config.stash[xml_key]``.

    Fixtures read it there: ``record_property`` and ``record_xml_attribute`` warn when
    the family is not xunit1, as they do in-process, and the warning reaches the
    controller like any other. It writes nothing: the controller's LogXML writes the
    one junit file from the reports, and what ``record_xml_attribute`` and
    ``record_testsuite_property`` record goes to it as "xml" frames (plugin.py replays
    them before it logs the test's reports).
    """

    def __init__(self, family: str, forwarder: Forwarder) -> None:
        self.family = family
        self.forwarder = forwarder

    def node_reporter(self, nodeid: str) -> _JunitFamily:
        return self

    def add_attribute(self, name: str, value: object) -> None:
        self.forwarder.send_xml("attribute", name, value)

    def add_global_property(self, name: str, value: object) -> None:
        from _pytest.junitxml import _check_record_param_type

        __tracebackhide__ = True
        _check_record_param_type("name", name)
        self.forwarder.send_xml("suite", name, value)

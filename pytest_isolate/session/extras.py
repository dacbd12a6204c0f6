"""Attributes plugins add to a report, carried with the types pytest-xdist keeps.

pytest turns a report's own fields into JSON-safe values and copies every other
attribute a plugin set on the report as it is. pytest-xdist sends that dict with
execnet's serializer, which keeps sets, tuples, bytes and non-string dict keys, and
plugins made for xdist rely on it: pytest-testmon files each test's covered lines as
``{file: set of line numbers}`` on its report and reads them back in the controller.
Our frames are JSON, which gave a set as its ``repr`` string, a tuple as a list and an
``int`` key as a string (testmon then failed with an INTERNALERROR). So an attribute
JSON would not give back as it was travels in execnet's encoding instead, and the
controller decodes it before pytest rebuilds the report. execnet's loader makes nothing
but plain data (numbers, strings, bytes, lists, tuples, dicts, sets), so the sandbox,
which is untrusted, can send no code this way.
"""

from __future__ import annotations

import base64
import io
import math
from typing import Any

from _pytest._code.code import ExceptionChainRepr, ReprFileLocation, TerminalRepr
from _pytest._io import TerminalWriter
from execnet.gateway_base import dumps_internal, loads_internal

#: Where the encoded attributes travel in a serialized report (taken out again before
#: pytest rebuilds the report, so no plugin sees it).
KEY = "_isolate_extras"
#: A failure shown by a repr of its own (a doctest's, sybil's): its text as it prints.
TEXT = "_isolate_text"
#: Fields pytest's own serialization makes (and ``answer._tuples`` repairs), and ours.
STANDARD = frozenset(
    {
        "nodeid", "location", "keywords", "outcome", "longrepr", "when", "user_properties",
        "sections", "duration", "start", "stop", "$report_type", "_report_type",
        "_subtest.context", "wasxfail", "result", "_isolate_bdd", KEY, TEXT,
    }
)  # fmt: skip
#: An encoded attribute larger than this is dropped on arrival (frames are bounded too).
LIMIT = 16 << 20
_DEPTH = 64


def _json_safe(value: Any, depth: int = 0) -> bool:
    """Whether JSON gives ``value`` back as it is (same types, same keys)."""
    if value is None or isinstance(value, (str, bool, int)):
        return True
    if isinstance(value, float):
        return math.isfinite(value)
    if depth > _DEPTH:
        return False
    if type(value) is list:
        return all(_json_safe(v, depth + 1) for v in value)
    if type(value) is dict:
        return all(type(k) is str and _json_safe(v, depth + 1) for k, v in value.items())
    return False


def pack(data: Any) -> Any:
    """In the sandbox: ``data`` (a serialized report, ours to change) with the
    attributes JSON would alter moved under ``KEY``, encoded. A value execnet cannot
    encode either (an arbitrary object) stays, as pytest-xdist could not send it at all."""
    if not isinstance(data, dict):
        return data
    odd = [k for k in data if k not in STANDARD and not _json_safe(data[k])]
    if not odd:
        return data
    packed = {}
    for name in odd:
        try:
            packed[name] = base64.b64encode(dumps_internal(data[name])).decode("ascii")
        except Exception:  # noqa: BLE001 - execnet's DumpError, or a recursion: left as it was
            continue
        del data[name]
    if packed:
        data[KEY] = packed
    return data


def unpack(data: Any) -> Any:
    """In the controller, before pytest rebuilds the report: the attributes as they were."""
    if not isinstance(data, dict):
        return data
    packed = data.pop(KEY, None)
    if not isinstance(packed, dict):
        return data
    for name, text in packed.items():
        if (
            not isinstance(name, str)
            or name in STANDARD
            or not isinstance(text, str)
            or len(text) > LIMIT
        ):
            continue
        try:
            data[name] = loads_internal(base64.b64decode(text, validate=True))
        except Exception:  # noqa: BLE001 - a damaged or hostile value: the attribute is left out
            continue
    return data


class PlainRepr(TerminalRepr):
    """A failure's text as the sandbox's repr printed it, line for line.

    pytest serializes a repr that is not an exception's (``ReprFailDoctest``, sybil's,
    a plugin's ``repr_failure``) as ``str(longrepr)``, stripped, and a string longrepr
    is a message: isolated, a doctest's failure lost its blank lines and its short
    summary line read ``FAILED mod.py::mod.f - 002`` where in-process it has none (as
    under xdist). This prints the text unstripped and, like the original, has no
    ``reprcrash``; ``str()`` of it is what ``str()`` of the original was.
    """

    def __init__(self, text: str) -> None:
        self.text = text

    def toterminal(self, tw: Any) -> None:
        for line in self.text.split("\n")[:-1] if self.text.endswith("\n") else self.text.split("\n"):
            tw.line(line)


def plain_text(report: Any, data: Any) -> None:
    """In the sandbox: the unstripped text of a repr pytest would send as a string."""
    longrepr = getattr(report, "longrepr", None)
    if not isinstance(data, dict) or not isinstance(data.get("longrepr"), str) or not isinstance(longrepr, TerminalRepr):
        return
    out = io.StringIO()
    tw = TerminalWriter(file=out)
    tw.hasmarkup = False
    try:
        longrepr.toterminal(tw)
    except Exception:  # noqa: BLE001 - the repr's own failure: pytest's string stays
        return
    data[TEXT] = out.getvalue()


def restore_text(report: Any, crash: tuple[str, int, str] | None = None) -> Any:
    """In the controller: the repr back where the sandbox sent its text, and the crash
    line a chained repr names (``crash``: :func:`sent_crash` of its data)."""
    text = report.__dict__.pop(TEXT, None)
    if isinstance(text, str) and isinstance(report.longrepr, str) and len(text) <= LIMIT:
        report.longrepr = PlainRepr(text)
    longrepr = report.longrepr
    if crash is not None and isinstance(longrepr, ExceptionChainRepr):
        have = longrepr.reprcrash
        if have is None or (have.path, have.lineno, have.message) != crash:
            longrepr.reprcrash = ReprFileLocation(*crash)
    return report


def sent_crash(data: Any) -> tuple[str, int, str] | None:
    """The ``reprcrash`` of a chained failure repr as the sandbox serialized it, taken
    before pytest rebuilds the report (which replaces the dict in place).

    pytest serializes a chained repr's own ``reprcrash`` and each link's, but rebuilds
    the repr from its links alone, and ``ExceptionChainRepr`` takes the last link's
    crash for its own. A plugin that sets another one had it lost on the way:
    pytest-check, for a test whose checks failed and which then raised, names the first
    failed check (the short summary's ``FAILED t.py::test - check 1 == 2: first``, the
    junit ``message``); isolated, they named the exception raised after it (as under
    pytest-xdist, whose workers pytest-check leaves alone)."""
    sent = data.get("longrepr") if isinstance(data, dict) else None
    if not isinstance(sent, dict) or not sent.get("chain"):
        return None
    crash = sent.get("reprcrash")
    if not isinstance(crash, dict):
        return None
    try:
        return str(crash["path"]), int(crash["lineno"]), str(crash["message"])
    except (KeyError, TypeError, ValueError):
        return None

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
import math
from typing import Any

from execnet.gateway_base import dumps_internal, loads_internal

#: Where the encoded attributes travel in a serialized report (taken out again before
#: pytest rebuilds the report, so no plugin sees it).
KEY = "_isolate_extras"
#: Fields pytest's own serialization makes (and ``answer._tuples`` repairs), and ours.
STANDARD = frozenset(
    {
        "nodeid", "location", "keywords", "outcome", "longrepr", "when", "user_properties",
        "sections", "duration", "start", "stop", "$report_type", "_report_type",
        "_subtest.context", "wasxfail", "result", "_isolate_bdd", KEY,
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

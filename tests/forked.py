"""Run a function in a forked child and bring back its JSON-able result.

Facet tests change process-wide state (namespaces, capabilities, uid, mounts) that must
never touch the pytest process itself: each check runs in a throwaway child.
"""

from __future__ import annotations

import json
import os
import traceback
from collections.abc import Callable
from typing import Any


def in_child(fn: Callable[[], Any], setup: Callable[[], None] | None = None) -> Any:
    """``setup()`` then ``fn()`` in a forked child; ``fn``'s result, or AssertionError
    with the child's traceback. ``setup`` may fork again: only the process that returns
    from it runs ``fn`` and reports."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        try:
            os.close(r)
            if setup is not None:
                setup()
            out = {"ok": fn()}
        except BaseException:  # noqa: BLE001
            out = {"tb": traceback.format_exc()}
        os.write(w, json.dumps(out, default=repr).encode())
        os._exit(0)
    os.close(w)
    data = b""
    while chunk := os.read(r, 1 << 16):
        data += chunk
    os.close(r)
    os.waitpid(pid, 0)
    res = json.loads(data)
    if "tb" in res:
        raise AssertionError("child failed:\n" + res["tb"])
    return res["ok"]

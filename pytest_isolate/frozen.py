"""``gc.freeze()`` for the plugin's own processes, invisible to the tests and plugins.

The controller, the fork server and its spawner freeze their heaps so that garbage
collections (and, after a fork, the copy-on-write faults they cause) never walk what
lives for the whole run. But CPython's gc introspection skips frozen objects:
``gc.get_referrers`` finds no referrer in a module's globals, ``gc.get_objects`` misses
them, ``gc.get_freeze_count`` is not 0. In-process pytest freezes nothing, so a test (or
a library: hypothesis's ``register_random`` asks ``get_referrers`` and warns, an error
under ``filterwarnings=error``) saw another heap.

So a test's process thaws the heap it was forked with before the test
(``child.run_items``): its ``gc.collect()`` must free a cycle made at collection that
the test let go, as in-process; a full collection there then walks (and copies) the
inherited heap, as in-process it walks it. In the plugin's own processes (the
controller, where in-process tests and every plugin's hooks run, and the server), our
freeze thaws itself the moment something would see it: an audit hook catches
``gc.get_referrers`` and ``gc.get_objects`` before they look (a Python wrapper would not
do: its frame shows, e.g. a running coroutine then refers to its own locals), and
``get_freeze_count``, ``freeze`` and ``unfreeze`` are wrapped until the first call of
any of them (a test's own freeze must not take ours in).
"""

from __future__ import annotations

import functools
import gc
import sys
from collections.abc import Callable
from typing import Any

#: Answers that depend on what is frozen, without an audit event to catch them by.
_WRAPPED = ("get_freeze_count", "freeze", "unfreeze")
_ORIGINALS: dict[str, Callable[..., Any]] = {name: getattr(gc, name) for name in _WRAPPED}
#: Audit events raised before the gc walks its lists.
_LOOKS = frozenset({"gc.get_referrers", "gc.get_objects"})
_hidden = False


def freeze() -> None:
    """``gc.freeze()``, hidden from whatever runs in this process or its forks."""
    global _hidden
    _ORIGINALS["freeze"]()
    _hidden = True
    for name in _WRAPPED:
        setattr(gc, name, _thawing(_ORIGINALS[name]))


def thaw() -> None:
    """Undo our freeze: the heap is as it would be in-process."""
    global _hidden
    if not _hidden:
        return
    _hidden = False
    for name, orig in _ORIGINALS.items():
        setattr(gc, name, orig)
    _ORIGINALS["unfreeze"]()


def _thawing(orig: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(orig)
    def call(*args: Any, **kwargs: Any) -> Any:
        thaw()
        return orig(*args, **kwargs)

    return call


def _on_audit(event: str, _args: tuple[Any, ...]) -> None:
    if _hidden and event in _LOOKS:
        thaw()


# Added once, at import: before any sandbox's audit layer (``observe/audit.py``), which
# takes a hook added after it for tampering. Forks inherit it.
sys.addaudithook(_on_audit)

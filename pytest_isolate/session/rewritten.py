"""The modules pytest rewrote in the controller, shared with a UML guest's fork server.

pytest rewrites the asserts of every module of a plugin's distribution, of conftests and
of test modules, and caches the result beside each source. A guest sees the host's files
read-only, so whenever the host holds no cached copy (``PYTHONDONTWRITEBYTECODE``, set
in many CI images; a site-packages the user cannot write; a pytest version not run here
before) the guest's server parses and rewrites every one of them again, on the guest's
one CPU where each fresh page is a trip through the host: ~1.2 s of a guest's start
with this repository's test venv (211 modules), work the controller has just done.

So the controller keeps what it rewrites (``capture``, from the plugin's import on), and
when a guest starts it writes that code into the run dir (``Share``); the guest's server
reads there when pytest's own cache misses (``use``). pytest's own reader checks each
file against its source's hash, so a file that does not match its source is never used,
and the guest runs exactly the code it would have built itself. Modules rewritten before
this plugin was imported (entry points load in no fixed order) are rewritten again on a
thread of the controller while the guest boots, unless pytest's cache has them.
Nothing of this exists in a fork server (``stop``), and when no test of the run is a
``uml`` test the kept code is let go at the end of the collection.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import threading
from pathlib import Path
from typing import Any

#: (source, key, code) that pytest's rewriter made since ``capture``, until a share
#: takes them; None when nothing is kept (``stop``, or a share writes them at once).
_kept: list[tuple[Path, Any, Any]] | None = None
#: The share new code goes to directly once one exists.
_share: Share | None = None
#: Set by ``stop``: a later ``capture`` (the plugin's import in a fork server) keeps nothing.
_off = False


def _name(source: Path | str) -> str:
    """The file a module's code has in a share: one directory, named by the path."""
    return hashlib.sha1(str(source).encode(), usedforsecurity=False).hexdigest()[:24] + ".pyc"


def capture() -> None:
    """Keep what pytest's rewriter makes in this process from now on."""
    global _kept
    if _off:
        return
    try:
        from _pytest.assertion import rewrite

        orig = rewrite._rewrite_test
        rewrite._write_pyc  # noqa: B018 - what a share writes with: without it, nothing to keep
    except (ImportError, AttributeError):
        return
    if getattr(orig, "_isolate_orig", None) is not None:
        return

    @functools.wraps(orig)
    def _rewrite_test(fn: Any, config: Any) -> Any:
        key, co = orig(fn, config)
        if _share is not None:
            _share.write(Path(fn), key, co)
        elif _kept is not None:
            _kept.append((Path(fn), key, co))
        return key, co

    _rewrite_test._isolate_orig = orig  # type: ignore[attr-defined]
    _kept = []
    rewrite._rewrite_test = _rewrite_test


def stop() -> None:
    """Nothing kept from here on: a fork server, or a run without ``uml`` tests."""
    global _kept, _off
    _kept = None
    _off = True


def share(directory: Path, config: Any) -> Share | None:
    """The run's share, made at the first guest's start; later guests read the same."""
    global _share, _kept
    if _share is None and _kept is not None:
        try:
            _share = Share(directory, config)
        except OSError:
            return None
        kept, _kept = _kept, None
        for fn, key, co in kept:
            _share.write(fn, key, co)
        _share.rewrite_missing([fn for fn, _, _ in kept])
    return _share


def close() -> None:
    """Before the run dir goes: no thread writes into it any more."""
    global _share
    if _share is not None:
        _share.close()
        _share = None


class Share:
    """The run dir's copy of the controller's rewritten modules."""

    def __init__(self, directory: Path, config: Any) -> None:
        directory.mkdir(mode=0o755, exist_ok=True)
        self.directory = directory
        self.config = config
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def write(self, fn: Path, key: Any, co: Any) -> None:
        from _pytest.assertion import rewrite

        with contextlib.suppress(Exception):
            rewrite._write_pyc(self.config.stash[rewrite.assertstate_key], co, key, self.directory / _name(fn))

    def rewrite_missing(self, kept: list[Path]) -> None:
        """Rewrite on a thread what pytest rewrote before ``capture`` and has no cached
        copy of: the guest needs it only after its boot and its own ``import pytest``."""
        from _pytest.assertion import rewrite

        state = self.config.stash.get(rewrite.assertstate_key, None)
        hook = getattr(state, "hook", None)
        names = getattr(hook, "_rewritten_names", None)
        if not names:
            return
        done = set(kept)
        todo = [Path(fn) for fn in list(names.values()) if Path(fn) not in done]
        if not todo:
            return
        orig = getattr(rewrite._rewrite_test, "_isolate_orig", rewrite._rewrite_test)

        def run() -> None:
            for fn in todo:
                if self._stop.is_set():
                    return
                with contextlib.suppress(Exception):
                    cached = rewrite.get_cache_dir(fn) / (fn.name[:-3] + rewrite.PYC_TAIL)
                    if rewrite._read_pyc(fn, cached) is not None:
                        continue  # the guest finds pytest's own copy
                    key, co = orig(fn, self.config)
                    self.write(fn, key, co)

        self._thread = threading.Thread(target=run, name="isolate-rewrite-share", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)


def use(directory: str) -> None:
    """In a guest's fork server, before its configuration: where pytest's cache misses,
    read the controller's copy (checked against the source by pytest itself)."""
    try:
        from _pytest.assertion import rewrite

        orig = rewrite._read_pyc
    except (ImportError, AttributeError):
        return
    root = Path(directory)
    if not os.path.isdir(root):
        return

    @functools.wraps(orig)
    def _read_pyc(source: Any, pyc: Any, trace: Any = lambda _: None) -> Any:
        co = orig(source, pyc, trace)
        if co is None:
            co = orig(source, root / _name(source), trace)
        return co

    rewrite._read_pyc = _read_pyc


def no_pyc_until_collected() -> None:
    """In a fork server: what pytest rewrites while this server configures and collects
    is not written to ``__pycache__`` (``pyc_again`` undoes it).

    The server configures and collects while the controller does, and pytest's rewriter
    warns (``PytestAssertRewriteWarning``: an assert on a tuple) only when it compiles a
    module, not when it loads its cached copy. A server that cached a test module or a
    conftest first took the warning from the controller's summary (pyyaml's "1 warning",
    fidelity.md difference 36): the controller then loaded the server's copy. The
    server's own warnings at collection go nowhere. Reading a copy the controller wrote
    is harmless, and the controller writes its own as in-process."""
    try:
        from _pytest.assertion import rewrite

        orig = rewrite._write_pyc
    except (ImportError, AttributeError):
        return
    if getattr(orig, "_isolate_orig", None) is not None:
        return

    def _write_pyc(*_args: Any, **_kwargs: Any) -> bool:
        return False

    _write_pyc._isolate_orig = orig  # type: ignore[attr-defined]
    rewrite._write_pyc = _write_pyc


def pyc_again() -> None:
    """After the server's collection: tests' own imports write their cache as in-process."""
    try:
        from _pytest.assertion import rewrite
    except ImportError:
        return
    orig = getattr(rewrite._write_pyc, "_isolate_orig", None)
    if orig is not None:
        rewrite._write_pyc = orig

"""What a test stores with ``config.cache.set``, kept in the user's ``.pytest_cache``.

pytest's cache is its store across runs (``--lf`` keeps its failures there, and tests,
fixtures and plugins keep values there with ``request.config.cache.set``: a download's
checksum, a slow computation, a counter). From `chroot` up a sandbox's writes land in
its own root, thrown away with it: the value was gone for the next test and the next
run, which saw ``None`` where in-process they saw it. So in every sandbox the cache's
``set`` also records the key and value, and the controller stores them in its own
cache after the test, in order (at `process` the sandbox wrote the same file already;
writing it again changes nothing). Directories from ``config.cache.mkdir`` and what a
test writes in them are not carried.

The sandbox is untrusted: a key is stored only when it is a relative path without
``..`` (pytest joins it under ``.pytest_cache/v``), and values are JSON, as pytest's are.
"""

from __future__ import annotations

import contextlib
from pathlib import PurePosixPath
from typing import Any

import pytest

from pytest_isolate.session.kind import PluginCollector

NAME = "pytest_cache"
#: Values stored per sandbox at most.
_MAX = 10_000


def _cache(config: pytest.Config) -> Any:
    """The session's cache, unless ``-p no:cacheprovider``."""
    return getattr(config, "cache", None)


def _key_ok(key: Any) -> bool:
    if not isinstance(key, str) or not key or len(key) > 1000 or "\0" in key or "\\" in key:
        return False
    path = PurePosixPath(key)
    return not path.is_absolute() and all(part not in ("", ".", "..") for part in key.split("/"))


class Collector(PluginCollector):
    """Controller side: the sandbox's values stored in this session's cache, before the
    next test is sent (it may read them, as it would in-process)."""

    early = True

    def loaded(self) -> bool:
        return _cache(self.config) is not None

    def merge(self, data: Any) -> None:
        cache = _cache(self.config)
        if cache is None or not isinstance(data, list):
            return
        for entry in data[:_MAX]:
            if isinstance(entry, list) and len(entry) == 2 and _key_ok(entry[0]):
                with contextlib.suppress(Exception):  # pytest's own refusal of a key or value
                    cache.set(entry[0], entry[1])


class Recorder:
    """Sandbox side: the cache's ``set`` records what it stores.

    Made in the fork server before pytest's cache exists there (it comes with the
    configuration); each child wraps the cache it inherited before its test."""

    def __init__(self, config: pytest.Config) -> None:
        self.config = config
        self.stored: list[list[Any]] = []

    def begin(self) -> None:
        self.stored = []
        cache = _cache(self.config)
        if cache is None:
            return
        original = cache.set
        stored = self.stored

        def set(key: str, value: object) -> None:  # noqa: A001 - the method it stands for
            original(key, value)
            if len(stored) < _MAX:
                stored.append([key, value])

        cache.set = set

    def collect(self) -> list[list[Any]] | None:
        return self.stored or None


def sandbox(config: pytest.Config, init: dict[str, Any]) -> Recorder | None:
    """The sandbox side, made in the fork server."""
    return Recorder(config) if config.pluginmanager.has_plugin("cacheprovider") else None

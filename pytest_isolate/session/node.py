"""pytest-xdist's node protocol between the controller and a sandbox's session.

The fork server's session is a worker of the controller's, the way an xdist worker is:
plugins that support separate processes put what their worker side needs into
``node.workerinput`` (``pytest_configure_node``) and read what it left in
``config.workeroutput`` when the node goes down (``pytest_testnodedown``). Posing as a
worker without this breaks them (pytest-rerunfailures' ``sock_port``,
pytest-randomly's seed); not posing at all makes the server write the session-end
files a worker leaves to its controller (junit XML, html reports, syrupy's deletion of
snapshots it saw no test use). So the protocol is spoken for real, with three
adjustments:

- plugins whose state this plugin carries per test itself (``session.carry``) are left
  out of both hooks: their worker side is off in the server;
- a plugin that registers its xdist hooks only when pytest-xdist is installed gets what
  those hooks would have given (``_shims``), since the server is a worker either way;
- under a real xdist worker, the server's input is that worker's own ``workerinput``
  (its id, its run uid, what the xdist controller's plugins gave it: they are not asked
  again), and the worker's own ``workeroutput`` is never touched;
- it is a worker only where plugins decide what kind of session they are in: while it
  is configured and starts, and when it finishes (``hide_worker``). From collection to
  the last test it looks like the user's in-process session, which is not a worker.
"""

from __future__ import annotations

import contextlib
import json
import sys
from typing import Any

import pytest

from pytest_isolate.session import retry

#: Plugins (by registered name) whose cross-process state ``session.carry`` handles.
CARRIED = ("_cov",)
#: Set in the fork server's config: this session is a sandbox's, not the user's
#: controller (a stash key, not a ``workerinput`` key: tests can read the latter).
SERVER_KEY = pytest.StashKey[bool]()


class SandboxNode:
    """What a plugin's ``pytest_configure_node``/``pytest_testnodedown`` sees of a
    sandbox worker: the attributes of xdist's ``WorkerController`` they use."""

    def __init__(self, config: pytest.Config, gateway: Any, workerinput: dict[str, Any]) -> None:
        self.config = config
        self.gateway = gateway
        self.workerinput = workerinput
        # ``workeroutput`` is set only once the server sent it: a worker that died or
        # was stopped at once has none, and plugins tell that by its absence, as with
        # an xdist worker that went down (pytest-metadata reads it unguarded otherwise).
        #: pytest-cov's DistMaster reads ``node.nodemanager.roots`` (rsync roots: none).
        self.nodemanager = _NodeManager()
        self.shutting_down = False

    def __repr__(self) -> str:
        return f"<SandboxNode {self.workerinput.get('workerid')}>"


class _NodeManager:
    roots: list[Any] = []
    specs: list[Any] = []


def _hook(config: pytest.Config, name: str) -> Any:
    """The hook without the carried plugins, or None when no plugin implements it (the
    hook exists only once pytest-xdist's hookspecs or an implementation registered it)."""
    if not hasattr(config.hook, name):
        return None
    pm = config.pluginmanager
    carried = [p for p in (pm.get_plugin(n) for n in CARRIED) if p is not None]
    return pm.subset_hook_caller(name, remove_plugins=carried)


def workerinput(config: pytest.Config, gateway: Any, run_id: str) -> tuple[SandboxNode, dict[str, Any]]:
    """The server's ``workerinput``, filled by the controller's plugins.

    Raises what a plugin's ``pytest_configure_node`` raised: the worker cannot start
    then, and the caller reports that once for the tests of that worker."""
    own = getattr(config, "workerinput", None)
    base = dict(own or {})
    base.setdefault("workerid", "master")
    base.setdefault("workercount", 1)
    base.setdefault("testrunuid", run_id)
    base.setdefault("mainargv", list(sys.argv))
    node = SandboxNode(config, gateway, base)
    # Under an xdist worker the xdist controller's plugins filled ``own`` already; their
    # worker halves may not configure nodes (pytest-rerunfailures' asks its controller-
    # only socket server for a port), and the sandbox is that worker's own extension.
    hook = _hook(config, "pytest_configure_node") if own is None else None
    if hook is not None:
        hook(node=node)
    _shims(config, node.workerinput)
    return node, _plain(node.workerinput)


def _shims(config: pytest.Config, data: dict[str, Any]) -> None:
    """Keys that plugins read in any worker but give only through xdist hooks they
    register when pytest-xdist is installed."""
    seed = getattr(config.option, "randomly_seed", None)
    if config.pluginmanager.has_plugin("randomly") and isinstance(seed, int):
        data.setdefault("randomly_seed", seed)
    retry.shim(config, data)
    _mypy_shim(config, data)


def _mypy_shim(config: pytest.Config, data: dict[str, Any]) -> None:
    """pytest-mypy's workers read where its results go from ``workerinput``, which its
    controller fills only when pytest-xdist is installed: without it, every isolated
    test failed (the server's configuration raised ``KeyError``)."""
    mod = sys.modules.get("pytest_mypy")
    if mod is None or "mypy_config_stash_serialized" in data or not config.pluginmanager.is_registered(mod):
        return
    try:
        data["mypy_config_stash_serialized"] = config.stash[mod.stash_key["config"]].serialized()
    except Exception:  # noqa: BLE001 - another version's internals: as before
        pass


def _plain(data: dict[str, Any]) -> dict[str, Any]:
    """What JSON carries of it: values that do not survive are dropped (an xdist
    channel would refuse them too)."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        with contextlib.suppress(TypeError, ValueError):
            out[str(key)] = json.loads(json.dumps(value))
    return out


def nodedown(config: pytest.Config, node: SandboxNode, workeroutput: dict[str, Any] | None, error: str | None) -> None:
    """``pytest_testnodedown`` for a sandbox worker that stopped."""
    if workeroutput is not None:
        node.workeroutput = dict(workeroutput)
    node.shutting_down = True
    hook = _hook(config, "pytest_testnodedown")
    if hook is not None:
        hook(node=node, error=error)


def server_output(config: pytest.Config) -> dict[str, Any]:
    """The server's ``workeroutput`` as JSON can carry it, sent when its session ends."""
    return _plain(dict(getattr(config, "workeroutput", None) or {}))


def under_xdist(config: pytest.Config) -> bool:
    """Is the controller of this server itself an xdist worker? It passed that worker's
    ``workerid`` on; an in-process controller passes "master" (``workerinput``)."""
    return (getattr(config, "workerinput", None) or {}).get("workerid", "master") != "master"


#: What makes a session an xdist worker, to plugins and tests alike.
_WORKER_ATTRS = ("workerinput", "workeroutput")


def hide_worker(config: pytest.Config) -> dict[str, Any]:
    """Take the worker attributes off the server's config until ``show_worker``.

    Plugins decide whether they run in a worker when they are configured or when the
    session starts (pytest-cov, pytest-randomly, pytest-rerunfailures, junitxml), and a
    worker's session-end work reaches the controller only if they still see one at the
    end. Between the two, what asks is a conftest's collection hook or a test's fixture:
    ``xdist.is_xdist_worker(request)``, the ``worker_id`` fixture, pytest-django's test
    database suffix, "skip this on xdist workers". In-process those see no worker, so a
    sandbox must not show one either. Under a real xdist worker they do see one (its
    own), and nothing is hidden."""
    if under_xdist(config):
        return {}
    return {name: config.__dict__.pop(name) for name in _WORKER_ATTRS if name in config.__dict__}


def show_worker(config: pytest.Config, saved: dict[str, Any]) -> None:
    """Put back what ``hide_worker`` took, for the session's end."""
    for name, value in saved.items():
        setattr(config, name, value)
    saved.clear()

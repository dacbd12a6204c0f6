"""Writes a test may keep: files it wrote below chosen paths, copied back to the host.

From ``chroot`` up a test writes into a throwaway overlay, which is the point of those
tiers, and also why a regression baseline, a golden file or a recorded cassette a test
writes into the source tree (pytest-regressions, pytest-snapshot, a project's own
``--update-golden``) was lost: the next run failed again where in-process it passes.
``keep`` names the paths (``isolate_keep``, ``--isolate-keep``, ``isolate(keep=...)``)
below which such writes reach the host.

Both halves live here, as a facet's host and sandbox sides do elsewhere:

- :func:`collect` runs where the test's overlay upper is reachable after the test (the
  chroot server, the jail/zone init, the UML guest's server) and reads what changed
  below the kept paths, never following a link the test made;
- :func:`write_back` runs in the controller, which trusts nothing of it: each path is
  checked against the item's own patterns again, files Python or pytest would import or
  read as configuration on the host (``conftest.py``, any ``.py``, ini files), what lies
  in a ``.git`` directory and files that are executable there are refused, since a test
  could otherwise plant code that runs outside any sandbox later; new files are never
  executable; each file is written through directory fds opened without following
  links, to a temporary name renamed into place.
"""

from __future__ import annotations

import base64
import contextlib
import os
import re
import stat
from collections.abc import Callable, Iterable
from typing import Any

#: What one test may keep, in all and per file: beyond it nothing more is copied.
MAX_BYTES = 32 << 20
MAX_FILES = 1000
#: Never copied back: what Python imports or pytest reads as configuration.
_CODE_SUFFIXES = (".py", ".pyc", ".pyo", ".pyw", ".pyd", ".so", ".pth")
_CONFIG_NAMES = ("pytest.ini", ".pytest.ini", "tox.ini", "setup.cfg", "pyproject.toml")
_GLOB = re.compile(r"[*?\[]")


def literal_prefix(pattern: str) -> str:
    """The leading directories of ``pattern`` before its first wildcard."""
    parts = pattern.split("/")
    out = []
    for p in parts:
        if _GLOB.search(p):
            break
        out.append(p)
    return "/".join(out) or "/"


def matcher(patterns: Iterable[str]) -> Callable[[str], bool]:
    """Whether an absolute path is at or below one of ``patterns`` (``*`` and ``?``
    within one name, ``**`` across names)."""
    regexes = []
    for pat in patterns:
        body = ""
        i = 0
        while i < len(pat):
            if pat.startswith("**/", i):
                body += "(?:.*/)?"
                i += 3
            elif pat.startswith("**", i):
                body += ".*"
                i += 2
            elif pat[i] == "*":
                body += "[^/]*"
                i += 1
            elif pat[i] == "?":
                body += "[^/]"
                i += 1
            else:
                body += re.escape(pat[i])
                i += 1
        regexes.append(re.compile(body.rstrip("/") + "(?:/.*)?"))
    return lambda path: any(r.fullmatch(path) for r in regexes)


def refused(path: str) -> str | None:
    """Why ``path`` is never written back, or None."""
    name = path.rsplit("/", 1)[-1]
    if name.endswith(_CODE_SUFFIXES):
        return "Python could import it on the host"
    if name in _CONFIG_NAMES:
        return "pytest reads it as configuration"
    if "/.git/" in path + "/":
        return "git runs or reads what is there"
    return None


def resolve(patterns: Iterable[str], base: str) -> tuple[str, ...]:
    """Absolute patterns: relative ones from ``base``; the part before the first
    wildcard with links resolved, since the test's writes went where links lead and the
    overlay holds them under that path."""
    out = []
    for pat in patterns:
        full = os.path.normpath(os.path.join(base, pat))
        fixed = literal_prefix(full)
        rest = full[len(fixed):]
        out.append(os.path.realpath(fixed) + rest)
    return tuple(dict.fromkeys(out))


# -- sandbox side ---------------------------------------------------------------------


def collect(
    uppers: Iterable[tuple[str, str]], patterns: Iterable[str], lower: str | None = None
) -> list[dict[str, Any]]:
    """What a test wrote below ``patterns``, one entry per path.

    ``uppers``: (upper dir, where its layer sits in the root) pairs. An entry is
    ``{"path", "data"}`` (base64) for a regular file, ``{"path", "deleted": True}`` for
    a whiteout of a file the lower had, ``{"path", "why"}`` for what is not kept (links,
    devices, over the limit): the controller says so beside its own refusals.
    """
    pats = tuple(patterns)
    if not pats:
        return []
    match = matcher(pats)
    prefixes = [literal_prefix(p) for p in pats]
    entries: list[dict[str, Any]] = []
    budget = [MAX_BYTES]

    def wanted_dir(path: str) -> bool:
        return any(
            path == p or p.startswith(path.rstrip("/") + "/") or path.startswith(p.rstrip("/") + "/") or p == "/"
            for p in prefixes
        )

    def walk(fd: int, inside: str) -> None:
        for e in sorted(os.scandir(fd), key=lambda e: e.name):
            path = f"{inside.rstrip('/')}/{e.name}"
            try:
                st = e.stat(follow_symlinks=False)
            except OSError:
                continue
            if stat.S_ISDIR(st.st_mode):
                if not wanted_dir(path):
                    continue
                try:
                    sub = os.open(e.name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
                except OSError:
                    continue
                try:
                    walk(sub, path)
                finally:
                    os.close(sub)
                continue
            if not match(path) or "/__pycache__/" in path:
                continue
            if len(entries) >= MAX_FILES:
                entries.append({"path": path, "why": f"more than {MAX_FILES} files; it and later ones not kept"})
                raise StopIteration
            if stat.S_ISCHR(st.st_mode) and st.st_rdev == 0:
                if lower is not None and os.path.isfile(os.path.join(lower, path.lstrip("/"))):
                    entries.append({"path": path, "deleted": True})
                continue
            if not stat.S_ISREG(st.st_mode):
                entries.append({"path": path, "why": "not a regular file"})
                continue
            if st.st_size > budget[0]:
                entries.append({"path": path, "why": f"over the {MAX_BYTES >> 20} MiB a test may keep"})
                continue
            try:
                ffd = os.open(e.name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=fd)
            except OSError as exc:
                entries.append({"path": path, "why": str(exc.strerror)})
                continue
            try:
                if not stat.S_ISREG(os.fstat(ffd).st_mode):
                    continue
                data = _read(ffd, budget[0] + 1)
            finally:
                os.close(ffd)
            if len(data) > budget[0]:
                entries.append({"path": path, "why": f"over the {MAX_BYTES >> 20} MiB a test may keep"})
                continue
            budget[0] -= len(data)
            entries.append({"path": path, "data": base64.b64encode(data).decode("ascii")})

    for upper, prefix in uppers:
        try:
            fd = os.open(upper, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError:
            continue
        try:
            if wanted_dir(prefix or "/"):
                walk(fd, prefix or "/")
        except StopIteration:
            break
        finally:
            os.close(fd)
    return entries


def _read(fd: int, limit: int) -> bytes:
    chunks = []
    size = 0
    while size < limit:
        chunk = os.read(fd, min(1 << 20, limit - size))
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
    return b"".join(chunks)


# -- controller side --------------------------------------------------------------------


def write_back(entries: Any, patterns: Iterable[str]) -> tuple[list[str], list[str]]:
    """(kept, notes): write the sandbox's ``entries`` to the host, each checked again."""
    if not isinstance(entries, list) or not entries:
        return [], []
    match = matcher(patterns)
    kept: list[str] = []
    notes: list[str] = []
    total = 0
    for entry in entries[: MAX_FILES + 1]:
        path = entry.get("path") if isinstance(entry, dict) else None
        if not isinstance(path, str) or not path.startswith("/") or "\0" in path:
            continue
        if os.path.normpath(path) != path or not match(path):
            notes.append(f"keep: {path!r} not written back (not below a kept path)")
            continue
        why = entry.get("why")
        if isinstance(why, str):
            notes.append(f"keep: {path} not kept ({why[:200]})")
            continue
        why = refused(path)
        if why:
            notes.append(f"keep: {path} not written back ({why}; write it with --isolate=process)")
            continue
        try:
            if entry.get("deleted") is True:
                if _delete(path):
                    kept.append(f"deleted {path}")
                continue
            data = base64.b64decode(entry.get("data") or "", validate=True)
            total += len(data)
            if total > MAX_BYTES:
                notes.append(f"keep: {path} not written back (over the {MAX_BYTES >> 20} MiB a test may keep)")
                continue
            _write(path, data)
            kept.append(path)
        except (OSError, ValueError, TypeError) as exc:
            notes.append(f"keep: {path} not written back ({getattr(exc, 'strerror', None) or exc})")
    return kept, notes


_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def _parent(path: str, create: bool) -> tuple[int, str]:
    """An fd of ``path``'s directory, reached from ``/`` without following a link (its
    patterns were resolved: a link on the way is not where the test wrote)."""
    *dirs, name = path.strip("/").split("/")
    fd = os.open("/", _DIR_FLAGS)
    try:
        for d in dirs:
            try:
                sub = os.open(d, _DIR_FLAGS, dir_fd=fd)
            except FileNotFoundError:
                if not create:
                    raise
                os.mkdir(d, 0o777, dir_fd=fd)
                sub = os.open(d, _DIR_FLAGS, dir_fd=fd)
            os.close(fd)
            fd = sub
    except BaseException:
        os.close(fd)
        raise
    return fd, name


def _write(path: str, data: bytes) -> None:
    fd, name = _parent(path, create=True)
    try:
        try:
            st = os.stat(name, dir_fd=fd, follow_symlinks=False)
            mode = stat.S_IMODE(st.st_mode) if stat.S_ISREG(st.st_mode) else None
        except FileNotFoundError:
            mode = None
        if mode is not None and mode & 0o111:
            # Its new content would run as whoever runs it next (a script, a hook).
            raise ValueError("an executable file on the host")
        # As in-process: rewriting a file keeps its mode.
        replace_at(fd, name, data, mode)
    finally:
        os.close(fd)


def replace_at(dir_fd: int, name: str, data: bytes, mode: int | None = None) -> None:
    """Put ``data`` at ``name`` in the directory ``dir_fd`` for a sandbox: written to a
    new temporary name beside it, then renamed over it, so a link at ``name`` is replaced
    and never written through, and nothing half-written is ever seen there. The
    temporary goes on any exception, Ctrl-C included: nothing of ours is left in the
    user's tree. ``mode``: the permissions it gets (else the umask's)."""
    tmp = f".{name[:200]}.isolate-{os.getpid()}"
    out = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666, dir_fd=dir_fd)
    try:
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(out, view):]
            if mode is not None:
                os.fchmod(out, mode & 0o777)
        finally:
            os.close(out)
        os.rename(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp, dir_fd=dir_fd)
        raise


def _delete(path: str) -> bool:
    try:
        fd, name = _parent(path, create=False)
    except FileNotFoundError:
        return False
    try:
        st = os.stat(name, dir_fd=fd, follow_symlinks=False)
        if not stat.S_ISREG(st.st_mode):
            return False
        os.unlink(name, dir_fd=fd)
        return True
    except FileNotFoundError:
        return False
    finally:
        os.close(fd)

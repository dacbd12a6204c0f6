"""What a test changed in its overlay root, read from the upper layer afterwards.

Apart from ``facets.mounts`` because it changes with the report, not with how the root
is built: an overlay's upper dir holds exactly what the test wrote, so walking it (new
entries, copy-ups, whiteouts, opaque dirs) gives the report's change list and the disk
the test used. Runs wherever the upper is still reachable: the chroot and UML tiers'
``finish``, and the jail init before its mount namespace goes.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterable

from pytest_isolate.facets.mounts import RootLayout

_OPAQUE_XATTRS = ("trusted.overlay.opaque", "user.overlay.opaque")
#: At most this many change lines; the rest are summarised in one line.
MAX_CHANGES = 200


def _is_whiteout(st: os.stat_result) -> bool:
    return stat.S_ISCHR(st.st_mode) and st.st_rdev == 0


def _is_opaque(path: str) -> bool:
    for name in _OPAQUE_XATTRS:
        try:
            if os.getxattr(path, name, follow_symlinks=False) == b"y":
                return True
        except OSError:
            continue
    return False


def _lower_exists(lower: str | None, rel: str) -> bool:
    if lower is None:
        return False
    return os.path.lexists(os.path.join(lower, rel))


def scan_upper(
    upper: str | os.PathLike[str],
    ignore: Iterable[str | os.PathLike[str]] = (),
    lower: str | os.PathLike[str] | None = None,
    prefix: str = "",
    limit: int = MAX_CHANGES,
) -> tuple[list[str], int]:
    """(changes, bytes) of an overlay upper dir, paths as the test saw them.

    ``changes`` lines read ``created /etc/x``, ``modified /etc/passwd``, ``deleted
    /etc/hosts`` (an overlay whiteout), ``replaced /opt/d/`` (an opaque dir). A new
    directory is one line with its entry count instead of one line per file. Paths under
    ``ignore`` (tmp dirs, mount points the tier made) and ``.pyc`` files in ``__pycache__``
    directories (new or not) are left out of ``changes`` but counted in ``bytes`` (the disk the test used in the upper).
    Without ``lower`` nothing can be told apart from new, so everything is "created".
    ``prefix`` is where this upper's layer sits in the root (split roots).
    """
    up = os.fspath(upper)
    low = os.fspath(lower) if lower is not None else None
    ign = [os.fspath(p).rstrip("/") or "/" for p in ignore]
    pre = prefix.rstrip("/")
    changes: list[str] = []
    total = 0
    extra = 0

    def ignored(inside: str) -> bool:
        return any(inside == i or inside.startswith(i + "/") or i == "/" for i in ign)

    def add(line: str) -> None:
        nonlocal extra
        if len(changes) < limit:
            changes.append(line)
        else:
            extra += 1

    def walk(rel: str, count_only: bool) -> int:
        """Walk upper/rel; returns the number of entries below it."""
        nonlocal total
        n = 0
        try:
            it = os.scandir(os.path.join(up, rel) if rel else up)
        except OSError:
            return 0
        with it:
            for e in it:
                r = f"{rel}/{e.name}" if rel else e.name
                inside = pre + "/" + r
                try:
                    st = e.stat(follow_symlinks=False)
                except OSError:
                    continue
                n += 1
                total += st.st_blocks * 512 if st.st_blocks else st.st_size
                if stat.S_ISDIR(st.st_mode):
                    skip = count_only or ignored(inside)
                    if e.name == "__pycache__":
                        # The import system's cache (a module imported for the first
                        # time, pytest's rewritten copy): a new one is no more the
                        # test's doing than the .pyc files in it; anything else in it is.
                        n += walk(r, skip)
                        continue
                    if not skip and not _lower_exists(low, r):
                        sub = walk(r, True)
                        n += sub
                        add(f"created {inside}/" + (f" ({sub} entries)" if sub else ""))
                        continue
                    if not skip and _lower_exists(low, r) and _is_opaque(e.path):
                        sub = walk(r, True)
                        n += sub
                        add(f"replaced {inside}/" + (f" ({sub} entries)" if sub else ""))
                        continue
                    n += walk(r, skip)
                    continue
                if count_only or ignored(inside):
                    continue
                if "/__pycache__/" in inside and e.name.endswith(".pyc"):
                    continue
                if _is_whiteout(st):
                    add(f"deleted {inside}")
                elif _lower_exists(low, r):
                    add(f"modified {inside}")
                else:
                    add(f"created {inside}")
        return n

    walk("", False)
    if extra:
        changes.append(f"... and {extra} more")
    return changes, total


def _tree_bytes(path: str) -> tuple[int, int]:
    """(entries, bytes) below and including ``path``, never leaving its filesystem."""
    try:
        st = os.lstat(path)
    except OSError:
        return 0, 0
    n, total = 0, st.st_blocks * 512
    if stat.S_ISDIR(st.st_mode):
        for dirpath, dirnames, filenames in os.walk(path):
            for name in dirnames + filenames:
                try:
                    s2 = os.lstat(os.path.join(dirpath, name))
                except OSError:
                    continue
                n += 1
                total += s2.st_blocks * 512
    return n, total


def scan_root(
    layout: RootLayout,
    upper: str | os.PathLike[str],
    lower: str | os.PathLike[str],
    root: str | os.PathLike[str],
    ignore: Iterable[str | os.PathLike[str]] = (),
) -> tuple[list[str], int]:
    """(changes, bytes) of a root built by ``build_root``; ``root`` is where it is seen now.

    Single overlay: its upper dir. Split root: each overlay layer's upper, plus entries
    the test created or deleted in the plain dirs that hold the layers.
    """
    ign = [*map(os.fspath, ignore), *layout.created]
    if not layout.split:
        return scan_upper(upper, ign, lower)
    up, low, rt = os.fspath(upper), os.fspath(lower), os.fspath(root).rstrip("/")
    changes: list[str] = []
    total = 0
    children: dict[str, set[str]] = {}
    for layer in layout.layers:
        if layer.path != "/":
            parent, _, name = layer.path.rpartition("/")
            children.setdefault(parent or "/", set()).add(name)
    for layer in layout.layers:
        if layer.kind == "overlay":
            c, b = scan_upper(
                os.path.join(up, layer.key),
                ign,
                low.rstrip("/") + layer.path,
                prefix=layer.path,
                limit=max(0, MAX_CHANGES - len(changes)),
            )
            changes.extend(c)
            total += b
        elif layer.kind == "dir":
            here = rt + (layer.path if layer.path != "/" else "") or "/"
            try:
                actual = set(os.listdir(here))
            except OSError:
                continue
            expected = children.get(layer.path, set())
            base = layer.path.rstrip("/")
            for name in sorted(actual - expected):
                inside = f"{base}/{name}"
                n, b = _tree_bytes(os.path.join(here, name))
                total += b
                if any(inside == i or inside.startswith(i.rstrip("/") + "/") for i in ign):
                    continue
                if os.path.isdir(os.path.join(here, name)) and not os.path.islink(os.path.join(here, name)):
                    changes.append(f"created {inside}/" + (f" ({n} entries)" if n else ""))
                else:
                    changes.append(f"created {inside}")
            for name in sorted(expected - actual):
                changes.append(f"deleted {base}/{name}")
    if len(changes) > MAX_CHANGES:
        changes[MAX_CHANGES:] = [f"... and {len(changes) - MAX_CHANGES} more"]
    return changes, total


def uppers(layout: RootLayout, upper: str | os.PathLike[str]) -> list[tuple[str, str]]:
    """(upper dir, where its layer sits in the root) of each overlay of a built root."""
    up = os.fspath(upper)
    if not layout.split:
        return [(up, "/")]
    return [(os.path.join(up, layer.key), layer.path) for layer in layout.layers if layer.kind == "overlay"]


def upper_size(upper: str | os.PathLike[str]) -> int:
    """Bytes the test's writes occupy in the upper layer (copy-ups count whole)."""
    return scan_upper(upper, ("/",), None)[1]

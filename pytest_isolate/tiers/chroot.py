"""`chroot` tier: the host's namespaces, a throwaway overlay root.

Files the test writes outside basetemp land in a tmpfs upper layer and are listed in
the report; nothing else is confined. Root inside can still escape (double chroot,
``/proc/1/root``, mount, signals to host processes): that is what this tier is, and the
escape detectors report it.

Host-side layout, all under ``ctx.workdir/chroot`` (a tmpfs mounted once per worker,
private, so nothing mounted below it propagates to the host's peers)::

    chroot/<index>/upper  work  root      root = the overlay, with proc/sys/dev/binds
"""

from __future__ import annotations

import os
import resource
import sys
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn

from pytest_isolate.facets import keep, mounts, overlay_changes
from pytest_isolate.facets.namespaces import in_initial_userns
from pytest_isolate.tiers.base import Box, Tier, fork_child

#: Paths inside the sandbox whose changes are the test's own business, not a change to
#: the system (tempfile.mkdtemp and friends).
TMP_DIRS = ("/tmp", "/var/tmp")


def overlay_available() -> str | None:
    try:
        with open("/proc/filesystems", encoding="utf-8") as f:
            kinds = {line.split()[-1] for line in f if line.strip()}
    except OSError:
        return None
    if "overlay" not in kinds and not os.path.exists("/sys/module/overlay"):
        # It may still be a loadable module the first mount pulls in; say what to do.
        if not any(Path("/lib/modules", os.uname().release).glob("kernel/fs/overlayfs/*")):
            return "the kernel has no overlayfs (CONFIG_OVERLAY_FS): `modprobe overlay` or use a kernel with it"
    return None


def lower_for(box: Box) -> Path:
    if box.spec.rootfs:
        return Path(box.spec.rootfs)
    return Path("/")


class ChrootTier(Tier):
    name = "chroot"
    #: The runner is the server's own child: its "end" is the answer. Its overlay is
    #: scanned and lazily unmounted while the kernel tears the exiting runner down.
    direct = True

    @classmethod
    def availability(cls) -> str | None:
        if os.geteuid() != 0 or not in_initial_userns():
            return (
                "the chroot tier needs root (it mounts an overlay in the host mount namespace); "
                "run pytest as root, or use tier 'jail', which works unprivileged in a user namespace"
            )
        return overlay_available()

    def __init__(self, ctx):  # type: ignore[no-untyped-def]
        super().__init__(ctx)
        self._fs: Path | None = None  # the per-worker tmpfs, once mounted
        #: Roots of finished tests, unmounted and removed by ``tidy``.
        self._finished: list[Path] = []
        #: What each lower root needs bound (as jail keeps it): ~1 ms of stat() a test.
        self._binds: dict[str, list[tuple[Path, bool]]] = {}

    # -- per worker -----------------------------------------------------------------

    def _worker_fs(self) -> Path:
        if self._fs is None:
            fs = self.ctx.workdir / "chroot"
            fs.mkdir(parents=True, exist_ok=True)
            mounts.mount_tmpfs(fs, mode=0o700)
            # Mounts *below* it must not propagate. Its own unmount still reaches any
            # copies a shared parent made of it, since that follows the parent's type.
            mounts.make_private(fs)
            self._fs = fs
        return self._fs

    def close(self) -> None:
        self.tidy()
        if self._fs is not None:
            for mp in mounts.mounts_below(self._fs):
                mounts.detach_tree(mp)
            try:
                self._fs.rmdir()
            except OSError:
                pass
            self._fs = None

    # -- per test -------------------------------------------------------------------

    def prepare(self, box: Box) -> None:
        d = self._worker_fs() / str(box.index)
        d.mkdir()
        if box.spec.disk:
            # A test of its own: the upper layer cannot outgrow the disk budget (ENOSPC).
            mounts.mount_tmpfs(d, size=box.spec.disk, mode=0o700)
        for sub in ("upper", "work", "root"):
            (d / sub).mkdir()
        lower = lower_for(box)
        plan = mounts.RootPlan(
            merged=d / "root",
            upper=d / "upper",
            work=d / "work",
            lower=lower,
            binds=self._needed_binds(lower),
            dev="bind",
        )
        box.state["chroot_dir"] = d
        try:
            box.state["chroot_layout"] = mounts.build_root(plan)
        except BaseException:
            self._cleanup(box)
            raise
        cwd = os.getcwd()
        if not os.path.isdir(os.path.join(plan.merged, cwd.lstrip("/"))):
            cwd = str(self.ctx.rootdir) if os.path.isdir(os.path.join(plan.merged, str(self.ctx.rootdir).lstrip("/"))) else "/"
        box.state["chroot_cwd"] = cwd

    def _needed_binds(self, lower: Path) -> list[tuple[Path, bool]]:
        key = os.fspath(lower)
        binds = self._binds.get(key)
        if binds is None:
            binds = self._binds[key] = mounts.needed_binds(lower, self.ctx.rootdir, self.ctx.basetemp)
        return binds

    def entry(self, box: Box) -> tuple[str, str]:
        # All a child needs here (own process group, chroot, chdir), so the spawner's
        # zygote can do it as well as ``spawn``'s child.
        return str(box.state["chroot_dir"] / "root"), box.state["chroot_cwd"]

    def spawn(self, box: Box, run: Callable[[], NoReturn]) -> int:
        root, cwd = self.entry(box)

        def body() -> NoReturn:
            os.setpgid(0, 0)
            os.chroot(root)
            os.chdir(cwd)
            run()

        return fork_child(body)

    def finish(self, box: Box, pid: int, status: int, rusage: resource.struct_rusage | None) -> None:
        """What the test changed; its root is unmounted and removed by ``tidy``, once
        the answer is out (~1 ms of unmounting, not on the test's critical path)."""
        d: Path | None = box.state.pop("chroot_dir", None)
        if d is None:
            return
        try:
            layout = box.state.pop("chroot_layout", None) or mounts.RootLayout()
            changes, used = overlay_changes.scan_root(layout, d / "upper", lower_for(box), d / "root", TMP_DIRS)
            box.usage["disk_bytes"] = used
            box.state["changes"] = changes
            if box.spec.keep:
                uppers = overlay_changes.uppers(layout, d / "upper")
                box.state["kept"] = keep.collect(uppers, box.spec.keep, lower_for(box))
        finally:
            self._finished.append(d)

    def tidy(self) -> None:
        finished, self._finished = self._finished, []
        for d in finished:
            try:
                problems = self._remove(d)
            except Exception as exc:  # noqa: BLE001 - never the running test's failure
                problems = [f"chroot: could not unmount {d}: {exc} (removed at worker close)"]
            for why in problems:
                print(f"pytest-isolate: {why}", file=sys.stderr)  # the server's log

    def _cleanup(self, box: Box) -> None:
        d: Path | None = box.state.pop("chroot_dir", None)
        if d is not None:
            box.notes.extend(self._remove(d))

    @staticmethod
    def _remove(d: Path) -> list[str]:
        """Unmount and delete a test's root; what could not be done, as notes."""
        # One lazy unmount per mount of the root's own: MNT_DETACH takes what is below.
        for mp in _tops(mounts.mounts_below(d)):
            mounts.detach_tree(mp)
        left = mounts.mounts_below(d)
        if left:
            # Never delete through a mount (it may be basetemp or /dev).
            return [f"chroot: mounts left under {d}: {', '.join(left)}"]
        if not mounts.remove_tree(d):
            # e.g. a file the test made immutable in the upper layer: it goes with the
            # worker's tmpfs at close().
            return [f"chroot: could not remove all of {d} (removed at worker close)"]
        return []


def _tops(mps: list[str]) -> list[str]:
    """The mount points not below another one of the list (deepest-first order kept)."""
    return [mp for mp in mps if not any(mp.startswith(other + "/") for other in mps)]

"""Which User-Mode Linux kernel a guest boots, and whether a guest can boot here at all.

Host side, before any guest exists: find the kernel (beside the interpreter, then
PATH), read what it was built with (``--showconfig`` and its option text, no boot),
boot one probe guest per kernel (Debian's 6.1 and 6.12 panic on AVX-512/AMX CPUs, and
nothing short of running one shows it), pick the guest's channel (tap or veth) and
answer ``availability``. Asked by ``tiers.availability``, the controller and
``uml_gateway.gateway_spec`` (which builds a guest's command line from the answers),
all on the host; each answer is cached per kernel binary.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import functools
import os
import shutil
import signal
import sys
import tempfile
import threading
from typing import Any

from pytest_isolate.facets import caps
from pytest_isolate.facets.namespaces import in_initial_userns
from pytest_isolate.tiers.base import Unavailable

KERNEL_NAMES = ("linux.uml", "linux")
NOT_FOUND = (
    "uml: no User-Mode Linux kernel found (install the Debian package user-mode-linux, "
    "or pass --isolate-uml-kernel=PATH)"
)
#: Boot-time initcalls skipped. The RAID6 and XOR set-ups only benchmark (Debian's UML
#: kernel builds btrfs in, which pulls in raid6_pq with CONFIG_RAID6_PQ_BENCHMARK):
#: ~0.85 s of a ~1 s boot, for md/btrfs RAID a guest never uses. The RAID6 one is
#: ``raid6_select_algo`` up to 6.x and ``raid6_init`` in 7.x (the kernel
#: scripts/uml-kernel.sh fetches): both are named. zswap (no swap), mmapper and ubd (no
#: iomem, no block devices: the root is hostfs) only print warnings on the console.
#: Names a kernel lacks are ignored.
INITCALL_BLACKLIST = (
    "raid6_select_algo,raid6_init,calibrate_xor_blocks,init_zswap,mmapper_init,ubd_init,ubd_driver_init"
)
#: Forces the guest's channel ("tap" or "veth"; unset or "auto": ``choose_channel``).
#: For tests and benchmarks, which run each channel where both would work.
CHANNEL_ENV = "PYTEST_ISOLATE_UML_CHANNEL"
CHANNELS = ("tap", "veth")


def _kernel_search_path() -> str:
    """Where a kernel is looked up by name: the directory of ``sys.executable`` first,
    then PATH, then the distribution's directories.

    ``sys.executable`` as the interpreter was started, not its realpath: in a venv that
    is the venv's ``bin``, where scripts/uml-kernel.sh installs a kernel that boots on
    CPUs the distribution's cannot (AVX-512/AMX). A run of ``.venv/bin/python -m
    pytest`` (or ``.venv/bin/pytest``) without an activated venv has that ``bin`` off
    PATH, and would otherwise fall back to ``/usr/bin/linux.uml``.
    """
    dirs = [os.path.dirname(os.path.abspath(sys.executable))] if sys.executable else []
    return os.pathsep.join([*dirs, os.environ.get("PATH", ""), "/usr/bin", "/usr/local/bin"])


def find_kernel(explicit: str | None = None) -> str:
    """The UML kernel to boot: ``explicit`` (``--isolate-uml-kernel`` / marker
    ``kernel=``) if given, else ``linux.uml`` or ``linux`` beside the interpreter or on
    PATH (see ``_kernel_search_path``; a ``linux`` that is not a UML kernel is skipped)."""
    if explicit:
        path = shutil.which(explicit) or explicit
        if not os.path.isfile(path) or not os.access(path, os.X_OK):
            raise Unavailable(
                f"uml: kernel {explicit!r} is not an executable file (--isolate-uml-kernel, ini "
                "isolate_uml_kernel or marker kernel=: valid is the path or PATH name of a "
                "User-Mode Linux kernel, e.g. /usr/bin/linux.uml)"
            )
        return os.path.realpath(path)
    search = _kernel_search_path()
    for name in KERNEL_NAMES:
        path = shutil.which(name, path=search)
        if path and (name == "linux.uml" or _looks_like_uml(path)):
            return os.path.realpath(path)
    raise Unavailable(NOT_FOUND)


def _looks_like_uml(path: str) -> bool:
    """Only a UML kernel answers ``--showconfig`` with its configuration."""
    try:
        return kernel_config(os.path.realpath(path)).get("CONFIG_UML") == "y"
    except OSError:
        return False


@functools.lru_cache(maxsize=8)
def _kernel_config_cached(path: str, mtime: float) -> dict[str, str]:
    import subprocess

    try:
        out = subprocess.run(
            [path, "--showconfig"],
            capture_output=True,
            text=True,
            encoding="utf-8",
            timeout=10,
            stdin=subprocess.DEVNULL,
        ).stdout
    except (OSError, subprocess.TimeoutExpired):
        return {}
    cfg: dict[str, str] = {}
    for line in out.splitlines():
        if line.startswith("CONFIG_") and "=" in line:
            k, _, v = line.partition("=")
            cfg[k] = v.strip('"')
    return cfg


def kernel_config(kernel: str) -> dict[str, str]:
    """``CONFIG_*`` of a UML kernel (``linux.uml --showconfig``; no boot, ~7 ms, cached)."""
    return _kernel_config_cached(kernel, os.stat(kernel).st_mtime)


def smp_support(kernel: str) -> int:
    """How many CPUs the kernel can use: 1 without CONFIG_SMP (Debian's 6.1 has
    NR_CPUS=1; UML regained SMP in Linux 6.19, where ``ncpus=N`` starts N CPUs)."""
    cfg = kernel_config(kernel)
    if cfg.get("CONFIG_SMP") != "y":
        return 1
    try:
        return int(cfg.get("CONFIG_NR_CPUS", "1"))
    except ValueError:
        return 1


#: The probe guest's init: prints a token, then powers off (PID 1 must never exit).
_PROBE_INIT = """#!/bin/sh
echo isolate-probe-ok
mount -t proc proc /proc 2>/dev/null
echo o > /proc/sysrq-trigger
sleep 30
"""


def boot_probe(kernel: str) -> str | None:
    """None when ``kernel`` boots here and runs a program, else why not (one line).

    Why a boot and not only the config: Debian 12's and 13's UML kernels (6.1, 6.12)
    panic at their first user-space instruction on CPUs whose XSAVE area (AVX-512,
    AMX) is larger than they handle, and nothing short of running one shows it.
    ~1 s, once per kernel per run; a probe ``start_probe`` began is waited for.
    """
    key, fut, mine = _probe_future(kernel)
    if mine:
        _run_probe(fut, key)
    return fut.result()


def start_probe(kernel: str) -> None:
    """Boot the probe guest on a thread of its own: the run's first guest boots beside
    it (~1 s of the wait before the first uml result), and ``boot_probe`` then only
    waits for what is left of it. ``stop_probes`` ends one still running."""
    key, fut, mine = _probe_future(kernel)
    if mine:
        threading.Thread(target=_run_probe, args=(fut, key), name="isolate-uml-probe", daemon=True).start()


def stop_probes() -> None:
    """At the run's end (an interrupted run's too): a probe guest still booting is
    ended, and its dir removed, before the interpreter exits under its thread."""
    with _probe_lock:
        stopped = dict(_probe_procs)
    for proc in stopped:
        with contextlib.suppress(OSError):
            proc.terminate()  # SIGTERM: UML shuts down with its helpers
    for key in stopped.values():
        with contextlib.suppress(Exception):
            _probes[key].result(timeout=15)
        with _probe_lock:
            _probes.pop(key, None)  # cut short: it says nothing of the kernel


#: (kernel, mtime, size) -> the probe's answer, once it has one; one probe per binary.
_probes: dict[tuple[str, int, int], concurrent.futures.Future[str | None]] = {}
#: A probe guest still running -> its key.
_probe_procs: dict[Any, tuple[str, int, int]] = {}
_probe_lock = threading.Lock()


def _probe_future(kernel: str) -> tuple[tuple[str, int, int], concurrent.futures.Future[str | None], bool]:
    """The probe's key and future for this binary, and whether the caller must run it."""
    st = os.stat(kernel)
    key = (kernel, st.st_mtime_ns, st.st_size)
    with _probe_lock:
        fut = _probes.get(key)
        if fut is not None:
            return key, fut, False
        fut = _probes[key] = concurrent.futures.Future()
        return key, fut, True


def _run_probe(fut: concurrent.futures.Future[str | None], key: tuple[str, int, int]) -> None:
    try:
        fut.set_result(_boot_probe(key))
    except BaseException as exc:  # noqa: BLE001 - the waiter raises it
        fut.set_exception(exc)


def _boot_probe(key: tuple[str, int, int]) -> str | None:
    import subprocess
    from pathlib import Path

    from pytest_isolate.leftovers import _write_owner

    kernel = key[0]
    with tempfile.TemporaryDirectory(prefix="pytest-isolate-umlprobe-") as tmp:
        # Owned like a run dir: if this process is killed mid-probe, the next run's
        # ``sweep_stale`` removes the dir (UML's memory file is in it) and ends the probe
        # guest, whose working directory it is.
        _write_owner(Path(tmp))
        init = os.path.join(tmp, "init")
        with open(init, "w", encoding="utf-8") as f:
            f.write(_PROBE_INIT)
        os.chmod(init, 0o755)
        os.chmod(tmp, 0o755)
        argv = [
            kernel, "mem=64M", "rootfstype=hostfs", "rootflags=/", "ro", "quiet", "noreboot",
            "con=null", "ssl=null", "con0=null,fd:1", f"uml_dir={tmp}", "umid=probe",
            f"initcall_blacklist={INITCALL_BLACKLIST}", f"init={init}",
        ]
        proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            env={**os.environ, "TMPDIR": tmp}, start_new_session=True, cwd=tmp,
        )
        with _probe_lock:
            _probe_procs[proc] = key
        try:
            try:
                out, _ = proc.communicate(timeout=60)
            except subprocess.TimeoutExpired:
                proc.terminate()  # SIGTERM: UML shuts down with its helpers (SIGKILL leaks them)
                try:
                    out, _ = proc.communicate(timeout=10)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    out, _ = proc.communicate()
        finally:
            with _probe_lock:
                _probe_procs.pop(proc, None)
    text = out.decode(errors="replace")
    if "isolate-probe-ok" in text:
        return None
    if "fp regs failed" in text:
        return (
            f"uml: kernel {kernel} cannot run programs on this CPU ('ptrace set fp regs failed': "
            "its XSAVE area, AVX-512/AMX, is larger than this UML version handles); use a newer "
            "UML kernel with --isolate-uml-kernel (scripts/uml-kernel.sh installs Debian "
            "unstable's into .venv/bin)"
        )
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("[<")]
    last = next((ln for ln in reversed(lines) if "panic" in ln.lower()), lines[-1] if lines else "no output")
    return f"uml: kernel {kernel} did not boot a test guest (exit {proc.returncode}): {last}"


def seccomp_mode(kernel: str) -> bool:
    """Does ``kernel`` take ``seccomp=``? UML from 6.16 on can catch its processes'
    system calls with seccomp instead of ptrace: measured here, fork in the guest 30 ms
    instead of 50 ms, ``import pytest`` 0.47 s instead of 0.61 s. ``auto`` falls back to
    ptrace where the host refuses it. Older kernels would pass an unknown ``seccomp=``
    on to init, so ask the binary (its option text), once per kernel."""
    st = os.stat(kernel)
    return _has_text(kernel, st.st_mtime_ns, st.st_size, b"Invalid seccomp option")


@functools.lru_cache(maxsize=8)
def _has_text(path: str, _mtime: int, _size: int, needle: bytes) -> bool:
    try:
        with open(path, "rb") as f:
            return needle in f.read()
    except OSError:
        return False


def nic_driver(kernel: str) -> tuple[str, str] | None:
    """How the guest gets its tap NICs: (kernel argument template, guest NIC prefix).

    The legacy ``tuntap`` driver (``eth<N>``) where the kernel has it: in Debian 12's
    6.1 kernel the vector driver's tap transport stalled TCP. Kernels from 6.15 on have
    only the vector driver (``vec<N>``); ``{n}`` and ``{tap}`` are filled in per NIC.
    """
    cfg = kernel_config(kernel)
    if cfg.get("CONFIG_UML_NET_TUNTAP") == "y" or not cfg:
        return "eth{n}=tuntap,{tap}", "eth"
    if cfg.get("CONFIG_UML_NET_VECTOR") == "y":
        return "vec{n}:transport=tap,ifname={tap},gro=1", "vec"
    return None


def module_roots(kernel: str) -> list[str]:
    """Where the guest may find its modules: ``<prefix>/lib/uml/modules`` beside
    ``<prefix>/bin/linux.uml``, as Debian lays them out (``/usr`` for the system
    package, ``.venv/uml/usr`` for scripts/uml-kernel.sh's), then the same beside the
    kernels ``find_kernel`` would look at (a copied kernel has no tree of its own). The
    guest takes the first that holds its own release."""
    roots: list[str] = []
    search = _kernel_search_path()
    for k in (kernel, *(shutil.which(n, path=search) for n in KERNEL_NAMES)):
        if k:
            root = os.path.join(os.path.dirname(os.path.dirname(os.path.realpath(k))), "lib", "uml", "modules")
            if root not in roots and os.path.isdir(root):
                roots.append(root)
    return roots


def _privileged() -> bool:
    """Root of the host's own user namespace, with CAP_SYS_ADMIN (``uml_launch`` asks the
    same with its own copy: it runs as a file and imports nothing of ours)."""
    try:
        return os.geteuid() == 0 and in_initial_userns() and caps.has_cap(caps.CAP_SYS_ADMIN)
    except OSError:
        return False


def tap_problem() -> str | None:
    """None when this process can give a guest a tap (the launcher creates it in its
    own network namespace through ``/dev/net/tun``), else why not."""
    if not os.path.exists("/dev/net/tun"):
        return "/dev/net/tun is missing"
    if not _privileged() and not os.access("/dev/net/tun", os.R_OK | os.W_OK):
        return "/dev/net/tun is not accessible to this user"
    return None


def choose_channel(kernel: str, requested: str | None = None) -> str:
    """The guest's channel: ``"tap"`` or ``"veth"``; raises ``Unavailable`` when
    neither works.

    ``tap`` where ``/dev/net/tun`` can be opened: as root, or a user where it is mode
    0666 (udev's default). Otherwise ``veth``: a veth pair in the launcher's private
    network namespace, the guest's end driven by the vector driver's raw transport (a
    packet socket: CAP_NET_RAW in the launcher's user namespace, over that netns only).
    It needs no device and no privilege beyond the user namespace the unprivileged
    launcher makes anyway, and is the same TCP channel at the same speed. Not the
    preferred one where a tap works because the tap came first and runs on the
    legacy ``tuntap`` driver of kernels before 6.15, the one measured there (the
    vector driver's tap transport stalled TCP on Debian 12's 6.1).

    ``requested`` (else ``$PYTEST_ISOLATE_UML_CHANNEL``): ``tap``, ``veth`` or ``auto``.
    """
    want = (requested or os.environ.get(CHANNEL_ENV) or "auto").strip().lower()
    if want not in (*CHANNELS, "auto"):
        raise Unavailable(
            f"uml: channel {want!r} unknown ({CHANNEL_ENV}: valid are tap, veth and auto)"
        )
    vector = kernel_config(kernel).get("CONFIG_UML_NET_VECTOR") == "y"
    tap_why = tap_problem()
    if want == "tap" or (want == "auto" and tap_why is None):
        if tap_why:
            raise Unavailable(f"uml: {tap_why} (the tap channel was asked for with {CHANNEL_ENV}=tap)")
        return "tap"
    if vector:
        return "veth"
    why = tap_why or "the veth channel was asked for"
    raise Unavailable(
        f"uml: {why}, and kernel {kernel} lacks CONFIG_UML_NET_VECTOR (the guest's channel "
        "without a tap is a veth read by the vector driver's raw transport): "
        + (
            "`modprobe tun`, or use a kernel built with it (--isolate-uml-kernel)"
            if tap_why == "/dev/net/tun is missing"
            else "make /dev/net/tun mode 0666 (udev's default), run as root, or use a kernel "
            "built with it (--isolate-uml-kernel)"
        )
    )


def availability(kernel: str | None = None, boot: bool = True) -> str | None:
    """None when a guest can boot here, else one line: what is missing and how to fix it.

    The kernel, its hostfs/tuntap support, a probe guest's boot (``boot_probe``; left
    out with ``boot=False``, the checks that cost nothing), a channel
    (``choose_channel``), namespaces; a tmpfs-capable TMPDIR is not needed (the
    launcher mounts its own).
    """
    try:
        k = find_kernel(kernel)
    except Unavailable as e:
        return str(e)
    cfg = kernel_config(k)
    if cfg:
        if cfg.get("CONFIG_HOSTFS") != "y":
            return (
                f"uml: kernel {k} lacks CONFIG_HOSTFS (hostfs, the guest's root); "
                "use a kernel built with it (--isolate-uml-kernel)"
            )
        if nic_driver(k) is None:
            return (
                f"uml: kernel {k} lacks CONFIG_UML_NET_TUNTAP and CONFIG_UML_NET_VECTOR (a tap "
                "transport, the gateway's channel); use a kernel built with one (--isolate-uml-kernel)"
            )
    why = boot_probe(k) if boot else None
    if why:
        return why
    try:
        choose_channel(k)
    except Unavailable as e:
        return str(e)
    if not _privileged():
        from pytest_isolate.facets import namespaces

        why = namespaces.userns_available()
        if why:
            return f"uml: without root the guest runs in a user namespace: {why}"
    if not hasattr(os, "pidfd_open"):
        return "uml: needs Python >= 3.9 on Linux >= 5.3 (pidfd_open)"
    return None


__all__ = [
    "availability",
    "find_kernel",
    "kernel_config",
    "smp_support",
]

"""The host side of one UML guest: the execnet spec that boots it, and its end.

``gateway_spec`` turns a guest's options (``UmlOptions``) into a launch config and an
execnet spec whose "python" is ``uml_launch.py``: the kernel command line, the NICs of
its channel and switch, the interpreter the guest's init runs (``resolve_python``) and
the environment it starts with. ``console_tail`` explains a guest's death from its
console log; ``close_guest`` makes sure the launcher, the UML process tree, the switch
tap and the work dir are gone. Used on the host, by the controller (once per worker)
and by ``python -m pytest_isolate.tiers.uml``; the tier inside the guest needs none of
it. Which kernel, NIC driver and channel: ``uml_kernel``.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import secrets
import shlex
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pytest_isolate.stem import START_PREFIXES
from pytest_isolate.tiers.base import Unavailable
from pytest_isolate.tiers.uml_kernel import (
    INITCALL_BLACKLIST,
    choose_channel,
    find_kernel,
    module_roots,
    nic_driver,
    seccomp_mode,
    smp_support,
)

HERE = Path(__file__).resolve().parent
LAUNCHER = HERE / "uml_launch.py"
INIT = HERE / "uml_init.py"
#: Environment that shapes the guest interpreter's start-up (sys.path, site, encoding);
#: passed to PID 1 on the kernel command line. The worker gets the full environment.
STARTUP_ENV = (
    "PYTHONPATH",
    "PYTHONHOME",
    "PYTHONNOUSERSITE",
    "PYTHONUSERBASE",
    "PYTHONSAFEPATH",
    "PYTHONPLATLIBDIR",
    "PYTHONDONTWRITEBYTECODE",
    "PYTHONPYCACHEPREFIX",
    "PYTHONWARNINGS",
    "PYTHONDEVMODE",
    "PYTHONUTF8",
    "PYTHONIOENCODING",
    "PYTHONHASHSEED",
    "PYTHONINTMAXSTRDIGITS",
    "HOME",
    "LANG",
    "LC_ALL",
    "LC_CTYPE",
    "VIRTUAL_ENV",
)
#: UML's COMMAND_LINE_SIZE is 4096; leave room for what the kernel appends.
CMDLINE_MAX = 3800
#: RAM tmpfs beyond ``memory``: UML's own files (pid, mconsole socket) and slack.
RAM_SLACK = 64 << 20


@dataclass(frozen=True)
class UmlOptions:
    """One guest's configuration (a pool key: guests differ only by these)."""

    kernel: str | None = None
    memory: int = 256 << 20
    cpus: int | None = None
    network: str = "none"



def _startup_names(env: dict[str, str]) -> list[str]:
    """``STARTUP_ENV``, then whatever else of ``env`` an interpreter reads as it starts
    (``PYTHONUNBUFFERED``, ``LD_PRELOAD``, ...): PID 1 must start as a fresh interpreter
    in the worker's environment would, or the worker does not fork its server from it
    (``uml_init.fork_server``)."""
    return [*STARTUP_ENV, *sorted(k for k in env if k.startswith(START_PREFIXES) and k not in STARTUP_ENV)]


def _kernel_env(env: dict[str, str]) -> list[str]:
    """``NAME=value`` words for the kernel command line: the kernel hands unknown
    ``name=value`` parameters to init as its environment."""
    out = []
    for name in _startup_names(env):
        v = env.get(name)
        if v is None or '"' in v or "\n" in v:
            continue
        out.append(f'{name}="{v}"' if (" " in v or "\t" in v) else f"{name}={v}")
    return out


def _default_basetemp() -> Path:
    """pytest's default basetemp root: ``$TMPDIR/pytest-of-<user>``."""
    import getpass

    try:
        user = getpass.getuser()
    except (ImportError, KeyError, OSError):
        user = "unknown"
    return Path(tempfile.gettempdir()) / f"pytest-of-{user}"


def gateway_spec(
    opts: UmlOptions,
    workdir: Path,
    python: str,
    *,
    basetemp: Path | str | None = None,
    writable: Iterable[Path | str] = (),
    switch: str | None = None,
    bridge: str = "br0",
    hostname: str = "isolate-uml",
    boot_timeout: float = 120.0,
    hang_timeout: float = 5.0,
    debug: bool = False,
    mode: str = "auto",
    channel: str | None = None,
    server_start: dict[str, Any] | None = None,
) -> str:
    """The execnet spec of one guest: ``popen//python=<launcher ...>``.

    ``workdir`` (created here, removed by ``close_guest``) holds the launch config, the
    console log and, inside the launcher's private mount namespace only, the tmpfs of
    UML's RAM file. ``python`` is the interpreter the guest runs (an absolute path on
    the host, visible in the guest through hostfs).

    Writable in the guest (hostfs, reaching the host): ``basetemp`` (default: pytest's
    ``$TMPDIR/pytest-of-<user>``) and ``writable`` (e.g. the worker dir, for its log).
    Everything else is the host's tree read-only under a tmpfs overlay.

    ``switch``: the run's switch netns path, required for ``network="ip"``.
    ``hang_timeout``: seconds without a heartbeat from the guest's PID 1 before the
    launcher declares the guest hung, kills it and closes the gateway.
    ``mode="userns"`` confines ``linux.uml`` the unprivileged way even when root.
    ``channel``: ``"tap"``, ``"veth"`` or ``None`` (``choose_channel``: the environment
    variable ``PYTEST_ISOLATE_UML_CHANNEL``, else a tap where ``/dev/net/tun`` opens).
    ``server_start``: what a fork server configures with (``forkserver.main``'s
    ``start``); given, the guest forks its server as soon as the channel is up, and it
    imports and configures while execnet starts (``uml_init.worker_main``).
    """
    kernel = find_kernel(opts.kernel)
    if opts.network not in ("none", "ip"):
        raise ValueError(f"uml: network must be 'none' or 'ip', got {opts.network!r}")
    if opts.network == "ip" and not switch:
        raise Unavailable(
            "uml: network='ip' needs the run's switch (gateway_spec(..., switch=<netns path>))"
        )
    chan = choose_channel(kernel, channel)
    ncpu = smp_support(kernel)
    if opts.cpus is not None and opts.cpus > ncpu:
        raise Unavailable(
            f"uml: cpus={opts.cpus} asked, but kernel {kernel} supports {ncpu} CPU"
            f"{'s' if ncpu != 1 else ''} (built without CONFIG_SMP); pass an SMP-capable "
            "linux.uml with --isolate-uml-kernel or drop cpus="
        )
    python = resolve_python(python)
    workdir = Path(workdir)
    # 0700 is enough: the UML process reads guest.json with CAP_DAC_READ_SEARCH (root)
    # or as the owner (user namespace), and guest.json holds the caller's environment.
    workdir.mkdir(parents=True, exist_ok=True, mode=0o700)
    ramdir = workdir / "ram"
    ramdir.mkdir(exist_ok=True)
    bt = Path(basetemp) if basetemp is not None else _default_basetemp()
    bt.mkdir(parents=True, exist_ok=True, mode=0o700)
    paths: list[str] = []
    for p in [bt, *writable]:
        rp = os.path.realpath(p)
        if os.path.isdir(rp) and rp not in paths:
            paths.append(rp)
    mem_mb = max(32, opts.memory >> 20)
    switch_tap = f"pu{secrets.token_hex(5)}" if opts.network == "ip" else None
    argv = [
        kernel,
        f"mem={mem_mb}M",
        "rootfstype=hostfs",
        "rootflags=/",
        "ro",
        "quiet",  # loglevel 4: panics, oopses and OOM kills still reach the console log
        "noreboot",  # guest `reboot` exits UML instead of re-executing it
        "con=null",
        "ssl=null",
        "con0=null,fd:1",
        f"uml_dir={ramdir}",
        "umid=isolate",
        f"initcall_blacklist={INITCALL_BLACKLIST}",
    ]
    if seccomp_mode(kernel):
        argv.append("seccomp=auto")
    nic, prefix = nic_driver(kernel) or ("eth{n}=tuntap,{tap}", "eth")
    if chan == "veth":
        # The vector driver's raw transport on the guest's end of a veth pair (uml_launch).
        argv.append("vec0:transport=raw,ifname=umlc0u,gro=1")
        channel_if = "vec0"
    else:
        argv.append(nic.format(n=0, tap="umlc0"))
        channel_if = f"{prefix}0"
    # The vector driver's tap transport breaks when its tap moves netns: raw transport
    # on a veth whose peer goes into the switch instead (uml_launch.create_veth); the
    # same where the channel is a veth because /dev/net/tun is out of reach.
    switch_raw = prefix == "vec" or chan == "veth"
    if switch_tap and switch_raw:
        argv.append(f"vec1:transport=raw,ifname={switch_tap}u,gro=1")
    elif switch_tap:
        argv.append(nic.format(n=1, tap=switch_tap))
    if opts.cpus and ncpu > 1:
        argv.append(f"ncpus={opts.cpus}")
    tail = [f"init={python}", "--", str(INIT), str(workdir / "guest.json")]
    if any(c.isspace() for c in "".join(tail)):
        raise Unavailable(
            f"uml: paths with spaces cannot go on the kernel command line: {' '.join(tail)}"
        )
    env_words = _kernel_env(dict(os.environ))
    while env_words and len(" ".join(argv + env_words + tail)) > CMDLINE_MAX:
        env_words.pop()
    if len(" ".join(argv + tail)) > CMDLINE_MAX:
        raise Unavailable("uml: paths too long for the kernel command line")
    cfg = {
        "workdir": str(workdir),
        "kernel": kernel,
        "argv": argv + env_words + tail,
        "ramdir": str(ramdir),
        "ram_size": (mem_mb << 20) + RAM_SLACK,
        "writable": paths,
        "switch": switch,
        "bridge": bridge,
        "switch_tap": switch_tap,
        "switch_transport": "raw" if switch_raw else "tap",
        "boot_timeout": boot_timeout,
        "mode": mode,
        "channel": chan,
        "hang_timeout": hang_timeout,
        "guest": {
            "python": python,
            "cwd": os.getcwd(),
            "umask": _umask(),
            "writable": paths,
            "basetemp": os.path.realpath(bt),
            "network": opts.network,
            "channel_if": channel_if,
            "switch_if": "vec1" if switch_raw else f"{prefix}1",
            "modules": module_roots(kernel),
            "hostname": hostname,
            "workdir": str(workdir),
            "debug": debug,
            "connect_timeout": boot_timeout,
            "server_start": server_start,
            # What the guest's fork server shows as its command line: this process's,
            # as a host worker's server does (``uml_init.set_cmdline``).
            "cmdline": _own_cmdline(),
            "startup_env": list(STARTUP_ENV),
            # What the guest's worker and tests see: this process's os.environ, as a
            # host worker's tests do (``stem.adopt``); the launcher's own would be the
            # C environ it inherited, with readline's COLUMNS and LINES.
            "env": dict(os.environ),
        },
    }
    cfg_path = workdir / "launch.json"
    cfg_path.write_text(json.dumps(cfg), encoding="utf-8")
    launcher = shlex.join([sys.executable, "-I", "-S", str(LAUNCHER), str(cfg_path)])
    return f"popen//python={launcher}"


def _own_cmdline() -> list[str]:
    try:
        with open("/proc/self/cmdline", "rb") as f:
            return [a.decode(errors="surrogateescape") for a in f.read().split(b"\0")[:-1]]
    except OSError:
        return []


def _is_elf(path: str) -> bool:
    """A binary the kernel execs directly (a script would go through its shebang)."""
    with open(path, "rb") as f:
        return f.read(4) == b"\x7fELF"


@functools.lru_cache(maxsize=8)
def resolve_python(python: str) -> str:
    """The interpreter the guest's init runs: a binary, named by the path that keeps
    its environment.

    A pyenv shim (or any wrapper script) would become the guest's init: a bash script,
    exec'd through its shebang, costing 25-70 ms per exec inside UML and re-exec'ing
    the interpreter anyway. So a script is asked (once, cached) for its
    ``sys.executable``. The answer, like a ``python`` that is already a symlink to a
    binary, is kept unresolved: a virtualenv's ``bin/python`` is a symlink into the
    base install, and Python finds the venv (its ``sys.prefix``, site-packages, and the
    ``sys.executable`` a test runs) through the ``pyvenv.cfg`` beside the path it was
    started by. Its realpath would be the bare base interpreter.
    """
    link = os.path.abspath(shutil.which(python) or python)
    path = os.path.realpath(link)
    try:
        if _is_elf(path):
            return link
    except OSError as e:
        raise Unavailable(f"uml: cannot read the guest interpreter {python!r}: {e}") from None
    import subprocess

    out = subprocess.run(
        [path, "-c", "import sys; print(sys.executable)"],
        capture_output=True,
        text=True,
        encoding="utf-8",
        timeout=60,
    )
    exe = out.stdout.strip()
    try:
        ok = out.returncode == 0 and os.path.isabs(exe) and _is_elf(os.path.realpath(exe))
    except OSError:
        ok = False
    if not ok:
        raise Unavailable(f"uml: {python!r} is not an interpreter this launcher can resolve")
    return exe


def _umask() -> int:
    m = os.umask(0o022)
    os.umask(m)
    return m


#: Console lines that explain a death even when they scrolled out of the tail.
_KEY_LINES = (
    "Kernel panic",
    "Out of memory",
    "oom-kill",
    "Killed process",
    "BUG:",
    "Oops",
    "[pytest-isolate]",
    "guest init failed",
)


def console_tail(workdir: Path, lines: int = 40) -> str:
    """The last ``lines`` lines of the guest console (and launcher notes), for failure
    reports; a panic/OOM line that scrolled out (a panic's stack trace is long) is kept
    at the top."""
    path = Path(workdir) / "console.log"
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - (256 << 10)))
            text = f.read().decode(errors="replace")
    except OSError:
        return ""
    all_lines = [ln.rstrip("\r") for ln in text.splitlines() if ln.strip()]
    tail = all_lines[-lines:]
    earlier = (
        [ln for ln in all_lines[: -lines or None] if any(k in ln for k in _KEY_LINES)]
        if len(all_lines) > lines
        else []
    )
    if earlier:
        return "\n".join([*earlier[-5:], "...", *tail])
    return "\n".join(tail)


def _pid_from(path: Path) -> int | None:
    try:
        return int(path.read_text(encoding="utf-8").split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _proc_matches(pid: int, needle: bytes) -> bool:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return needle in f.read()
    except OSError:
        return False


def _alive(pid: int) -> bool:
    """Running (zombies count as gone: their parent reaps them)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            st = f.read()
        return st[st.rindex(b")") + 2 : st.rindex(b")") + 3] not in (b"Z", b"X")
    except (OSError, ValueError):
        return False


def _stop(pid: int, grace: float) -> None:
    """SIGTERM, then SIGKILL. Never reaps: the launcher is execnet's child (its Popen
    reaps it), the UML runner the launcher's."""
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, sig)
        end = time.monotonic() + wait
        while time.monotonic() < end:
            if not _alive(pid):
                return
            time.sleep(0.01)


def close_guest(workdir: Path) -> None:
    """After ``gw.exit()`` (or when the gateway died): make sure the launcher and the
    UML process tree are gone, the guest's switch tap is deleted, and ``workdir`` is
    removed. Idempotent."""
    workdir = Path(workdir)
    launcher = _pid_from(workdir / "launcher.pid")
    umlpid = _pid_from(workdir / "uml.pid")
    if launcher and _alive(launcher) and _proc_matches(launcher, b"uml_launch.py"):
        _stop(launcher, grace=4.0)
    if umlpid and _alive(umlpid) and not _proc_matches(umlpid, b"uml_launch.py"):
        # PID 1 of its namespace: SIGKILL takes every helper with it.
        _stop(umlpid, grace=2.0)
    try:
        cfg = json.loads((workdir / "launch.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        cfg = {}
    if cfg.get("switch_tap") and cfg.get("switch") and os.path.exists(cfg["switch"]):
        with contextlib.suppress(Exception):
            from pytest_isolate.facets import net

            net.delete_tap(cfg["switch"], cfg["switch_tap"])
    shutil.rmtree(workdir, ignore_errors=True)


__all__ = [
    "UmlOptions",
    "close_guest",
    "console_tail",
    "gateway_spec",
]

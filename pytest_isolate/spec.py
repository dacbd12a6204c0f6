"""IsolationSpec: what sandbox and budgets one test asked for.

Every value a user can write (marker keys, ``--isolate-*`` flags, ini options) is parsed
here and nowhere else, so the error for a bad value reads the same wherever it was
written: one line naming where it came from, the bad value, and what is valid.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

TIERS = ("none", "process", "chroot", "jail", "zone", "uml")
#: Tiers ordered weakest first; used by the advisor and for "at least" comparisons.
LADDER = TIERS[1:]
NETWORKS = ("none", "ip")
SCOPES = ("test", "module", "session")
ON_POLICY = ("fail", "warn", "ignore")


class SpecError(ValueError):
    """A user-supplied isolation value is invalid; str() is the one-line message."""


_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?b?)\s*$", re.IGNORECASE)
_SIZE_MULT = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
_DUR_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|min)?\s*$", re.IGNORECASE)
_DUR_MULT = {None: 1.0, "ms": 0.001, "s": 1.0, "m": 60.0, "min": 60.0, "h": 3600.0}


def parse_size(value: Any, what: str = "size") -> int:
    """Bytes from ``256M``, ``1G``, ``512KiB``, ``1.5g`` or an int (bytes)."""
    if isinstance(value, bool):
        raise SpecError(f"{what}: invalid size {value!r} (use bytes or e.g. '256M', '1G')")
    if isinstance(value, int):
        if value <= 0:
            raise SpecError(f"{what}: size must be positive, got {value!r}")
        return value
    m = _SIZE_RE.match(str(value))
    if not m:
        raise SpecError(
            f"{what}: invalid size {value!r} (valid: bytes as int, or a number with "
            "K, M, G or T, e.g. '256M', '1G')"
        )
    n = int(float(m.group(1)) * _SIZE_MULT[m.group(2).lower()])
    if n <= 0:
        raise SpecError(f"{what}: size must be positive, got {value!r}")
    return n


def parse_duration(value: Any, what: str = "duration") -> float:
    """Seconds from ``2s``, ``500ms``, ``1.5m``, ``1h`` or a number (seconds)."""
    if isinstance(value, bool):
        raise SpecError(f"{what}: invalid duration {value!r} (use seconds or e.g. '2s', '500ms')")
    if isinstance(value, (int, float)):
        if value <= 0:
            raise SpecError(f"{what}: duration must be positive, got {value!r}")
        return float(value)
    m = _DUR_RE.match(str(value))
    if not m:
        raise SpecError(
            f"{what}: invalid duration {value!r} (valid: seconds as a number, or with "
            "ms, s, m or h, e.g. '2s', '500ms')"
        )
    unit = m.group(2).lower() if m.group(2) else None
    secs = float(m.group(1)) * _DUR_MULT[unit]
    if secs <= 0:
        raise SpecError(f"{what}: duration must be positive, got {value!r}")
    return secs


def parse_cpu(value: Any, what: str = "cpu") -> float:
    """A CPU share as a fraction of one CPU (``0.5``, ``"50%"``, ``2`` for two CPUs)."""
    try:
        if isinstance(value, str) and value.strip().endswith("%"):
            f = float(value.strip()[:-1]) / 100.0
        elif isinstance(value, bool):
            raise ValueError
        else:
            f = float(value)
    except ValueError:
        raise SpecError(
            f"{what}: invalid CPU share {value!r} (valid: a fraction of one CPU such as 0.5, "
            "or a percentage such as '50%')"
        ) from None
    if f <= 0:
        raise SpecError(f"{what}: CPU share must be positive, got {value!r}")
    return f


def parse_count(value: Any, what: str) -> int:
    if isinstance(value, bool):
        raise SpecError(f"{what}: invalid count {value!r} (valid: a positive whole number)")
    try:
        n = int(str(value).strip()) if not isinstance(value, int) else value
    except ValueError:
        raise SpecError(f"{what}: invalid count {value!r} (valid: a positive whole number)") from None
    if n <= 0:
        raise SpecError(f"{what}: count must be positive, got {value!r}")
    return n


def _choice(choices: tuple[str, ...]):
    def parse(value: Any, what: str) -> str:
        v = str(value).strip().lower() if value is not None else ""
        if v not in choices:
            raise SpecError(f"{what}: unknown value {value!r} (valid: {', '.join(choices)})")
        return v

    return parse


def _str(value: Any, what: str) -> str:
    if not isinstance(value, str) or not value:
        raise SpecError(f"{what}: expected a non-empty string, got {value!r}")
    return value


def _names(value: Any, what: str) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [v for v in re.split(r"[,\s]+", value) if v]
    if not isinstance(value, (list, tuple, set, frozenset)):
        raise SpecError(f"{what}: expected a list of names, got {value!r}")
    return tuple(str(v) for v in value)


def _paths(value: Any, what: str) -> tuple[str, ...]:
    """Paths or glob patterns (``keep``): a list, or one string split at commas and
    line ends (an ini option's lines)."""
    if isinstance(value, str):
        value = [value]
    if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        value = [p.strip() for v in value for p in re.split(r"[,\n]", v) if p.strip()]
    if not isinstance(value, list) or not value or any("\0" in v for v in value):
        raise SpecError(
            f"{what}: expected a path or a list of paths (relative to the rootdir, '*' and '**' "
            f"allowed), got {value!r}"
        )
    return tuple(value)


#: Every key a marker, flag or ini option may set, with its parser. The order is the
#: order shown in docs and errors.
KEYS: dict[str, Any] = {
    "tier": _choice(TIERS),
    "timeout": parse_duration,
    "cpu_time": parse_duration,
    "memory": parse_size,
    "cpu": parse_cpu,
    "pids": parse_count,
    "disk": parse_size,
    "fds": parse_count,
    "io": parse_size,  # bytes per second, read+write, zone only
    "network": _choice(NETWORKS),
    "scope": _choice(SCOPES),
    "rootfs": _str,
    "kernel": _str,
    "cpus": parse_count,
    "allow": _names,
    "keep": _paths,
}


@dataclass(frozen=True)
class IsolationSpec:
    """The resolved isolation of one test. Frozen and hashable so it can key pools."""

    tier: str = "none"
    timeout: float | None = None
    cpu_time: float | None = None
    memory: int | None = None
    cpu: float | None = None
    pids: int | None = None
    disk: int | None = None
    fds: int | None = None
    io: int | None = None
    network: str = "none"
    scope: str | None = None  # None: fresh child per test (and one UML guest per worker)
    rootfs: str | None = None
    kernel: str | None = None
    cpus: int | None = None
    allow: tuple[str, ...] = field(default_factory=tuple)
    #: Absolute once resolved (``plugin.item_spec``): where a test's writes reach the host.
    keep: tuple[str, ...] = field(default_factory=tuple)

    @property
    def isolated(self) -> bool:
        return self.tier != "none"

    def budgets(self) -> dict[str, Any]:
        """The resource budgets that are set, by key (for reports and enforcement)."""
        keys = ("timeout", "cpu_time", "memory", "cpu", "pids", "disk", "fds", "io")
        return {k: getattr(self, k) for k in keys if getattr(self, k) is not None}

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready copy. Made once per spec (``asdict`` costs ~0.2 ms and a spec is
        shared by many tests, each sent and reported with it)."""
        cached = self.__dict__.get("_dict")
        if cached is None:
            cached = dataclasses.asdict(self)
            cached["allow"] = list(self.allow)
            cached["keep"] = list(self.keep)
            object.__setattr__(self, "_dict", cached)
        return {**cached, "allow": list(cached["allow"]), "keep": list(cached["keep"])}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> IsolationSpec:
        d = dict(d)
        d["allow"] = tuple(d.get("allow") or ())
        d["keep"] = tuple(d.get("keep") or ())
        return cls(**d)


def parse_values(values: Mapping[str, Any], where: str) -> dict[str, Any]:
    """Validate raw user values; ``where`` names the source for error messages.

    Values of ``None`` mean "not set here" and are dropped, so a lower-precedence layer
    can still supply them.
    """
    out: dict[str, Any] = {}
    for key, raw in values.items():
        if key not in KEYS:
            raise SpecError(f"{where}: unknown key {key!r} (valid: {', '.join(KEYS)})")
        if raw is None:
            continue
        out[key] = KEYS[key](raw, f"{where}: {key}")
    return out


def marker_values(args: Iterable[Any], kwargs: Mapping[str, Any], where: str) -> dict[str, Any]:
    """Raw values from one ``isolate`` marker: ``isolate("zone", memory="256M")``."""
    args = tuple(args)
    if len(args) > 1:
        raise SpecError(
            f"{where}: isolate() takes the tier as its only positional argument, got {args!r}"
        )
    values = dict(kwargs)
    if args:
        if "tier" in values:
            raise SpecError(f"{where}: tier given both positionally and as tier=")
        values["tier"] = args[0]
    return parse_values(values, where)


def resolve(layers: Iterable[Mapping[str, Any]]) -> IsolationSpec:
    """Merge parsed layers, highest precedence first, key by key."""
    merged: dict[str, Any] = {}
    for layer in layers:
        for k, v in layer.items():
            merged.setdefault(k, v)
    return intern(IsolationSpec(**merged))


def intern(spec: IsolationSpec) -> IsolationSpec:
    """One object per distinct spec: its ``to_dict`` is then made once for the run,
    not once per test (every test is sent with its spec)."""
    return _INTERNED.setdefault(spec, spec)


_INTERNED: dict[IsolationSpec, IsolationSpec] = {}


def format_size(n: int | float | None) -> str:
    """Human size in binary units, as budgets are usually written ("256 MiB")."""
    if n is None:
        return "-"
    n = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" or n == int(n) else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"

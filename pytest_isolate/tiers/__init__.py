"""Tiers: each composes facets into one rung of the isolation ladder."""

from __future__ import annotations

import pytest


def availability(tier: str, config: pytest.Config | None = None, quick: bool = False) -> str | None:
    """None when ``tier`` can run here, else one line: what is missing and how to fix it.

    Imports the tier lazily so a host without, say, a UML kernel never loads that code.
    ``quick``: leave out what takes time (uml: the probe guest's boot, ~1 s).
    """
    from pytest_isolate.tiers.base import Unavailable

    try:
        if tier == "process":
            return None
        if tier == "chroot":
            from pytest_isolate.tiers.chroot import ChrootTier as cls
        elif tier == "jail":
            from pytest_isolate.tiers.jail import JailTier as cls
        elif tier == "zone":
            from pytest_isolate.tiers.zone import ZoneTier as cls
        elif tier == "uml":
            from pytest_isolate.tiers import uml_kernel

            return uml_kernel.availability(uml_kernel.find_kernel(_uml_kernel(config)), boot=not quick)
        else:
            return f"unknown tier {tier!r}"
        return cls.availability()
    except Unavailable as exc:
        return f"{tier}: {exc}" if not str(exc).startswith(tier) else str(exc)
    except ImportError as exc:
        return f"{tier}: not available in this installation ({exc})"


def start_uml_probe(config: pytest.Config | None) -> None:
    """Begin the probe guest's boot that ``availability("uml")`` waits for, on a thread
    (``uml_kernel.start_probe``); nothing when no kernel is found (availability says so)."""
    from pytest_isolate.tiers import uml_kernel
    from pytest_isolate.tiers.base import Unavailable

    try:
        uml_kernel.start_probe(uml_kernel.find_kernel(_uml_kernel(config)))
    except (Unavailable, OSError):
        pass


def _uml_kernel(config: pytest.Config | None) -> str | None:
    if config is None:
        return None
    return config.getoption("isolate_uml_kernel", None) or config.getini("isolate_uml_kernel") or None

"""Tiers: each composes facets into one rung of the isolation ladder."""

from __future__ import annotations

import pytest


def availability(tier: str, config: pytest.Config | None = None) -> str | None:
    """None when ``tier`` can run here, else one line: what is missing and how to fix it.

    Imports the tier lazily so a host without, say, a UML kernel never loads that code.
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

            kernel = None
            if config is not None:
                kernel = config.getoption("isolate_uml_kernel", None) or config.getini("isolate_uml_kernel") or None
            return uml_kernel.availability(uml_kernel.find_kernel(kernel))
        else:
            return f"unknown tier {tier!r}"
        return cls.availability()
    except Unavailable as exc:
        return f"{tier}: {exc}" if not str(exc).startswith(tier) else str(exc)
    except ImportError as exc:
        return f"{tier}: not available in this installation ({exc})"

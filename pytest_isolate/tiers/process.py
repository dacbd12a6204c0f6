"""`process` tier: a fresh forked process per test, nothing else confined."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import NoReturn

from pytest_isolate.tiers.base import Box, Tier, fork_child


class ProcessTier(Tier):
    name = "process"
    direct = True

    def spawn(self, box: Box, run: Callable[[], NoReturn]) -> int:
        def body() -> NoReturn:
            # Own process group: a timeout can kill what the test spawned, and a
            # Ctrl-C on the terminal reaches the controller, which decides.
            os.setpgid(0, 0)
            run()

        return fork_child(body)

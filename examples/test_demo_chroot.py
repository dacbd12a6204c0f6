"""chroot tier: a throwaway overlay of the host's / as root directory, nothing else.

Files written outside tmp_path land in the overlay and are listed in the report; the
host never sees them. The test shares the host's processes, network and mount table,
and root inside can climb out: the escape below succeeds at this tier, and is reported.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from demo_escape import root_after_double_chroot, root_id

pytestmark = pytest.mark.isolate("chroot")

#: The host's /. Module code runs at collection, outside any sandbox, so this is the
#: host's root even though the tests below run in an overlay.
HOST_ROOT = root_id()


def test_root_is_a_throwaway_overlay() -> None:
    assert root_id() != HOST_ROOT, "not in a sandbox: refusing to write to /etc"
    path = Path("/etc/pytest-isolate-demo.conf")
    path.write_text("written inside the sandbox\n")
    assert path.read_text() == "written inside the sandbox\n"
    # The report lists /etc/pytest-isolate-demo.conf under "changes"; the host has no
    # such file.


def test_fails_on_purpose_double_chroot_escape(tmp_path: Path) -> None:
    assert root_id() != HOST_ROOT, "not in a sandbox: refusing to try an escape"
    root = root_after_double_chroot(tmp_path)
    assert root != HOST_ROOT, "the double chroot reached the host's /: chroot is no boundary for root"

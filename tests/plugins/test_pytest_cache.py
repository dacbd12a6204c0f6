"""``config.cache.set`` in a sandbox: kept for later tests and the next run, as in-process.

From `chroot` up a sandbox's writes land in its own root: the value was lost, and a
later test or the next run read ``None``.
"""

from __future__ import annotations

import json

import pytest

from tests.plugins.conftest import TIERS, Runner, outcomes

SUITE = """
    def test_write(request):
        n = request.config.cache.get("demo/count", 0)
        request.config.cache.set("demo/count", n + 1)
        request.config.cache.set("demo/nested", {"runs": [n + 1], "ok": True})

    def test_read(request):
        assert request.config.cache.get("demo/count", None) is not None
        assert request.config.cache.get("demo/nested", {})["ok"] is True
"""


def stored(pytester: pytest.Pytester) -> dict[str, object]:
    base = pytester.path / ".pytest_cache" / "v" / "demo"
    return {p.name: json.loads(p.read_text()) for p in sorted(base.iterdir())} if base.is_dir() else {}


@pytest.mark.parametrize("tier", TIERS)
def test_values_kept_for_later_tests_and_runs(pytester: pytest.Pytester, run: Runner, tier: str) -> None:
    pytester.makepyfile(test_cache=SUITE)
    base = [outcomes(run(None)) for _ in range(2)]
    expected = stored(pytester)
    assert expected == {"count": 2, "nested": {"runs": [2], "ok": True}}
    pytester.path.joinpath(".pytest_cache").rename(pytester.path / "in-process-cache")
    iso = [outcomes(run(tier)) for _ in range(2)]
    assert iso == base
    assert stored(pytester) == expected


def test_a_key_outside_the_cache_is_not_stored(pytester: pytest.Pytester, run: Runner) -> None:
    """The sandbox is untrusted: a key that climbs out of ``.pytest_cache/v`` is not
    written on the host."""
    pytester.makepyfile(
        test_evil="""
        def test_climb(request):
            # pytest's own set refuses such keys: a hostile test adds them to what the
            # sandbox sends, reached through the wrapper's closure.
            cells = [c.cell_contents for c in request.config.cache.set.__closure__]
            sent = next(c for c in cells if isinstance(c, list))
            sent += [["../../escaped", 1], ["/tmp/absolute", 1], ["a/../../../escaped", 1]]
            request.config.cache.set("fine/key", 3)
        """
    )
    result = run("jail")
    assert outcomes(result) == {"test_evil.py::test_climb": ["PASSED"]}, result.stdout.str()
    assert not (pytester.path / "escaped").exists() and not (pytester.path.parent / "escaped").exists()
    assert not any(pytester.path.rglob("escaped"))
    assert json.loads((pytester.path / ".pytest_cache" / "v" / "fine" / "key").read_text()) == 3


def test_keys_the_controller_refuses() -> None:
    """pytest 9.2 refuses such keys itself; earlier pytest joined them under the cache
    directory as they were, so the controller checks them first."""
    from pytest_isolate.session.pytest_cache import _key_ok

    for bad in ("../x", "a/../../x", "/etc/x", "a//b", "./a", "a/.", "", "a\\..\\b", "a\0b", 5, None):
        assert not _key_ok(bad), bad
    for good in ("demo/count", "cache/lastfailed", "a", "plugin/sub/key.json"):
        assert _key_ok(good), good

"""pytest-recording (vcrpy): cassettes a test records are replayed by the next run.

A test marked ``@pytest.mark.vcr`` records its HTTP exchanges into
``cassettes/<module>/`` beside its module (``--record-mode=once``), and a later run
replays them. From ``chroot`` up the cassettes stayed in the sandbox's throwaway root:
the next run (``--record-mode=none``, the server gone) failed where in-process it
replays. The cassette directory is kept for such tests, as pytest-regressions' data
directories are. Only a server on 127.0.0.1 that the conftest starts is ever asked.
"""

from __future__ import annotations

import pytest

from tests.plugins.conftest import TIERS, Runner, outcomes

CONFTEST = """
    import http.server, os, socket, threading
    import pytest

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b"hello " + self.path.encode())

        def log_message(self, *args):
            pass

    @pytest.fixture(scope="session")
    def url():
        if os.environ.get("NO_SERVER"):
            with socket.socket() as s:  # a loopback port nothing listens on
                s.bind(("127.0.0.1", 0))
                yield f"http://127.0.0.1:{s.getsockname()[1]}"
            return
        server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
        yield f"http://127.0.0.1:{server.server_address[1]}"
        server.shutdown()

    @pytest.fixture(scope="module")
    def vcr_config():
        return {"match_on": ["method", "path"]}
"""

TESTS = """
    import urllib.request
    import pytest

    @pytest.mark.vcr
    def test_get(url):
        assert urllib.request.urlopen(url + "/a").read() == b"hello /a"

    @pytest.mark.vcr
    class TestClass:
        def test_method(self, url):
            assert urllib.request.urlopen(url + "/b").read() == b"hello /b"

    def test_unmarked(url):
        pass
"""


def story(
    pytester: pytest.Pytester, run: Runner, monkeypatch: pytest.MonkeyPatch, tier: str | None
) -> tuple[list[object], list[str]]:
    """A run that records, then one that replays with no server: outcomes, cassettes."""
    pytester.makeconftest(CONFTEST)
    pytester.makepyfile(test_rec=TESTS)
    plugins = ("recording",)
    monkeypatch.delenv("NO_SERVER", raising=False)
    seen: list[object] = [outcomes(run(tier, "--record-mode=once", plugins=plugins))]
    monkeypatch.setenv("NO_SERVER", "1")
    replay = run(tier, "--record-mode=none", plugins=plugins)
    replay.stdout.fnmatch_lines(["*= 3 passed in *"])
    seen.append(outcomes(replay))
    cassettes = pytester.path / "cassettes"
    names = sorted(str(p.relative_to(pytester.path)) for p in cassettes.rglob("*") if p.is_file())
    return seen, names


@pytest.mark.parametrize("tier", TIERS)
def test_recorded_cassettes_are_replayed_as_in_process(
    pytester: pytest.Pytester, run: Runner, monkeypatch: pytest.MonkeyPatch, tier: str
) -> None:
    pytest.importorskip("pytest_recording")
    base = story(pytester, run, monkeypatch, None)
    passed = {
        "test_rec.py::test_get": ["PASSED"],
        "test_rec.py::TestClass::test_method": ["PASSED"],
        "test_rec.py::test_unmarked": ["PASSED"],
    }
    assert base == (
        [passed, passed],
        ["cassettes/test_rec/TestClass.test_method.yaml", "cassettes/test_rec/test_get.yaml"],
    )
    pytester.path.joinpath("cassettes").rename(pytester.path / "in-process")
    assert story(pytester, run, monkeypatch, tier) == base

"""The projects ``fidelity.py`` runs, pinned: which suites, at which versions, with what.

One entry a project, and why it is in the set (``why``): a configuration, a plugin or a
kind of test nobody else in the set has. Kept apart from the harness, which changes for
other reasons (how a run is made, compared and reported).
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Project:
    """One suite under test: why it is in the set is in ``why``."""

    name: str
    version: str
    test_deps: tuple[str, ...]
    why: str
    args: tuple[str, ...] = ()
    env: tuple[tuple[str, str], ...] = ()
    extras: tuple[str, ...] = ()  # the project's own extras its suite needs
    # Run once with the venv's python in the extracted sdist after the install, e.g. an
    # in-place build of a C extension that a flat layout's tests import from the tree.
    prepare: tuple[str, ...] = ()


# Pinned so the table can be reproduced. Test dependencies come from each project's
# own test requirements (dependency groups, requirements/tests*.txt, tox.ini); only what
# the suite needs is installed, so that no plugin the project does not use changes the
# run. Their resolved versions are recorded in the JSON (``pip freeze`` per venv).
PROJECTS: tuple[Project, ...] = (
    Project("iniconfig", "2.3.1", (), "small; plain pytest functions"),
    Project(
        "attrs",
        "26.1.0",
        ("hypothesis", "pympler", "cloudpickle"),
        "--import-mode=importlib, --strict-config/markers, xfail_strict, hypothesis",
    ),
    Project(
        "packaging",
        "26.4",
        ("hypothesis", "pretend", "tomli_w", "pip"),
        "filterwarnings=error, -p no:tmpdir/no:logging, --capture=sys; ~7,300 tests: the "
        "two largest files (57,000 generated version/requirement cases) are left out to keep "
        "a run of all tiers under an hour",
        ("--ignore=tests/test_version.py", "--ignore=tests/test_requirements.py"),
    ),
    Project(
        "more-itertools",
        "11.2.1",
        (),
        "unittest.TestCase classes, doctest via load_tests",
    ),
    Project(
        "python-dateutil",
        "4.0.0",
        ("hypothesis", "freezegun", "pytest-cov", "attrs"),
        "filterwarnings=error, xfail_strict, hypothesis, freezegun, time zones, pytest-cov's no_cover mark",
    ),
    Project("click", "8.5.1", (), "filterwarnings=error, -m selection, temp files, terminal I/O"),
    Project(
        "pluggy", "1.7.0", ("pytest-benchmark",), "filterwarnings=error, pytest-benchmark installed"
    ),
    Project("toolz", "1.2.0", (), "filterwarnings=error, --strict-config, log_cli_level"),
    Project("jinja2", "3.1.6", ("trio",), "filterwarnings=error, async tests, file loaders"),
    Project("markupsafe", "3.0.4", (), "filterwarnings=error, C extension"),
    Project(
        "wcwidth",
        "0.9.4",
        ("pytest-cov",),
        "--doctest-modules, pytest-cov (--cov in addopts), filterwarnings=error, junit_family; "
        "WCWIDTH_PYTHON=1: its conftest asserts the C extension is loaded unless told pure "
        "Python, and the flat layout imports the unbuilt source tree",
        env=(("WCWIDTH_PYTHON", "1"),),
    ),
    Project("cachetools", "8.0.2", (), "no pytest config at all: defaults"),
    Project("h11", "0.16.0", (), "no pytest config; tests inside the package; a local HTTP server thread"),
    Project(
        "zipp", "4.1.2",
        ("jaraco.itertools", "jaraco.functools", "more_itertools", "big-O", "pytest-ignore-flaky", "jaraco.test"),
        "--doctest-modules, --import-mode importlib, consider_namespace_packages, filterwarnings (jaraco skeleton)",
    ),
    Project("six", "1.17.0", (), "one test module at the top level (test_six.py), moves/tkinter"),
    Project(
        "execnet", "2.1.2", ("pytest-timeout",),
        "spawns popen gateways (subprocesses over pipes), threads, pytest-timeout (timeout=20)",
        env=(("PYTHONWARNDEFAULTENCODING", "1"),),
    ),
    Project(
        "anyio", "4.16.0",
        ("trio", "blockbuster", "hypothesis", "psutil", "pytest-mock", "pytest-timeout", "trustme", "truststore",
         "uvloop"),
        "its own pytest plugin (-p anyio, anyio_mode=auto), asyncio/uvloop/trio backends, local sockets and "
        "subprocesses, process pools, gc.get_referrers, --strict-config/markers, xfail_strict, "
        "filterwarnings=error, pytest-timeout; -m 'not network' (Internet)",
        ("-m", "not network"),
    ),
    Project(
        "pyparsing", "3.3.3", ("railroad-diagrams", "jinja2", "matplotlib"),
        "unittest classes, diagrams (jinja2, railroad), matplotlib cases; tox's paths",
        ("tests", "examples/tiny/tests"),
    ),
    Project(
        "humanize", "4.17.0", ("freezegun", "pytest-benchmark", "pytest-codspeed", "pytest-cov"),
        "--doctest-modules over src and tests, filterwarnings=error, freezegun, gettext locales, "
        "pytest-benchmark and pytest-codspeed installed",
    ),
    Project(
        "tabulate", "0.10.0", (),
        "tox's default env: --doctest-modules, --ignore benchmark; numpy/pandas tests skip",
        ("--doctest-modules", "--ignore", "benchmark"),
    ),
    Project(
        "soupsieve", "4.1.4", ("beautifulsoup4", "lxml", "html5lib"),
        "~1,000 selector tests over three HTML parsers, threads",
    ),
    Project(
        "decorator", "5.3.2", (),
        "unittest + doctest in tests/test.py (not a test_*.py name: given as an argument)",
        ("tests/test.py",),
    ),
    Project(
        "blinker", "1.9.0", ("pytest-asyncio==0.24.0",),
        "filterwarnings=error, asyncio_mode=auto (its pinned pytest-asyncio; a newer one warns at "
        "configure, an error there), weak references collected mid-test",
    ),
    Project("itsdangerous", "2.2.0", ("freezegun",), "filterwarnings=error, freezegun's clock"),
    Project("sqlparse", "0.6.1", (), "conftest fixtures, a CLI run in a subprocess, DoS-prevention limits"),
    Project(
        "structlog",
        "26.1.0",
        ("pytest-asyncio", "pytest-randomly", "simplejson", "time-machine"),
        "pytest-randomly (shuffled order, reseeded random), time-machine (C-level clock "
        "patching), pytest-asyncio auto mode, --import-mode=importlib, xfail_strict",
    ),
    Project(
        "platformdirs",
        "4.14.5",
        ("appdirs==1.4.4", "covdefaults", "pytest-cov", "pytest-mock"),
        "pytest-mock (mocker), environment and home-directory patching, covdefaults",
    ),
    Project(
        "arrow",
        "1.4.0",
        ("dateparser==1.*", "pytest-cov", "pytest-mock", "pytz==2025.2", "simplejson==3.*"),
        "tox.ini addopts: --cov with --cov-fail-under=99 (the coverage of every test's "
        "child must be combined, or the run fails), --junitxml, -v; pytest-mock, time zones",
    ),
    Project(
        "cattrs",
        "26.2.1",
        (
            "hypothesis", "pytest-benchmark", "immutables", "ujson", "orjson", "msgpack", "pyyaml",
            "tomlkit", "cbor2", "pymongo", "msgspec", "tomli-w",
        ),
        "hypothesis-heavy, pytest-benchmark options in addopts, its preconf extras "
        "(orjson, msgspec, ...); tests/ only (bench/ is its benchmark suite)",
        ("tests",),
    ),
    Project(
        "flask", "3.1.3", ("asgiref", "greenlet", "python-dotenv", "pytest<9"),
        "filterwarnings=error, app/request contexts, CLI runner, async views (asgiref); "
        "pytest 8 (its test_cli imports _pytest.monkeypatch.notset, gone in pytest 9)",
    ),
    Project(
        "werkzeug", "3.1.9",
        ("cffi", "cryptography", "ephemeral-port-reserve", "pytest-timeout", "watchdog"),
        "dev_server tests: a server subprocess on a loopback port reserved ahead, the reloader "
        "(watchdog), TLS, pytest-timeout",
    ),
    Project(
        "typeguard", "4.6.1", ("mypy",),
        "its own pytest plugin (entry point) and an import hook instrumenting modules, "
        "xfail_strict, filterwarnings=error",
    ),
    Project(
        "pytest-mock", "3.17.0", ("pytest-asyncio",),
        "a plugin's own suite: pytester (inline and subprocess pytest runs inside each test), "
        "asyncio_mode=auto",
    ),
    Project(
        "pygments", "2.21.0", ("pytest-randomly", "wcag-contrast-ratio"),
        "golden files (snippets, example files) collected by its conftest as its own "
        "pytest.Item subclass, pytest-randomly",
    ),
    Project("marshmallow", "4.4.0", ("simplejson",), "plain pytest, ~1,300 parametrized tests"),
    Project(
        "mako", "1.4.3",
        ("beaker", "markupsafe", "pygments", "babel", "dogpile.cache", "lingua>=4.16", "junitparser"),
        "addopts -p warnings, --tb native; python_files test/*test_*.py, python_classes *Test; "
        "templates compiled to a module cache",
    ),
    Project(
        "freezegun", "1.5.5", ("pytest-cov", "python-dateutil>=2.7"),
        "tox's command: --cov; the clock patched module by module, including pytest's own",
        ("--cov",),
    ),
    Project(
        "pytest-asyncio", "1.5.0", ("coverage>=6.2", "hypothesis>=5.7.1"),
        "a plugin's own suite: pytester, event loops per scope, testpaths docs and tests, "
        "junit_family xunit2",
    ),
    Project("wrapt", "2.5.2", ("setuptools",), "a C extension built from the sdist; no pytest config"),
    Project("tomlkit", "0.15.3", ("PyYAML",), "toml-test fixtures read from files, no pytest config"),
    Project(
        "django-model-utils", "5.0.0", ("Django~=5.1.0", "pytest-django", "time-machine"),
        "pytest-django (DJANGO_SETTINGS_MODULE in setup.cfg, the test database made by a session "
        "fixture, transactions per test), SQLite (its CI's SQLITE=1)",
        env=(("SQLITE", "1"),),
    ),
    Project(
        "fastapi", "0.165.0",
        (
            "opentelemetry-instrumentation-fastapi>=0.65b0", "logfire>=5.1.0", "sentry-sdk>=2.70.0",
            "opentelemetry-sdk>=1.44.0", "opentelemetry-exporter-otlp-proto-http>=1.44.0",
            "httpx>=0.23.0,<1.0.0", "httpx2>=2.0.0", "python-slugify>=8.0.4", "ruff>=0.14.14,<0.17.0",
            "anyio[trio]>=4.1.0,<5.0.0", "coverage[toml]>=7.13,<8.0", "dirty-equals>=0.9.0",
            "flask>=3.0.0,<4.0.0", "inline-snapshot>=0.21.1", "mypy>=1.14.1", "pwdlib[argon2]>=0.2.1",
            "pyjwt>=2.9.0", "pytest>=9.0.0,<9.2", "pytest-codspeed>=4.3.0", "pyyaml>=5.3.1,<7.0.0",
            "sqlmodel>=0.0.31", "strawberry-graphql>=0.200.0,<1.0.0", "ty>=0.0.25", "typer>=0.26.1",
            "a2wsgi>=1.9.0,<=2.0.0", "pytest-xdist[psutil]>=3.0.2", "pytest-cov>=4.0.0",
            "pytest-sugar>=1.0.0", "pytest-timeout>=2.4.0",
        ),
        "inline-snapshot in ~300 test modules, dirty-equals, pytest-timeout (20 s in its config), "
        "filterwarnings=error, --strict-config/--strict-markers, strict_xfail; ~5,300 tests, "
        "TestClient apps imported from docs_src per module; its dependency group 'tests' and "
        "the 'all' extra",
        extras=("all",),
    ),
    Project(
        "pytest-regressions", "2.11.0", ("matplotlib", "numpy", "pandas", "pillow", "pyarrow"),
        "a plugin's own suite: its committed baselines read through pytest-datadir's copies, "
        "pytester runs that write baselines, filterwarnings=error (tox.ini); its fixtures "
        "turn on ``keep`` for each of its tests",
    ),
    Project(
        "httpx", "0.28.1",
        ("chardet==5.2.0", "trio", "trustme", "uvicorn", "cryptography"),
        "a uvicorn server on 127.0.0.1:8000 started in a thread by a session-scoped fixture "
        "(so once per sandbox isolated), trio and asyncio via anyio, TLS with trustme, "
        "filterwarnings=error; its requirements.txt's extras",
        extras=("brotli", "cli", "http2", "socks", "zstd"),
    ),
    Project(
        "pytest-xdist", "3.8.0", ("filelock", "psutil"),
        "a plugin's own suite, the model of the node protocol: pytester runs with -n that "
        "start execnet gateways of their own, inside each sandbox",
        extras=("testing",),
    ),
    Project(
        "markdown-it-py", "4.3.0", (),
        "pytest-regressions' data_regression and file_regression over committed baselines "
        "(so ``keep`` on for those tests), pytest-timeout, a test that builds the sdist; "
        "its testing and linkify extras",
        extras=("testing", "linkify"),
    ),
    Project(
        "sphinx", "9.0.4",
        ("pytest-xdist[psutil]>=3.4", "cython>=3.0", "defusedxml>=0.7.1", "setuptools>=70.0", "typing_extensions>=4.9"),
        "its own pytest plugin (sphinx.testing.fixtures: an app per test built from test roots "
        "copied into a session-wide temp dir, builds shared between tests through a cache), "
        "local HTTP servers in threads (linkcheck), ~2,500 tests; its dependency group 'test'",
    ),
    Project(
        "alembic", "1.20.1",
        ("sqlalchemy>=2.0.0", "mako", "tzdata", "greenlet>=1", "pytest-xdist", "black==25.9.0", "zimports"),
        "SQLAlchemy's testing plugin (bootstrapped by its conftest: its own options, class-level "
        "fixtures, per-backend test classes, xdist node hooks that name a follower database), "
        "SQLite; --maxfail, -p no:warnings, -p no:logging in addopts",
    ),
    Project(
        "pytest-rerunfailures", "16.7", ("pytest-xdist",),
        "a plugin's own suite: testdir/pytester runs with --reruns inside each test, rerun "
        "delays, xdist crash reruns (its tox xdist env); tests/ as its tox.ini",
        ("tests/",),
    ),
    Project(
        "pytest-timeout", "2.4.0", ("pexpect", "ipdb", "pytest-cov"),
        "a plugin's own suite: SIGALRM and thread timeouts in pytester runs (inline and "
        "subprocess), pexpect-driven pytest with pdb/ipdb, --cov; its tox.ini deps",
    ),
    Project(
        "jsonschema", "4.26.0", ("jsonpath-ng",),
        "unittest TestCases (its CI runs them with virtue) over the JSON-Schema-Test-Suite "
        "files shipped in the sdist (~7,800 generated tests), a CLI, format checkers; its "
        "dependency group 'test' and the 'format' extra",
        ("jsonschema/tests",),
        extras=("format",),
    ),
    Project(
        "tqdm", "4.70.1", ("pytest-timeout", "pytest-asyncio", "rich", "numpy", "pandas", "dask[delayed]"),
        "terminal rendering of progress bars (widths, ANSI escapes, monitor threads), "
        "-W=error and --durations in addopts, pytest-timeout (30 s), asyncio strict mode, "
        "rich/pandas/dask integrations; -k 'not perf' as its tox.ini (in place of rich "
        "15.0.0, whose sdist ships no tests)",
        ("-k", "not perf"),
    ),
    Project(
        "pytest", "9.2.0",
        ("argcomplete", "attrs>=23.1", "hypothesis>=6.75", "mock", "numpy>=1.26", "pexpect>=4.9",
         "pytest-xdist>=3.5", "pyyaml", "requests", "setuptools", "xmlschema"),
        "pytest's own suite (testing/): pytester everywhere (inline runs and pytest in "
        "subprocesses, runpytest_subprocess, spawn via pexpect), -p pytester in addopts, "
        "strict=true, filterwarnings=error, capture and faulthandler tests that look at the "
        "process's own file descriptors; its dependency group dev without coverage; without "
        "its tox.ini's PYTHONWARNDEFAULTENCODING=1: with it and filterwarnings=error every "
        "isolated run stops at its start (the plugin's own open() calls without an encoding "
        "warn: INTERNALERROR; black in run 66)",
    ),
    Project(
        "filelock", "4.2.9",
        ("pytest-asyncio>=1.3", "pytest-mock>=3.15.1", "pytest-randomly>=3.16", "pytest-timeout>=2.4",
         "virtualenv>=21.2"),
        "fcntl/soft/SQLite read-write locks across threads, forked children and subprocesses, "
        "os.register_at_fork and audit hooks installed at import, PID/time-namespace identity, "
        "pytest-randomly (seed fixed here so every run has one order), pytest-timeout (20 s), "
        "filterwarnings=error, asyncio; its dependency group test without coverage tools. "
        "4.2.9: the newest whose sdist builds here (4.2.10 on need python-sbom, not on the index)",
        ("--randomly-seed=1", "tests"),
    ),
    Project(
        "psutil", "7.2.2", ("pytest<9.2", "pytest-instafail", "pytest-xdist", "setuptools"),
        "system and process introspection (a C extension built from the sdist): /proc of its own "
        "and spawned processes (pids, ppid, children, zombies, open files, connections on "
        "loopback, threads, memory maps, rlimits, signals), --capture=no, -p xdist/instafail in "
        "addopts; its Makefile's test env but plugin autoload (PYTEST_DISABLE_PLUGIN_AUTOLOAD) "
        "left on, or the plugin would not load; test_memleaks.py left out (as make test says), "
        "and test_sudo.py (sets the host's clock; its Makefile runs it with unittest); the "
        "extension built in place first (make build: setup.py build_ext -i), as the flat "
        "layout's tests import psutil from the tree; pytest 9.1 (9.2 rejects its "
        "verbosity_subtests = \"0\", a string, under --strict-config)",
        ("--ignore=tests/test_memleaks.py", "--ignore=tests/test_sudo.py"),
        env=(("PSUTIL_TESTING", "1"), ("PSUTIL_DEBUG", "1"), ("PYTHONWARNINGS", "always"),
             ("PYTHONUNBUFFERED", "1")),
        prepare=("setup.py", "build_ext", "-i"),
    ),
    Project(
        "trio", "0.35.0",
        ("astor==0.8.1", "async-generator==1.10", "black==26.10.1", "cryptography==50.0.2",
         "jedi==0.20.1", "mypy==2.4.0", "pylint==4.1.3", "pyopenssl==26.4.0", "pyyaml==6.0.3",
         "ruff==0.17.2", "trustme==1.2.1"),
        "its own pytest plugin (-p trio._tests.pytest_plugin in addopts), --import-mode=importlib, "
        "xfail_strict, filterwarnings=error, faulthandler_timeout; signals, subprocesses, "
        "threads, sockets and DTLS/TLS on loopback, pipes; ci.sh's --run-slow and "
        "-p _trio_check_attrs_aliases (PYTHONPATH=tests), its test-requirements' pins; "
        "pyright's tests deselected (pyright fetches node from the Internet)",
        ("--run-slow", "-p", "_trio_check_attrs_aliases", "-k", "not pyright", "src/trio"),
        env=(("PYTHONPATH", "tests"),),
    ),
    Project(
        "black", "26.10.1", ("pytest<9.2",),
        "filterwarnings=error, xfail_strict, its own --run-optional option (tests/optional.py), "
        "blackd over aiohttp's test server, a process pool for formatting many files, the cache "
        "dir; tox's first command (the d extra, --run-optional no_jupyter) without xdist and "
        "coverage, and without its PYTHONWARNDEFAULTENCODING=1: with it every isolated run "
        "stopped at its start (run 66: the plugin's own open() calls without an encoding warn, "
        "an INTERNALERROR under filterwarnings=error); pytest 9.1 (its tests/optional.py reads "
        "config.inicfg, which warns from pytest 9.2 on: an error at configure under "
        "filterwarnings=error)",
        ("tests", "--run-optional", "no_jupyter"),
        extras=("d",),
    ),
    Project(
        "watchdog", "7.1.1", ("flaky==3.8.1", "pytest-timeout==2.4.0"),
        "inotify observers and emitter threads over files in tmp_path, watchmedo launching "
        "subprocesses and signalling them, flaky's reruns, pytest-timeout, -vvv --showlocals; "
        "its requirements-tests.txt (without xdist and coverage) and the watchmedo extra",
        extras=("watchmedo",),
    ),
    Project(
        "urllib3", "2.8.0",
        ("anyio[trio]>=4.8.0", "h2>=4.1.0", "httpx>=0.28.1", "hypercorn>=0.15.0", "pysocks>=1.7.1",
         "pytest-socket>=0.7.0", "pytest-timeout>=2.3.1", "quart>=0.20.0", "quart-trio>=0.12.0",
         "trio>=0.27.0", "cryptography>=44.0.2", "idna>=3.10", "pyopenssl>=25.0.0", "trustme>=1.2.1"),
        "local HTTP/HTTPS/proxy servers (hypercorn + quart in threads, trustme certificates, "
        "SOCKS, HTTP/2 via h2), sockets with timeouts, filterwarnings=error, xfail_strict, "
        "log_level DEBUG; its dependency groups test and dev's TLS packages (hypercorn from PyPI, "
        "not its git fork); requires_network tests skip themselves (no route in the run's "
        "network namespace: the Internet is left out), --integration tests are off by default",
        extras=("brotli", "zstd", "socks", "h2"),
    ),
    Project(
        "pyyaml", "6.0.4", (),
        "data-driven legacy tests (tests/legacy_tests: ~1,300 cases generated from files in "
        "data/ by its conftest), the libyaml C extension built from the sdist, recursion limits",
    ),
    Project(
        "starlette", "1.10.0",
        ("httpx2[zstd]>=2.0.0", "blockbuster>=1.5.23", "importlib-metadata>=9.0.1",
         "opentelemetry-sdk>=1.44.0", "trio>=0.34.0"),
        "ASGI apps through TestClient (anyio portals in threads, asyncio and trio), websockets, "
        "file responses, sessions, blockbuster (blocking calls in the event loop fail), "
        "-rXs --strict-config --strict-markers, xfail_strict, filterwarnings=error; its "
        "dependency group dev without type checkers, linters and coverage, and the full extra",
        extras=("full",),
    ),
    Project(
        "msgpack", "1.2.4", ("setuptools>=78.1.1",),
        "a C extension (Cython-generated _cmsgpack.c) built in place first, as the flat layout's "
        "tests import msgpack from the tree; no pytest config; test/ as its CI; setuptools>=78.1.1 "
        "(its build-system pin: an older one rejects its SPDX project.license)",
        ("test",),
        prepare=("setup.py", "build_ext", "-i"),
    ),
    Project(
        "boltons", "26.2.0", (),
        "--doctest-modules over the package and tests/ (tox.ini's command), doctest_optionflags, "
        "file utilities (atomic saves, mkdir_p), socket utilities over socketpairs, gc/tb "
        "utilities, signal-free timeouts",
        ("--doctest-modules", "boltons", "tests"),
    ),
    Project(
        "ptyprocess", "0.7.0", (),
        "pseudo-terminals: processes spawned on a pty (fork + setsid + controlling tty), "
        "echo and window size, waiting on exit statuses, preexec_fn; no pytest config",
        ("tests",),
    ),
)

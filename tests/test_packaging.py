"""The package as a user gets it: a wheel built from this tree, installed into a fresh
venv outside the repo, running the demo suite (README: "Try it").

Everything else in the suite imports the plugin from the source tree (scripts/setup.sh
installs it editable), which hides packaging mistakes: a subpackage that
``[tool.setuptools.packages.find]`` misses, a module left out of the wheel, a broken
entry point. Here the wheel is built as ``python -m pip wheel`` builds it (isolated
build, from a copy of the tree, so the working tree gets no ``build/``), its file list
is checked against ``pytest_isolate/``, and the demo runs with the wheel's venv's
pytest, expecting what the README and scripts/demo.sh say: the
``test_fails_on_purpose_*`` tests fail, all others pass, every tier runs, and the
demo's own check ("what the plugin should have reported") says yes to each item.

The wheel's dependencies come from the package index (pip's cache after the first
run), pinned to the versions installed here, so the venv differs from the development
one only in how pytest-isolate got there.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from importlib import metadata
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
PROJECT = "pytest-isolate-tiers"
#: Not part of a build: the development venvs, build output, caches, reports.
_SKIP = shutil.ignore_patterns(
    ".git", ".venv", ".venv-*", ".tox", "build", "dist", "*.egg-info", "__pycache__",
    "*.pyc", ".pytest_cache", "examples-report.json",
)


def SKIP(directory: str, names: list[str]) -> set[str]:
    skip = set(_SKIP(directory, names))
    if Path(directory).name == "bench" and "out" in names:
        skip.add("out")  # bench/out/: benchmark results
    return skip
TIERS = {"process", "chroot", "jail", "zone", "uml"}


def _run(cmd: list[str | Path], timeout: float, **kw: Any) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=timeout, **kw)
    assert proc.returncode == 0, (
        f"{' '.join(map(str, cmd))} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    )
    return proc


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(the wheel, the copy of the tree it was built from)."""
    base = tmp_path_factory.mktemp("packaging")
    src = base / "src"
    shutil.copytree(ROOT, src, ignore=SKIP, symlinks=True)
    dist = base / "dist"
    _run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--disable-pip-version-check",
         "-q", "-w", dist, src],
        timeout=300,
        env={**os.environ, "PIP_NO_INPUT": "1"},
    )
    wheels = sorted(dist.glob("*.whl"))
    assert len(wheels) == 1, wheels
    return wheels[0], src


def test_wheel_holds_every_module_and_no_tests(built: tuple[Path, Path]) -> None:
    wheel, src = built
    names = set(zipfile.ZipFile(wheel).namelist())
    package = src / "pytest_isolate"
    expected = {
        p.relative_to(src).as_posix()
        for p in package.rglob("*")
        if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc"
    }
    assert {"pytest_isolate/tiers/uml_init.py", "pytest_isolate/session/__init__.py"} <= expected
    missing = sorted(expected - names)
    assert not missing, f"{wheel.name} lacks {len(missing)} file(s) of pytest_isolate/: {missing}"
    # Byte for byte what the tree holds (the wheel is not built from a stale copy).
    with zipfile.ZipFile(wheel) as zf:
        differ = [n for n in sorted(expected) if zf.read(n) != (src / n).read_bytes()]
    assert not differ, differ

    tops = {n.split("/", 1)[0] for n in names}
    dist_info = {t for t in tops if t.endswith(".dist-info")}
    assert tops - dist_info == {"pytest_isolate"}, f"unexpected top-level entries: {sorted(tops)}"
    stray = sorted(
        n for n in names
        if Path(n).name.startswith("test_") or Path(n).name == "conftest.py"
        or "/tests/" in f"/{n}" or "/examples/" in f"/{n}" or n.endswith(".pyc")
    )
    assert not stray, f"test files in the wheel: {stray}"

    (info,) = dist_info
    entry_points = zipfile.ZipFile(wheel).read(f"{info}/entry_points.txt").decode()
    assert "[pytest11]" in entry_points
    assert "isolate = pytest_isolate.plugin" in entry_points


def _constraints(path: Path) -> Path:
    """The versions installed here, so the fresh venv gets the same dependencies."""
    lines = sorted({
        f"{d.metadata['Name']}=={d.version}"
        for d in metadata.distributions()
        if d.metadata["Name"] and d.version
        and d.metadata["Name"].lower().replace("_", "-") != PROJECT
    })
    path.write_text("\n".join(lines) + "\n")
    return path


def _uml_kernel() -> list[str]:
    """The UML kernel this environment boots (scripts/uml-kernel.sh may have put one
    beside the development venv's interpreter, which the fresh venv's is not)."""
    try:
        from pytest_isolate.tiers import uml_kernel

        return [f"--isolate-uml-kernel={uml_kernel.find_kernel()}"]
    except Exception:
        return []


def test_demo_runs_from_the_wheel(
    built: tuple[Path, Path], tmp_path: Path, h: object
) -> None:
    wheel, src = built
    venv = tmp_path / "venv"
    python = venv / "bin" / "python"
    _run([sys.executable, "-m", "venv", "--without-pip", venv], timeout=120)
    _run(
        [sys.executable, "-m", "pip", "--python", python, "install", "-q",
         "--disable-pip-version-check", "-c", _constraints(tmp_path / "constraints.txt"), wheel],
        timeout=300,
        env={**os.environ, "PIP_NO_INPUT": "1"},
    )
    env = {
        k: v for k, v in os.environ.items()
        if not k.startswith(("PYTEST_", "PYTHON", "VIRTUAL_ENV", "COV_CORE"))
    }
    env.update({"PY_COLORS": "0", "PATH": f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"})

    # The plugin comes from the wheel, not from the tree.
    where = _run([python, "-c", "import pytest_isolate; print(pytest_isolate.__file__)"],
                 timeout=60, env=env, cwd=tmp_path).stdout.strip()
    assert where.startswith(str(venv)), where

    shutil.copytree(src / "examples", tmp_path / "examples", ignore=SKIP)
    report = tmp_path / "report.json"
    snap = h.LeakSnapshot(tmp_path)  # type: ignore[attr-defined]
    proc = subprocess.run(
        [python, "-m", "pytest", "examples", "-v", "-p", "no:cacheprovider",
         f"--basetemp={tmp_path / 'basetemp'}", f"--isolate-report={report}", *_uml_kernel()],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240,
    )
    out = proc.stdout + proc.stderr
    leaks = snap.leaks()
    assert not leaks, "the demo left behind:\n" + "\n".join(leaks)
    # As scripts/demo.sh: the failing tests fail on purpose (exit 1), nothing worse.
    assert proc.returncode == 1, out

    data = json.loads(report.read_text())
    assert data["generator"].startswith(PROJECT), data["generator"]
    outcomes = {t["nodeid"].rsplit("::", 1)[-1]: t["outcome"] for t in data["tests"]}
    expected = {
        name: "failed" if name.startswith("test_fails_on_purpose_") else "passed"
        for name in outcomes
    }
    assert outcomes == expected, out
    assert "failed" in expected.values() and "passed" in expected.values()
    assert {t["tier"] for t in data["tests"]} == TIERS, out
    # Every test file of the demo ran.
    files = {t["nodeid"].split("::", 1)[0].rsplit("/", 1)[-1] for t in data["tests"]}
    assert files == {p.name for p in (src / "examples").glob("test_*.py")}, files

    section = out.split("demo: what the plugin should have reported", 1)
    assert len(section) == 2, out
    checks = [
        line for line in section[1].splitlines()[1:]
        if line.startswith("test_") and ": " in line
    ]
    assert checks and all(line.endswith(": yes") for line in checks), "\n".join(checks)
    summary = data["summary"]["outcomes"]
    assert f"{summary['failed']} failed, {summary['passed']} passed" in out, out

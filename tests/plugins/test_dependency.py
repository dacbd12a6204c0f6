"""pytest-dependency: a test that depends on others runs or is skipped as in-process.

pytest-dependency records outcomes in the process a test runs in; every sandbox starts
from the collected session, where nothing has run. Without the controller's record
each dependent test is skipped isolated ("test_c depends on test_a") and passes
in-process.
"""

from __future__ import annotations

import pytest

from tests.plugins.conftest import TIERS, Runner, outcomes

SUITE = """
    import pytest
    from pytest_dependency import depends

    @pytest.mark.dependency()
    def test_a():
        pass

    @pytest.mark.dependency()
    @pytest.mark.xfail(reason="deliberate")
    def test_b():
        assert False

    @pytest.mark.dependency()
    def test_fails():
        assert False

    @pytest.mark.dependency(depends=["test_a"])
    def test_c():
        pass

    @pytest.mark.dependency(depends=["test_b"])
    def test_d():
        pass

    @pytest.mark.dependency(depends=["test_fails"])
    def test_after_failure():
        pass

    @pytest.mark.dependency(depends=["test_c"])
    def test_chain():
        pass

    @pytest.mark.dependency(name="named")
    def test_named():
        pass

    @pytest.mark.dependency(depends=["named"])
    def test_on_named():
        pass

    @pytest.mark.isolate(tier="none")
    @pytest.mark.dependency(depends=["test_a"])
    def test_in_process_on_isolated():
        pass

    @pytest.mark.isolate(tier="none")
    @pytest.mark.dependency()
    def test_in_process():
        pass

    @pytest.mark.dependency(depends=["test_in_process"])
    def test_isolated_on_in_process():
        pass

    def test_runtime(request):
        depends(request, ["test_a", "test_chain"])

    def test_runtime_unmet(request):
        depends(request, ["test_d"])

    class TestSteps:
        @pytest.mark.dependency()
        def test_one(self):
            pass

        @pytest.mark.dependency(depends=["TestSteps::test_one"])
        def test_two(self):
            pass

        @pytest.mark.dependency(depends=["test_one"], scope="class")
        def test_three(self):
            pass
"""

OTHER = """
    import pytest

    @pytest.mark.dependency(depends=["test_dep.py::test_a", "test_dep.py::TestSteps::test_two"], scope="session")
    def test_across_modules():
        pass

    @pytest.mark.dependency(depends=["test_dep.py::test_d"], scope="session")
    def test_across_unmet():
        pass

    @pytest.mark.dependency(depends=["test_a"])
    def test_other_module_same_name():
        pass
"""

EXPECTED = {
    "test_dep.py::test_a": ["PASSED"],
    "test_dep.py::test_b": ["XFAIL"],
    "test_dep.py::test_fails": ["FAILED"],
    "test_dep.py::test_c": ["PASSED"],
    "test_dep.py::test_d": ["SKIPPED"],
    "test_dep.py::test_after_failure": ["SKIPPED"],
    "test_dep.py::test_chain": ["PASSED"],
    "test_dep.py::test_named": ["PASSED"],
    "test_dep.py::test_on_named": ["PASSED"],
    "test_dep.py::test_in_process_on_isolated": ["PASSED"],
    "test_dep.py::test_in_process": ["PASSED"],
    "test_dep.py::test_isolated_on_in_process": ["PASSED"],
    "test_dep.py::test_runtime": ["PASSED"],
    "test_dep.py::test_runtime_unmet": ["SKIPPED"],
    "test_dep.py::TestSteps::test_one": ["PASSED"],
    "test_dep.py::TestSteps::test_two": ["PASSED"],
    "test_dep.py::TestSteps::test_three": ["PASSED"],
    "test_other.py::test_across_modules": ["PASSED"],
    "test_other.py::test_across_unmet": ["SKIPPED"],
    "test_other.py::test_other_module_same_name": ["SKIPPED"],
}


@pytest.mark.parametrize("tier", TIERS)
def test_dependency_same_outcomes(pytester: pytest.Pytester, run: Runner, tier: str) -> None:
    pytester.makepyfile(test_dep=SUITE, test_other=OTHER)
    base = run(None, "-p", "no:randomly", plugins=("dependency",))
    iso = run(tier, "-p", "no:randomly", plugins=("dependency",))
    assert outcomes(base) == EXPECTED, base.stdout.str()
    assert outcomes(iso) == EXPECTED, iso.stdout.str()
    # The reason pytest-dependency gives, from the sandbox as in-process.
    iso.stdout.fnmatch_lines(["*SKIPPED*test_d depends on test_b*"])


@pytest.mark.parametrize("args", [("--isolate-scope=module",), ("-p", "xdist", "-n", "2", "--dist", "loadfile")])
def test_dependency_kept_sandboxes_and_xdist(pytester: pytest.Pytester, run: Runner, args: tuple[str, ...]) -> None:
    """A sandbox kept for a module records its own tests as in-process and takes the
    controller's record for each; under xdist each worker's record is its own, as
    in-process (``loadfile``: a module's tests share a worker)."""
    pytester.makepyfile(test_dep=SUITE)
    expected = {k: v for k, v in EXPECTED.items() if k.startswith("test_dep.py")}
    xdist = "-n" in args
    base = run(None, *(args if xdist else ()), plugins=("dependency",))
    iso = run("process", *args, plugins=("dependency",))
    if not xdist:
        assert outcomes(base) == expected, base.stdout.str()
        assert outcomes(iso) == expected, iso.stdout.str()
    else:  # -v under xdist: "[gw0] PASSED test_dep.py::test_a"
        for res in (base, iso):
            res.assert_outcomes(passed=12, failed=1, skipped=3, xfailed=1)


def test_automark_and_ignore_unknown(pytester: pytest.Pytester, run: Runner) -> None:
    """``automark_dependency`` records every test; ``--ignore-unknown-dependency`` runs a
    test whose dependency was never run (deselected)."""
    pytester.makeini("[pytest]\nautomark_dependency = true\n")
    pytester.makepyfile(
        test_auto="""
        import pytest

        def test_plain():
            pass

        def test_plain_fails():
            assert False

        @pytest.mark.dependency(depends=["test_plain"])
        def test_on_plain():
            pass

        @pytest.mark.dependency(depends=["test_plain_fails"])
        def test_on_failed():
            pass

        @pytest.mark.dependency(depends=["test_never"])
        def test_on_unknown():
            pass

        def test_never():
            pass
        """
    )
    args = ("-p", "no:randomly", "--deselect", "test_auto.py::test_never", "--ignore-unknown-dependency")
    base = run(None, *args, plugins=("dependency",))
    for tier in ("process", "jail"):
        iso = run(tier, *args, plugins=("dependency",))
        assert outcomes(iso) == outcomes(base) == {
            "test_auto.py::test_plain": ["PASSED"],
            "test_auto.py::test_plain_fails": ["FAILED"],
            "test_auto.py::test_on_plain": ["PASSED"],
            "test_auto.py::test_on_failed": ["SKIPPED"],
            "test_auto.py::test_on_unknown": ["PASSED"],
        }, iso.stdout.str()

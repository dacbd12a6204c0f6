"""pytest-bdd: the same scenarios, outcomes and cucumber JSON isolated as in-process.

pytest-bdd keeps each scenario's steps in a registry keyed by the report object made in
the test's process; the controller logs a report rebuilt from the sandbox's, which the
registry has never seen, so ``--cucumberjson`` wrote ``[]`` isolated.
"""

from __future__ import annotations

import json
import re

import pytest

from tests.plugins.conftest import TIERS, Runner, outcomes

FEATURE = """\
Feature: Cucumbers
    Scenario: Eating
        Given there are 12 cucumbers
        When I eat 5 cucumbers
        Then I should have 7 cucumbers

    Scenario Outline: Outlined
        Given there are <start> cucumbers
        When I eat <eat> cucumbers
        Then I should have <left> cucumbers

        Examples:
        | start | eat | left |
        |  12   |  5  |  7   |
        |  20   |  5  |  14  |
"""

STEPS = """
    from pytest_bdd import given, parsers, scenarios, then, when

    scenarios("cucumbers.feature")

    @given(parsers.parse("there are {n:d} cucumbers"), target_fixture="basket")
    def basket(n):
        return {"n": n}

    @when(parsers.parse("I eat {e:d} cucumbers"))
    def eat(basket, e):
        basket["n"] -= e

    @then(parsers.parse("I should have {left:d} cucumbers"))
    def left(basket, left):
        assert basket["n"] == left

    def test_not_a_scenario():
        pass
"""


def cucumber(path: str) -> object:
    """The cucumber JSON without what differs from run to run (durations, addresses)."""
    with open(path) as f:
        text = json.dumps(json.load(f), sort_keys=True)
    text = re.sub(r'"duration": \d+', '"duration": 0', text)
    return json.loads(re.sub(r"0x[0-9a-f]+", "0x0", text))


@pytest.mark.parametrize("tier", TIERS)
def test_bdd_same_outcomes_and_cucumber_json(pytester: pytest.Pytester, run: Runner, tier: str) -> None:
    pytester.makefile(".feature", cucumbers=FEATURE)
    pytester.makepyfile(test_steps=STEPS)
    base = run(None, "--cucumberjson=base.json", plugins=("pytest-bdd",))
    iso = run(tier, "--cucumberjson=iso.json", plugins=("pytest-bdd",))
    assert outcomes(iso) == outcomes(base) == {
        "test_steps.py::test_eating": ["PASSED"],
        "test_steps.py::test_outlined[12-5-7]": ["PASSED"],
        "test_steps.py::test_outlined[20-5-14]": ["FAILED"],
        "test_steps.py::test_not_a_scenario": ["PASSED"],
    }, iso.stdout.str()
    expected = cucumber(str(pytester.path / "base.json"))
    assert expected, "in-process pytest-bdd wrote no scenario"
    assert cucumber(str(pytester.path / "iso.json")) == expected
    assert '"status": "failed"' in json.dumps(expected)


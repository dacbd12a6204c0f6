"""Unit tests of spec.py: every value a user can write, parsed and refused in one place."""

from __future__ import annotations

import pytest

from pytest_isolate.spec import (
    KEYS,
    TIERS,
    IsolationSpec,
    SpecError,
    format_size,
    marker_values,
    parse_count,
    parse_cpu,
    parse_duration,
    parse_size,
    parse_values,
    resolve,
)

KiB, MiB, GiB, TiB = 1 << 10, 1 << 20, 1 << 30, 1 << 40


# -- sizes ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("256M", 256 * MiB),
        ("1G", GiB),
        ("1g", GiB),
        ("512KiB", 512 * KiB),
        ("512k", 512 * KiB),
        ("1.5g", int(1.5 * GiB)),
        ("2T", 2 * TiB),
        ("64MB", 64 * MiB),
        ("100", 100),
        (" 8 M ", 8 * MiB),
        (4096, 4096),
    ],
)
def test_parse_size(raw: object, expected: int) -> None:
    assert parse_size(raw) == expected


@pytest.mark.parametrize("raw", ["256Q", "", "M", "1.5.5G", "-1M", "ten", True, 0, -5, "0M"])
def test_parse_size_refuses(raw: object) -> None:
    with pytest.raises(SpecError) as exc:
        parse_size(raw, "memory")
    msg = str(exc.value)
    assert "\n" not in msg
    assert msg.startswith("memory: ")
    assert repr(raw) in msg


# -- durations -----------------------------------------------------------------------
@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("2s", 2.0),
        ("500ms", 0.5),
        ("1.5m", 90.0),
        ("2min", 120.0),
        ("1h", 3600.0),
        ("90", 90.0),
        ("  3 S ", 3.0),
        (2, 2.0),
        (0.25, 0.25),
    ],
)
def test_parse_duration(raw: object, expected: float) -> None:
    assert parse_duration(raw) == pytest.approx(expected)


@pytest.mark.parametrize("raw", ["soon", "", "1d", "-1s", "s", "0s", 0, -2, True, "1..2s"])
def test_parse_duration_refuses(raw: object) -> None:
    with pytest.raises(SpecError) as exc:
        parse_duration(raw, "timeout")
    msg = str(exc.value)
    assert "\n" not in msg
    assert msg.startswith("timeout: ")
    assert repr(raw) in msg


# -- cpu shares and counts -------------------------------------------------------------
@pytest.mark.parametrize(("raw", "expected"), [(0.5, 0.5), ("0.25", 0.25), ("50%", 0.5), (" 150% ", 1.5), (2, 2.0)])
def test_parse_cpu(raw: object, expected: float) -> None:
    assert parse_cpu(raw) == pytest.approx(expected)


@pytest.mark.parametrize("raw", ["half", "", "%", 0, "-10%", -1, True, "0%"])
def test_parse_cpu_refuses(raw: object) -> None:
    with pytest.raises(SpecError) as exc:
        parse_cpu(raw, "cpu")
    msg = str(exc.value)
    assert "\n" not in msg and msg.startswith("cpu: ") and repr(raw) in msg


@pytest.mark.parametrize(("raw", "expected"), [(10, 10), ("10", 10), (" 3 ", 3), (1, 1)])
def test_parse_count(raw: object, expected: int) -> None:
    assert parse_count(raw, "pids") == expected


@pytest.mark.parametrize("raw", ["ten", "", 0, -3, "-3", True, 1.5, "1.5"])
def test_parse_count_refuses(raw: object) -> None:
    with pytest.raises(SpecError) as exc:
        parse_count(raw, "pids")
    msg = str(exc.value)
    assert "\n" not in msg and msg.startswith("pids: ") and repr(raw) in msg


# -- one-line messages naming where, key, value and what is valid ------------------------
#: (key, bad value, a fragment that tells the user what *is* valid)
BAD_VALUES = [
    ("tier", "prison", "valid: " + ", ".join(TIERS)),
    ("tier", "", "valid: " + ", ".join(TIERS)),
    ("timeout", "soon", "valid: seconds"),
    ("timeout", "0s", "positive"),
    ("cpu_time", "forever", "valid: seconds"),
    ("memory", "256Q", "valid: bytes as int, or a number with K, M, G or T"),
    ("memory", 0, "positive"),
    ("disk", "lots", "valid: bytes"),
    ("io", "fast", "valid: bytes"),
    ("cpu", "half", "valid: a fraction of one CPU"),
    ("cpu", 0, "positive"),
    ("pids", "many", "valid: a positive whole number"),
    ("pids", 0, "positive"),
    ("fds", "x", "valid: a positive whole number"),
    ("cpus", -1, "positive"),
    ("network", "internet", "valid: none, ip"),
    ("scope", "forever", "valid: test, module, session"),
    ("rootfs", "", "non-empty string"),
    ("kernel", 3, "non-empty string"),
    ("allow", 5, "list of names"),
]


@pytest.mark.parametrize(("key", "value", "valid"), BAD_VALUES)
def test_error_is_one_line_naming_source_key_value_and_valid(key: str, value: object, valid: str) -> None:
    with pytest.raises(SpecError) as exc:
        parse_values({key: value}, "isolate marker")
    msg = str(exc.value)
    assert "\n" not in msg
    assert msg.startswith(f"isolate marker: {key}: ")
    assert repr(value) in msg
    assert valid in msg


def test_unknown_key_lists_every_valid_key() -> None:
    with pytest.raises(SpecError) as exc:
        parse_values({"colour": "red"}, "--isolate-colour")
    msg = str(exc.value)
    assert "\n" not in msg
    assert msg == f"--isolate-colour: unknown key 'colour' (valid: {', '.join(KEYS)})"


def test_values_are_normalized() -> None:
    got = parse_values(
        {"tier": " Process ", "timeout": "2s", "memory": "1G", "cpu": "50%", "pids": "8", "network": "IP",
         "scope": "module", "allow": "mount, ptrace  raw_socket"},
        "x",
    )
    assert got == {
        "tier": "process", "timeout": 2.0, "memory": GiB, "cpu": 0.5, "pids": 8, "network": "ip",
        "scope": "module", "allow": ("mount", "ptrace", "raw_socket"),
    }


def test_none_means_not_set_here() -> None:
    assert parse_values({"tier": None, "timeout": None}, "x") == {}


# -- markers -------------------------------------------------------------------------
def test_marker_positional_and_keyword_tier() -> None:
    assert marker_values(("jail",), {"memory": "256M"}, "m") == {"tier": "jail", "memory": 256 * MiB}
    assert marker_values((), {"tier": "zone"}, "m") == {"tier": "zone"}
    assert marker_values((), {"timeout": 3}, "m") == {"timeout": 3.0}


def test_marker_two_positionals_refused() -> None:
    with pytest.raises(SpecError) as exc:
        marker_values(("process", "jail"), {}, "isolate marker")
    msg = str(exc.value)
    assert "\n" not in msg and "'jail'" in msg and "only positional" in msg


def test_marker_tier_twice_refused() -> None:
    with pytest.raises(SpecError) as exc:
        marker_values(("process",), {"tier": "jail"}, "isolate marker")
    assert "\n" not in str(exc.value) and "tier" in str(exc.value)


# -- precedence ----------------------------------------------------------------------
def test_default_is_no_isolation() -> None:
    spec = resolve([])
    assert spec == IsolationSpec()
    assert spec.tier == "none" and not spec.isolated
    assert spec.network == "none"
    assert spec.budgets() == {}


def test_resolve_marker_beats_cli_beats_ini_key_by_key() -> None:
    marker = parse_values({"tier": "jail"}, "marker")
    cli = parse_values({"tier": "process", "timeout": "3s"}, "cli")
    ini = parse_values({"tier": "zone", "timeout": "9s", "memory": "1G"}, "ini")
    spec = resolve([marker, cli, ini])
    assert (spec.tier, spec.timeout, spec.memory) == ("jail", 3.0, GiB)
    assert resolve([{}, cli, ini]).tier == "process"
    assert resolve([{}, {}, ini]).tier == "zone"
    # An explicit "none" in a marker opts out even when the command line isolates.
    assert not resolve([parse_values({"tier": "none"}, "m"), cli, ini]).isolated


def test_spec_is_hashable_and_round_trips() -> None:
    spec = resolve([parse_values({"tier": "zone", "memory": "64M", "allow": ["mount"], "timeout": "1s"}, "x")])
    assert hash(spec) == hash(IsolationSpec.from_dict(spec.to_dict()))
    assert IsolationSpec.from_dict(spec.to_dict()) == spec
    assert spec.budgets() == {"timeout": 1.0, "memory": 64 * MiB}
    assert {spec: 1}[IsolationSpec.from_dict(spec.to_dict())] == 1


@pytest.mark.parametrize(
    ("n", "text"), [(None, "-"), (512, "512 B"), (1024, "1 KiB"), (256 * MiB, "256 MiB"), (1536 * KiB, "1.5 MiB"), (3 * GiB, "3 GiB")]
)
def test_format_size(n: int | None, text: str) -> None:
    assert format_size(n) == text

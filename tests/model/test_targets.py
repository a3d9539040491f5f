"""Target validation: bad values are errors that change nothing."""

from __future__ import annotations

import pytest

from agent.model.targets import (
    TargetError,
    TargetLimits,
    TargetSet,
    check_capacity,
    validate_values,
)


@pytest.mark.parametrize(
    ("kind", "values", "expected"),
    [
        ("pids", [1, 2, 2], frozenset({1, 2})),
        ("uids", [0, 2**32 - 1], frozenset({0, 2**32 - 1})),
        ("comms", ["bash", "a" * 15], frozenset({"bash", "a" * 15})),
        ("pids", [], frozenset()),
        ("cgroups", ["/", "/system.slice", "//a//b/"], frozenset({"/", "/system.slice", "/a/b"})),
        ("containers", ["4f3c4f3c4f3c", "a" * 64], frozenset({"4f3c4f3c4f3c", "a" * 64})),
    ],
)
def test_valid(kind, values, expected) -> None:
    assert validate_values(kind, values) == expected


@pytest.mark.parametrize(
    ("kind", "values", "message"),
    [
        ("pids", [-1], "outside"),
        ("pids", [2**32], "outside"),
        ("uids", ["12"], "not an integer"),
        ("uids", [1.5], "not an integer"),
        ("pids", [True], "not an integer"),
        ("comms", [""], "empty"),
        ("comms", ["a" * 16], "16 bytes"),
        ("comms", ["é" * 8], "16 bytes"),
        ("comms", [3], "not a string"),
        ("pids", 5, "expected a list"),
        ("cgroups", ["system.slice"], "must start with '/'"),
        ("cgroups", ["/a/../b"], "'.' and '..' are not allowed"),
        ("cgroups", [7], "not a string"),
        ("containers", ["4f3c4f3c4f3"], "12 to 64 lower-case hex digits"),  # 11 digits
        ("containers", ["a" * 65], "12 to 64 lower-case hex digits"),
        ("containers", ["4F3C4F3C4F3C"], "12 to 64 lower-case hex digits"),
        ("containers", ["4f3c4f3c4f3g"], "12 to 64 lower-case hex digits"),
        ("containers", [123456789012], "not a string"),
    ],
)
def test_invalid(kind, values, message) -> None:
    with pytest.raises(TargetError, match=message):
        validate_values(kind, values)


def test_capacity() -> None:
    limits = TargetLimits(pids=2, uids=1, comms=1, cgroups=1, containers=1)
    check_capacity(TargetSet(pids=frozenset({1, 2})), limits)
    with pytest.raises(TargetError, match="3 values exceed the kernel map's 2 entries"):
        check_capacity(TargetSet(pids=frozenset({1, 2, 3})), limits)
    with pytest.raises(TargetError, match="containers: 2 values exceed"):
        check_capacity(TargetSet(containers=frozenset({"a" * 12, "b" * 12})), limits)


def test_removing_a_cgroup_drops_its_id() -> None:
    t = TargetSet(cgroups=frozenset({"/a", "/b"}), cgroup_ids=(("/a", 10), ("/b", 11)))
    assert t.with_values("cgroups", frozenset({"/b"})).cgroup_ids == (("/b", 11),)

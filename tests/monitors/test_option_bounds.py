"""Every number a monitor option carries into the kernel fits its kernel type."""

from __future__ import annotations

import typing

import annotated_types
import pytest
from pydantic import ValidationError

from agent.monitors.registry import discover_monitors
from agent.monitors.syscall.monitor import ScConfig, SyscallOptions

REGISTRY = discover_monitors()


def int_fields() -> list[tuple[str, str, object]]:
    out = []
    for cls in REGISTRY:
        for field, info in cls.Options.model_fields.items():
            if "int" in str(info.annotation) and "bool" not in str(info.annotation):
                out.append((cls.name, field, info))
    return out


@pytest.mark.parametrize(("monitor", "field", "info"), int_fields(),
                         ids=lambda x: x if isinstance(x, str) else "")
def test_every_integer_option_has_both_bounds(monitor: str, field: str, info: object) -> None:
    metadata = list(info.metadata)  # type: ignore[attr-defined]
    annotation = info.annotation  # type: ignore[attr-defined]
    if typing.get_origin(annotation) is list:  # list[Annotated[int, Ge, Le]]: the items'
        metadata += getattr(typing.get_args(annotation)[0], "__metadata__", ())
    assert any(isinstance(m, annotated_types.Ge | annotated_types.Gt) for m in metadata), field
    assert any(isinstance(m, annotated_types.Le | annotated_types.Lt) for m in metadata), field


@pytest.mark.parametrize("value", [2**64, 2**64 // 1000 + 1, -1, 10**30])
def test_slow_threshold_beyond_u64_ns_is_refused(value: int) -> None:
    with pytest.raises(ValidationError):
        SyscallOptions(slow_threshold_us=value)


def test_largest_slow_threshold_fits_the_kernel_field() -> None:
    top = SyscallOptions.model_fields["slow_threshold_us"].metadata
    le = next(m.le for m in top if isinstance(m, annotated_types.Le))
    SyscallOptions(slow_threshold_us=le)
    assert ScConfig(slow_ns=le * 1000).slow_ns == le * 1000  # no wrap to a small value

"""Shared fixtures. Kernel tests need root and a working eBPF stack: outside CI they
skip with the reason; with CI=true they fail, so a broken CI machine cannot pass green.
The helpers themselves live in tests/support/."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.filters import workload_binary
from tests.support.kernel import CollectingSink, require_kernel


@pytest.fixture
def kernel() -> None:
    """Use in every test that loads BPF programs."""
    require_kernel()


@pytest.fixture
def sink() -> Iterator[CollectingSink]:
    yield CollectingSink()


@pytest.fixture(scope="session")
def filter_workload() -> Iterator[Path]:
    """The stream-filter workload (tests/support/filters.py), compiled once."""
    with workload_binary() as binary:
        yield binary

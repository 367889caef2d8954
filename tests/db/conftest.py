"""Fixtures for the billing-core database tests (see dbkit for the callers they drive)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from dbkit import Billing, FakeToss

from service.runtime.cluster import Runtime


@pytest.fixture
def bl(rt: Runtime, dbname: str) -> Iterator[Billing]:
    """Owner, service and subscriber connections to a fresh migrated database."""
    b = Billing(rt, dbname)
    yield b
    b.close()


@pytest.fixture
def toss(bl: Billing) -> FakeToss:
    return FakeToss(bl)

"""Fixtures for the billing-core database tests (see dbkit for the callers they drive)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from dbkit import Billing, FollowClock, TossSandbox, serve_sandbox

from service.runtime.cluster import Runtime


@pytest.fixture(scope="session")
def sandbox_server() -> Iterator[tuple[str, FollowClock]]:
    """One Toss sandbox for the session (its URL and clock); each test starts it afresh."""
    with serve_sandbox() as server:
        yield server


@pytest.fixture
def toss(sandbox_server: tuple[str, FollowClock]) -> Iterator[TossSandbox]:
    """Toss, with nothing in it yet: no keys, payments, faults or webhooks."""
    sandbox = TossSandbox(*sandbox_server)
    sandbox.reset()
    yield sandbox
    sandbox.close()


@pytest.fixture
def bl(rt: Runtime, dbname: str, toss: TossSandbox) -> Iterator[Billing]:
    """Owner, service and subscriber connections to a fresh migrated database, with Toss."""
    b = Billing(rt, dbname, toss)
    yield b
    b.close()

"""Fixtures for the billing-core database tests (see dbkit for the callers they drive)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from dbkit import Billing, TossSandbox, serve_sandbox

from service.runtime.cluster import Runtime


@pytest.fixture(scope="session")
def sandbox_server() -> Iterator[TossSandbox]:
    """One Toss sandbox for the session; each test starts it afresh (``toss``)."""
    with serve_sandbox() as (url, clock):
        sandbox = TossSandbox(url, clock)
        yield sandbox
        sandbox.close()


@pytest.fixture
def toss(sandbox_server: TossSandbox) -> TossSandbox:
    """Toss, with nothing in it yet: no keys, payments, faults or webhooks."""
    sandbox_server.reset()
    return sandbox_server


@pytest.fixture
def bl(rt: Runtime, dbname: str, toss: TossSandbox) -> Iterator[Billing]:
    """Owner, service and subscriber connections to a fresh migrated database, with Toss."""
    b = Billing(rt, dbname, toss)
    yield b
    b.close()

"""Fixtures for the Toss client and sandbox tests: no database, a real HTTP server."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import ExitStack
from typing import Any

import httpx
import pytest
from sandbox_harness import SECRET_KEY, START, LiveServer, WebhookSink, basic

from service.sandbox import Clock, build_app
from service.toss import TossClient


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="session")
def webhook_sink() -> WebhookSink:
    return WebhookSink()


@pytest.fixture(scope="session")
def _shared_server(webhook_sink: WebhookSink) -> Iterator[LiveServer]:
    app = build_app(clock=Clock(START), webhook_transport=httpx.MockTransport(webhook_sink.handle))
    with LiveServer(app) as server:
        yield server


@pytest.fixture
def server(_shared_server: LiveServer, webhook_sink: WebhookSink) -> LiveServer:
    """The shared sandbox, emptied: no keys, payments, faults or webhooks; clock at START."""
    sandbox = _shared_server.sandbox
    sandbox.reset(seed=0)
    sandbox.webhooks.url = None
    webhook_sink.reset()
    return _shared_server


@pytest.fixture
def api(server: LiveServer) -> Iterator[httpx.Client]:
    """The Toss API of the sandbox, authenticated with the docs test secret key."""
    with httpx.Client(base_url=server.url, headers=basic(SECRET_KEY), timeout=30) as client:
        yield client


@pytest.fixture
def control(server: LiveServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=30) as client:
        yield client


@pytest.fixture
async def toss(server: LiveServer) -> AsyncIterator[TossClient]:
    """service.toss's client against the shared sandbox."""
    async with TossClient(SECRET_KEY, base_url=server.url) as client:
        yield client


@pytest.fixture
async def acontrol(server: LiveServer) -> AsyncIterator[httpx.AsyncClient]:
    """The sandbox's control API, for async tests."""
    async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
        yield client


@pytest.fixture
def start_sandbox() -> Iterator[Callable[..., LiveServer]]:
    """Start an extra sandbox with its own options; stopped after the test."""
    with ExitStack() as stack:

        def start(**options: Any) -> LiveServer:
            options.setdefault("clock", Clock(START))
            return stack.enter_context(LiveServer(build_app(**options)))

        yield start

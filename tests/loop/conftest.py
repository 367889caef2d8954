"""Fixtures for the service's tests (see loopkit for the stack they build)."""

from __future__ import annotations

import base64
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import standardwebhooks
from dbkit import Billing, kst
from liveserver import LiveServer, free_port
from loopkit import APP_URL, CLIENT_KEY, KEYRING, SECRET_KEY, Receiver, Stack
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from service import db
from service.app import build_app
from service.runtime.cluster import Runtime
from service.sandbox.app import build_app as build_sandbox
from service.settings import Settings


@pytest.fixture
def bl(rt: Runtime, dbname: str) -> Iterator[Billing]:
    b = Billing(rt, dbname)
    yield b
    b.close()


@contextmanager
def _stack(bl: Billing, rt: Runtime, dbname: str, **overrides: Any) -> Iterator[Stack]:
    bl.enable_clock(kst(2028, 1, 10, 10, 0))
    port = free_port()
    token = secrets.token_urlsafe(24)
    with LiveServer(
        build_sandbox(secret_keys=[f"{CLIENT_KEY}:{SECRET_KEY}"], rate_limit=None)
    ) as sandbox:
        settings = Settings(
            database_url=rt.dsn(dbname, "postgres"),  # type: ignore[arg-type]
            toss_secret_key=SECRET_KEY,  # type: ignore[arg-type]
            toss_client_key=CLIENT_KEY,
            toss_api_url=sandbox.url,
            toss_sdk_url=f"{sandbox.url}/v2/standard",
            billing_keyring=KEYRING,  # type: ignore[arg-type]
            doorbell_token=token,  # type: ignore[arg-type]
            public_url=f"http://127.0.0.1:{port}",
            app_url=APP_URL,
            worker_name="svc-test",
            poll_s=3600,  # only the doorbell starts work here
            rate_per_minute=10_000,
            **overrides,
        )
        with LiveServer(build_app(settings), port) as service:
            # The doorbell billing.tick rings through pg_net, pointed at this service.
            db.run_sync(bl.owner, db.ops_configure_doorbell(service.url, token))
            yield Stack(bl, sandbox, service, settings)


@pytest.fixture
def stack(bl: Billing, rt: Runtime, dbname: str) -> Iterator[Stack]:
    with _stack(bl, rt, dbname) as s:
        yield s


@pytest.fixture
def impatient_stack(bl: Billing, rt: Runtime, dbname: str) -> Iterator[Stack]:
    """The stack, with a service that waits only a second for a database connection."""
    with _stack(bl, rt, dbname, db_pool_timeout_s=1.0) as s:
        yield s


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    secret = "whsec_" + base64.b64encode(secrets.token_bytes(24)).decode()
    verifier = standardwebhooks.Webhook(secret)
    box: list[Receiver] = []

    async def hook(request: Request) -> Response:
        body = await request.body()
        try:
            payload = verifier.verify(body, dict(request.headers))
        except standardwebhooks.WebhookVerificationError as exc:
            box[0].refused.append(str(exc))
            return Response(status_code=400)
        box[0].received.append({"id": request.headers["webhook-id"], **payload})
        return Response(status_code=204)

    with LiveServer(Starlette(routes=[Route("/hooks", hook, methods=["POST"])])) as server:
        box.append(Receiver(server, secret))
        yield box[0]


@pytest.fixture
def notify_stack(bl: Billing, rt: Runtime, dbname: str, receiver: Receiver) -> Iterator[Stack]:
    with _stack(
        bl,
        rt,
        dbname,
        notify_url=f"{receiver.server.url}/hooks",
        notify_secret=receiver.secret,
    ) as s:
        yield s

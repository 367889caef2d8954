"""The local Toss Payments sandbox: build the Starlette app, or serve it with uvicorn."""

from __future__ import annotations

import logging
import re
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Literal, TypedDict, Unpack

import httpx
import uvicorn
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response

from service.sandbox import api, control, sdk
from service.sandbox.clock import Clock
from service.sandbox.context import Sandbox, SandboxConfig
from service.sandbox.errors import ApiError, language
from service.sandbox.merchants import (
    DOCS_TEST_MERCHANT,
    TEST_RATE_LIMIT_PER_MINUTE,
    CancelWebhooks,
    parse_merchants,
)


class SandboxOptions(TypedDict, total=False):
    clock: Clock
    secret_keys: Sequence[str] | None
    webhook_url: str | None
    webhook_transport: httpx.AsyncBaseTransport | None
    second_delete: Literal["error", "ok"]
    record_failed_charges: bool
    rate_limit: int | None
    cancel_webhooks: CancelWebhooks
    control_api: bool
    seed: int


def build_app(
    *,
    clock: Clock | None = None,
    secret_keys: Sequence[str] | None = None,
    webhook_url: str | None = None,
    webhook_transport: httpx.AsyncBaseTransport | None = None,
    second_delete: Literal["error", "ok"] = "error",
    record_failed_charges: bool = False,
    rate_limit: int | None = TEST_RATE_LIMIT_PER_MINUTE,
    cancel_webhooks: CancelWebhooks = "status_change",
    control_api: bool = True,
    seed: int = 0,
) -> Starlette:
    """A fresh sandbox with its own in-memory state.

    * ``clock``: defaults to wall time; pass ``Clock(start)`` for a frozen, advanceable one.
    * ``secret_keys``: the merchants, one ``key[:key…]`` spec each (see ``merchants``);
      default: the docs' test merchant. Any other key is 401 UNAUTHORIZED_KEY. Configuring
      a live key switches the control API off.
    * ``webhook_url``: where events go (also settable with ``PUT /_sandbox/webhook``);
      ``webhook_transport`` replaces the network for deliveries (tests).
    * ``second_delete``: a second DELETE of a billing key answers 400
      ALREADY_REMOVED_BILLING_KEY (``"error"``) or 200 again (``"ok"``).
    * ``record_failed_charges``: keep a failed charge as an ABORTED payment with ``failure``,
      findable by orderId (undocumented at Toss; off by default).
    * ``rate_limit``: requests per minute per secret key and API, for test keys (Toss's
      documented 100 by default); beyond it 429 with ``Retry-After``. None turns it off.
    * ``cancel_webhooks``: when a cancel sends PAYMENT_STATUS_CHANGED (undocumented for
      billing): ``"status_change"`` (default, the documented minimum), ``"every_cancel"``
      or ``"none"``.
    * ``control_api``: serve ``/_sandbox``; ``seed``: the fault-injection RNG seed.
    """
    if rate_limit is not None and rate_limit < 1:
        raise ValueError("rate_limit must be a positive number of requests per minute")
    config = SandboxConfig(
        merchants=parse_merchants(secret_keys if secret_keys is not None else [DOCS_TEST_MERCHANT]),
        second_delete=second_delete,
        record_failed_charges=record_failed_charges,
        control_api=control_api,
        rate_limit=rate_limit,
        cancel_webhooks=cancel_webhooks,
    )
    sandbox = Sandbox(
        config,
        clock or Clock(),
        seed=seed,
        webhook_url=webhook_url,
        webhook_transport=webhook_transport,
    )

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await sandbox.start()
        try:
            yield
        finally:
            await sandbox.stop()

    app = Starlette(
        routes=[*api.routes, *sdk.routes, *control.routes],
        exception_handlers={404: _not_found, 405: _not_found},
        lifespan=lifespan,
    )
    app.state.sandbox = sandbox
    return app


async def _not_found(request: Request, exc: Exception) -> Response:
    # Toss answers unknown paths and methods (e.g. the invented
    # /v1/billing/authorizations/{key}/payments) with 404 NOT_FOUND_HTTP_METHOD.
    if isinstance(exc, HTTPException) and exc.status_code not in (404, 405):
        raise exc
    return ApiError("NOT_FOUND_HTTP_METHOD").response(language(request))


# A charge (POST) and a deletion (DELETE) name the billing key in the path.
_BILLING_KEY_IN_PATH = re.compile(r"^(/v1/billing/)(?!authorizations/)[^/?]+")


class MaskBillingKeys(logging.Filter):
    """uvicorn's access log prints each request's path: a billing key in it becomes ``****``.

    The sandbox is Toss's side, but its log is a file on the merchant's machine."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        # uvicorn.access: (client, method, path with query, HTTP version, status)
        if isinstance(args, tuple) and len(args) >= 3 and isinstance(args[2], str):
            masked = _BILLING_KEY_IN_PATH.sub(r"\1****", args[2])
            record.args = (*args[:2], masked, *args[3:])
        return True


def serve(host: str = "127.0.0.1", port: int = 8100, **options: Unpack[SandboxOptions]) -> None:
    """Run the sandbox until interrupted (``saju-billing sandbox --port 8100``)."""
    config = uvicorn.Config(build_app(**options), host=host, port=port, ws="none", log_level="info")
    # After Config: it (re)configures uvicorn's loggers.
    logging.getLogger("uvicorn.access").addFilter(MaskBillingKeys())
    uvicorn.Server(config).run()

"""The sandbox's control API under ``/_sandbox`` (no Toss counterpart).

Refused with 403 FORBIDDEN_REQUEST when a request carries a live secret key, and absent
(404) when the sandbox is configured with a live key or with ``control_api=False``.

The ledger, auth keys and webhooks belong to one merchant: the one whose test secret key the
request carries as Basic credentials (an unknown key is 401), else the first configured one.
Faults, the clock and reset apply to the whole sandbox.

======  ===========================  ======================================================
method  path                         does
======  ===========================  ======================================================
GET     /_sandbox/ledger             every approval and cancel, plus totals
POST    /_sandbox/auth-keys          mint an authKey without a browser: ``{customerKey,
                                     cardNumber?, cardExpirationYear?, cardExpirationMonth?,
                                     customerIdentityNumber?}``
GET     /_sandbox/faults             active faults and how many requests are held
POST    /_sandbox/faults             add a fault (see ``faults``), answers it with its id
DELETE  /_sandbox/faults             remove all faults
POST    /_sandbox/faults/held        ``{count}``: wait (up to 10 s, else 408) until that
                                     many requests are held by ``hold`` faults
POST    /_sandbox/faults/release     let held requests continue
GET     /_sandbox/rate-limit         the merchant's limit per minute (null: off) and the
                                     429s it answered, per API
GET     /_sandbox/clock              the sandbox time
POST    /_sandbox/clock/advance      ``{days?, hours?, minutes?, seconds?}``, then deliver the
                                     webhooks now due; answers the time and those deliveries
PUT     /_sandbox/webhook            ``{url}`` (null turns delivery off) for later events
GET     /_sandbox/webhooks           every event with its delivery attempts
POST    /_sandbox/webhooks/flush     deliver what is due now
POST    /_sandbox/reset              forget all state; ``{seed?}`` reseeds fault RNG
======  ===========================  ======================================================
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from datetime import timedelta

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from service.sandbox.api import basic_secret, json_body
from service.sandbox.cards import DEFAULT_TEST_CARD, CardRejected, register_card
from service.sandbox.clock import toss_time
from service.sandbox.context import Sandbox, sandbox_of
from service.sandbox.errors import ApiError, json_response, language
from service.sandbox.merchants import Merchant
from service.sandbox.sdk import CUSTOMER_KEY

ControlHandler = Callable[[Request, Sandbox, Merchant], Awaitable[object]]


def _merchant(request: Request, sandbox: Sandbox) -> Merchant:
    secret = basic_secret(request)
    if secret is None:
        return sandbox.default
    if secret.startswith("live_"):
        raise ApiError("FORBIDDEN_REQUEST", "라이브 키로는 샌드박스 제어 API를 사용할 수 없습니다.")
    merchant = sandbox.merchant_for_secret(secret)
    if merchant is None:
        raise ApiError("UNAUTHORIZED_KEY")
    return merchant


def _control(handler: ControlHandler) -> Callable[[Request], Awaitable[Response]]:
    async def endpoint(request: Request) -> Response:
        sandbox = sandbox_of(request)
        if sandbox.config.live_mode or not sandbox.config.control_api:
            return ApiError("NOT_FOUND_HTTP_METHOD").response(language(request))
        try:
            merchant = _merchant(request, sandbox)
            return json_response(await handler(request, sandbox, merchant))
        except ApiError as exc:
            return exc.response(language(request))

    endpoint.__name__ = handler.__name__
    return endpoint


async def _ledger(request: Request, sandbox: Sandbox, merchant: Merchant) -> object:
    return merchant.store.ledger()


async def _mint_auth_key(request: Request, sandbox: Sandbox, merchant: Merchant) -> object:
    body = await json_body(request)
    customer_key = body.get("customerKey")
    if not isinstance(customer_key, str) or not CUSTOMER_KEY.fullmatch(customer_key):
        raise ApiError("INVALID_CUSTOMER_KEY")
    now = sandbox.clock.now()
    card_fields = {
        "cardNumber": DEFAULT_TEST_CARD,
        "cardExpirationYear": f"{(now.year + 5) % 100:02d}",
        "cardExpirationMonth": "12",
        "customerIdentityNumber": "900101",
    }
    for key in card_fields:
        value = body.get(key)
        if value is not None:
            if not isinstance(value, str):
                raise ApiError("INVALID_REQUEST", f"{key}은(는) 문자열이어야 합니다.")
            card_fields[key] = value
    try:
        card = register_card(
            card_fields["cardNumber"],
            card_fields["cardExpirationYear"],
            card_fields["cardExpirationMonth"],
            card_fields["customerIdentityNumber"],
            now,
        )
    except CardRejected as exc:
        raise ApiError(exc.code) from None
    auth_key = merchant.store.mint_auth_key(customer_key, card)
    return {"authKey": auth_key, "customerKey": customer_key, "cardNumber": card.masked}


async def _faults(request: Request, sandbox: Sandbox, merchant: Merchant) -> object:
    return sandbox.faults.listing()


async def _add_fault(request: Request, sandbox: Sandbox, merchant: Merchant) -> object:
    return sandbox.faults.add(await json_body(request)).as_json()


async def _clear_faults(request: Request, sandbox: Sandbox, merchant: Merchant) -> object:
    sandbox.faults.clear()
    return {}


async def _wait_held(request: Request, sandbox: Sandbox, merchant: Merchant) -> object:
    count = (await json_body(request)).get("count", 1)
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise ApiError("INVALID_REQUEST", "count must be a positive integer")
    try:
        async with asyncio.timeout(10):
            await sandbox.faults.wait_held(count)
    except TimeoutError:
        raise ApiError("TIMEOUT", "요청이 보류되지 않았습니다.", 408) from None
    return {"held": count}


async def _release(request: Request, sandbox: Sandbox, merchant: Merchant) -> object:
    return {"released": sandbox.faults.release()}


async def _rate_limit(request: Request, sandbox: Sandbox, merchant: Merchant) -> object:
    return merchant.limiter.listing()


async def _clock(request: Request, sandbox: Sandbox, merchant: Merchant) -> object:
    return {"now": toss_time(sandbox.clock.now())}


async def _advance(request: Request, sandbox: Sandbox, merchant: Merchant) -> object:
    body = await json_body(request)
    units = {}
    for unit in ("days", "hours", "minutes", "seconds"):
        value = body.get(unit, 0)
        if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
            raise ApiError("INVALID_REQUEST", f"{unit} must be a non-negative number")
        units[unit] = float(value)
    now = sandbox.clock.advance(timedelta(**units))
    return {"now": toss_time(now), "delivered": await _deliver_due(sandbox)}


async def _deliver_due(sandbox: Sandbox) -> list[object]:
    """Deliver every merchant's due webhooks (the clock is the whole sandbox's)."""
    return [d for m in sandbox.merchants for d in await m.webhooks.deliver_due()]


async def _set_webhook(request: Request, sandbox: Sandbox, merchant: Merchant) -> object:
    url = (await json_body(request)).get("url")
    if url is not None and not isinstance(url, str):
        raise ApiError("INVALID_REQUEST", "url must be a string or null")
    merchant.webhooks.url = url
    return {"url": url}


async def _webhooks(request: Request, sandbox: Sandbox, merchant: Merchant) -> object:
    return {"deliveries": merchant.webhooks.listing()}


async def _flush(request: Request, sandbox: Sandbox, merchant: Merchant) -> object:
    return {"delivered": await _deliver_due(sandbox)}


async def _reset(request: Request, sandbox: Sandbox, merchant: Merchant) -> object:
    seed = (await json_body(request)).get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise ApiError("INVALID_REQUEST", "seed must be an integer")
    sandbox.reset(seed)
    return {}


routes = [
    Route("/_sandbox/ledger", _control(_ledger), methods=["GET"]),
    Route("/_sandbox/auth-keys", _control(_mint_auth_key), methods=["POST"]),
    Route("/_sandbox/faults", _control(_faults), methods=["GET"]),
    Route("/_sandbox/faults", _control(_add_fault), methods=["POST"]),
    Route("/_sandbox/faults", _control(_clear_faults), methods=["DELETE"]),
    Route("/_sandbox/faults/held", _control(_wait_held), methods=["POST"]),
    Route("/_sandbox/faults/release", _control(_release), methods=["POST"]),
    Route("/_sandbox/rate-limit", _control(_rate_limit), methods=["GET"]),
    Route("/_sandbox/clock", _control(_clock), methods=["GET"]),
    Route("/_sandbox/clock/advance", _control(_advance), methods=["POST"]),
    Route("/_sandbox/webhook", _control(_set_webhook), methods=["PUT"]),
    Route("/_sandbox/webhooks", _control(_webhooks), methods=["GET"]),
    Route("/_sandbox/webhooks/flush", _control(_flush), methods=["POST"]),
    Route("/_sandbox/reset", _control(_reset), methods=["POST"]),
]

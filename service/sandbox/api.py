"""The Toss API routes: authentication, request validation, idempotency, faults, test codes.

Every API request goes through :func:`_serve`:

1. Basic auth: the secret key picks the merchant whose data the request sees; a key of no
   configured merchant is 401 UNAUTHORIZED_KEY; widget keys on billing routes: 400
   INVALID_API_KEY;
2. the rate limit per secret key and API (429 ``TOO_MANY_REQUESTS`` with ``Retry-After``),
   then injected ``error`` faults (both answered at once, never stored under a key);
3. for POST with an Idempotency-Key: replay the stored first response, or 409 while the first
   request is in flight, or 400 INVALID_IDEMPOTENCY_KEY over 300 characters;
4. processing: ``latency``/``hold`` faults, then ``processed_error`` faults and
   ``TossPayments-Test-Code`` (test keys only), then the handler; the response is stored under
   the key;
5. ``latency_after_commit`` / ``drop_after_commit`` faults on the way out.

Messages follow ``Accept-Language`` (``en-US``: English).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import math
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from service.sandbox.cards import CardRejected, register_card
from service.sandbox.context import Sandbox, sandbox_of
from service.sandbox.errors import TOO_MANY_REQUESTS, ApiError, Language, json_bytes, language
from service.sandbox.faults import FaultKind
from service.sandbox.idempotency import (
    IN_FLIGHT,
    MAX_KEY_LENGTH,
    Slot,
    StoredResponse,
    secret_digest,
)
from service.sandbox.merchants import Merchant
from service.sandbox.store import ChargeRequest, Json
from service.toss import KST

_ORDER_ID = re.compile(r"[A-Za-z0-9_=-]{6,64}")
_EMAIL = re.compile(r"[^@\s]+@[^@\s]+\.[^@\s]+")
# Answers that mean "not processed": never stored under an Idempotency-Key.
_NOT_PROCESSED = frozenset({409, 429})

Body = dict[str, object]
Result = Json | list[Json] | None


@dataclass(frozen=True, slots=True)
class Caller:
    merchant: Merchant
    secret_digest: str
    live: bool
    widget: bool


Handler = Callable[[Request, Caller], Awaitable[Result]]


def basic_secret(request: Request) -> str | None:
    """The secret key of the request's Basic credentials; None without an Authorization header.

    ApiError for credentials that are not Basic ``base64(key + ":")``.
    """
    header = request.headers.get("Authorization")
    if header is None:
        return None
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "basic" or not token:
        raise ApiError("UNAUTHORIZED_KEY")
    try:
        decoded = base64.b64decode(token.strip(), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        raise ApiError("UNAUTHORIZED_KEY") from None
    secret, colon, _ = decoded.partition(":")
    if not colon:
        raise ApiError("INCORRECT_BASIC_AUTH_FORMAT")
    return secret


def authenticate(request: Request, sandbox: Sandbox) -> Caller:
    secret = basic_secret(request)
    merchant = sandbox.merchant_for_secret(secret) if secret else None
    if secret is None or merchant is None:
        raise ApiError("UNAUTHORIZED_KEY")
    return Caller(merchant, secret_digest(secret), merchant.keys.live, "_gsk_" in secret)


# --------------------------------------------------------------------------- pipeline


async def _serve(request: Request, endpoint: str, handler: Handler, *, billing: bool) -> Response:
    sandbox = sandbox_of(request)
    lang = language(request)
    # Receive the whole request first (Starlette caches it): processing must not depend on
    # the client still being connected, as at Toss.
    await request.body()
    try:
        caller = authenticate(request, sandbox)
        if billing and caller.widget:
            # Billing needs the API-individual keys; the exact code Toss uses is unconfirmed.
            raise ApiError("INVALID_API_KEY")
    except ApiError as exc:
        return exc.response(lang)
    wait = caller.merchant.limiter.admit(caller.secret_digest, endpoint)
    if wait is not None:
        code, message = TOO_MANY_REQUESTS
        return ApiError(code, message, 429).response(lang, _retry_after(wait))
    if error := sandbox.faults.fire(endpoint, FaultKind.ERROR):
        headers = _retry_after(error.seconds) if error.status == 429 else None
        return error.error().response(lang, headers)

    idempotency = caller.merchant.idempotency
    key = request.headers.get("Idempotency-Key") if request.method == "POST" else None
    slot: Slot | None = None
    if key:
        if len(key) > MAX_KEY_LENGTH:
            return ApiError("INVALID_IDEMPOTENCY_KEY").response(lang)
        slot = Slot(key, caller.secret_digest, request.url.path, request.method)
        previous = idempotency.begin(slot)
        if previous is IN_FLIGHT:
            return ApiError("IDEMPOTENT_REQUEST_PROCESSING").response(lang)
        if isinstance(previous, StoredResponse):
            return _response(previous, key)

    try:
        result = await _process(request, caller, endpoint, handler, lang)
    except BaseException:
        if slot is not None:
            idempotency.finish(slot, None)
        raise
    if slot is not None:
        idempotency.finish(slot, None if result.status in _NOT_PROCESSED else result)

    if slow := sandbox.faults.fire(endpoint, FaultKind.LATENCY_AFTER_COMMIT):
        await asyncio.sleep(slow.seconds)
    if sandbox.faults.fire(endpoint, FaultKind.DROP_AFTER_COMMIT):
        return _DroppedResponse(result.body, result.status)
    return _response(result, key)


async def _process(
    request: Request, caller: Caller, endpoint: str, handler: Handler, lang: Language
) -> StoredResponse:
    sandbox = sandbox_of(request)
    if slow := sandbox.faults.fire(endpoint, FaultKind.LATENCY):
        await asyncio.sleep(slow.seconds)
    if sandbox.faults.fire(endpoint, FaultKind.HOLD):
        await sandbox.faults.hold()
    try:
        if failed := sandbox.faults.fire(endpoint, FaultKind.PROCESSED_ERROR):
            raise failed.error()
        test_code = request.headers.get("TossPayments-Test-Code")
        # Test codes only work with test keys; live keys ignore the header.
        if test_code and not caller.live and request.method == "POST":
            raise ApiError(test_code)
        result = await handler(request, caller)
    except ApiError as exc:
        return StoredResponse(exc.status, json_bytes(exc.body(lang)), "application/json")
    if result is None:
        return StoredResponse(200, b"", "")
    return StoredResponse(200, json_bytes(result), "application/json")


def _retry_after(seconds: float) -> dict[str, str]:
    # Whole seconds (RFC 9110 delta-seconds), never 0: "retry now" would just hit it again.
    return {"Retry-After": str(max(1, math.ceil(seconds)))}


def _response(stored: StoredResponse, idempotency_key: str | None) -> Response:
    headers = {"Idempotency-Key": idempotency_key} if idempotency_key else None
    return Response(
        stored.body,
        status_code=stored.status,
        media_type=stored.media_type or None,
        headers=headers,
    )


class _DroppedResponse(Response):
    """Starts the response, then ends the exchange without the body.

    Under uvicorn the connection is closed, so the client sees a transport error although the
    request was processed: the "committed, response lost" case.
    """

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send(
            {
                "type": "http.response.start",
                "status": self.status_code,
                "headers": self.raw_headers,
            }
        )


# --------------------------------------------------------------------------- validation


async def json_body(request: Request) -> Body:
    raw = await request.body()
    if not raw.strip():
        return {}
    try:
        body = json.loads(raw)
    except ValueError:
        raise ApiError("INVALID_REQUEST", "요청 본문이 올바른 JSON이 아닙니다.") from None
    if not isinstance(body, dict):
        raise ApiError("INVALID_REQUEST")
    return body


def _require(body: Body, *keys: str) -> None:
    for key in keys:
        if body.get(key) is None:
            raise ApiError("INVALID_REQUIRED_PARAM", f"필수 파라미터 {key}이(가) 누락되었습니다.")


def _text(body: Body, key: str, *, max_length: int | None = None) -> str | None:
    value = body.get(key)
    if value is None:
        return None
    if not isinstance(value, str):
        raise ApiError("INVALID_REQUEST", f"{key}은(는) 문자열이어야 합니다.")
    if max_length is not None and len(value) > max_length:
        raise ApiError("INVALID_REQUEST", f"{key}은(는) {max_length}자 이하여야 합니다.")
    return value


def _amount(body: Body, key: str) -> int | None:
    value = body.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ApiError("INVALID_REQUEST", f"{key}은(는) 숫자여야 합니다.")
    if isinstance(value, float) and not value.is_integer():
        raise ApiError("INVALID_REQUEST", f"{key}은(는) 원 단위 정수여야 합니다.")
    return int(value)


def _customer_key(body: Body) -> str:
    value = _text(body, "customerKey")
    assert value is not None  # callers _require it first
    if len(value) > 300:
        # Measured on Toss's test API: over 300 characters fails in its database.
        raise ApiError("FAILED_DB_PROCESSING")
    if len(value) < 2:
        raise ApiError("INVALID_CUSTOMER_KEY")
    # The documented charset is not enforced by the real API (measured), so not here either.
    return value


def _email(body: Body) -> None:
    email = _text(body, "customerEmail")
    if email is not None and (len(email) > 100 or not _EMAIL.fullmatch(email)):
        raise ApiError("INVALID_EMAIL")


def _non_negative(body: Body, key: str, upper: int) -> int:
    value = _amount(body, key) or 0
    if not 0 <= value <= upper:
        raise ApiError("INVALID_REQUEST", f"{key} 값이 올바르지 않습니다.")
    return value


# --------------------------------------------------------------------------- handlers


async def _issue(request: Request, caller: Caller) -> Result:
    body = await json_body(request)
    _require(body, "authKey", "customerKey")
    auth_key = _text(body, "authKey", max_length=300)
    assert auth_key is not None
    return caller.merchant.store.issue_from_auth_key(auth_key, _customer_key(body))


async def _issue_by_card(request: Request, caller: Caller) -> Result:
    sandbox = sandbox_of(request)
    body = await json_body(request)
    fields = (
        "customerKey",
        "cardNumber",
        "cardExpirationYear",
        "cardExpirationMonth",
        "customerIdentityNumber",
    )
    _require(body, *fields)
    customer_key = _customer_key(body)
    number, year, month, identity = (_text(body, f) or "" for f in fields[1:])
    _text(body, "customerName", max_length=100)
    _email(body)
    try:
        card = register_card(number, year, month, identity, sandbox.clock.now())
    except CardRejected as exc:
        raise ApiError(exc.code) from None
    return caller.merchant.store.issue_from_card(customer_key, card)


async def _charge(request: Request, caller: Caller) -> Result:
    body = await json_body(request)
    _require(body, "customerKey", "amount", "orderId", "orderName")
    order_id = _text(body, "orderId") or ""
    if not _ORDER_ID.fullmatch(order_id):
        raise ApiError("INVALID_ORDER_ID")
    order_name = _text(body, "orderName") or ""
    if not 1 <= len(order_name) <= 100:
        raise ApiError("INVALID_ORDER_NAME")
    amount = _amount(body, "amount") or 0
    if amount <= 0:
        raise ApiError("BELOW_ZERO_AMOUNT")
    if amount < 100:
        raise ApiError("BELOW_MINIMUM_AMOUNT")
    customer_key = _customer_key(body)
    _email(body)
    _text(body, "customerName", max_length=100)
    _text(body, "customerIp")
    charge = ChargeRequest(
        customer_key=customer_key,
        amount=amount,
        order_id=order_id,
        order_name=order_name,
        tax_free_amount=_non_negative(body, "taxFreeAmount", amount),
        tax_exemption_amount=_non_negative(body, "taxExemptionAmount", amount),
    )
    return caller.merchant.store.charge(request.path_params["billingKey"], charge)


async def _delete(request: Request, caller: Caller) -> Result:
    caller.merchant.store.delete_billing_key(request.path_params["billingKey"])
    return None


async def _cancel(request: Request, caller: Caller) -> Result:
    body = await json_body(request)
    _require(body, "cancelReason")
    reason = _text(body, "cancelReason", max_length=200) or ""
    amount = _amount(body, "cancelAmount")
    if amount is not None and amount <= 0:
        raise ApiError("INVALID_REQUEST", "cancelAmount는 0보다 커야 합니다.")
    refundable = _amount(body, "refundableAmount")
    tax_free = _amount(body, "taxFreeAmount") or 0
    if tax_free < 0:
        raise ApiError("INVALID_REQUEST", "taxFreeAmount 값이 올바르지 않습니다.")
    # "must equal the approved currency" (§5); every sandbox payment is KRW. The code Toss
    # answers a mismatch with is undocumented.
    currency = _text(body, "currency")
    if currency is not None and currency != "KRW":
        raise ApiError("INVALID_REQUEST", "취소 통화가 결제 통화와 일치하지 않습니다.")
    return caller.merchant.store.cancel(
        request.path_params["paymentKey"], reason, amount, refundable, tax_free
    )


async def _get_payment(request: Request, caller: Caller) -> Result:
    return caller.merchant.store.payment(request.path_params["paymentKey"])


async def _get_payment_by_order(request: Request, caller: Caller) -> Result:
    return caller.merchant.store.payment_by_order(request.path_params["orderId"])


def _query_time(request: Request, key: str) -> datetime:
    value = request.query_params.get(key)
    if not value:
        raise ApiError("INVALID_REQUIRED_PARAM", f"필수 파라미터 {key}이(가) 누락되었습니다.")
    for pattern in ("%Y-%m-%dT%H:%M:%S", "%Y-%m-%d"):
        try:
            return datetime.strptime(value, pattern).replace(tzinfo=KST)
        except ValueError:
            continue
    raise ApiError("INVALID_REQUEST", f"{key}는 yyyy-MM-dd'T'HH:mm:ss 형식이어야 합니다.")


async def _transactions(request: Request, caller: Caller) -> Result:
    start, end = _query_time(request, "startDate"), _query_time(request, "endDate")
    raw_limit = request.query_params.get("limit", "100")
    if not raw_limit.isdigit() or not 1 <= int(raw_limit) <= 5000:
        raise ApiError("INVALID_REQUEST", "limit는 1 이상 5000 이하여야 합니다.")
    starting_after = request.query_params.get("startingAfter") or None
    return caller.merchant.store.transactions(start, end, starting_after, int(raw_limit))


def _endpoint(
    name: str, handler: Handler, *, billing: bool
) -> Callable[[Request], Awaitable[Response]]:
    async def endpoint(request: Request) -> Response:
        return await _serve(request, name, handler, billing=billing)

    endpoint.__name__ = name
    return endpoint


routes = [
    Route(
        "/v1/billing/authorizations/issue",
        _endpoint("issue_billing_key", _issue, billing=True),
        methods=["POST"],
    ),
    Route(
        "/v1/billing/authorizations/card",
        _endpoint("issue_billing_key_by_card", _issue_by_card, billing=True),
        methods=["POST"],
    ),
    Route(
        "/v1/billing/{billingKey}",
        _endpoint("charge", _charge, billing=True),
        methods=["POST"],
    ),
    Route(
        "/v1/billing/{billingKey}",
        _endpoint("delete_billing_key", _delete, billing=True),
        methods=["DELETE"],
    ),
    Route(
        "/v1/payments/orders/{orderId}",
        _endpoint("get_payment_by_order", _get_payment_by_order, billing=False),
        methods=["GET"],
    ),
    Route(
        "/v1/payments/{paymentKey}",
        _endpoint("get_payment", _get_payment, billing=False),
        methods=["GET"],
    ),
    Route(
        "/v1/payments/{paymentKey}/cancel",
        _endpoint("cancel", _cancel, billing=False),
        methods=["POST"],
    ),
    Route(
        "/v1/transactions",
        _endpoint("list_transactions", _transactions, billing=False),
        methods=["GET"],
    ),
]

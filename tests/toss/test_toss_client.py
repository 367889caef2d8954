"""service.toss.TossClient against the sandbox, and against httpx.MockTransport for the wire."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, timedelta

import anyio
import httpx
import pytest
from sandbox_harness import (
    CUSTOMER_KEY,
    GOOD_CARD,
    SECRET_KEY,
    START,
    LiveServer,
    basic,
)

from service.toss import (
    ERROR_CODES,
    Billing,
    FailureClass,
    Operation,
    Payment,
    SecretKey,
    TossChargeFailed,
    TossClient,
    TossError,
    TossMalformedResponse,
    TossOutcomeUnknown,
    TossReplyMismatch,
    classify,
    parse_time,
)
from service.toss_errors import parse_retry_after

pytestmark = pytest.mark.anyio


async def _billing_key(toss: TossClient, acontrol: httpx.AsyncClient, card: str = GOOD_CARD) -> str:
    body = {"customerKey": CUSTOMER_KEY, "cardNumber": card}
    auth_key = (await acontrol.post("/_sandbox/auth-keys", json=body)).json()["authKey"]
    billing = await toss.issue_billing_key(
        auth_key, CUSTOMER_KEY, idempotency_key=f"reg-{auth_key}"
    )
    return billing.billing_key


async def _charge(
    toss: TossClient, billing_key: str, order_id: str, amount: int = 4900, key: str | None = None
) -> Payment:
    return await toss.charge(
        billing_key,
        CUSTOMER_KEY,
        amount,
        order_id,
        "사주맛피아 Pro 1개월",
        idempotency_key=key or f"idem-{order_id}",
    )


async def _error(call: Awaitable[object]) -> TossError:
    with pytest.raises(TossError) as info:
        await call
    return info.value


# --------------------------------------------------------------------------- happy path


async def test_billing_lifecycle(toss: TossClient, acontrol: httpx.AsyncClient) -> None:
    minted = await acontrol.post("/_sandbox/auth-keys", json={"customerKey": CUSTOMER_KEY})
    billing = await toss.issue_billing_key(
        minted.json()["authKey"], CUSTOMER_KEY, idempotency_key="reg-life"
    )
    assert isinstance(billing, Billing)
    assert billing.customer_key == CUSTOMER_KEY
    assert billing.method == "카드"
    assert billing.authenticated_at == START
    assert billing.card is not None
    assert billing.card.number == "94100012****789*"

    payment = await _charge(toss, billing.billing_key, "order-life-1", 10000)
    assert (payment.status, payment.type, payment.method) == ("DONE", "BILLING", "카드")
    assert (payment.total_amount, payment.balance_amount) == (10000, 10000)
    assert (payment.supplied_amount, payment.vat) == (9091, 909)
    assert payment.approved_at == START
    assert payment.approved_at.utcoffset() == timedelta(hours=9)
    assert payment.card is not None
    assert payment.card.acquire_status == "READY"
    assert payment.secret is not None
    assert payment.secret.startswith("ps_")
    assert payment.receipt is not None
    assert payment.cancels == ()
    assert payment.is_partial_cancelable
    assert await toss.get_payment(payment.payment_key) == payment
    assert await toss.get_payment_by_order("order-life-1") == payment

    partial = await toss.cancel(payment.payment_key, "부분 환불", 4000, idempotency_key="r-1")
    assert (partial.status, partial.balance_amount) == ("PARTIAL_CANCELED", 6000)
    assert [c.cancel_amount for c in partial.cancels] == [4000]
    rest = await toss.cancel(
        payment.payment_key, "나머지 환불", idempotency_key="r-2", refundable_amount=6000
    )
    assert (rest.status, rest.balance_amount) == ("PARTIAL_CANCELED", 0)
    assert rest.last_transaction_key == rest.cancels[-1].transaction_key

    await toss.delete_billing_key(billing.billing_key)
    error = await _error(_charge(toss, billing.billing_key, "order-life-2"))
    assert (error.code, error.error_class) == (
        "ALREADY_REMOVED_BILLING_KEY",
        FailureClass.NEEDS_NEW_CARD,
    )


async def test_lookups_of_missing_payments(toss: TossClient) -> None:
    assert await toss.get_payment_by_order("order-never") is None
    error = await _error(toss.get_payment("tviva20250301100000zzzzz"))
    assert (error.code, error.http_status) == ("NOT_FOUND_PAYMENT", 404)
    assert error.operation is Operation.GET_PAYMENT


async def test_list_transactions_pages_through_everything(
    toss: TossClient, acontrol: httpx.AsyncClient
) -> None:
    billing_key = await _billing_key(toss, acontrol)
    for i in range(5):
        await _charge(toss, billing_key, f"order-page-{i}")
        await acontrol.post("/_sandbox/clock/advance", json={"minutes": 10})
    start_utc = START.astimezone(UTC)  # any offset works; the client sends Korea time
    rows = [
        t
        async for t in toss.list_transactions(
            start_utc, start_utc + timedelta(hours=1), page_size=2
        )
    ]
    assert [t.order_id for t in rows] == [f"order-page-{i}" for i in range(5)]
    assert [t.transaction_at - START for t in rows] == [timedelta(minutes=10 * i) for i in range(5)]
    assert {t.customer_key for t in rows} == {CUSTOMER_KEY}
    assert all(t.amount == 4900 and t.status == "DONE" for t in rows)
    narrow = [t async for t in toss.list_transactions(START, START + timedelta(minutes=15))]
    assert [t.order_id for t in narrow] == ["order-page-0", "order-page-1"]


# --------------------------------------------------------------------------- classification


@pytest.mark.parametrize(
    ("card", "code", "status", "error_class"),
    [
        ("4000000001000000", "REJECT_CARD_PAYMENT", 403, FailureClass.DECLINE),
        ("4000000003000000", "EXCEED_MAX_DAILY_PAYMENT_COUNT", 400, FailureClass.DECLINE),
        ("4000000002000000", "INVALID_STOPPED_CARD", 400, FailureClass.NEEDS_NEW_CARD),
        ("4330121234567890", "NOT_SUPPORTED_CARD_TYPE", 400, FailureClass.NEEDS_NEW_CARD),
        ("4000000006000000", "FAILED_CARD_COMPANY_RESPONSE", 500, FailureClass.TRANSIENT),
    ],
)
async def test_card_failures_are_classified(
    toss: TossClient,
    acontrol: httpx.AsyncClient,
    card: str,
    code: str,
    status: int,
    error_class: FailureClass,
) -> None:
    billing_key = await _billing_key(toss, acontrol, card)
    error = await _error(_charge(toss, billing_key, "order-class-1"))
    assert (error.code, error.http_status, error.error_class) == (code, status, error_class)
    assert error.message == ERROR_CODES[code].message


@pytest.mark.parametrize(
    ("endpoint", "code", "status", "error_class"),
    [
        ("charge", "PROVIDER_ERROR", 400, FailureClass.TRANSIENT),
        ("charge", "IDEMPOTENT_REQUEST_PROCESSING", 409, FailureClass.UNPROCESSED),
        ("charge", "TOO_MANY_REQUESTS", 429, FailureClass.UNPROCESSED),
        ("charge", "FORBIDDEN_CONSECUTIVE_REQUEST", 403, FailureClass.TRANSIENT),
        ("charge", "DUPLICATED_ORDER_ID", 400, FailureClass.RECONCILE),
        ("charge", "ALREADY_PROCESSED_PAYMENT", 400, FailureClass.RECONCILE),
        ("charge", "COMMON_ERROR", 500, FailureClass.TRANSIENT),
        ("charge", "BRAND_NEW_SERVER_CODE", 502, FailureClass.TRANSIENT),
        ("charge", "UNAUTHORIZED_KEY", 401, FailureClass.BUG),
        ("charge", "INVALID_IDEMPOTENCY_KEY", 400, FailureClass.BUG),
        ("charge", "BRAND_NEW_CLIENT_CODE", 400, FailureClass.BUG),
        ("charge", "EXCEED_MAX_AMOUNT", 400, FailureClass.DECLINE),
        ("charge", "INVALID_CARD_EXPIRATION", 400, FailureClass.NEEDS_NEW_CARD),
        ("get_payment", "COMMON_ERROR", 500, FailureClass.TRANSIENT),
        ("get_payment", "BRAND_NEW_SERVER_CODE", 503, FailureClass.TRANSIENT),
        ("get_payment", "FAILED_DB_PROCESSING", 500, FailureClass.TRANSIENT),
    ],
)
async def test_error_responses_are_classified(
    toss: TossClient,
    acontrol: httpx.AsyncClient,
    endpoint: str,
    code: str,
    status: int,
    error_class: FailureClass,
) -> None:
    billing_key = await _billing_key(toss, acontrol)
    fault = {"endpoint": endpoint, "kind": "error", "count": 1, "code": code, "status": status}
    await acontrol.post("/_sandbox/faults", json=fault)
    if endpoint == "charge":
        error = await _error(_charge(toss, billing_key, "order-fault-1"))
    else:
        error = await _error(toss.get_payment("tviva20250301100000aaaaa"))
    assert (error.code, error.http_status, error.error_class) == (code, status, error_class)
    # Only what Toss did not process may be re-sent under the same Idempotency-Key.
    assert error.retry_same_request is (error_class is FailureClass.UNPROCESSED)


async def test_server_errors_on_cancel_are_transient(
    toss: TossClient, acontrol: httpx.AsyncClient
) -> None:
    payment = await _charge(toss, await _billing_key(toss, acontrol), "order-cancel-500")
    await acontrol.post(
        "/_sandbox/faults",
        json={"endpoint": "cancel", "kind": "error", "count": 1, "code": "FAILED_REFUND_PROCESS"},
    )
    error = await _error(toss.cancel(payment.payment_key, "환불", idempotency_key="c-500"))
    assert (error.code, error.error_class) == ("FAILED_REFUND_PROCESS", FailureClass.TRANSIENT)
    assert not error.retry_same_request


async def test_real_rule_violations_are_classified(
    toss: TossClient, acontrol: httpx.AsyncClient
) -> None:
    billing_key = await _billing_key(toss, acontrol)
    await _charge(toss, billing_key, "order-real-1")
    duplicate = await _error(_charge(toss, billing_key, "order-real-1", key="another-key"))
    assert (duplicate.code, duplicate.error_class) == (
        "DUPLICATED_ORDER_ID",
        FailureClass.RECONCILE,
    )
    bad_order = await _error(_charge(toss, billing_key, "short"))
    assert (bad_order.code, bad_order.error_class) == ("INVALID_ORDER_ID", FailureClass.BUG)
    long_customer = await _error(
        toss.charge(billing_key, "c" * 301, 4900, "order-real-2", "Pro", idempotency_key="k")
    )
    assert (long_customer.code, long_customer.http_status) == ("FAILED_DB_PROCESSING", 500)
    assert long_customer.error_class is FailureClass.TRANSIENT  # every 5xx


async def test_unknown_secret_key_is_a_config_error(
    start_sandbox: Callable[..., LiveServer],
) -> None:
    server = start_sandbox(secret_keys=["test_sk_" + "C" * 28])
    async with TossClient(SECRET_KEY, base_url=server.url) as toss:
        error = await _error(toss.get_payment("tviva20250301100000aaaaa"))
    assert (error.code, error.http_status) == ("UNAUTHORIZED_KEY", 401)
    assert error.error_class is FailureClass.BUG


def test_failure_class_is_the_sql_enum() -> None:
    # The labels and order of billing.failure_class; one name on both sides.
    assert [c.value for c in FailureClass] == [
        "unprocessed",
        "transient",
        "decline",
        "needs_new_card",
        "reconcile",
        "bug",
    ]


def test_code_table_and_status_rules() -> None:
    for code, spec in ERROR_CODES.items():
        assert classify(code, spec.http_status) is spec.error_class, code
        assert classify(code) is spec.error_class, code
        # Every 5xx of the table is transient, every 429 unprocessed.
        if spec.http_status >= 500:
            assert spec.error_class is FailureClass.TRANSIENT, code
    unprocessed = {c for c, s in ERROR_CODES.items() if s.error_class is FailureClass.UNPROCESSED}
    assert unprocessed == {"IDEMPOTENT_REQUEST_PROCESSING"}
    assert classify("FAILED_DB_PROCESSING", 500) is FailureClass.TRANSIENT
    assert classify("REJECT_CARD_PAYMENT", 429) is FailureClass.UNPROCESSED
    assert classify("NEVER_SEEN", 418) is FailureClass.BUG
    assert classify("NEVER_SEEN", 500) is FailureClass.TRANSIENT
    assert classify("NEVER_SEEN") == "bug"
    assert classify("REJECT_CARD_PAYMENT") == "decline"
    assert classify("PROVIDER_ERROR") == "transient"
    assert classify("DUPLICATED_ORDER_ID", 400) == "reconcile"
    assert ERROR_CODES["REJECT_CARD_PAYMENT"].http_status == 403
    assert ERROR_CODES["UNAUTHORIZED_KEY"].http_status == 401


# --------------------------------------------------------------------------- unknown outcome


@pytest.mark.parametrize("kind", ["drop_after_commit", "latency_after_commit"])
async def test_lost_response_is_unknown_then_reconciled(
    server: LiveServer, toss: TossClient, acontrol: httpx.AsyncClient, kind: str
) -> None:
    billing_key = await _billing_key(toss, acontrol)
    await acontrol.post(
        "/_sandbox/faults", json={"endpoint": "charge", "kind": kind, "count": 1, "seconds": 2}
    )
    async with TossClient(SECRET_KEY, base_url=server.url, timeout=0.5) as impatient:
        with pytest.raises(TossOutcomeUnknown) as info:
            await _charge(impatient, billing_key, "order-lost-1", key="k-lost")
    assert not isinstance(info.value, TossError)
    assert info.value.operation is Operation.CHARGE

    found = await toss.get_payment_by_order("order-lost-1")
    assert found is not None
    assert found.status == "DONE"
    resent = await _charge(toss, billing_key, "order-lost-1", key="k-lost")
    assert resent == found
    ledger = (await acontrol.get("/_sandbox/ledger")).json()
    assert [e["orderId"] for e in ledger["entries"]] == ["order-lost-1"]


async def test_in_flight_duplicate_is_transient(
    server: LiveServer, toss: TossClient, acontrol: httpx.AsyncClient
) -> None:
    billing_key = await _billing_key(toss, acontrol)
    await acontrol.post("/_sandbox/faults", json={"endpoint": "charge", "kind": "hold", "count": 1})
    results: list[Payment] = []

    async def first() -> None:
        results.append(await _charge(toss, billing_key, "order-hold-1", key="k-hold"))

    async with anyio.create_task_group() as tg:
        tg.start_soon(first)
        assert (await acontrol.post("/_sandbox/faults/held", json={"count": 1})).is_success
        error = await _error(_charge(toss, billing_key, "order-hold-1", key="k-hold"))
        assert (error.http_status, error.error_class) == (409, FailureClass.UNPROCESSED)
        assert error.retry_same_request
        await acontrol.post("/_sandbox/faults/release")
    assert await _charge(toss, billing_key, "order-hold-1", key="k-hold") == results[0]


# --------------------------------------------------------------------------- wire format


def _mock(handler: Callable[[httpx.Request], httpx.Response]) -> TossClient:
    http = httpx.AsyncClient(transport=httpx.MockTransport(handler))
    return TossClient(SecretKey(SECRET_KEY), base_url="https://toss.test", http=http)


PAYMENT_BODY = {
    "paymentKey": "tviva20250301100000abcde",
    "orderId": "order-wire-1",
    "orderName": "Pro",
    "status": "DONE",
    "type": "BILLING",
    "method": "카드",
    "mId": "tvivarepublica",
    "currency": "KRW",
    "totalAmount": 4900.0,
    "balanceAmount": 4900,
    "suppliedAmount": 4455,
    "vat": 445,
    "requestedAt": "2025-03-01T10:00:00+09:00",
    "approvedAt": "2025-03-01T10:00:01+09:00",
    "cancels": None,
    "brandNewField": {"nested": [1, 2, 3]},
}


BILLING_BODY = {
    "mId": "tvivarepublica",
    "customerKey": CUSTOMER_KEY,
    "authenticatedAt": "2025-03-01T10:00:00+09:00",
    "method": "카드",
    "billingKey": "Z_t5vOvQxrj4499PeiJcjen28-V2RyqgYTwN44Rdzk0=",
    "card": None,
}


CANCELED_BODY = {
    **PAYMENT_BODY,
    "status": "CANCELED",
    "balanceAmount": 0,
    "cancels": [
        {
            "transactionKey": "txrd_a01cancel",
            "cancelAmount": 4900,
            "canceledAt": "2025-03-01T11:00:00+09:00",
        }
    ],
}


async def test_request_shape() -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json=PAYMENT_BODY)

    async with _mock(handler) as toss:
        payment = await toss.charge(
            "Z_t5vOvQxrj4499PeiJcjen28-V2RyqgYTwN44Rdzk0=",
            CUSTOMER_KEY,
            4900,
            "order-wire-1",
            "Pro",
            customer_email="user@example.com",
            idempotency_key="attempt-7f3e",
        )
        await toss.get_payment("tviva20250301100000abcde")
    charge, lookup = seen
    assert charge.method == "POST"
    assert charge.url.raw_path == b"/v1/billing/Z_t5vOvQxrj4499PeiJcjen28-V2RyqgYTwN44Rdzk0%3D"
    expected_auth = "Basic " + base64.b64encode(f"{SECRET_KEY}:".encode()).decode()
    assert charge.headers["authorization"] == expected_auth
    assert charge.headers["idempotency-key"] == "attempt-7f3e"
    assert json.loads(charge.content) == {
        "customerKey": CUSTOMER_KEY,
        "amount": 4900,
        "orderId": "order-wire-1",
        "orderName": "Pro",
        "customerEmail": "user@example.com",
    }
    assert charge.extensions["timeout"]["read"] >= 60
    assert "idempotency-key" not in lookup.headers
    assert lookup.extensions["timeout"]["read"] == 30
    assert payment.total_amount == 4900
    assert isinstance(payment.total_amount, int)
    assert payment.approved_at == START + timedelta(seconds=1)


async def test_slow_calls_get_at_least_60_seconds() -> None:
    # §3/§6: charge and transactions can take up to 60 s; issue and cancel move money or keys.
    seen: dict[str, httpx.Request] = {}

    def handler(request: httpx.Request) -> httpx.Response:
        seen[f"{request.method} {request.url.path}"] = request
        if request.url.path == "/v1/transactions":
            return httpx.Response(200, json=[])
        if request.method == "DELETE":
            return httpx.Response(200)
        if request.url.path.endswith("/issue"):
            return httpx.Response(200, json={**BILLING_BODY})
        if request.url.path.endswith("/cancel"):
            return httpx.Response(200, json=CANCELED_BODY)
        return httpx.Response(200, json=PAYMENT_BODY)

    async with _mock(handler) as toss:
        await toss.issue_billing_key("bln_x", CUSTOMER_KEY, idempotency_key="reg-1")
        await toss.cancel("tviva20250301100000abcde", "환불", idempotency_key="k")
        assert [t async for t in toss.list_transactions(START, START)] == []
        await toss.get_payment_by_order("order-wire-1")
        assert await toss.delete_billing_key("bk") is None
    read = {name: request.extensions["timeout"]["read"] for name, request in seen.items()}
    assert read == {
        "POST /v1/billing/authorizations/issue": 60,
        "POST /v1/payments/tviva20250301100000abcde/cancel": 60,
        "GET /v1/transactions": 60,
        "GET /v1/payments/orders/order-wire-1": 30,
        "DELETE /v1/billing/bk": 30,
    }
    assert seen["GET /v1/transactions"].url.params["limit"] == "100"
    assert seen["POST /v1/billing/authorizations/issue"].headers["idempotency-key"] == "reg-1"
    assert "idempotency-key" not in seen["DELETE /v1/billing/bk"].headers


async def test_v2_error_envelope_is_read() -> None:
    # §9a: newer resource APIs wrap the error; the client reads either shape.
    body = {
        "version": "2022-11-16",
        "traceId": "t-1",
        "error": {"code": "COMMON_ERROR", "message": "일시적인 오류"},
    }
    async with _mock(lambda request: httpx.Response(500, json=body)) as toss:
        error = await _error(toss.get_payment("pk"))
    assert (error.code, error.message, error.http_status) == ("COMMON_ERROR", "일시적인 오류", 500)
    assert error.error_class is FailureClass.TRANSIENT


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        # §10: webhook createdAt has no offset (Korea time); a real one had 5 digits.
        ("2026-01-02T14:46:59.65327", (2026, 1, 2, 14, 46, 59, 653270)),
        ("2025-03-01T10:00:30.000000", (2025, 3, 1, 10, 0, 30, 0)),
        ("2024-09-05T12:19:21+09:00", (2024, 9, 5, 12, 19, 21, 0)),
        ("2024-09-05T03:19:21Z", (2024, 9, 5, 12, 19, 21, 0)),
    ],
)
def test_parse_time_is_lenient(text: str, expected: tuple[int, ...]) -> None:
    parsed = parse_time(text).astimezone(START.tzinfo)
    assert parsed.utcoffset() == timedelta(hours=9)
    fields = (parsed.year, parsed.month, parsed.day, parsed.hour, parsed.minute, parsed.second)
    assert (*fields, parsed.microsecond) == expected


async def test_order_ids_with_equals_signs_round_trip(
    toss: TossClient, acontrol: httpx.AsyncClient
) -> None:
    billing_key = await _billing_key(toss, acontrol)
    payment = await _charge(toss, billing_key, "order=eq=1")
    assert payment.order_id == "order=eq=1"
    assert await toss.get_payment_by_order("order=eq=1") == payment
    await toss.delete_billing_key(billing_key)
    again = await _error(toss.delete_billing_key(billing_key))
    assert (again.code, again.http_status, again.operation) == (
        "ALREADY_REMOVED_BILLING_KEY",
        400,
        Operation.DELETE_BILLING_KEY,
    )


async def test_failed_payment_lookup_carries_the_failure() -> None:
    aborted = {**PAYMENT_BODY, "orderId": "order wire/1", "status": "ABORTED", "approvedAt": None}
    aborted["failure"] = {"code": "REJECT_CARD_PAYMENT", "message": "한도초과"}
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json=aborted)

    async with _mock(handler) as toss:
        payment = await toss.get_payment_by_order("order wire/1")
        # Resolving a charge attempt: a failed charge, not a success and not "not found".
        with pytest.raises(TossChargeFailed) as info:
            await toss.lookup_charge("order wire/1", 4900, CUSTOMER_KEY)
    assert seen[0].url.raw_path == b"/v1/payments/orders/order%20wire%2F1"
    assert payment is not None
    assert (payment.status, payment.approved_at) == ("ABORTED", None)
    assert payment.failure is not None
    assert (payment.failure.code, payment.failure.message) == ("REJECT_CARD_PAYMENT", "한도초과")
    failed = info.value
    assert (failed.code, failed.message, failed.http_status) == (
        "REJECT_CARD_PAYMENT",
        "한도초과",
        403,
    )
    assert (failed.error_class, failed.payment_key) == (FailureClass.DECLINE, payment.payment_key)
    assert failed.payment_status == "ABORTED"
    assert not failed.retry_same_request


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({"status": "DONE"}, "DONE"),
        ({"status": "PARTIAL_CANCELED", "balanceAmount": 900}, "PARTIAL_CANCELED"),
        ({"status": "ABORTED", "failure": None}, TossChargeFailed),
        (
            {"status": "EXPIRED", "failure": {"code": "PROVIDER_ERROR", "message": "m"}},
            "PROVIDER_ERROR",
        ),
        ({"status": "IN_PROGRESS"}, TossOutcomeUnknown),
        ({"status": "DONE", "totalAmount": 9900}, TossReplyMismatch),
        ({"status": "DONE", "customerKey": "someone-else"}, TossReplyMismatch),
        (None, None),
    ],
)
async def test_lookup_charge_reads_every_answer(
    changes: dict[str, object] | None, expected: object
) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        if changes is None:
            return httpx.Response(404, json={"code": "NOT_FOUND_PAYMENT", "message": "없음"})
        return httpx.Response(200, json={**PAYMENT_BODY, **changes})

    async with _mock(handler) as toss:
        lookup = toss.lookup_charge("order-wire-1", 4900, CUSTOMER_KEY)
        if isinstance(expected, type):
            with pytest.raises(expected) as info:  # type: ignore[misc]
                await lookup
            if expected is TossChargeFailed:
                # ABORTED without a reason: Toss's generic failure, transient.
                assert info.value.code == "UNKNOWN_PAYMENT_ERROR"
                assert info.value.error_class is FailureClass.TRANSIENT
        elif expected == "PROVIDER_ERROR":
            with pytest.raises(TossChargeFailed) as failed:
                await lookup
            assert (failed.value.code, failed.value.payment_status) == ("PROVIDER_ERROR", "EXPIRED")
            assert failed.value.error_class is FailureClass.TRANSIENT
        elif expected is None:
            assert await lookup is None
        else:
            found = await lookup
            assert found is not None
            assert (found.status, found.order_id, found.total_amount) == (
                expected,
                "order-wire-1",
                4900,
            )


@pytest.mark.parametrize(
    "exc", [httpx.ReadTimeout, httpx.ConnectError, httpx.RemoteProtocolError, httpx.WriteTimeout]
)
async def test_transport_failures_are_outcome_unknown(exc: type[httpx.TransportError]) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        raise exc("boom", request=request)

    async with _mock(handler) as toss:
        with pytest.raises(TossOutcomeUnknown) as info:
            await toss.charge("bk", CUSTOMER_KEY, 4900, "order-x-1", "Pro", idempotency_key="k")
    assert info.value.reason == exc.__name__
    assert info.value.__cause__ is None


class _BrokenStream(httpx.AsyncByteStream):
    async def __aiter__(self) -> AsyncIterator[bytes]:
        yield b'{"paymentKey": "tviva'
        raise httpx.RemoteProtocolError("peer closed connection")


@pytest.mark.parametrize(
    "response",
    [
        httpx.Response(200, content=b"<html>gateway</html>"),
        httpx.Response(200, json={**PAYMENT_BODY, "paymentKey": None}),
        httpx.Response(200, json={**PAYMENT_BODY, "totalAmount": 4900.5}),
        httpx.Response(200, json={**PAYMENT_BODY, "totalAmount": True}),
        httpx.Response(200, json={**PAYMENT_BODY, "approvedAt": "yesterday"}),
        httpx.Response(200, json=[PAYMENT_BODY]),
        # a corrupt gzip body: httpx cannot decode it
        httpx.Response(
            200,
            stream=httpx.ByteStream(b"\x1f\x8b\x08\x00not-gzip"),
            headers={"Content-Encoding": "gzip", "Content-Type": "application/json"},
        ),
        # a body cut short by the connection
        httpx.Response(200, stream=_BrokenStream(), headers={"Content-Type": "application/json"}),
    ],
)
async def test_unreadable_success_is_outcome_unknown(response: httpx.Response) -> None:
    # Any 2xx that cannot be read is outcome-unknown: the charge may have gone through.
    async with _mock(lambda request: response) as toss:
        with pytest.raises(TossMalformedResponse) as info:
            await toss.charge("bk", CUSTOMER_KEY, 4900, "order-x-1", "Pro", idempotency_key="k")
    assert isinstance(info.value, TossOutcomeUnknown)


async def test_non_json_error_is_classified_by_status() -> None:
    async with _mock(lambda request: httpx.Response(502, text="Bad Gateway")) as toss:
        lookup = await _error(toss.get_payment("p"))
        charge = await _error(toss.charge("bk", "c1", 4900, "order-x-1", "P", idempotency_key="k"))
    assert (lookup.code, lookup.error_class) == ("HTTP_502", FailureClass.TRANSIENT)
    assert (charge.code, charge.error_class) == ("HTTP_502", FailureClass.TRANSIENT)


# --------------------------------------------------------------------------- secrets


async def test_secret_key_never_shows(
    start_sandbox: Callable[..., LiveServer], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="service.toss")
    other = "test_sk_" + "D" * 28
    server = start_sandbox(secret_keys=[other])
    unauthorized = {"endpoint": "*", "kind": "error", "status": 401, "code": "UNAUTHORIZED_KEY"}
    async with (
        TossClient(other, base_url=server.url) as client,
        httpx.AsyncClient(base_url=server.url) as acontrol,
    ):
        billing_key = await _billing_key(client, acontrol)
        payment = await _charge(client, billing_key, "order-secret-1")
        texts = [repr(client), str(client)]
        await acontrol.post("/_sandbox/faults", json={**unauthorized, "count": 1})
        error = await _error(client.get_payment(payment.payment_key))
    async with TossClient(other, base_url="http://127.0.0.1:9", timeout=1) as dead:
        with pytest.raises(TossOutcomeUnknown) as unknown:
            await _charge(dead, billing_key, "order-secret-2")
    encoded = base64.b64encode(f"{other}:".encode()).decode()
    texts += [repr(SecretKey(other)), str(SecretKey(other)), f"{SecretKey(other)}"]
    texts += [str(error), repr(error), str(unknown.value), repr(unknown.value)]
    texts += [record.getMessage() for record in caplog.records]
    texts += [repr(payment), repr(Billing("bk-secret", CUSTOMER_KEY, "m", "카드", START, None))]
    assert caplog.records, "the client logs its calls"
    for text in texts:
        assert other not in text
        assert encoded not in text
        assert billing_key not in text
        assert "bk-secret" not in text
        assert payment.secret is not None
        assert payment.secret not in text
    assert repr(SecretKey(other)) == "SecretKey(test, hidden)"
    assert SecretKey(other).reveal() == other


@pytest.mark.parametrize(
    ("pasted", "says"),
    [
        ("\ufefftest_sk_abc", "byte-order mark"),
        ("test_sk_abc\n", "line break"),
        ("test_sk_abc\r\n", "line break"),
        (" test_sk_abc", "whitespace"),
        ("test_sk_ab c", "whitespace"),
        ("test_sk_abc\t", "whitespace"),
        ("test_sk_abc:", "':'"),
        ("test_sk_abç", "ASCII"),
        ("test_sk_abc\x00", "ASCII"),
        ("", "empty"),
    ],
)
def test_secret_key_is_refused_when_loaded(pasted: str, says: str) -> None:
    with pytest.raises(ValueError, match=says) as info:
        SecretKey(pasted)
    assert "abc" not in str(info.value)  # the message never repeats the key
    with pytest.raises(ValueError, match=says):
        TossClient(pasted)


def test_secret_key_rules() -> None:
    assert SecretKey("test_sk_abc") == SecretKey("test_sk_abc")
    assert SecretKey("test_sk_abc") != SecretKey("test_sk_abd")
    assert SecretKey("live_" + "sk_x").is_live
    assert basic("test_sk_abc") == {"Authorization": SecretKey("test_sk_abc").authorization()}


def test_httpx_request_log_never_shows_the_billing_key() -> None:
    # Importing service.toss (done at the top of this module) installs the filter.
    record = logging.LogRecord(
        "httpx",
        logging.INFO,
        __file__,
        1,
        'HTTP Request: %s %s "%s %d %s"',
        (
            "POST",
            httpx.URL("https://api.tosspayments.com/v1/billing/Z_t5vOvQxrj4499PeiJcjen28-V2Ryq="),
            "HTTP/1.1",
            200,
            "OK",
        ),
        None,
    )
    logger = logging.getLogger("httpx")
    assert all(f.filter(record) for f in logger.filters)
    message = record.getMessage()
    assert "Z_t5vOvQxrj4499PeiJcjen28" not in message
    assert "/v1/billing/<billing-key>" in message


# --------------------------------------------------------------------------- replies that lie


def _reply(**changes: object) -> Callable[[httpx.Request], httpx.Response]:
    return lambda request: httpx.Response(200, json={**PAYMENT_BODY, **changes})


async def _charge_wire(toss: TossClient) -> Payment:
    return await toss.charge(
        "bk", CUSTOMER_KEY, 4900, "order-wire-1", "Pro", idempotency_key="attempt-1"
    )


@pytest.mark.parametrize(
    ("changes", "field", "actual"),
    [
        ({"orderId": "order-other-9"}, "orderId", "order-other-9"),
        ({"totalAmount": 9900}, "totalAmount", 9900),
        ({"customerKey": "cus_someone_else"}, "customerKey", "cus_someone_else"),
        ({"status": "ABORTED", "approvedAt": None}, "status", "ABORTED"),
        ({"status": "EXPIRED", "approvedAt": None}, "status", "EXPIRED"),
        ({"status": "CANCELED"}, "status", "CANCELED"),
    ],
)
async def test_charge_reply_must_match_the_request(
    caplog: pytest.LogCaptureFixture, changes: dict[str, object], field: str, actual: object
) -> None:
    async with _mock(_reply(**changes)) as toss:
        with pytest.raises(TossReplyMismatch) as info:
            await _charge_wire(toss)
    mismatch = info.value
    assert not isinstance(mismatch, (TossError, TossOutcomeUnknown))  # never a success or retry
    assert (mismatch.operation, mismatch.field, mismatch.actual) == (
        Operation.CHARGE,
        field,
        actual,
    )
    alerts = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert [r.getMessage() for r in alerts] == [
        f"toss charge: reply does not match the request ({field})"
    ]


async def test_other_replies_are_checked_too() -> None:
    billing = {**BILLING_BODY, "customerKey": "cus_someone_else"}
    async with _mock(lambda request: httpx.Response(200, json=billing)) as toss:
        with pytest.raises(TossReplyMismatch, match="customerKey"):
            await toss.issue_billing_key("bln_x", CUSTOMER_KEY, idempotency_key="reg-1")
    async with _mock(_reply()) as toss:
        with pytest.raises(TossReplyMismatch, match="paymentKey"):
            await toss.get_payment("tviva20250301100000zzzzz")
        with pytest.raises(TossReplyMismatch, match="orderId"):
            await toss.get_payment_by_order("order-wire-2")
        # A cancel answered with the payment still DONE did not cancel anything.
        with pytest.raises(TossReplyMismatch, match="status"):
            await toss.cancel("tviva20250301100000abcde", "환불", idempotency_key="r-1")
    async with _mock(lambda request: httpx.Response(200, json=CANCELED_BODY)) as toss:
        with pytest.raises(TossReplyMismatch, match="paymentKey"):
            await toss.cancel("tviva20250301100000zzzzz", "환불", idempotency_key="r-2")


async def test_a_reused_key_replays_another_charge_loudly(
    toss: TossClient, acontrol: httpx.AsyncClient
) -> None:
    # Toss (and the sandbox) replay the first response for a key whatever the new body: an
    # attempt that reuses another attempt's key must not be taken as paid.
    billing_key = await _billing_key(toss, acontrol)
    first = await _charge(toss, billing_key, "order-key-1", key="k-collide")
    with pytest.raises(TossReplyMismatch) as info:
        await _charge(toss, billing_key, "order-key-2", key="k-collide")
    assert (info.value.field, info.value.expected, info.value.actual) == (
        "orderId",
        "order-key-2",
        first.order_id,
    )
    with pytest.raises(TossReplyMismatch, match="totalAmount"):
        await _charge(toss, billing_key, "order-key-1", amount=9900, key="k-collide")
    ledger = (await acontrol.get("/_sandbox/ledger")).json()
    assert [e["orderId"] for e in ledger["entries"]] == ["order-key-1"]
    assert await toss.get_payment_by_order("order-key-2") is None


# --------------------------------------------------------------------------- lookups of charges


@pytest.mark.parametrize("recorded", [False, True])
async def test_lookup_charge_under_both_failed_charge_behaviours(
    start_sandbox: Callable[..., LiveServer], recorded: bool
) -> None:
    server = start_sandbox(record_failed_charges=recorded)
    async with (
        TossClient(SECRET_KEY, base_url=server.url) as toss,
        httpx.AsyncClient(base_url=server.url) as acontrol,
    ):
        declining = await _billing_key(toss, acontrol, "4000000001000000")
        good = await _billing_key(toss, acontrol)
        declined = await _error(_charge(toss, declining, "order-look-1"))
        paid = await _charge(toss, good, "order-look-2")
        assert await toss.lookup_charge("order-look-2", 4900, CUSTOMER_KEY) == paid
        assert await toss.lookup_charge("order-look-3", 4900, CUSTOMER_KEY) is None
        if recorded:
            # Found as ABORTED with failure: a failed charge, classified like the answer.
            with pytest.raises(TossChargeFailed) as info:
                await toss.lookup_charge("order-look-1", 4900, CUSTOMER_KEY)
            failed = info.value
            assert (failed.code, failed.http_status, failed.error_class) == (
                declined.code,
                declined.http_status,
                declined.error_class,
            )
            assert (failed.code, failed.payment_status) == ("REJECT_CARD_PAYMENT", "ABORTED")
        else:
            assert await toss.lookup_charge("order-look-1", 4900, CUSTOMER_KEY) is None


# --------------------------------------------------------------------------- issue, 429, deadline


async def test_lost_issue_answer_is_recovered_under_the_registration_key(
    toss: TossClient, acontrol: httpx.AsyncClient, server: LiveServer
) -> None:
    body = {"customerKey": CUSTOMER_KEY}
    auth_key = (await acontrol.post("/_sandbox/auth-keys", json=body)).json()["authKey"]
    drop = {"endpoint": "issue_billing_key", "kind": "drop_after_commit", "count": 1}
    await acontrol.post("/_sandbox/faults", json=drop)
    with pytest.raises(TossOutcomeUnknown):
        await toss.issue_billing_key(auth_key, CUSTOMER_KEY, idempotency_key="reg-7f3e")
    # The authKey is spent; only the same Idempotency-Key returns the key that was issued.
    again = await toss.issue_billing_key(auth_key, CUSTOMER_KEY, idempotency_key="reg-7f3e")
    other = await _error(toss.issue_billing_key(auth_key, CUSTOMER_KEY, idempotency_key="x"))
    assert other.code == "INVALID_BILLING_AUTH"
    paid = await _charge(toss, again.billing_key, "order-reg-1")
    assert paid.status == "DONE"
    with pytest.raises(ValueError, match="idempotency key"):
        await toss.issue_billing_key(auth_key, CUSTOMER_KEY, idempotency_key="")


async def test_rate_limit_keeps_retry_after(start_sandbox: Callable[..., LiveServer]) -> None:
    server = start_sandbox(rate_limit=1)
    async with TossClient(SECRET_KEY, base_url=server.url) as toss:
        assert await toss.get_payment_by_order("order-rl-1") is None
        error = await _error(toss.get_payment_by_order("order-rl-2"))
    assert (error.code, error.http_status, error.retry_after) == ("TOO_MANY_REQUESTS", 429, 60.0)
    assert error.error_class is FailureClass.UNPROCESSED
    assert error.retry_same_request


def test_retry_after_forms() -> None:
    now = START.astimezone(UTC)
    assert parse_retry_after("120") == 120.0
    assert parse_retry_after("Sat, 01 Mar 2025 01:00:30 GMT", now) == 30.0
    assert parse_retry_after("Sat, 01 Mar 2025 00:59:00 GMT", now) == 0.0  # in the past
    assert parse_retry_after("soon") is None
    assert parse_retry_after(None) is None


async def test_error_with_an_unreadable_body_is_classified_by_status() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(
            503,
            stream=httpx.ByteStream(b"\x1f\x8b\x08\x00broken"),
            headers={"Content-Encoding": "gzip", "Retry-After": "5"},
        )

    async with _mock(handler) as toss:
        error = await _error(toss.get_payment("p"))
    assert (error.code, error.error_class, error.retry_after) == (
        "HTTP_503",
        FailureClass.TRANSIENT,
        5.0,
    )


async def test_a_trickling_server_cannot_outlast_the_deadline() -> None:
    """Per-read timeouts never fire on a server sending a byte at a time; the deadline does."""
    body = json.dumps(PAYMENT_BODY).encode()
    head, tail = body[:-20], body[-20:]

    async def trickle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await reader.readuntil(b"\r\n\r\n")
            writer.write(
                b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                + f"Content-Length: {len(body)}\r\n\r\n".encode()
                + head
            )
            for byte in tail:  # 20 bytes, 0.1 s apart: 2 s in all
                await writer.drain()
                await asyncio.sleep(0.1)
                writer.write(bytes([byte]))
            await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(trickle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        async with TossClient(SECRET_KEY, base_url=f"http://127.0.0.1:{port}", timeout=1) as toss:
            with pytest.raises(TossOutcomeUnknown) as info:
                await _charge_wire(toss)
        assert (info.value.reason, info.value.operation) == ("deadline exceeded", Operation.CHARGE)
        # The same exchange completes when the deadline leaves room for it.
        async with TossClient(SECRET_KEY, base_url=f"http://127.0.0.1:{port}", timeout=30) as toss:
            assert (await _charge_wire(toss)).order_id == "order-wire-1"
    finally:
        server.close()
        await server.wait_closed()

"""Reference §9b (and the per-endpoint tables of §2b, §3 and §5) row by row.

For every error code: ``TossPayments-Test-Code`` on a relevant endpoint makes the sandbox answer
with the code's documented HTTP status and a ``{code, message}`` body, processes nothing, and
``service.toss`` classifies the answer into the documented retry class.

The expected values are written out here from the reference, not read from ``ERROR_CODES``, so
a wrong row in the code table fails. The reference's "retry?" column maps to the classes as:

* "no (config / bug / fix)", "no", "no (drop installment)"            -> BUG
* "no — restart registration / re-register / ask for another card",
  "no (contact issuer)"                                                 -> NEEDS_NEW_CARD
* "dunning: retry on a later day", "later", "usually no; maybe later"   -> DECLINE
* "no blind retry — look up", "reconcile", "re-read balance",
  "no (treat as done)"                                                  -> RECONCILE
* "yes, same key" (409) and 429                                         -> UNPROCESSED
* every other "yes ..." (processed, so replayed under its key)          -> TRANSIENT, and so is
  every 5xx ("yes, after reconcile / after lookup"; FAILED_DB_PROCESSING too).

The header only works on POSTs (§14 item 4), so codes of the DELETE and GET endpoints are sent
to the POST endpoint where the same condition also occurs.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import httpx
import pytest
from sandbox_harness import CUSTOMER_KEY, GOOD_CARD, SECRET_KEY, LiveServer, basic

from service.toss import ERROR_CODES, FailureClass, Operation, TossClient, TossError

BUG = FailureClass.BUG
CARD = FailureClass.NEEDS_NEW_CARD
DECLINE = FailureClass.DECLINE
RECONCILE = FailureClass.RECONCILE
TRANSIENT = FailureClass.TRANSIENT
UNPROCESSED = FailureClass.UNPROCESSED

ISSUE = Operation.ISSUE_BILLING_KEY
CHARGE = Operation.CHARGE
CANCEL = Operation.CANCEL

# (endpoint, code, documented HTTP status, documented retry class)
ROWS: list[tuple[Operation, str, int, FailureClass]] = [
    # §1 / §9b authentication and configuration
    (ISSUE, "UNAUTHORIZED_KEY", 401, BUG),
    (CHARGE, "UNAUTHORIZED_KEY", 401, BUG),
    (CANCEL, "UNAUTHORIZED_KEY", 401, BUG),
    (ISSUE, "INVALID_API_KEY", 400, BUG),
    (ISSUE, "INCORRECT_BASIC_AUTH_FORMAT", 403, BUG),  # status [UNC]: T1's cancel table
    (CANCEL, "INCORRECT_BASIC_AUTH_FORMAT", 403, BUG),
    (CHARGE, "FORBIDDEN_REQUEST", 403, BUG),
    (CANCEL, "FORBIDDEN_REQUEST", 403, BUG),
    (ISSUE, "NOT_SUPPORTED_METHOD", 400, BUG),
    (CHARGE, "NOT_FOUND_HTTP_METHOD", 404, BUG),
    # request format
    (CHARGE, "INVALID_REQUEST", 400, BUG),
    (CANCEL, "INVALID_REQUEST", 400, BUG),
    (CHARGE, "INVALID_REQUIRED_PARAM", 400, BUG),
    (CHARGE, "INVALID_ORDER_ID", 400, BUG),
    (CHARGE, "INVALID_ORDER_NAME", 400, BUG),
    (ISSUE, "INVALID_CUSTOMER_KEY", 400, BUG),
    (CHARGE, "INVALID_CUSTOMER_KEY", 400, BUG),
    (CHARGE, "INVALID_EMAIL", 400, BUG),
    (CHARGE, "BELOW_MINIMUM_AMOUNT", 400, BUG),
    (CHARGE, "BELOW_ZERO_AMOUNT", 400, BUG),
    (CHARGE, "INVALID_IDEMPOTENCY_KEY", 400, BUG),
    (CHARGE, "NOT_FOUND_PAYMENT_SESSION", 404, BUG),  # a confirm code; no confirm here
    # billing keys
    (ISSUE, "INVALID_BILLING_AUTH", 400, CARD),
    (CHARGE, "INVALID_BILL_KEY_REQUEST", 400, CARD),
    (CHARGE, "NOT_MATCHES_CUSTOMER_KEY", 400, BUG),
    (ISSUE, "NOT_MATCHES_CUSTOMER_KEY", 400, BUG),
    (CHARGE, "ALREADY_REMOVED_BILLING_KEY", 400, CARD),
    (CHARGE, "BILLING_KEY_NOT_FOUND", 400, CARD),  # a delete code (§7)
    (CHARGE, "NOT_FOUND_BILLING", 404, CARD),
    # the card
    (CHARGE, "INVALID_CARD_NUMBER", 400, CARD),
    (CHARGE, "INVALID_CARD_EXPIRATION", 400, CARD),
    (CHARGE, "INVALID_STOPPED_CARD", 400, CARD),
    (CHARGE, "INVALID_REJECT_CARD", 400, CARD),
    (CHARGE, "NOT_SUPPORTED_CARD_TYPE", 400, CARD),
    (CHARGE, "NOT_REGISTERED_CARD_COMPANY", 400, CARD),
    (CHARGE, "INVALID_CARD_LOST_OR_STOLEN", 400, CARD),  # status [INF]
    (ISSUE, "INVALID_CARD_PASSWORD", 400, CARD),
    (ISSUE, "INVALID_CARD_IDENTITY", 400, CARD),
    (ISSUE, "INVALID_BIRTH_DAY_FORMAT", 400, CARD),
    # installments
    (CHARGE, "INVALID_CARD_INSTALLMENT_PLAN", 400, BUG),
    (CHARGE, "NOT_SUPPORTED_INSTALLMENT_PLAN_CARD_OR_MERCHANT", 400, BUG),
    (CHARGE, "NOT_SUPPORTED_MONTHLY_INSTALLMENT_PLAN", 400, BUG),
    (CHARGE, "EXCEED_MAX_CARD_INSTALLMENT_PLAN", 400, BUG),
    # Toss's state differs from ours
    (CHARGE, "DUPLICATED_ORDER_ID", 400, RECONCILE),
    (CHARGE, "ALREADY_PROCESSED_PAYMENT", 400, RECONCILE),
    # limits and refusals
    (CHARGE, "PROVIDER_ERROR", 400, TRANSIENT),
    (CANCEL, "PROVIDER_ERROR", 400, TRANSIENT),
    (CHARGE, "EXCEED_MAX_DAILY_PAYMENT_COUNT", 400, DECLINE),
    (CHARGE, "EXCEED_MAX_PAYMENT_AMOUNT", 400, DECLINE),
    (CHARGE, "EXCEED_MAX_AMOUNT", 400, DECLINE),
    (CHARGE, "EXCEED_MAX_ONE_DAY_AMOUNT", 400, DECLINE),  # status [UNC]
    (CHARGE, "REJECT_CARD_PAYMENT", 403, DECLINE),
    (CHARGE, "REJECT_CARD_COMPANY", 403, DECLINE),
    (CHARGE, "REJECT_ACCOUNT_PAYMENT", 403, DECLINE),
    (CHARGE, "EXCEED_MAX_AUTH_COUNT", 403, CARD),
    # cancel (§5 table and §9b)
    (CANCEL, "NOT_AVAILABLE_BANK", 403, TRANSIENT),
    (CANCEL, "FORBIDDEN_CONSECUTIVE_REQUEST", 403, TRANSIENT),
    (CANCEL, "NOT_FOUND_PAYMENT", 404, BUG),
    (CANCEL, "ALREADY_CANCELED_PAYMENT", 400, RECONCILE),
    (CANCEL, "NOT_CANCELABLE_AMOUNT", 403, RECONCILE),
    (CANCEL, "NOT_CANCELABLE_PAYMENT", 403, BUG),
    (CANCEL, "NOT_MATCHES_REFUNDABLE_AMOUNT", 400, RECONCILE),
    (CANCEL, "EXCEED_MAX_REFUND_DUE", 403, BUG),
    (CANCEL, "NOT_ALLOWED_PARTIAL_REFUND", 403, BUG),
    (CANCEL, "NOT_ALLOWED_PARTIAL_REFUND_WAITING_DEPOSIT", 403, BUG),
    (CANCEL, "REFUND_REJECTED", 400, BUG),
    # §5 only (no retry advice in the reference: not retried)
    (CANCEL, "ALREADY_REFUND_PAYMENT", 400, RECONCILE),
    (CANCEL, "INVALID_REFUND_ACCOUNT_INFO", 400, BUG),
    (CANCEL, "INVALID_REFUND_ACCOUNT_NUMBER", 400, BUG),
    (CANCEL, "INVALID_BANK", 400, BUG),
    (CANCEL, "FORBIDDEN_BANK_REFUND_REQUEST", 400, BUG),
    (CANCEL, "EXCEED_CANCEL_AMOUNT_DISCOUNT_AMOUNT", 400, BUG),
    (CANCEL, "NOT_CANCELABLE_PAYMENT_FOR_DORMANT_USER", 403, BUG),
    (CANCEL, "EXCEED_CANCEL_LIMIT", 403, BUG),
    # idempotency
    (ISSUE, "IDEMPOTENT_REQUEST_PROCESSING", 409, UNPROCESSED),
    (CHARGE, "IDEMPOTENT_REQUEST_PROCESSING", 409, UNPROCESSED),
    (CANCEL, "IDEMPOTENT_REQUEST_PROCESSING", 409, UNPROCESSED),
    # 5xx: retried after a lookup; on money-moving calls the lookup comes first
    (ISSUE, "FAILED_BILL_KEY_AUTH_CREATION", 500, TRANSIENT),
    (ISSUE, "FAILED_INTERNAL_SYSTEM_PROCESSING", 500, TRANSIENT),
    (ISSUE, "COMMON_ERROR", 500, TRANSIENT),
    # "usually no — likely bad input", but a 5xx was processed and may be temporary: transient
    (ISSUE, "FAILED_DB_PROCESSING", 500, TRANSIENT),
    (CHARGE, "FAILED_DB_PROCESSING", 500, TRANSIENT),
    (CHARGE, "FAILED_INTERNAL_SYSTEM_PROCESSING", 500, TRANSIENT),
    (CHARGE, "FAILED_PAYMENT_INTERNAL_SYSTEM_PROCESSING", 500, TRANSIENT),
    (CHARGE, "FAILED_CARD_COMPANY_RESPONSE", 500, TRANSIENT),
    (CHARGE, "COMMON_ERROR", 500, TRANSIENT),
    (CHARGE, "UNKNOWN_ERROR", 500, TRANSIENT),
    (CHARGE, "UNKNOWN_PAYMENT_ERROR", 500, TRANSIENT),
    (CANCEL, "FAILED_REFUND_PROCESS", 500, TRANSIENT),
    (CANCEL, "FAILED_METHOD_HANDLING_CANCEL", 500, TRANSIENT),
    (CANCEL, "FAILED_PARTIAL_REFUND", 500, TRANSIENT),
    (CANCEL, "FAILED_INTERNAL_SYSTEM_PROCESSING", 500, TRANSIENT),
    (CANCEL, "FAILED_PAYMENT_INTERNAL_SYSTEM_PROCESSING", 500, TRANSIENT),
    (CANCEL, "COMMON_ERROR", 500, TRANSIENT),
]

pytestmark = pytest.mark.anyio


@asynccontextmanager
async def _forcing(server: LiveServer, code: str) -> AsyncIterator[TossClient]:
    """A TossClient whose requests carry ``TossPayments-Test-Code: <code>``."""
    async with (
        httpx.AsyncClient(headers={"TossPayments-Test-Code": code}) as http,
        TossClient(SECRET_KEY, base_url=server.url, http=http) as client,
    ):
        yield client


async def _auth_key(acontrol: httpx.AsyncClient) -> str:
    body = {"customerKey": CUSTOMER_KEY, "cardNumber": GOOD_CARD}
    response = await acontrol.post("/_sandbox/auth-keys", json=body)
    assert response.status_code == 200, response.text
    auth_key: str = response.json()["authKey"]
    return auth_key


async def _approvals(acontrol: httpx.AsyncClient) -> list[str]:
    entries = (await acontrol.get("/_sandbox/ledger")).json()["entries"]
    return [f"{e['kind']}:{e['orderId']}:{e['amount']}" for e in entries]


@pytest.mark.parametrize(
    ("operation", "code", "status", "error_class"),
    ROWS,
    ids=[f"{op.value}-{code}" for op, code, _, _ in ROWS],
)
async def test_code_status_and_retry_class(
    server: LiveServer,
    toss: TossClient,
    acontrol: httpx.AsyncClient,
    operation: Operation,
    code: str,
    status: int,
    error_class: FailureClass,
) -> None:
    # A code missing from the table would still come back (as 400, BUG).
    assert code in ERROR_CODES
    auth_key = await _auth_key(acontrol)
    if operation is ISSUE:
        async with _forcing(server, code) as client:
            with pytest.raises(TossError) as info:
                await client.issue_billing_key(auth_key, CUSTOMER_KEY, idempotency_key="reg-1")
        # Nothing was processed: the one-time authKey is still unused.
        billing = await toss.issue_billing_key(auth_key, CUSTOMER_KEY, idempotency_key="reg-2")
        assert billing.customer_key == CUSTOMER_KEY
    elif operation is CHARGE:
        billing = await toss.issue_billing_key(auth_key, CUSTOMER_KEY, idempotency_key="reg-2")
        async with _forcing(server, code) as client:
            with pytest.raises(TossError) as info:
                await client.charge(
                    billing.billing_key,
                    CUSTOMER_KEY,
                    4900,
                    "order-code-1",
                    "Pro",
                    idempotency_key="k-code-1",
                )
        assert await toss.get_payment_by_order("order-code-1") is None
        assert await _approvals(acontrol) == []
    else:
        billing = await toss.issue_billing_key(auth_key, CUSTOMER_KEY, idempotency_key="reg-2")
        paid = await toss.charge(
            billing.billing_key, CUSTOMER_KEY, 4900, "order-code-2", "Pro", idempotency_key="k-2"
        )
        async with _forcing(server, code) as client:
            with pytest.raises(TossError) as info:
                await client.cancel(paid.payment_key, "환불", 1000, idempotency_key="k-code-3")
        after = await toss.get_payment(paid.payment_key)
        assert (after.status, after.balance_amount, after.cancels) == ("DONE", 4900, ())
        assert await _approvals(acontrol) == ["approval:order-code-2:4900"]
    error = info.value
    assert (error.code, error.http_status, error.operation) == (code, status, operation)
    assert error.error_class is error_class
    assert error.retry_same_request is (error_class is UNPROCESSED)
    assert error.message == ERROR_CODES[code].message


def test_every_reference_code_has_a_row() -> None:
    # The §9b table, §3's charge list, §5's cancel list and §7's delete list, as printed.
    reference_codes = {
        "UNAUTHORIZED_KEY",
        "INVALID_API_KEY",
        "INCORRECT_BASIC_AUTH_FORMAT",
        "FORBIDDEN_REQUEST",
        "NOT_SUPPORTED_METHOD",
        "INVALID_REQUEST",
        "INVALID_REQUIRED_PARAM",
        "INVALID_ORDER_ID",
        "INVALID_ORDER_NAME",
        "INVALID_CUSTOMER_KEY",
        "INVALID_EMAIL",
        "BELOW_MINIMUM_AMOUNT",
        "BELOW_ZERO_AMOUNT",
        "INVALID_BILLING_AUTH",
        "INVALID_BILL_KEY_REQUEST",
        "NOT_MATCHES_CUSTOMER_KEY",
        "ALREADY_REMOVED_BILLING_KEY",
        "BILLING_KEY_NOT_FOUND",
        "NOT_FOUND_BILLING",
        "INVALID_CARD_NUMBER",
        "INVALID_CARD_EXPIRATION",
        "INVALID_STOPPED_CARD",
        "INVALID_REJECT_CARD",
        "NOT_SUPPORTED_CARD_TYPE",
        "NOT_REGISTERED_CARD_COMPANY",
        "INVALID_CARD_PASSWORD",
        "INVALID_CARD_IDENTITY",
        "INVALID_BIRTH_DAY_FORMAT",
        "INVALID_CARD_LOST_OR_STOLEN",
        "INVALID_CARD_INSTALLMENT_PLAN",
        "NOT_SUPPORTED_INSTALLMENT_PLAN_CARD_OR_MERCHANT",
        "NOT_SUPPORTED_MONTHLY_INSTALLMENT_PLAN",
        "EXCEED_MAX_CARD_INSTALLMENT_PLAN",
        "DUPLICATED_ORDER_ID",
        "ALREADY_PROCESSED_PAYMENT",
        "PROVIDER_ERROR",
        "EXCEED_MAX_DAILY_PAYMENT_COUNT",
        "EXCEED_MAX_PAYMENT_AMOUNT",
        "EXCEED_MAX_AMOUNT",
        "EXCEED_MAX_ONE_DAY_AMOUNT",
        "REJECT_CARD_PAYMENT",
        "REJECT_CARD_COMPANY",
        "REJECT_ACCOUNT_PAYMENT",
        "EXCEED_MAX_AUTH_COUNT",
        "NOT_AVAILABLE_BANK",
        "FORBIDDEN_CONSECUTIVE_REQUEST",
        "NOT_FOUND_PAYMENT",
        "NOT_FOUND_PAYMENT_SESSION",
        "NOT_FOUND_HTTP_METHOD",
        "ALREADY_CANCELED_PAYMENT",
        "NOT_CANCELABLE_AMOUNT",
        "NOT_CANCELABLE_PAYMENT",
        "NOT_MATCHES_REFUNDABLE_AMOUNT",
        "EXCEED_MAX_REFUND_DUE",
        "NOT_ALLOWED_PARTIAL_REFUND",
        "NOT_ALLOWED_PARTIAL_REFUND_WAITING_DEPOSIT",
        "REFUND_REJECTED",
        "INVALID_IDEMPOTENCY_KEY",
        "IDEMPOTENT_REQUEST_PROCESSING",
        "FAILED_INTERNAL_SYSTEM_PROCESSING",
        "FAILED_PAYMENT_INTERNAL_SYSTEM_PROCESSING",
        "FAILED_CARD_COMPANY_RESPONSE",
        "FAILED_DB_PROCESSING",
        "FAILED_BILL_KEY_AUTH_CREATION",
        "FAILED_REFUND_PROCESS",
        "FAILED_METHOD_HANDLING_CANCEL",
        "FAILED_PARTIAL_REFUND",
        "COMMON_ERROR",
        "UNKNOWN_ERROR",
        "UNKNOWN_PAYMENT_ERROR",
        "ALREADY_REFUND_PAYMENT",
        "INVALID_REFUND_ACCOUNT_INFO",
        "INVALID_REFUND_ACCOUNT_NUMBER",
        "INVALID_BANK",
        "FORBIDDEN_BANK_REFUND_REQUEST",
        "EXCEED_CANCEL_AMOUNT_DISCOUNT_AMOUNT",
        "NOT_CANCELABLE_PAYMENT_FOR_DORMANT_USER",
        "EXCEED_CANCEL_LIMIT",
    }
    assert len(reference_codes) == 78
    assert {code for _, code, _, _ in ROWS} == reference_codes
    assert reference_codes <= set(ERROR_CODES)
    # Each code has one status whichever endpoint answers it.
    statuses = {(code, status) for _, code, status, _ in ROWS}
    assert len(statuses) == len(reference_codes)


# --------------------------------------------------------------------------- 429 has no code


@pytest.mark.parametrize("operation", [ISSUE, CHARGE, CANCEL, Operation.GET_PAYMENT])
async def test_429_without_a_code_is_unprocessed(operation: Operation) -> None:
    """§9b "(no code) 429 — yes, back off": classified by the status alone."""

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(429)

    calls = {
        ISSUE: lambda c: c.issue_billing_key("bln_x", CUSTOMER_KEY, idempotency_key="reg-1"),
        CHARGE: lambda c: c.charge("bk", CUSTOMER_KEY, 4900, "order-429", "P", idempotency_key="k"),
        CANCEL: lambda c: c.cancel("pk", "환불", idempotency_key="k"),
        Operation.GET_PAYMENT: lambda c: c.get_payment("pk"),
    }
    async with (
        httpx.AsyncClient(transport=httpx.MockTransport(handler)) as http,
        TossClient(SECRET_KEY, base_url="https://toss.test", http=http) as client,
    ):
        call = calls[operation](client)
        with pytest.raises(TossError) as info:
            await call
    error = info.value
    assert (error.code, error.http_status, error.error_class) == ("HTTP_429", 429, UNPROCESSED)
    assert error.retry_same_request is True
    assert error.retry_after is None  # no Retry-After header


# --------------------------------------------------------------------------- §2b card issuance


@pytest.mark.parametrize(
    ("code", "status"),
    [
        ("INVALID_CARD_NUMBER", 400),
        ("NOT_SUPPORTED_CARD_TYPE", 400),
        ("INVALID_CARD_PASSWORD", 400),
        ("INVALID_CARD_EXPIRATION", 400),
        ("INVALID_CARD_IDENTITY", 400),
        ("INVALID_REJECT_CARD", 400),
        ("INVALID_STOPPED_CARD", 400),
        ("INVALID_BIRTH_DAY_FORMAT", 400),
        ("NOT_REGISTERED_CARD_COMPANY", 400),
        ("INVALID_EMAIL", 400),
        ("NOT_SUPPORTED_METHOD", 400),
        ("INVALID_REQUEST", 400),
        ("EXCEED_MAX_AUTH_COUNT", 403),
        ("REJECT_CARD_COMPANY", 403),
        ("REJECT_ACCOUNT_PAYMENT", 403),
        ("COMMON_ERROR", 500),
    ],
)
async def test_card_issue_endpoint_answers_its_codes(
    server: LiveServer, code: str, status: int
) -> None:
    body = {
        "customerKey": CUSTOMER_KEY,
        "cardNumber": GOOD_CARD,
        "cardExpirationYear": "30",
        "cardExpirationMonth": "12",
        "customerIdentityNumber": "900101",
    }
    async with httpx.AsyncClient(base_url=server.url, headers=basic(SECRET_KEY)) as http:
        forced = await http.post(
            "/v1/billing/authorizations/card",
            json=body,
            headers={"TossPayments-Test-Code": code},
        )
        plain = await http.post("/v1/billing/authorizations/card", json=body)
    assert forced.status_code == status
    assert forced.headers["content-type"] == "application/json"
    assert forced.json() == {"code": code, "message": ERROR_CODES[code].message}
    assert plain.status_code == 200  # the same request without the header issues a key

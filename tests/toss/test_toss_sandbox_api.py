"""Conformance of the sandbox's Toss API with reference/toss-api.md (§2-§9, §14)."""

from __future__ import annotations

import base64
import re
from collections.abc import Callable
from urllib.parse import quote

import httpx
import pytest
from sandbox_harness import (
    CUSTOMER_KEY,
    GOOD_CARD,
    LIVE_SECRET_KEY,
    SECRET_KEY,
    WIDGET_SECRET_KEY,
    LiveServer,
    basic,
    charge,
    mint_auth_key,
    new_billing_key,
)

TOSS_TIME = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\+09:00")
PAYMENT_KEY = re.compile(r"tviva\d{14}[A-Za-z0-9]{5}")
TRANSACTION_KEY = re.compile(r"txrd_[a-z0-9]{27}")
# §3's table of top-level Payment fields (API version 2022-11-16).
PAYMENT_FIELDS = {
    "version",
    "paymentKey",
    "type",
    "orderId",
    "orderName",
    "mId",
    "currency",
    "method",
    "totalAmount",
    "balanceAmount",
    "status",
    "requestedAt",
    "approvedAt",
    "useEscrow",
    "lastTransactionKey",
    "transactionKey",
    "suppliedAmount",
    "vat",
    "cultureExpense",
    "taxFreeAmount",
    "taxExemptionAmount",
    "cancels",
    "isPartialCancelable",
    "card",
    "virtualAccount",
    "mobilePhone",
    "giftCertificate",
    "transfer",
    "easyPay",
    "cashReceipt",
    "cashReceipts",
    "discount",
    "secret",
    "receipt",
    "checkout",
    "country",
    "failure",
    "metadata",
    "easyPayAmount",
    "easyPayDiscountAmount",
}
CANCEL_FIELDS = {
    "cancelAmount",
    "cancelReason",
    "taxFreeAmount",
    "taxExemptionAmount",
    "refundableAmount",
    "cardDiscountAmount",
    "transferDiscountAmount",
    "easyPayDiscountAmount",
    "canceledAt",
    "transactionKey",
    "receiptKey",
    "cancelStatus",
    "cancelRequestId",
}


def error_of(response: httpx.Response) -> tuple[int, str]:
    body = response.json()
    assert set(body) == {"code", "message"}, body
    assert body["message"], body
    return response.status_code, body["code"]


# --------------------------------------------------------------------------- §1 auth


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Bearer " + SECRET_KEY},
        {"Authorization": "Basic !!!not-base64!!!"},
        basic("test_ck_D5GePWvyJnrK0W0k6q8gLzN97Eoq"),  # a client key is not a secret key
        basic("sk_without_environment_prefix"),
        # §1: a UTF-8 BOM encoded in front of the key ("77u/...") is a different key.
        {"Authorization": "Basic " + base64.b64encode(f"\ufeff{SECRET_KEY}:".encode()).decode()},
        basic(":"),
    ],
    ids=["missing", "bearer", "garbage", "client-key", "no-prefix", "bom", "empty-key"],
)
def test_bad_credentials_are_401_unauthorized_key(
    server: LiveServer, headers: dict[str, str]
) -> None:
    response = httpx.get(f"{server.url}/v1/payments/anything", headers=headers)
    assert error_of(response) == (401, "UNAUTHORIZED_KEY")


def test_basic_credentials_without_colon_are_rejected(server: LiveServer) -> None:
    token = base64.b64encode(SECRET_KEY.encode()).decode()
    response = httpx.get(
        f"{server.url}/v1/payments/anything", headers={"Authorization": f"Basic {token}"}
    )
    assert error_of(response) == (403, "INCORRECT_BASIC_AUTH_FORMAT")


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("POST", "/v1/billing/authorizations/issue"),
        ("POST", "/v1/billing/authorizations/card"),
        ("POST", "/v1/billing/somekey"),
        ("DELETE", "/v1/billing/somekey"),
    ],
)
def test_widget_keys_are_refused_on_billing_routes(
    server: LiveServer, method: str, path: str
) -> None:
    response = httpx.request(method, server.url + path, headers=basic(WIDGET_SECRET_KEY), json={})
    assert error_of(response) == (400, "INVALID_API_KEY")


def test_legacy_ak_secret_keys_are_accepted(start_sandbox: Callable[..., LiveServer]) -> None:
    # §1: very old docs show test_ak_ secret keys; a merchant may be configured with one.
    server = start_sandbox(secret_keys=["test_ak_legacy01"])
    response = httpx.get(f"{server.url}/v1/payments/nope", headers=basic("test_ak_legacy01"))
    assert error_of(response) == (404, "NOT_FOUND_PAYMENT")


def test_widget_keys_work_on_payment_lookups(server: LiveServer) -> None:
    response = httpx.get(f"{server.url}/v1/payments/nope", headers=basic(WIDGET_SECRET_KEY))
    assert error_of(response) == (404, "NOT_FOUND_PAYMENT")


def test_configured_secret_keys_are_the_only_ones_accepted(
    start_sandbox: Callable[..., LiveServer],
) -> None:
    server = start_sandbox(secret_keys=[SECRET_KEY])
    other = "test_sk_" + "A" * 28
    ok = httpx.get(f"{server.url}/v1/payments/nope", headers=basic(SECRET_KEY))
    refused = httpx.get(f"{server.url}/v1/payments/nope", headers=basic(other))
    assert error_of(ok) == (404, "NOT_FOUND_PAYMENT")
    assert error_of(refused) == (401, "UNAUTHORIZED_KEY")


# --------------------------------------------------------------------------- §2 issuance


def test_issue_from_auth_key_returns_billing_object(
    api: httpx.Client, control: httpx.Client
) -> None:
    auth_key = mint_auth_key(control, CUSTOMER_KEY, GOOD_CARD)
    response = api.post(
        "/v1/billing/authorizations/issue",
        json={"authKey": auth_key, "customerKey": CUSTOMER_KEY},
    )
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    billing = response.json()
    assert set(billing) == {
        "mId",
        "customerKey",
        "authenticatedAt",
        "method",
        "billingKey",
        "card",
        "transfers",
        "cardCompany",  # API version 2022-11-16 still has it (removed from 2024-06-01)
        "cardNumber",
    }
    assert billing["transfers"] is None
    assert billing["cardCompany"] == "하나"
    assert billing["mId"] == "tvivarepublica"
    assert billing["customerKey"] == CUSTOMER_KEY
    assert billing["authenticatedAt"] == "2025-03-01T10:00:00+09:00"
    assert billing["method"] == "카드"
    assert re.fullmatch(r"[A-Za-z0-9_-]{43}=", billing["billingKey"])
    assert billing["card"] == {
        "issuerCode": "21",
        "acquirerCode": "21",
        "number": "94100012****789*",
        "cardType": "신용",
        "ownerType": "개인",
    }
    assert billing["cardNumber"] == "94100012****789*"


def test_auth_key_is_single_use(api: httpx.Client, control: httpx.Client) -> None:
    auth_key = mint_auth_key(control, CUSTOMER_KEY)
    body = {"authKey": auth_key, "customerKey": CUSTOMER_KEY}
    first = api.post("/v1/billing/authorizations/issue", json=body)
    second = api.post("/v1/billing/authorizations/issue", json=body)
    unknown = api.post(
        "/v1/billing/authorizations/issue",
        json={"authKey": "bln_unknown", "customerKey": CUSTOMER_KEY},
    )
    assert first.status_code == 200
    assert error_of(second) == (400, "INVALID_BILLING_AUTH")
    assert error_of(unknown) == (400, "INVALID_BILLING_AUTH")


def test_issue_with_another_customer_key_is_refused(
    api: httpx.Client, control: httpx.Client
) -> None:
    auth_key = mint_auth_key(control, CUSTOMER_KEY)
    response = api.post(
        "/v1/billing/authorizations/issue",
        json={"authKey": auth_key, "customerKey": "someone-else"},
    )
    assert error_of(response) == (400, "NOT_MATCHES_CUSTOMER_KEY")


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (b'{"customerKey": "cus_1"}', (400, "INVALID_REQUIRED_PARAM")),
        (b'{"authKey": "bln_x"}', (400, "INVALID_REQUIRED_PARAM")),
        (b"not json", (400, "INVALID_REQUEST")),
        (b"[1, 2]", (400, "INVALID_REQUEST")),
        (b'{"authKey": 5, "customerKey": "cus_1"}', (400, "INVALID_REQUEST")),
    ],
)
def test_issue_request_validation(
    api: httpx.Client, content: bytes, expected: tuple[int, str]
) -> None:
    response = api.post("/v1/billing/authorizations/issue", content=content)
    assert error_of(response) == expected


def _card_issue(api: httpx.Client, number: str, **overrides: str) -> httpx.Response:
    body = {
        "customerKey": CUSTOMER_KEY,
        "cardNumber": number,
        "cardExpirationYear": "30",
        "cardExpirationMonth": "12",
        "customerIdentityNumber": "900101",
        **overrides,
    }
    return api.post("/v1/billing/authorizations/card", json=body)


def test_issue_by_card_number(api: httpx.Client) -> None:
    response = _card_issue(api, GOOD_CARD)
    assert response.status_code == 200
    billing = response.json()
    assert billing["card"]["cardType"] == "신용"
    assert billing["card"]["issuerCode"] == "21"
    assert charge(api, billing["billingKey"], "order-card-1").json()["status"] == "DONE"


@pytest.mark.parametrize(
    ("number", "overrides", "code"),
    [
        ("941000", {}, "INVALID_CARD_NUMBER"),  # measured: a 6-digit number
        ("9410 0012 3456 7890", {}, "INVALID_CARD_NUMBER"),
        (GOOD_CARD, {"cardExpirationMonth": "13"}, "INVALID_CARD_EXPIRATION"),
        (GOOD_CARD, {"cardExpirationYear": "24"}, "INVALID_CARD_EXPIRATION"),  # before 2025-03
        (GOOD_CARD, {"customerIdentityNumber": "901332"}, "INVALID_BIRTH_DAY_FORMAT"),
    ],
)
def test_issue_by_card_rejects_bad_card_data(
    api: httpx.Client, number: str, overrides: dict[str, str], code: str
) -> None:
    assert error_of(_card_issue(api, number, **overrides)) == (400, code)


@pytest.mark.parametrize("number", ["4330121234567890", "5520221234567890"])
def test_unknown_card_type_issues_but_cannot_charge(api: httpx.Client, number: str) -> None:
    # Measured on Toss's test API: these issue with cardType 미확인 and fail at charge time.
    billing = _card_issue(api, number).json()
    assert billing["card"]["cardType"] == "미확인"
    response = charge(api, billing["billingKey"], "order-unknown-type")
    assert error_of(response) == (400, "NOT_SUPPORTED_CARD_TYPE")


@pytest.mark.parametrize(
    ("customer_key", "expected"),
    [
        ("ab", 200),
        ("c" * 50, 200),
        ("c" * 51, 200),  # the SDK's 50-character limit is not the API's
        ("c" * 300, 200),
        ("bad key!", 200),  # measured: the documented charset is not enforced
        ("c", (400, "INVALID_CUSTOMER_KEY")),
        ("c" * 301, (500, "FAILED_DB_PROCESSING")),  # measured
    ],
)
def test_api_customer_key_rules(
    api: httpx.Client, customer_key: str, expected: int | tuple[int, str]
) -> None:
    response = _card_issue(api, GOOD_CARD, customerKey=customer_key)
    if expected == 200:
        assert response.status_code == 200
        billing = response.json()
        assert billing["customerKey"] == customer_key
        paid = charge(api, billing["billingKey"], "order-ck-1", customer_key=customer_key)
        assert paid.json()["status"] == "DONE"
    else:
        assert error_of(response) == expected


def test_issue_with_an_over_long_customer_key_fails_in_the_database(
    api: httpx.Client, control: httpx.Client
) -> None:
    auth_key = mint_auth_key(control, CUSTOMER_KEY)
    response = api.post(
        "/v1/billing/authorizations/issue", json={"authKey": auth_key, "customerKey": "c" * 301}
    )
    assert error_of(response) == (500, "FAILED_DB_PROCESSING")
    body = {"authKey": auth_key, "customerKey": CUSTOMER_KEY}
    assert api.post("/v1/billing/authorizations/issue", json=body).status_code == 200


# --------------------------------------------------------------------------- §3 charge


def test_charge_returns_a_complete_billing_payment(
    api: httpx.Client, control: httpx.Client
) -> None:
    billing_key = new_billing_key(api, control)
    response = charge(api, billing_key, "order-0001", 4900)
    assert response.status_code == 200
    p = response.json()
    assert set(p) == PAYMENT_FIELDS
    assert PAYMENT_KEY.fullmatch(p["paymentKey"])
    assert p["paymentKey"].startswith("tviva20250301100000")
    assert TRANSACTION_KEY.fullmatch(p["lastTransactionKey"])
    assert p["type"] == "BILLING"
    assert p["method"] == "카드"
    assert p["status"] == "DONE"
    assert p["orderId"] == "order-0001"
    assert p["orderName"] == "사주맛피아 Pro 1개월"
    assert p["mId"] == "tvivarepublica"
    assert p["currency"] == "KRW"
    assert p["country"] == "KR"
    assert p["version"] == "2022-11-16"
    assert (p["totalAmount"], p["balanceAmount"]) == (4900, 4900)
    # vat = round((4900 - 0) / 11) = 445 (the docs example's 455 is a typo)
    assert (p["suppliedAmount"], p["vat"], p["taxFreeAmount"]) == (4455, 445, 0)
    assert p["taxExemptionAmount"] == 0
    assert p["requestedAt"] == p["approvedAt"] == "2025-03-01T10:00:00+09:00"
    assert p["useEscrow"] is False
    assert p["cultureExpense"] is False
    assert p["isPartialCancelable"] is True
    assert p["cancels"] is None
    assert p["failure"] is None
    assert re.fullmatch(r"ps_[A-Za-z0-9]{20}", p["secret"])
    assert p["receipt"]["url"].startswith("https://dashboard-sandbox.tosspayments.com/")
    assert p["checkout"]["url"] == (
        f"https://api.tosspayments.com/v1/payments/{p['paymentKey']}/checkout"
    )
    card = p["card"]
    assert set(card) == {
        "amount",
        "issuerCode",
        "acquirerCode",
        "number",
        "installmentPlanMonths",
        "approveNo",
        "useCardPoint",
        "cardType",
        "ownerType",
        "acquireStatus",
        "isInterestFree",
        "interestPayer",
    }
    assert (card["useCardPoint"], card["isInterestFree"], card["interestPayer"]) == (
        False,
        False,
        None,
    )
    assert card["number"] == "94100012****789*"
    assert card["amount"] == 4900
    assert card["acquireStatus"] == "READY"
    assert card["installmentPlanMonths"] == 0
    assert re.fullmatch(r"\d{8}", card["approveNo"])
    assert (card["cardType"], card["ownerType"], card["issuerCode"]) == ("신용", "개인", "21")
    for empty in (
        "virtualAccount",
        "transfer",
        "mobilePhone",
        "giftCertificate",
        "easyPay",
        "cashReceipt",
        "cashReceipts",
        "discount",
        "metadata",
        "easyPayAmount",
        "easyPayDiscountAmount",
        "transactionKey",  # documented like lastTransactionKey, null in recent real bodies
    ):
        assert p[empty] is None, empty


@pytest.mark.parametrize(
    ("amount", "tax_free", "supplied", "vat"),
    [(15000, 0, 13636, 1364), (37400, 0, 34000, 3400), (11000, 10000, 909, 91)],
)
def test_vat_and_supplied_amount(
    api: httpx.Client,
    control: httpx.Client,
    amount: int,
    tax_free: int,
    supplied: int,
    vat: int,
) -> None:
    billing_key = new_billing_key(api, control)
    p = charge(api, billing_key, f"order-vat-{amount}", amount, taxFreeAmount=tax_free).json()
    assert (p["suppliedAmount"], p["vat"], p["taxFreeAmount"]) == (supplied, vat, tax_free)


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        ({"orderId": "abc12"}, (400, "INVALID_ORDER_ID")),
        ({"orderId": "o" * 65}, (400, "INVALID_ORDER_ID")),
        ({"orderId": "order#0001"}, (400, "INVALID_ORDER_ID")),
        ({"orderId": "order.0001"}, (400, "INVALID_ORDER_ID")),
        ({"orderName": ""}, (400, "INVALID_ORDER_NAME")),
        ({"orderName": "가" * 101}, (400, "INVALID_ORDER_NAME")),
        ({"amount": 0}, (400, "BELOW_ZERO_AMOUNT")),
        ({"amount": -100}, (400, "BELOW_ZERO_AMOUNT")),
        ({"amount": 99}, (400, "BELOW_MINIMUM_AMOUNT")),
        ({"amount": "4900"}, (400, "INVALID_REQUEST")),
        ({"amount": 4900.5}, (400, "INVALID_REQUEST")),
        ({"customerKey": "c"}, (400, "INVALID_CUSTOMER_KEY")),
        ({"customerKey": "c" * 301}, (500, "FAILED_DB_PROCESSING")),  # measured
        ({"customerKey": "c" * 300}, (400, "NOT_MATCHES_CUSTOMER_KEY")),  # valid, not ours
        ({"customerEmail": "not-an-email"}, (400, "INVALID_EMAIL")),
        ({"orderName": None}, (400, "INVALID_REQUIRED_PARAM")),
        ({"amount": None}, (400, "INVALID_REQUIRED_PARAM")),
    ],
)
def test_charge_request_validation(
    api: httpx.Client,
    control: httpx.Client,
    overrides: dict[str, object],
    expected: tuple[int, str],
) -> None:
    billing_key = new_billing_key(api, control)
    body: dict[str, object] = {
        "customerKey": CUSTOMER_KEY,
        "amount": 4900,
        "orderId": "order-valid-1",
        "orderName": "Pro",
        **overrides,
    }
    response = api.post(f"/v1/billing/{billing_key}", json=body)
    assert error_of(response) == expected
    assert control.get("/_sandbox/ledger").json()["entries"] == []


@pytest.mark.parametrize("order_id", ["abc-12", "A_b-C=d" * 9 + "x", "o" * 64, "ORDER=1"])
def test_charge_accepts_valid_order_ids(
    api: httpx.Client, control: httpx.Client, order_id: str
) -> None:
    billing_key = new_billing_key(api, control)
    assert charge(api, billing_key, order_id, 100).status_code == 200


def test_charge_ignores_undocumented_fields(api: httpx.Client, control: httpx.Client) -> None:
    # An assumption (CONFORMANCE.md): cardInstallmentPlan (older docs), currency and unknown
    # fields are accepted and ignored on a billing charge; the client never sends them.
    billing_key = new_billing_key(api, control)
    extra = {"cardInstallmentPlan": 3, "currency": "USD", "brandNewField": {"x": 1}}
    paid = charge(api, billing_key, "order-lenient-1", 4900, **extra)
    assert paid.status_code == 200
    body = paid.json()
    assert (body["currency"], body["card"]["installmentPlanMonths"]) == ("KRW", 0)
    assert "brandNewField" not in body


def test_charge_with_unknown_billing_key(api: httpx.Client) -> None:
    assert error_of(charge(api, "no-such-key", "order-0001")) == (404, "NOT_FOUND_BILLING")


def test_charge_with_wrong_customer_key(api: httpx.Client, control: httpx.Client) -> None:
    billing_key = new_billing_key(api, control)
    response = charge(api, billing_key, "order-0001", customer_key="cus_other")
    assert error_of(response) == (400, "NOT_MATCHES_CUSTOMER_KEY")


def test_percent_encoded_billing_key_is_the_same_key(
    api: httpx.Client, control: httpx.Client
) -> None:
    billing_key = new_billing_key(api, control)
    assert billing_key.endswith("=")
    response = charge(api, quote(billing_key, safe=""), "order-encoded")
    assert response.json()["status"] == "DONE"


def test_duplicated_order_id_after_approval_and_after_cancel(
    api: httpx.Client, control: httpx.Client
) -> None:
    billing_key = new_billing_key(api, control)
    payment = charge(api, billing_key, "order-dup-1").json()
    again = charge(api, billing_key, "order-dup-1")
    assert error_of(again) == (400, "DUPLICATED_ORDER_ID")
    api.post(f"/v1/payments/{payment['paymentKey']}/cancel", json={"cancelReason": "환불"})
    after_cancel = charge(api, billing_key, "order-dup-1")
    assert error_of(after_cancel) == (400, "DUPLICATED_ORDER_ID")
    assert len(control.get("/_sandbox/ledger").json()["entries"]) == 2  # approval + cancel


def test_failed_order_id_may_be_reused(api: httpx.Client, control: httpx.Client) -> None:
    declining = new_billing_key(api, control, card="4000000001000000")
    working = new_billing_key(api, control)
    assert error_of(charge(api, declining, "order-retry-1")) == (403, "REJECT_CARD_PAYMENT")
    assert charge(api, working, "order-retry-1").json()["status"] == "DONE"


def test_failed_charges_leave_no_payment_by_default(
    api: httpx.Client, control: httpx.Client
) -> None:
    billing_key = new_billing_key(api, control, card="4000000001000000")
    charge(api, billing_key, "order-failed-1")
    response = api.get("/v1/payments/orders/order-failed-1")
    assert error_of(response) == (404, "NOT_FOUND_PAYMENT")


def test_failed_charges_can_be_recorded_as_aborted(
    start_sandbox: Callable[..., LiveServer],
) -> None:
    server = start_sandbox(record_failed_charges=True)
    with (
        httpx.Client(base_url=server.url, headers=basic(SECRET_KEY)) as api,
        httpx.Client(base_url=server.url) as control,
    ):
        billing_key = new_billing_key(api, control, card="4000000002000000")
        charge(api, billing_key, "order-aborted-1")
        payment = api.get("/v1/payments/orders/order-aborted-1").json()
        assert payment["status"] == "ABORTED"
        assert payment["approvedAt"] is None
        assert payment["failure"]["code"] == "INVALID_STOPPED_CARD"
        assert control.get("/_sandbox/ledger").json()["entries"] == []


def test_billing_charges_send_no_webhook(
    api: httpx.Client, control: httpx.Client, server: LiveServer
) -> None:
    server.sandbox.webhooks.url = "http://merchant.test/webhooks/toss"
    charge(api, new_billing_key(api, control), "order-nohook")
    assert control.get("/_sandbox/webhooks").json()["deliveries"] == []


# --------------------------------------------------------------------------- test cards


@pytest.mark.parametrize(
    ("card", "expected"),
    [
        ("4000000001000000", (403, "REJECT_CARD_PAYMENT")),
        ("4000000002000000", (400, "INVALID_STOPPED_CARD")),
        ("4000000003000000", (400, "EXCEED_MAX_DAILY_PAYMENT_COUNT")),
        ("4000000004000000", (403, "REJECT_CARD_COMPANY")),
        ("4000000005000000", (400, "INVALID_CARD_LOST_OR_STOLEN")),
        ("4000000006000000", (500, "FAILED_CARD_COMPANY_RESPONSE")),
    ],
)
def test_declining_test_cards(
    api: httpx.Client, control: httpx.Client, card: str, expected: tuple[int, str]
) -> None:
    billing_key = new_billing_key(api, control, card=card)
    assert error_of(charge(api, billing_key, "order-decline")) == expected
    assert control.get("/_sandbox/ledger").json()["entries"] == []


def test_card_that_approves_n_times_then_declines(api: httpx.Client, control: httpx.Client) -> None:
    billing_key = new_billing_key(api, control, card="4000000012000000")
    statuses = [charge(api, billing_key, f"order-limited-{i}").status_code for i in range(4)]
    assert statuses == [200, 200, 403, 403]


# --------------------------------------------------------------------------- test code header


def test_test_code_header_forces_the_error(api: httpx.Client, control: httpx.Client) -> None:
    billing_key = new_billing_key(api, control)
    response = charge(
        api, billing_key, "order-tc-1", headers={"TossPayments-Test-Code": "REJECT_CARD_PAYMENT"}
    )
    assert error_of(response) == (403, "REJECT_CARD_PAYMENT")
    assert control.get("/_sandbox/ledger").json()["entries"] == []


@pytest.mark.parametrize(
    ("code", "status"),
    [("PROVIDER_ERROR", 400), ("FAILED_INTERNAL_SYSTEM_PROCESSING", 500), ("NOT_A_CODE", 400)],
)
def test_test_code_status_follows_the_code_table(
    api: httpx.Client, control: httpx.Client, code: str, status: int
) -> None:
    billing_key = new_billing_key(api, control)
    response = charge(api, billing_key, "order-tc-2", headers={"TossPayments-Test-Code": code})
    assert error_of(response) == (status, code)


def test_test_code_header_is_ignored_with_live_keys(
    start_sandbox: Callable[..., LiveServer],
) -> None:
    server = start_sandbox(secret_keys=[LIVE_SECRET_KEY])
    with httpx.Client(base_url=server.url, headers=basic(LIVE_SECRET_KEY)) as live:
        # A live sandbox has no control API: the key comes from the card-number endpoint.
        issued = _card_issue(live, GOOD_CARD)
        assert issued.status_code == 200, issued.text
        headers = {"TossPayments-Test-Code": "REJECT_CARD_PAYMENT"}
        response = charge(live, issued.json()["billingKey"], "order-tc-live", headers=headers)
    assert response.status_code == 200
    assert response.json()["status"] == "DONE"


@pytest.mark.parametrize(
    ("method", "path", "expected"),
    [
        ("GET", "/v1/payments/nope", (404, "NOT_FOUND_PAYMENT")),
        ("GET", "/v1/payments/orders/order-none", (404, "NOT_FOUND_PAYMENT")),
        ("DELETE", "/v1/billing/no-such-key", (404, "NOT_FOUND_BILLING")),
    ],
)
def test_test_code_header_applies_to_posts_only(
    api: httpx.Client, method: str, path: str, expected: tuple[int, str]
) -> None:
    # §14 item 4 ("on all POSTs"): other methods answer as they would without it.
    headers = {"TossPayments-Test-Code": "FORBIDDEN_CONSECUTIVE_REQUEST"}
    assert error_of(api.request(method, path, headers=headers)) == expected


# --------------------------------------------------------------------------- §5 cancel


def _paid(api: httpx.Client, control: httpx.Client, amount: int = 10000) -> dict[str, object]:
    payment: dict[str, object] = charge(
        api, new_billing_key(api, control), "order-cancel-1", amount
    ).json()
    return payment


def _cancel(api: httpx.Client, payment_key: object, **body: object) -> httpx.Response:
    return api.post(f"/v1/payments/{payment_key}/cancel", json={"cancelReason": "환불", **body})


def test_full_cancel_then_already_canceled(api: httpx.Client, control: httpx.Client) -> None:
    payment = _paid(api, control)
    response = _cancel(api, payment["paymentKey"])
    assert response.status_code == 200
    p = response.json()
    assert p["status"] == "CANCELED"
    assert (p["balanceAmount"], p["suppliedAmount"], p["vat"]) == (0, 0, 0)
    assert p["totalAmount"] == 10000
    (entry,) = p["cancels"]
    assert set(entry) == CANCEL_FIELDS
    assert entry["cancelAmount"] == 10000
    assert (entry["taxFreeAmount"], entry["taxExemptionAmount"]) == (0, 0)
    discounts = ("cardDiscountAmount", "transferDiscountAmount", "easyPayDiscountAmount")
    assert [entry[d] for d in discounts] == [0, 0, 0]
    assert (entry["receiptKey"], entry["cancelRequestId"]) == (None, None)
    assert entry["refundableAmount"] == 0
    assert entry["cancelReason"] == "환불"
    assert entry["cancelStatus"] == "DONE"
    assert TOSS_TIME.fullmatch(entry["canceledAt"])
    assert TRANSACTION_KEY.fullmatch(entry["transactionKey"])
    assert p["lastTransactionKey"] == entry["transactionKey"]
    assert entry["transactionKey"] != payment["lastTransactionKey"]
    assert error_of(_cancel(api, payment["paymentKey"])) == (400, "ALREADY_CANCELED_PAYMENT")


def test_partial_cancels_to_zero_stay_partial_canceled(
    api: httpx.Client, control: httpx.Client
) -> None:
    payment = _paid(api, control, 10000)
    first = _cancel(api, payment["paymentKey"], cancelAmount=3000).json()
    assert (first["status"], first["balanceAmount"]) == ("PARTIAL_CANCELED", 7000)
    assert (first["suppliedAmount"], first["vat"]) == (6364, 636)
    rest = _cancel(api, payment["paymentKey"]).json()
    assert (rest["status"], rest["balanceAmount"]) == ("PARTIAL_CANCELED", 0)
    assert [c["cancelAmount"] for c in rest["cancels"]] == [3000, 7000]
    assert [c["refundableAmount"] for c in rest["cancels"]] == [7000, 0]
    again = _cancel(api, payment["paymentKey"], cancelAmount=100)
    assert error_of(again) == (403, "NOT_CANCELABLE_AMOUNT")
    full_again = _cancel(api, payment["paymentKey"])
    assert error_of(full_again) == (403, "NOT_CANCELABLE_AMOUNT")


def test_cancel_above_balance_changes_nothing(api: httpx.Client, control: httpx.Client) -> None:
    payment = _paid(api, control, 10000)
    response = _cancel(api, payment["paymentKey"], cancelAmount=10001)
    assert error_of(response) == (403, "NOT_CANCELABLE_AMOUNT")
    after = api.get(f"/v1/payments/{payment['paymentKey']}").json()
    assert (after["status"], after["balanceAmount"], after["cancels"]) == ("DONE", 10000, None)


def test_refundable_amount_is_an_optimistic_lock(api: httpx.Client, control: httpx.Client) -> None:
    payment = _paid(api, control, 10000)
    stale = _cancel(api, payment["paymentKey"], cancelAmount=1000, refundableAmount=9000)
    assert error_of(stale) == (400, "NOT_MATCHES_REFUNDABLE_AMOUNT")
    fresh = _cancel(api, payment["paymentKey"], cancelAmount=1000, refundableAmount=10000)
    assert fresh.json()["balanceAmount"] == 9000


def test_tax_exempt_payment_cannot_be_partially_cancelled(
    api: httpx.Client, control: httpx.Client
) -> None:
    billing_key = new_billing_key(api, control)
    payment = charge(api, billing_key, "order-exempt", 10000, taxExemptionAmount=500).json()
    assert payment["isPartialCancelable"] is False
    partial = _cancel(api, payment["paymentKey"], cancelAmount=1000)
    assert error_of(partial) == (403, "NOT_ALLOWED_PARTIAL_REFUND")
    full = _cancel(api, payment["paymentKey"]).json()
    assert full["status"] == "CANCELED"
    assert (full["balanceAmount"], full["taxExemptionAmount"]) == (0, 0)
    assert full["cancels"][0]["taxExemptionAmount"] == 500


def test_cancel_reduces_the_tax_free_amount_and_the_vat(
    api: httpx.Client, control: httpx.Client
) -> None:
    billing_key = new_billing_key(api, control)
    payment = charge(api, billing_key, "order-taxfree", 11000, taxFreeAmount=10000).json()
    assert (payment["suppliedAmount"], payment["vat"]) == (909, 91)
    partial = _cancel(api, payment["paymentKey"], cancelAmount=5500, taxFreeAmount=5000).json()
    assert (partial["balanceAmount"], partial["taxFreeAmount"]) == (5500, 5000)
    # vat = round((5500 - 5000) / 11) = 45; supplied = 5500 - 5000 - 45
    assert (partial["suppliedAmount"], partial["vat"]) == (455, 45)
    assert partial["cancels"][0]["taxFreeAmount"] == 5000
    rest = _cancel(api, payment["paymentKey"]).json()
    assert (rest["balanceAmount"], rest["taxFreeAmount"], rest["vat"]) == (0, 0, 0)
    assert [c["taxFreeAmount"] for c in rest["cancels"]] == [5000, 5000]


@pytest.mark.parametrize(
    "body",
    [
        {"cancelAmount": 1000, "taxFreeAmount": 2000},  # more tax-free than cancelled
        {"cancelAmount": 1500, "taxFreeAmount": 0},  # would leave 10000 tax-free of 9500 paid
        {"cancelAmount": 1000, "taxFreeAmount": -1},
        {"cancelAmount": 1000, "currency": "USD"},  # §5: must equal the approved currency
    ],
)
def test_cancel_tax_free_and_currency_must_fit_the_payment(
    api: httpx.Client, control: httpx.Client, body: dict[str, object]
) -> None:
    billing_key = new_billing_key(api, control)
    payment = charge(api, billing_key, "order-taxfree-bad", 11000, taxFreeAmount=10000).json()
    assert error_of(_cancel(api, payment["paymentKey"], **body)) == (400, "INVALID_REQUEST")
    after = api.get(f"/v1/payments/{payment['paymentKey']}").json()
    assert (after["balanceAmount"], after["taxFreeAmount"], after["cancels"]) == (
        11000,
        10000,
        None,
    )
    ok = _cancel(api, payment["paymentKey"], cancelAmount=1000, taxFreeAmount=1000, currency="KRW")
    assert ok.json()["balanceAmount"] == 10000


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ({"cancelReason": None}, (400, "INVALID_REQUIRED_PARAM")),
        ({"cancelReason": "x" * 201}, (400, "INVALID_REQUEST")),
        ({"cancelAmount": 0}, (400, "INVALID_REQUEST")),
        ({"cancelAmount": "1000"}, (400, "INVALID_REQUEST")),
    ],
)
def test_cancel_request_validation(
    api: httpx.Client, control: httpx.Client, body: dict[str, object], expected: tuple[int, str]
) -> None:
    payment = _paid(api, control)
    assert error_of(_cancel(api, payment["paymentKey"], **body)) == expected


def test_cancel_unknown_payment(api: httpx.Client) -> None:
    assert error_of(_cancel(api, "tviva20250301100000xxxxx")) == (404, "NOT_FOUND_PAYMENT")


# --------------------------------------------------------------------------- §6 lookups


def test_lookups_return_the_same_payment(api: httpx.Client, control: httpx.Client) -> None:
    charged = charge(api, new_billing_key(api, control), "order-lookup-1")
    payment_key = charged.json()["paymentKey"]
    by_key = api.get(f"/v1/payments/{payment_key}")
    by_order = api.get("/v1/payments/orders/order-lookup-1")
    assert by_key.content == charged.content
    assert by_order.content == charged.content


def test_lookup_of_unknown_payment(api: httpx.Client) -> None:
    for path in ("/v1/payments/nope", "/v1/payments/orders/order-none"):
        response = api.get(path)
        assert response.status_code == 404
        assert response.json() == {
            "code": "NOT_FOUND_PAYMENT",
            "message": "존재하지 않는 결제 입니다.",
        }


def test_transactions_filter_and_page(
    api: httpx.Client, control: httpx.Client, server: LiveServer
) -> None:
    billing_key = new_billing_key(api, control)
    payment_keys = []
    for i in range(5):
        payment_keys.append(charge(api, billing_key, f"order-tx-{i}").json()["paymentKey"])
        control.post("/_sandbox/clock/advance", json={"hours": 1})
    _cancel(api, payment_keys[0], cancelAmount=1000)  # at 15:00
    control.post("/_sandbox/clock/advance", json={"days": 1})
    charge(api, billing_key, "order-tx-next-day")

    params: dict[str, str | int] = {
        "startDate": "2025-03-01T00:00:00",
        "endDate": "2025-03-01T23:59:59",
        "limit": 2,
    }
    pages: list[list[dict[str, object]]] = []
    while True:
        page = api.get("/v1/transactions", params=params).json()
        pages.append(page)
        if len(page) < 2:
            break
        params["startingAfter"] = page[-1]["transactionKey"]
    rows = [row for page in pages for row in page]
    assert [len(page) for page in pages] == [2, 2, 2, 0]
    assert [r["orderId"] for r in rows] == [f"order-tx-{i}" for i in range(5)] + ["order-tx-0"]
    assert [r["status"] for r in rows] == ["DONE"] * 5 + ["PARTIAL_CANCELED"]
    assert [r["amount"] for r in rows] == [4900] * 5 + [1000]
    assert rows[0]["transactionAt"] == "2025-03-01T10:00:00+09:00"
    assert rows[-1]["transactionAt"] == "2025-03-01T15:00:00+09:00"
    assert {r["customerKey"] for r in rows} == {CUSTOMER_KEY}
    assert len({r["transactionKey"] for r in rows}) == 6
    assert set(rows[0]) >= {
        "mId",
        "transactionKey",
        "paymentKey",
        "orderId",
        "method",
        "customerKey",
        "useEscrow",
        "receiptUrl",
        "status",
        "transactionAt",
        "currency",
        "amount",
    }
    date_only = api.get(
        "/v1/transactions", params={"startDate": "2025-03-02", "endDate": "2025-03-03"}
    ).json()
    assert [r["orderId"] for r in date_only] == ["order-tx-next-day"]


def test_transactions_limit_defaults_to_100_and_goes_up_to_5000(
    api: httpx.Client, control: httpx.Client
) -> None:
    # One approval and 100 partial cancels: 101 transactions.
    payment = charge(api, new_billing_key(api, control), "order-tx-many", 10100).json()
    for _ in range(100):
        assert _cancel(api, payment["paymentKey"], cancelAmount=100).status_code == 200
    window = {"startDate": "2025-03-01", "endDate": "2025-03-02"}
    default = api.get("/v1/transactions", params=window).json()
    assert len(default) == 100
    rest = api.get(
        "/v1/transactions", params={**window, "startingAfter": default[-1]["transactionKey"]}
    ).json()
    assert len(rest) == 1
    assert rest[0]["status"] == "PARTIAL_CANCELED"
    everything = api.get("/v1/transactions", params={**window, "limit": 5000}).json()
    assert [t["transactionKey"] for t in everything] == [
        t["transactionKey"] for t in default + rest
    ]


@pytest.mark.parametrize(
    ("params", "expected"),
    [
        ({"endDate": "2025-03-02"}, (400, "INVALID_REQUIRED_PARAM")),
        (
            {"startDate": "2025-03-01", "endDate": "2025-03-02", "limit": 0},
            (400, "INVALID_REQUEST"),
        ),
        ({"startDate": "2025/03/01", "endDate": "2025-03-02"}, (400, "INVALID_REQUEST")),
        (
            {"startDate": "2025-03-01", "endDate": "2025-03-02", "limit": 5001},
            (400, "INVALID_REQUEST"),
        ),
        (
            {"startDate": "2025-03-01", "endDate": "2025-03-02", "startingAfter": "txrd_x"},
            (400, "INVALID_REQUEST"),
        ),
    ],
)
def test_transactions_validation(
    api: httpx.Client, params: dict[str, str | int], expected: tuple[int, str]
) -> None:
    assert error_of(api.get("/v1/transactions", params=params)) == expected


# --------------------------------------------------------------------------- §7 delete


def test_delete_billing_key(api: httpx.Client, control: httpx.Client) -> None:
    billing_key = new_billing_key(api, control)
    response = api.delete(f"/v1/billing/{billing_key}")
    assert response.status_code == 200
    assert response.content == b""
    assert error_of(charge(api, billing_key, "order-deleted")) == (
        400,
        "ALREADY_REMOVED_BILLING_KEY",
    )
    second = api.delete(f"/v1/billing/{billing_key}")
    assert error_of(second) == (400, "ALREADY_REMOVED_BILLING_KEY")
    assert error_of(api.delete("/v1/billing/no-such-key")) == (404, "NOT_FOUND_BILLING")


def test_second_delete_can_be_configured_to_succeed(
    start_sandbox: Callable[..., LiveServer],
) -> None:
    server = start_sandbox(second_delete="ok")
    with (
        httpx.Client(base_url=server.url, headers=basic(SECRET_KEY)) as api,
        httpx.Client(base_url=server.url) as control,
    ):
        billing_key = new_billing_key(api, control)
        assert api.delete(f"/v1/billing/{billing_key}").status_code == 200
        assert api.delete(f"/v1/billing/{billing_key}").status_code == 200
        events = control.get("/_sandbox/webhooks").json()["deliveries"]
        assert [e["eventType"] for e in events] == ["BILLING_DELETED"]


# --------------------------------------------------------------------------- §4 / §14.11 routes


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("POST", "/v1/billing/authorizations/somekey/payments"),
        ("GET", "/v1/billing/authorizations/somekey"),
        ("DELETE", "/v1/billing/authorizations/somekey"),
        ("GET", "/v1/billing/somekey"),
        ("PUT", "/v1/payments/somekey"),
        ("GET", "/v2/payments"),
    ],
)
def test_unknown_routes_are_not_found_http_method(
    api: httpx.Client, method: str, path: str
) -> None:
    assert error_of(api.request(method, path)) == (404, "NOT_FOUND_HTTP_METHOD")


# --------------------------------------------------------------------------- ledger and control


def test_ledger_records_approvals_and_cancels(api: httpx.Client, control: httpx.Client) -> None:
    billing_key = new_billing_key(api, control)
    payment = charge(api, billing_key, "order-ledger-1", 10000).json()
    control.post("/_sandbox/clock/advance", json={"minutes": 5})
    _cancel(api, payment["paymentKey"], cancelAmount=2500)
    ledger = control.get("/_sandbox/ledger").json()
    approval, cancel = ledger["entries"]
    assert approval == {
        "kind": "approval",
        "transactionKey": payment["lastTransactionKey"],
        "paymentKey": payment["paymentKey"],
        "orderId": "order-ledger-1",
        "customerKey": CUSTOMER_KEY,
        "billingKey": billing_key,
        "amount": 10000,
        "at": "2025-03-01T10:00:00+09:00",
    }
    assert (cancel["kind"], cancel["amount"], cancel["at"]) == (
        "cancel",
        2500,
        "2025-03-01T10:05:00+09:00",
    )
    assert (ledger["approvedAmount"], ledger["canceledAmount"], ledger["netAmount"]) == (
        10000,
        2500,
        7500,
    )


def test_control_api_refuses_live_keys(server: LiveServer) -> None:
    response = httpx.get(f"{server.url}/_sandbox/ledger", headers=basic(LIVE_SECRET_KEY))
    assert error_of(response) == (403, "FORBIDDEN_REQUEST")
    fault = httpx.post(
        f"{server.url}/_sandbox/faults",
        headers=basic(LIVE_SECRET_KEY),
        json={"endpoint": "charge", "kind": "error"},
    )
    assert fault.status_code == 403
    assert server.sandbox.faults.listing()["faults"] == []


@pytest.mark.parametrize("options", [{"secret_keys": [LIVE_SECRET_KEY]}, {"control_api": False}])
def test_control_api_is_absent_in_live_mode(
    start_sandbox: Callable[..., LiveServer], options: dict[str, object]
) -> None:
    server = start_sandbox(**options)
    for method, path in (("GET", "/_sandbox/ledger"), ("POST", "/_sandbox/reset")):
        response = httpx.request(method, server.url + path, json={})
        assert error_of(response) == (404, "NOT_FOUND_HTTP_METHOD")


def test_reset_forgets_everything(api: httpx.Client, control: httpx.Client) -> None:
    billing_key = new_billing_key(api, control)
    charge(api, billing_key, "order-reset-1")
    control.post("/_sandbox/clock/advance", json={"days": 3})
    assert control.post("/_sandbox/reset", json={}).status_code == 200
    assert control.get("/_sandbox/ledger").json()["entries"] == []
    assert control.get("/_sandbox/clock").json() == {"now": "2025-03-01T10:00:00+09:00"}
    assert error_of(charge(api, billing_key, "order-reset-2")) == (404, "NOT_FOUND_BILLING")

"""Merchants, the test-mode rate limit and Accept-Language in the sandbox.

Reference §1 (unknown key → 401 UNAUTHORIZED_KEY; test and live data apart; ``Accept-Language:
en-US``) and §12 (100 requests per minute per API in the test environment).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from sandbox_harness import (
    CLIENT_KEY,
    CUSTOMER_KEY,
    GOOD_CARD,
    LIVE_SECRET_KEY,
    SECRET_KEY,
    LiveServer,
    basic,
    charge,
    mint_auth_key,
    new_billing_key,
    wait_until,
)

from service.sandbox.errors import ENGLISH
from service.sandbox.merchants import (
    SECRET_KEYS_ENV,
    load_specs,
    parse_merchants,
    split_specs,
)
from service.toss import ERROR_CODES

# Two made-up test merchants (API 개별 연동 키 pairs) and a made-up live one.
A_SK, A_CK = "test_sk_" + "A" * 28, "test_ck_" + "A" * 28
B_SK, B_CK = "test_sk_" + "B" * 28, "test_ck_" + "B" * 28
L_SK = "live_" + "sk_" + "L" * 28


def error_of(response: httpx.Response) -> tuple[int, str]:
    return response.status_code, response.json()["code"]


@pytest.fixture
def two(start_sandbox: Callable[..., LiveServer]) -> LiveServer:
    return start_sandbox(secret_keys=[f"{A_CK}:{A_SK}", f"{B_CK}:{B_SK}"])


# --------------------------------------------------------------------------- merchants


def test_merchants_see_only_their_own_data(two: LiveServer) -> None:
    with (
        httpx.Client(base_url=two.url, headers=basic(A_SK)) as a,
        httpx.Client(base_url=two.url, headers=basic(B_SK)) as b,
        httpx.Client(base_url=two.url, headers=basic(B_SK)) as b_control,
        httpx.Client(base_url=two.url) as a_control,  # no key: the first merchant
    ):
        a_key = new_billing_key(a, a_control)
        paid = charge(a, a_key, "order-a-1").json()
        assert paid["mId"] == "tvivarepublica"
        # B sees none of A's payments, billing keys, orders or transactions.
        assert error_of(b.get(f"/v1/payments/{paid['paymentKey']}")) == (404, "NOT_FOUND_PAYMENT")
        assert error_of(b.get("/v1/payments/orders/order-a-1")) == (404, "NOT_FOUND_PAYMENT")
        assert error_of(charge(b, a_key, "order-b-steal")) == (404, "NOT_FOUND_BILLING")
        assert error_of(b.delete(f"/v1/billing/{a_key}")) == (404, "NOT_FOUND_BILLING")
        cancel = b.post(f"/v1/payments/{paid['paymentKey']}/cancel", json={"cancelReason": "r"})
        assert error_of(cancel) == (404, "NOT_FOUND_PAYMENT")
        window = {"startDate": "2025-03-01", "endDate": "2025-03-02"}
        assert b.get("/v1/transactions", params=window).json() == []
        # B's own order with the same orderId is B's business, not a duplicate of A's.
        b_key = new_billing_key(b, b_control)
        b_paid = charge(b, b_key, "order-a-1").json()
        assert (b_paid["status"], b_paid["mId"]) == ("DONE", "tvivarepublica2")
        # A's authKey cannot be redeemed by B.
        auth_key = mint_auth_key(a_control, CUSTOMER_KEY)
        issue = b.post(
            "/v1/billing/authorizations/issue",
            json={"authKey": auth_key, "customerKey": CUSTOMER_KEY},
        )
        assert error_of(issue) == (400, "INVALID_BILLING_AUTH")
        # Each ledger holds its own merchant's charge only.
        a_orders = [e["paymentKey"] for e in a_control.get("/_sandbox/ledger").json()["entries"]]
        b_orders = [e["paymentKey"] for e in b_control.get("/_sandbox/ledger").json()["entries"]]
        assert (a_orders, b_orders) == ([paid["paymentKey"]], [b_paid["paymentKey"]])
        assert a.get(f"/v1/payments/{paid['paymentKey']}").json()["status"] == "DONE"


@pytest.mark.parametrize(
    "key",
    [
        "test_sk_" + "Z" * 28,  # made up
        "live_" + "sk_" + "A" * 28,  # A's key with the other environment's prefix
        LIVE_SECRET_KEY,
        SECRET_KEY,  # the docs key is not configured here
        A_CK,  # a client key is not a secret key
    ],
    ids=["made-up-test", "live-twin", "made-up-live", "docs-key", "client-key"],
)
def test_unknown_keys_are_401(two: LiveServer, key: str) -> None:
    with (
        httpx.Client(base_url=two.url, headers=basic(A_SK)) as a,
        httpx.Client(base_url=two.url) as control,
    ):
        a_key = new_billing_key(a, control)
        paid = charge(a, a_key, "order-a-2").json()
    with httpx.Client(base_url=two.url, headers=basic(key)) as stranger:
        for response in (
            stranger.get(f"/v1/payments/{paid['paymentKey']}"),
            stranger.get("/v1/payments/orders/order-a-2"),
            charge(stranger, a_key, "order-stranger"),
            stranger.delete(f"/v1/billing/{a_key}"),
        ):
            assert error_of(response) == (401, "UNAUTHORIZED_KEY")
            assert response.json()["message"] == ERROR_CODES["UNAUTHORIZED_KEY"].message


def test_test_and_live_merchants_never_share_data(
    start_sandbox: Callable[..., LiveServer],
) -> None:
    server = start_sandbox(secret_keys=[A_SK, L_SK])
    card = {
        "customerKey": CUSTOMER_KEY,
        "cardNumber": GOOD_CARD,
        "cardExpirationYear": "30",
        "cardExpirationMonth": "12",
        "customerIdentityNumber": "900101",
    }
    with (
        httpx.Client(base_url=server.url, headers=basic(A_SK)) as test,
        httpx.Client(base_url=server.url, headers=basic(L_SK)) as live,
    ):
        test_key = test.post("/v1/billing/authorizations/card", json=card).json()["billingKey"]
        live_key = live.post("/v1/billing/authorizations/card", json=card).json()["billingKey"]
        # Neither key charges the other environment's billing key.
        assert error_of(charge(live, test_key, "order-live-1")) == (404, "NOT_FOUND_BILLING")
        assert error_of(charge(test, live_key, "order-test-1")) == (404, "NOT_FOUND_BILLING")
        test_paid = charge(test, test_key, "order-test-2").json()
        assert error_of(live.get(f"/v1/payments/{test_paid['paymentKey']}")) == (
            404,
            "NOT_FOUND_PAYMENT",
        )
        # A configured live key switches the control API off entirely.
        assert error_of(httpx.get(f"{server.url}/_sandbox/ledger")) == (
            404,
            "NOT_FOUND_HTTP_METHOD",
        )


def test_control_api_acts_on_the_merchant_of_its_key(two: LiveServer) -> None:
    hook = {"url": "http://merchant-b.test/hooks"}
    with httpx.Client(base_url=two.url) as control:
        assert control.put("/_sandbox/webhook", json=hook, headers=basic(B_SK)).is_success
        unknown = control.get("/_sandbox/ledger", headers=basic("test_sk_" + "Z" * 28))
        assert error_of(unknown) == (401, "UNAUTHORIZED_KEY")
    a, b = two.sandbox.merchants
    assert (a.webhooks.url, b.webhooks.url) == (None, hook["url"])


def test_webhooks_are_the_merchants_own(two: LiveServer) -> None:
    with (
        httpx.Client(base_url=two.url, headers=basic(B_SK)) as b,
        httpx.Client(base_url=two.url) as a_control,
    ):
        billing_key = new_billing_key(b, b)
        b.delete(f"/v1/billing/{billing_key}")
        b_events = b.get("/_sandbox/webhooks").json()["deliveries"]
        a_events = a_control.get("/_sandbox/webhooks").json()["deliveries"]
    assert [d["eventType"] for d in b_events] == ["BILLING_DELETED"]
    assert a_events == []


def test_sdk_window_mints_the_auth_key_for_the_client_keys_merchant(two: LiveServer) -> None:
    form = {
        "clientKey": B_CK,
        "customerKey": CUSTOMER_KEY,
        "successUrl": "https://merchant.test/ok",
        "failUrl": "https://merchant.test/fail",
        "cardNumber": GOOD_CARD,
        "expiry": "12/30",
        "identity": "900101",
        "action": "submit",
    }
    with httpx.Client(base_url=two.url) as browser:
        landed = browser.post("/v2/billing-auth", data=form)
        assert landed.status_code == 303
        auth_key = httpx.URL(landed.headers["location"]).params["authKey"]
        unknown = browser.get("/v2/billing-auth", params={**form, "clientKey": CLIENT_KEY})
        assert unknown.status_code == 400
        assert "clientKey" in unknown.text
    body = {"authKey": auth_key, "customerKey": CUSTOMER_KEY}
    with httpx.Client(base_url=two.url) as api:
        wrong = api.post("/v1/billing/authorizations/issue", json=body, headers=basic(A_SK))
        right = api.post("/v1/billing/authorizations/issue", json=body, headers=basic(B_SK))
    assert error_of(wrong) == (400, "INVALID_BILLING_AUTH")
    assert (right.status_code, right.json()["mId"]) == (200, "tvivarepublica2")


@pytest.mark.parametrize(
    ("specs", "says"),
    [
        ([f"{A_SK}:{L_SK}"], "mixes test and live"),
        ([A_CK], "no secret key"),
        ([A_SK, f"{B_CK}:{A_SK}"], "two merchants"),
        (["\ufeff" + A_SK], "byte-order mark"),
        (["sk_without_environment"], "not a Toss key"),
        ([f"{A_SK}:"], "empty"),
        ([], "no merchant"),
    ],
)
def test_bad_merchant_specs_are_refused_with_a_clear_message(specs: list[str], says: str) -> None:
    with pytest.raises(ValueError, match=says) as info:
        parse_merchants(specs)
    assert "A" * 28 not in str(info.value)  # never the key itself


def test_merchants_load_from_flags_file_and_environment(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    keys.write_text(f"# merchants\n{A_CK}:{A_SK}  # first\n\n{B_SK}\n", encoding="utf-8")
    specs = load_specs([SECRET_KEY], str(keys), {SECRET_KEYS_ENV: f"{L_SK}\n"})
    assert specs == [SECRET_KEY, f"{A_CK}:{A_SK}", B_SK, L_SK]
    assert [m.m_id for m in parse_merchants(specs)] == [
        "tvivarepublica",
        "tvivarepublica2",
        "tvivarepublica3",
        "tvivarepublica4",
    ]
    assert split_specs("") == []
    merchant = parse_merchants([f"{A_CK}:{A_SK}"])[0]
    assert A_SK not in repr(merchant)


# --------------------------------------------------------------------------- rate limit


def test_test_mode_allows_100_requests_per_minute_per_api(
    start_sandbox: Callable[..., LiveServer],
) -> None:
    # The default is Toss's documented test-environment rate (reference §12).
    server = start_sandbox(secret_keys=[f"{SECRET_KEY}:{A_SK}"])
    with (
        httpx.Client(base_url=server.url, headers=basic(SECRET_KEY)) as api,
        httpx.Client(base_url=server.url) as control,
    ):
        answers = [api.get(f"/v1/payments/p-{i}").status_code for i in range(110)]
        assert answers == [404] * 100 + [429] * 10
        limited = api.get("/v1/payments/p-x")
        assert error_of(limited) == (429, "TOO_MANY_REQUESTS")
        assert limited.headers["Retry-After"] == "60"  # the sandbox clock stands still
        # Per API: another endpoint of the same key is untouched.
        assert error_of(api.get("/v1/payments/orders/order-x")) == (404, "NOT_FOUND_PAYMENT")
        # Per key: another secret key of the same merchant has its own budget.
        assert api.get("/v1/payments/p-y", headers=basic(A_SK)).status_code == 404
        # A sliding minute: 30 s on, the oldest requests are 30 s from leaving the window.
        control.post("/_sandbox/clock/advance", json={"seconds": 30})
        assert api.get("/v1/payments/p-z").headers["Retry-After"] == "30"
        control.post("/_sandbox/clock/advance", json={"seconds": 30})
        assert api.get("/v1/payments/p-z").status_code == 404
        # What a benchmark reads: the 429s answered, per API.
        assert control.get("/_sandbox/rate-limit").json() == {
            "perMinute": 100,
            "refused": {"get_payment": 12},
        }


def test_rate_limited_requests_are_not_processed(start_sandbox: Callable[..., LiveServer]) -> None:
    server = start_sandbox(rate_limit=2)
    with (
        httpx.Client(base_url=server.url, headers=basic(SECRET_KEY)) as api,
        httpx.Client(base_url=server.url) as control,
    ):
        billing_key = new_billing_key(api, control)
        key = {"Idempotency-Key": "k-rate"}
        assert charge(api, billing_key, "order-rate-1").status_code == 200
        assert charge(api, billing_key, "order-rate-2").status_code == 200
        limited = charge(api, billing_key, "order-rate-3", headers=key)
        assert error_of(limited) == (429, "TOO_MANY_REQUESTS")
        assert control.get("/_sandbox/ledger").json()["approvedAmount"] == 9800
        control.post("/_sandbox/clock/advance", json={"minutes": 1})
        # Not stored under the Idempotency-Key: the re-send is processed.
        assert charge(api, billing_key, "order-rate-3", headers=key).status_code == 200


def test_rate_limit_can_be_turned_off(start_sandbox: Callable[..., LiveServer]) -> None:
    server = start_sandbox(rate_limit=None)
    with httpx.Client(base_url=server.url, headers=basic(SECRET_KEY)) as api:
        assert {api.get(f"/v1/payments/p-{i}").status_code for i in range(150)} == {404}


def test_live_keys_have_no_rate_limit(start_sandbox: Callable[..., LiveServer]) -> None:
    # Toss documents no number for live; the limit is the test environment's.
    server = start_sandbox(secret_keys=[L_SK], rate_limit=1)
    with httpx.Client(base_url=server.url, headers=basic(L_SK)) as api:
        assert {api.get(f"/v1/payments/p-{i}").status_code for i in range(5)} == {404}


# --------------------------------------------------------------------------- Accept-Language


def test_every_code_has_an_english_message() -> None:
    assert set(ERROR_CODES) <= set(ENGLISH)
    assert all(text.isascii() and text for text in ENGLISH.values())


@pytest.mark.parametrize(
    "code",
    [
        # what the billing core acts on: declines, dead cards, reconcile, processed errors
        "REJECT_CARD_PAYMENT",
        "EXCEED_MAX_DAILY_PAYMENT_COUNT",
        "INVALID_STOPPED_CARD",
        "ALREADY_REMOVED_BILLING_KEY",
        "DUPLICATED_ORDER_ID",
        "ALREADY_PROCESSED_PAYMENT",
        "PROVIDER_ERROR",
        "FORBIDDEN_CONSECUTIVE_REQUEST",
        "IDEMPOTENT_REQUEST_PROCESSING",
        "FAILED_INTERNAL_SYSTEM_PROCESSING",
    ],
)
def test_en_us_answers_in_english(api: httpx.Client, control: httpx.Client, code: str) -> None:
    billing_key = new_billing_key(api, control)
    headers = {"TossPayments-Test-Code": code}
    korean = charge(api, billing_key, "order-lang-1", headers=headers)
    english = charge(
        api, billing_key, "order-lang-2", headers={**headers, "Accept-Language": "en-US"}
    )
    assert korean.json() == {"code": code, "message": ERROR_CODES[code].message}
    assert english.status_code == korean.status_code
    assert english.json() == {"code": code, "message": ENGLISH[code]}


def test_en_us_covers_the_sandbox_own_answers(server: LiveServer, api: httpx.Client) -> None:
    english = {"Accept-Language": "en-US,ko;q=0.8"}
    missing = api.post("/v1/billing/some-key", json={}, headers=english)
    assert missing.json() == {
        "code": "INVALID_REQUIRED_PARAM",
        "message": ENGLISH["INVALID_REQUIRED_PARAM"],
    }
    unknown = httpx.get(f"{server.url}/v1/payments/x", headers={**basic("test_sk_zz"), **english})
    assert unknown.json()["message"] == ENGLISH["UNAUTHORIZED_KEY"]
    route = httpx.get(f"{server.url}/v1/nowhere", headers=english)
    assert route.json()["message"] == ENGLISH["NOT_FOUND_HTTP_METHOD"]
    # Korean first (or no header) stays Korean.
    korean = api.get("/v1/payments/x", headers={"Accept-Language": "ko-KR,en-US;q=0.5"})
    assert korean.json()["message"] == ERROR_CODES["NOT_FOUND_PAYMENT"].message


# --------------------------------------------------------------------------- the command


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


@pytest.fixture
def command(tmp_path: Path) -> Iterator[str]:
    """``saju-billing sandbox`` as two merchants (one from a flag, one from a file)."""
    keys = tmp_path / "merchant-b"
    keys.write_text(f"{B_CK}:{B_SK}\n", encoding="utf-8")
    port = _free_port()
    log = tmp_path / "sandbox.log"
    env = {k: v for k, v in os.environ.items() if k != SECRET_KEYS_ENV}
    args = ["--port", str(port), "--secret-key", f"{A_CK}:{A_SK}"]
    args += ["--secret-keys-file", str(keys), "--record-failed-charges"]
    url = f"http://127.0.0.1:{port}"
    with log.open("wb") as err:
        process = subprocess.Popen(
            [sys.executable, "-m", "service.cli", "sandbox", *args],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=err,
        )

        def up() -> bool:
            if process.poll() is not None:
                raise AssertionError(log.read_text(encoding="utf-8", errors="replace"))
            try:
                httpx.get(f"{url}/v1/payments/x", timeout=1)
            except httpx.TransportError:
                return False
            return True

        try:
            wait_until(up, "the sandbox command to listen", timeout=30)
            yield url
        finally:
            process.terminate()
            process.wait(20)


def test_the_command_runs_two_isolated_merchants_with_a_rate_limit(command: str) -> None:
    with (
        httpx.Client(base_url=command, headers=basic(A_SK)) as a,
        httpx.Client(base_url=command, headers=basic(B_SK)) as b,
    ):
        # The control API picks merchant A by its key.
        auth_key = mint_auth_key(a, CUSTOMER_KEY, "4000000001000000")
        issued = a.post(
            "/v1/billing/authorizations/issue",
            json={"authKey": auth_key, "customerKey": CUSTOMER_KEY},
        )
        declined = charge(a, issued.json()["billingKey"], "order-cmd-1")
        assert error_of(declined) == (403, "REJECT_CARD_PAYMENT")
        # --record-failed-charges: the failed charge is an ABORTED payment with its failure.
        aborted = a.get("/v1/payments/orders/order-cmd-1").json()
        assert (aborted["status"], aborted["failure"]["code"]) == ("ABORTED", "REJECT_CARD_PAYMENT")
        assert error_of(b.get("/v1/payments/orders/order-cmd-1")) == (404, "NOT_FOUND_PAYMENT")
        assert error_of(a.get("/v1/payments/x", headers=basic(SECRET_KEY))) == (
            401,
            "UNAUTHORIZED_KEY",
        )
        answers = [b.get(f"/v1/payments/p-{i}") for i in range(101)]
        assert [r.status_code for r in answers[:100]] == [404] * 100
        assert error_of(answers[100]) == (429, "TOO_MANY_REQUESTS")
        assert 1 <= int(answers[100].headers["Retry-After"]) <= 60


def test_the_command_refuses_a_pasted_key_with_a_newline(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "service.cli", "sandbox", "--secret-key", A_SK + "\r"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2
    assert "line break" in result.stderr
    assert A_SK not in result.stderr

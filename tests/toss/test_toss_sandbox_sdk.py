"""The SDK v2 stand-in over plain HTTP: script, card form, redirects (the browser test drives
the same pages in Chromium)."""

from __future__ import annotations

from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
from sandbox_harness import CLIENT_KEY, CUSTOMER_KEY, WIDGET_CLIENT_KEY, LiveServer

SUCCESS_URL = "https://shop.test/billing/success?plan=pro&ref=a%26b"
FAIL_URL = "https://shop.test/billing/fail"


def _window(**overrides: str) -> dict[str, str]:
    return {
        "clientKey": CLIENT_KEY,
        "customerKey": CUSTOMER_KEY,
        "successUrl": SUCCESS_URL,
        "failUrl": FAIL_URL,
        **overrides,
    }


def _submit(control: httpx.Client, **fields: str) -> httpx.Response:
    return control.post("/v2/billing-auth", data={**_window(), **fields})


def test_script_defines_toss_payments(control: httpx.Client) -> None:
    response = control.get("/v2/standard")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("application/javascript")
    assert "global.TossPayments = TossPayments" in response.text
    assert "requestBillingAuth" in response.text


def test_card_form_escapes_what_it_echoes(control: httpx.Client) -> None:
    response = control.get("/v2/billing-auth", params=_window())
    assert response.status_code == 200
    assert 'name="successUrl" value="https://shop.test/billing/success?plan=pro&amp;ref=a%26b"' in (
        response.text
    )
    assert "카드번호" in response.text


@pytest.mark.parametrize(
    "overrides",
    [
        {"clientKey": WIDGET_CLIENT_KEY},
        {"customerKey": "x"},
        {"customerKey": "c" * 51},
        {"customerKey": "bad key!"},
        {"successUrl": "/billing/success"},
        {"failUrl": "shop.test/fail"},
    ],
)
def test_card_form_refuses_what_the_sdk_refuses(
    control: httpx.Client, overrides: dict[str, str]
) -> None:
    assert control.get("/v2/billing-auth", params=_window(**overrides)).status_code == 400
    assert _submit(control, action="register", **overrides).status_code == 400


def test_registration_redirects_with_a_one_time_auth_key(
    server: LiveServer, api: httpx.Client, control: httpx.Client
) -> None:
    response = _submit(
        control,
        action="register",
        cardNumber="9410-0012-3456-7890",
        expiry="12/30",
        identity="900101",
    )
    assert response.status_code == 303
    location = urlsplit(response.headers["location"])
    assert (location.netloc, location.path) == ("shop.test", "/billing/success")
    query = parse_qs(location.query)
    assert query["plan"] == ["pro"]
    assert query["ref"] == ["a&b"]
    assert query["customerKey"] == [CUSTOMER_KEY]
    (auth_key,) = query["authKey"]
    body = {"authKey": auth_key, "customerKey": CUSTOMER_KEY}
    assert api.post("/v1/billing/authorizations/issue", json=body).status_code == 200
    again = api.post("/v1/billing/authorizations/issue", json=body)
    assert again.json()["code"] == "INVALID_BILLING_AUTH"


@pytest.mark.parametrize(
    ("fields", "code"),
    [
        ({"action": "cancel"}, "PAY_PROCESS_CANCELED"),
        (
            {"action": "register", "cardNumber": "1234", "expiry": "12/30", "identity": "900101"},
            "INVALID_CARD_NUMBER",
        ),
        (
            {
                "action": "register",
                "cardNumber": "9410001234567890",
                "expiry": "01/20",
                "identity": "900101",
            },
            "INVALID_CARD_EXPIRATION",
        ),
        (
            {
                "action": "register",
                "cardNumber": "9410001234567890",
                "expiry": "12/30",
                "identity": "9001",
            },
            "INVALID_BIRTH_DAY_FORMAT",
        ),
    ],
)
def test_cancel_or_bad_card_redirects_to_fail_url(
    control: httpx.Client, fields: dict[str, str], code: str
) -> None:
    response = _submit(control, **fields)
    assert response.status_code == 303
    location = urlsplit(response.headers["location"])
    assert f"https://{location.netloc}{location.path}" == FAIL_URL
    query = parse_qs(location.query)
    assert query["code"] == [code]
    assert query["message"][0]


def test_fail_url_keeps_its_own_query(control: httpx.Client) -> None:
    # §11: {failUrl}?code=…&message=…, with whatever query failUrl already had.
    response = _submit(control, action="cancel", failUrl=FAIL_URL + "?plan=pro")
    assert response.status_code == 303
    location = urlsplit(response.headers["location"])
    assert f"https://{location.netloc}{location.path}" == FAIL_URL
    assert parse_qs(location.query) == {
        "plan": ["pro"],
        "code": ["PAY_PROCESS_CANCELED"],
        "message": ["사용자에 의해 결제가 취소되었습니다."],
    }

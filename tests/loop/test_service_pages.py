"""The service's own pages: the hosted card page in a real browser, a registration that expired
before its redirect came back, and rotating the billing-key encryption key online."""

from __future__ import annotations

import os
from datetime import timedelta

import httpx
import pytest
from loopkit import CLIENT_KEY, SECRET_KEY, Stack
from playwright.sync_api import sync_playwright

from service import cli
from service.app import issue_idempotency_key
from service.crypto import Keyring
from service.runtime.browser import CHROMIUM
from service.runtime.browser import launch as browser_launch


@pytest.mark.slow
@pytest.mark.browser
@pytest.mark.skipif(not os.path.exists(CHROMIUM), reason=f"{CHROMIUM} is not installed")
def test_the_hosted_card_page_registers_a_card_in_a_real_browser(stack: Stack) -> None:
    reg = stack.bl.api("b1", "begin_registration", "pro")
    with sync_playwright() as playwright:
        browser = browser_launch(playwright)
        try:
            page = browser.new_page()
            page.goto(f"{stack.service.url}/billing/cards/{reg['customerKey']}")
            page.click("#register")  # the page calls requestBillingAuth of the SDK
            page.wait_for_url(f"{stack.sandbox.url}/v2/billing-auth?**")
            page.fill("#cardNumber", "9410 0012 3456 7890")
            page.fill("#expiry", "12/30")
            page.fill("#identity", "900101")
            # The success redirect goes through the service and on to the (absent) app.
            with page.expect_request(lambda r: r.url.startswith("http://app.example/")):
                page.click("#submit")
        finally:
            browser.close()
    stack.wait(
        lambda: stack.bl.scalar("select status::text from billing.subscriptions") == "active",
        "the subscription to be active",
    )


def test_a_redirect_after_the_registration_expired_never_reaches_toss(stack: Stack) -> None:
    reg = stack.bl.api("u1", "begin_registration", "pro")
    customer_key = reg["customerKey"]
    auth = httpx.BasicAuth(SECRET_KEY, "")
    auth_key = httpx.post(
        f"{stack.sandbox.url}/_sandbox/auth-keys", json={"customerKey": customer_key}, auth=auth
    ).json()["authKey"]
    stack.bl.advance(timedelta(days=2))  # the registration has expired meanwhile
    with httpx.Client(base_url=stack.service.url) as web:
        page = web.get(
            "/billing/success", params={"customerKey": customer_key, "authKey": auth_key}
        )
    assert page.status_code == 409
    assert "REGISTRATION_NOT_PENDING" in page.text
    assert stack.bl.scalar("select count(*) from billing.payment_methods") == 0
    # No billing key was issued for it: the authKey is still unspent at Toss, so no key is left
    # behind to delete. (A registration that expires between that check and the record still
    # has its new key deleted by the service.)
    issued = httpx.post(
        f"{stack.sandbox.url}/v1/billing/authorizations/issue",
        json={"authKey": auth_key, "customerKey": customer_key},
        headers={"Idempotency-Key": issue_idempotency_key(customer_key, auth_key)},
        auth=auth,
    )
    assert issued.status_code == 200, issued.text
    assert issued.json()["customerKey"] == customer_key


def test_keys_rotate_online_to_the_active_key_id(
    stack: Stack, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    stack.register("u1")
    stack.register("u2")
    stack.wait(
        lambda: (
            stack.bl.scalar("select count(*) from billing.subscriptions where status = 'active'")
            == 2
        ),
        "first charges",
    )
    old = stack.settings.billing_keyring.get_secret_value()
    new_entry = f"k2:{Keyring.generate_key()}"
    env = {
        "SAJU_DATABASE_URL": stack.settings.database_url.get_secret_value(),
        "SAJU_TOSS_SECRET_KEY": SECRET_KEY,
        "SAJU_TOSS_CLIENT_KEY": CLIENT_KEY,
        "SAJU_BILLING_KEYRING": f"{new_entry},{old}",
        "SAJU_BILLING_ACTIVE_KEY_ID": "k2",
        "SAJU_DOORBELL_TOKEN": "x" * 24,
    }
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert cli.main(["keys", "rotate"]) == 0
    assert '"rotated": 2' in capsys.readouterr().out
    assert stack.bl.all("select distinct billing_key_key_id from billing.payment_methods") == [
        {"billing_key_key_id": "k2"}
    ]
    assert cli.main(["keys", "rotate"]) == 0  # nothing left: safe to run again
    assert '"rotated": 0' in capsys.readouterr().out
    rotated = Keyring.parse(f"{new_entry},{old}", "k2")
    opened = {
        rotated.open(bytes(r["billing_key_ciphertext"]), "k2", r["customer_key"])
        for r in stack.bl.all(
            "select customer_key, billing_key_ciphertext from billing.payment_methods"
        )
    }
    assert opened == {e["billingKey"] for e in stack.ledger()}

"""A real browser registers a card through the SDK stand-in; the client then issues and charges."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from urllib.parse import parse_qs, urlsplit

import anyio
import pytest
from playwright.sync_api import sync_playwright
from sandbox_harness import (
    CLIENT_KEY,
    SECRET_KEY,
    WIDGET_CLIENT_KEY,
    LiveServer,
)
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse
from starlette.routing import Route

from service.runtime.browser import CHROMIUM
from service.runtime.browser import launch as browser_launch
from service.toss import TossClient

CUSTOMER_KEY = "cus_7d1e5a40-browser"

pytestmark = [
    pytest.mark.browser,
    pytest.mark.slow,
    pytest.mark.skipif(not os.path.exists(CHROMIUM), reason=f"{CHROMIUM} is not installed"),
]


def merchant_app(sandbox_url: str) -> Starlette:
    """The smallest merchant: a page that starts billing registration, and its return pages."""

    async def checkout(request: Request) -> HTMLResponse:
        client_key = request.query_params.get("clientKey", CLIENT_KEY)
        return HTMLResponse(
            f"""<!doctype html><meta charset="utf-8"><title>Pro 구독</title>
<script src="{sandbox_url}/v2/standard"></script>
<button id="subscribe">카드 등록하고 구독하기</button>
<script>
  window.startBilling = async function (overrides) {{
    const payment = TossPayments({json.dumps(client_key)})
      .payment({{ customerKey: {json.dumps(CUSTOMER_KEY)} }});
    return payment.requestBillingAuth(Object.assign({{
      method: "CARD",
      successUrl: location.origin + "/billing/success?plan=pro",
      failUrl: location.origin + "/billing/fail",
      customerName: "김사주",
      customerEmail: "saju@example.com",
    }}, overrides || {{}}));
  }};
  document.getElementById("subscribe").addEventListener("click", () => window.startBilling());
</script>"""
        )

    async def landed(request: Request) -> HTMLResponse:
        return HTMLResponse(f"<!doctype html><title>{request.url.path}</title><p>ok</p>")

    return Starlette(
        routes=[
            Route("/checkout", checkout),
            Route("/billing/success", landed),
            Route("/billing/fail", landed),
        ]
    )


@pytest.fixture
def merchant(server: LiveServer) -> Iterator[LiveServer]:
    with LiveServer(merchant_app(server.url)) as merchant_server:
        yield merchant_server


def _query(url: str) -> dict[str, list[str]]:
    return parse_qs(urlsplit(url).query)


def test_card_registration_in_a_real_browser(server: LiveServer, merchant: LiveServer) -> None:
    with sync_playwright() as playwright:
        browser = browser_launch(playwright)
        try:
            page = browser.new_page()

            # The SDK's own checks reject bad setups before any navigation.
            page.goto(f"{merchant.url}/checkout?clientKey={WIDGET_CLIENT_KEY}")
            widget = page.evaluate("startBilling().then(() => 'ok', e => e.code)")
            assert widget == "NOT_SUPPORTED_WIDGET_KEY"
            page.goto(f"{merchant.url}/checkout")
            relative = page.evaluate(
                "startBilling({successUrl: '/billing/success'}).then(() => 'ok', e => e.code)"
            )
            assert relative == "INCORRECT_SUCCESS_URL_FORMAT"
            relative_fail = page.evaluate(
                "startBilling({failUrl: 'billing/fail'}).then(() => 'ok', e => e.code)"
            )
            assert relative_fail == "INCORRECT_FAIL_URL_FORMAT"
            no_method = page.evaluate(
                "startBilling({method: undefined}).then(() => 'ok', e => e.code)"
            )
            assert no_method == "NOT_SUPPORTED_METHOD"
            # payment({customerKey}) checks the key at once (SDK rule: 2-50 of A-Za-z0-9-_=.@).
            codes = page.evaluate(
                """([clientKey, keys]) => keys.map((customerKey) => {
                    try { TossPayments(clientKey).payment({ customerKey }); return "ok"; }
                    catch (e) { return e.code; }
                })""",
                [CLIENT_KEY, ["test_sk_abcdef12", "ab", "c" * 50, "c" * 51, "a", "bad key!"]],
            )
            assert codes == [
                "INSECURE_KEY_USAGE",
                "ok",
                "ok",
                "INVALID_CUSTOMER_KEY",
                "INVALID_CUSTOMER_KEY",
                "INVALID_CUSTOMER_KEY",
            ]
            anonymous = page.evaluate(
                """(clientKey) => TossPayments(clientKey)
                    .payment({ customerKey: TossPayments.ANONYMOUS })
                    .requestBillingAuth({ method: "CARD", successUrl: location.href,
                                          failUrl: location.href })
                    .then(() => "ok", (e) => e.code)""",
                CLIENT_KEY,
            )
            assert anonymous == "INVALID_CUSTOMER_KEY"  # billing needs a real customerKey

            # Cancelling the card window lands on failUrl with PAY_PROCESS_CANCELED.
            page.click("#subscribe")
            page.wait_for_url(f"{server.url}/v2/billing-auth?**")
            page.click("#cancel")
            page.wait_for_url(f"{merchant.url}/billing/fail?**")
            assert _query(page.url)["code"] == ["PAY_PROCESS_CANCELED"]

            # An invalid card number lands on failUrl with Toss's code.
            page.goto(f"{merchant.url}/checkout")
            page.click("#subscribe")
            page.fill("#cardNumber", "1234")
            page.fill("#expiry", "12/30")
            page.fill("#identity", "900101")
            page.click("#submit")
            page.wait_for_url(f"{merchant.url}/billing/fail?**")
            assert _query(page.url)["code"] == ["INVALID_CARD_NUMBER"]

            # A good card lands on successUrl with customerKey and a one-time authKey.
            page.goto(f"{merchant.url}/checkout")
            page.click("#subscribe")
            assert "카드번호" in page.inner_text("body")
            page.fill("#cardNumber", "9410 0012 3456 7890")
            page.fill("#expiry", "12/30")
            page.fill("#identity", "900101")
            page.click("#submit")
            page.wait_for_url(f"{merchant.url}/billing/success?**")
            landed = _query(page.url)
        finally:
            browser.close()

    assert landed["plan"] == ["pro"]  # the successUrl's own query survives
    assert landed["customerKey"] == [CUSTOMER_KEY]
    (auth_key,) = landed["authKey"]

    async def issue_and_charge() -> tuple[str, str, int]:
        async with TossClient(SECRET_KEY, base_url=server.url) as toss:
            billing = await toss.issue_billing_key(
                auth_key, CUSTOMER_KEY, idempotency_key="reg-browser-0001"
            )
            payment = await toss.charge(
                billing.billing_key,
                CUSTOMER_KEY,
                9900,
                "order-browser-0001",
                "사주맛피아 Pro 1개월",
                customer_email="saju@example.com",
                customer_name="김사주",
                idempotency_key="attempt-browser-0001",
            )
            assert billing.card is not None
            return billing.card.number, payment.status, payment.total_amount

    card_number, status, amount = anyio.run(issue_and_charge)
    assert card_number == "94100012****789*"
    assert (status, amount) == ("DONE", 9900)

"""Test harness for the Toss client and sandbox: keys, a live uvicorn server, a webhook sink."""

from __future__ import annotations

import base64
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime

import httpx
import liveserver

from service.sandbox.context import Sandbox
from service.toss import KST

# Toss's public docs test keys (API 개별 연동 키 and 결제위젯 연동 키); they move no money.
SECRET_KEY = "test_sk_zXLkKEypNArWmo50nX3lmeaxYG5R"
CLIENT_KEY = "test_ck_D5GePWvyJnrK0W0k6q8gLzN97Eoq"
WIDGET_SECRET_KEY = "test_gsk_docs_OaPz8L5KdmQXkzRz3y47BMw6"
WIDGET_CLIENT_KEY = "test_gck_docs_Ovk5rk1EwkEbP0W43n07xlzm"
# A live-looking key, assembled at run time and too short to be anyone's real key.
LIVE_SECRET_KEY = "live_" + "sk_" + "x" * 4

START = datetime(2025, 3, 1, 10, 0, 0, tzinfo=KST)
CUSTOMER_KEY = "cus_3f2b9c0e-sandbox"
GOOD_CARD = "9410001234567890"


def basic(secret_key: str) -> dict[str, str]:
    token = base64.b64encode(f"{secret_key}:".encode()).decode()
    return {"Authorization": f"Basic {token}"}


class LiveServer(liveserver.LiveServer):
    """The shared live server, with a handle on the sandbox it serves."""

    @property
    def sandbox(self) -> Sandbox:
        sandbox: Sandbox = self.app.state.sandbox  # type: ignore[attr-defined]
        return sandbox


@dataclass
class WebhookSink:
    """Stands in for the merchant's webhook endpoint through an httpx.MockTransport."""

    received: list[httpx.Request] = field(default_factory=list)
    # Answers for the next deliveries, in order; 200 once they run out. An exception class
    # instead of a status makes the delivery fail at the transport level.
    answers: list[int | type[Exception]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def handle(self, request: httpx.Request) -> httpx.Response:
        request.read()
        with self.lock:
            self.received.append(request)
            answer = self.answers.pop(0) if self.answers else 200
        if isinstance(answer, int):
            return httpx.Response(answer)
        raise answer("webhook endpoint failure", request=request)  # type: ignore[call-arg]

    def reset(self) -> None:
        with self.lock:
            self.received.clear()
            self.answers.clear()


def wait_until(condition: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    """Poll for a state the server reaches asynchronously (fails loudly, never on speed)."""
    liveserver.wait_until(condition, what, timeout)


def mint_auth_key(control: httpx.Client, customer_key: str, card: str = GOOD_CARD) -> str:
    response = control.post(
        "/_sandbox/auth-keys", json={"customerKey": customer_key, "cardNumber": card}
    )
    assert response.status_code == 200, response.text
    auth_key: str = response.json()["authKey"]
    return auth_key


def new_billing_key(
    api: httpx.Client,
    control: httpx.Client,
    customer_key: str = CUSTOMER_KEY,
    card: str = GOOD_CARD,
) -> str:
    auth_key = mint_auth_key(control, customer_key, card)
    response = api.post(
        "/v1/billing/authorizations/issue",
        json={"authKey": auth_key, "customerKey": customer_key},
    )
    assert response.status_code == 200, response.text
    billing_key: str = response.json()["billingKey"]
    return billing_key


def charge(
    api: httpx.Client,
    billing_key: str,
    order_id: str,
    amount: int = 4900,
    customer_key: str = CUSTOMER_KEY,
    headers: dict[str, str] | None = None,
    **extra: object,
) -> httpx.Response:
    body = {
        "customerKey": customer_key,
        "amount": amount,
        "orderId": order_id,
        "orderName": "사주맛피아 Pro 1개월",
        **extra,
    }
    return api.post(f"/v1/billing/{billing_key}", json=body, headers=headers)

"""A running stack for the service's tests: a fresh database (with the local net worker), the Toss
sandbox and the billing service, each a real HTTP server on loopback, wired to find each other."""

from __future__ import annotations

import base64
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
from dbkit import Billing
from liveserver import LiveServer, wait_until

from service.settings import Settings

# Toss's public docs test keys (API 개별 연동 키); they move no money.
SECRET_KEY = "test_sk_zXLkKEypNArWmo50nX3lmeaxYG5R"
CLIENT_KEY = "test_ck_D5GePWvyJnrK0W0k6q8gLzN97Eoq"
GOOD_CARD = "9410001234567890"
APP_URL = "http://app.example/billing"
KEYRING = "test-k1:" + base64.b64encode(bytes(range(32))).decode()


@dataclass
class Stack:
    bl: Billing
    sandbox: LiveServer
    service: LiveServer
    settings: Settings
    auth_keys: list[str] = field(default_factory=list)

    def toss(self) -> httpx.Client:
        token = base64.b64encode(f"{SECRET_KEY}:".encode()).decode()
        return httpx.Client(base_url=self.sandbox.url, headers={"Authorization": f"Basic {token}"})

    def ledger(self) -> list[dict[str, Any]]:
        with self.toss() as api:
            entries: list[dict[str, Any]] = api.get("/_sandbox/ledger").json()["entries"]
            return entries

    def register(self, sub: str, card: str = GOOD_CARD) -> httpx.Response:
        """The redirect flow a browser goes through, followed by hand (no JavaScript)."""
        reg = self.bl.api(sub, "begin_registration", "pro", claims={"email": f"{sub}@example.com"})
        customer_key = reg["customerKey"]
        with httpx.Client(timeout=60) as web:
            page = web.get(f"{self.service.url}/billing/cards/{customer_key}")
            assert page.status_code == 200, page.text
            assert f"{self.sandbox.url}/v2/standard" in page.text
            window = {
                "clientKey": CLIENT_KEY,
                "customerKey": customer_key,
                "successUrl": f"{self.service.url}/billing/success",
                "failUrl": f"{self.service.url}/billing/fail",
            }
            # What requestBillingAuth does: open the card window, which posts the card.
            assert web.get(f"{self.sandbox.url}/v2/billing-auth", params=window).status_code == 200
            submitted = web.post(
                f"{self.sandbox.url}/v2/billing-auth",
                data={
                    **window,
                    "cardNumber": card,
                    "expiry": "12/30",
                    "identity": "900101",
                    "action": "register",
                },
            )
            assert submitted.status_code == 303
            location = submitted.headers["location"]
            self.auth_keys.extend(parse_qs(urlsplit(location).query).get("authKey", []))
            return web.get(location)

    def wait(self, condition: Callable[[], bool], what: str) -> None:
        wait_until(condition, what, timeout=60)


@dataclass
class Receiver:
    """The product's app, receiving notifications signed per Standard Webhooks."""

    server: LiveServer
    secret: str
    received: list[dict[str, Any]] = field(default_factory=list)
    refused: list[str] = field(default_factory=list)

"""What the demo's people and Toss do to the running system, each through its real entry point.

* Subscribers use the app (``App``): each signs in once and calls the ``api`` functions through
  the Data API (PostgREST behind the gateway) with the ``supabase`` client and their own access
  token, as on a hosted project.
* A card is registered the way a browser does it: the service's hosted card page, the Toss SDK's
  card window (the sandbox's stand-in), the success redirect back to the service, which issues
  the billing key. ``register_card_http`` follows the redirects by hand; ``Browser`` clicks
  through them in headless Chromium.
* Support refunds through the operator functions ``saju-billing ops`` runs (``ops history`` to
  find the payment, ``ops refund``); the scheduler's steps (the test clock, ``billing.tick()``)
  run as the owner; the demo reads queue depths as the service role.
* Toss deletes a billing key with ``DELETE /v1/billing/{billingKey}`` at the sandbox, which then
  sends ``BILLING_DELETED`` to the service.

Every SQL statement the driver sends is here, one named ``db.Call`` each.
"""

from __future__ import annotations

import base64
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta
from types import TracebackType
from typing import Any, Self
from uuid import UUID

import httpx
from postgrest.exceptions import APIError

from service import db
from service.runtime import browser, signin
from service.runtime.api import DataApi
from service.runtime.signin import call_api, sign_in
from supabase import Client

CHROMIUM = browser.CHROMIUM


class DemoError(Exception):
    """The demo cannot go on; the message says why and what to do."""


def _scalar(rows: list[db.Row]) -> Any:
    return next(iter(rows[0].values()))


# ------------------------------------------------------------------------------ subscribers


class Refused(Exception):
    """The Data API refused a subscriber's call (HTTP 4xx, code SBxxx): what the app would show,
    and nothing changed."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code


# Renew a token this long before it expires (a long demo outlives Supabase Auth's one hour).
_TOKEN_MARGIN_S = 120


class App:
    """The product's app in each subscriber's hands: signed in once with an access token of their
    own, then calling ``api.*`` through the Data API (PostgREST behind the gateway) with the
    ``supabase`` client, which is what RLS and the api functions see on a hosted project."""

    def __init__(self, api: DataApi) -> None:
        self._api = api
        self._http = httpx.Client(timeout=60)
        self._sessions: dict[str, tuple[Client, int]] = {}  # user id -> (client, token expiry)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._http.close()

    def _signed_in(self, user_id: str, email: str) -> Client:
        session = self._sessions.get(user_id)
        if session is None or session[1] - _TOKEN_MARGIN_S < time.time():
            signed = sign_in(self._api, user_id, email=email)
            session = (signin.client(self._api, signed.access_token, self._http), signed.expires_at)
            self._sessions[user_id] = session
        return session[0]

    def call(self, user_id: str, email: str, fn: str, params: dict[str, Any] | None = None) -> Any:
        """``api.<fn>`` as the subscriber; a refusal (SBxxx) raises ``Refused``."""
        try:
            return signin.rpc(self._signed_in(user_id, email), fn, params)
        except APIError as exc:
            if exc.code and exc.code.startswith("SB"):
                raise Refused(exc.code, exc.message or "") from None
            raise

    def begin_registration(self, user_id: str, email: str) -> str:
        """Starts a card registration for the Pro plan; returns the customerKey."""
        return str(self.call(user_id, email, "begin_registration", {"plan": "pro"})["customerKey"])

    def cancel_subscription(self, user_id: str, email: str) -> None:
        """Cancels at the end of the paid period (at once when nothing is paid)."""
        self.call(user_id, email, "cancel_subscription")

    def resume_subscription(self, user_id: str, email: str) -> None:
        self.call(user_id, email, "resume_subscription")

    def consume_credit(self, user_id: str, email: str, reason: str) -> None:
        self.call(user_id, email, "consume_credit", {"reason": reason})


def begin_registration(api: DataApi, user_id: str, email: str) -> str:
    """``api.begin_registration('pro')`` through the Data API with the subscriber's own access
    token, on a connection of its own; returns the customerKey."""
    signed = sign_in(api, user_id, email=email)
    result = call_api(api, signed.access_token, "begin_registration", {"plan": "pro"})
    return str(result["customerKey"])


# ---------------------------------------------------------------------- owner and scheduler


def holds_billing_data() -> db.Call[bool]:
    return db.Call(
        "holds_billing_data",
        "select exists (select 1 from billing.customers) or exists (select 1 from billing.payments)"
        " as result",
        {},
        lambda rows: bool(_scalar(rows)),
    )


def start_test_clock(at: datetime) -> db.Call[datetime]:
    """Enables the database's test clock and sets it (SB403 when it holds payments)."""
    return db.Call(
        "start_test_clock",
        "select billing.enable_test_clock(), billing.set_test_clock(at => %(at)s::timestamptz)"
        " as result",
        {"at": at},
        lambda rows: rows[0]["result"],
    )


def advance_test_clock(by: timedelta) -> db.Call[datetime]:
    return db.Call(
        "advance_test_clock",
        "select billing.advance_test_clock(by => %(by)s::interval) as result",
        {"by": by},
        lambda rows: rows[0]["result"],
    )


def tick() -> db.Call[dict[str, Any]]:
    """What the pg_cron job runs every minute; rings the service through pg_net."""
    return db.Call("tick", "select billing.tick() as result", {}, lambda rows: _scalar(rows))


def latest_payment(user_id: str) -> db.Call[UUID | None]:
    """The subscriber's latest payment, as support finds it: ``saju-billing ops history <user>``
    lists every audited change, payments among them."""
    history = db.ops_history(user_id)

    def pick(rows: list[db.Row]) -> UUID | None:
        made = [
            r["entity_id"]
            for r in history.read(rows)
            if r["entity_type"] == "payments" and r["action"] == "created"
        ]
        return made[-1] if made else None

    return db.Call("latest_payment", history.query, history.params, pick)


@dataclass(frozen=True, slots=True)
class LiveSubscription:
    user_id: str
    status: str
    awaiting_card: bool
    cancel_at_period_end: bool
    trouble_since: datetime | None  # past due since, or created (incomplete)
    customer_key: str


def live_subscriptions() -> db.Call[dict[str, LiveSubscription]]:
    """The live subscription of every subscriber, by user id."""
    return db.Call(
        "live_subscriptions",
        "select s.user_id, s.status::text as status, s.awaiting_card, s.cancel_at_period_end,"
        " case s.status when 'past_due' then s.past_due_since"
        "   when 'incomplete' then s.created_at end as trouble_since, pm.customer_key"
        " from billing.subscriptions s"
        " join billing.payment_methods pm on pm.id = s.payment_method_id"
        " where s.status in ('incomplete', 'active', 'past_due')",
        {},
        lambda rows: {r["user_id"]: LiveSubscription(**r) for r in rows},
    )


# ---------------------------------------------------------------------------- card pages


@dataclass(frozen=True)
class Endpoints:
    service_url: str
    sandbox_url: str
    client_key: str
    secret_key: str


def _window(ep: Endpoints, customer_key: str) -> dict[str, str]:
    return {
        "clientKey": ep.client_key,
        "customerKey": customer_key,
        "successUrl": f"{ep.service_url}/billing/success",
        "failUrl": f"{ep.service_url}/billing/fail",
    }


def register_card_http(web: httpx.Client, ep: Endpoints, customer_key: str, card: str) -> None:
    """The redirects a browser follows for one card, by hand (no JavaScript): the hosted card
    page, the SDK's card window, the form post, the success redirect that issues the key."""
    page = web.get(f"{ep.service_url}/billing/cards/{customer_key}")
    if page.status_code != 200 or f"{ep.sandbox_url}/v2/standard" not in page.text:
        raise DemoError(f"the hosted card page answered {page.status_code}")
    window = _window(ep, customer_key)
    form = web.get(f"{ep.sandbox_url}/v2/billing-auth", params=window)
    if form.status_code != 200:
        raise DemoError(f"the card window answered {form.status_code}")
    submitted = web.post(
        f"{ep.sandbox_url}/v2/billing-auth",
        data={**window, "cardNumber": card, "expiry": "12/35", "identity": "900101"}
        | {"action": "register"},
    )
    if submitted.status_code != 303:
        raise DemoError(f"the card form answered {submitted.status_code}")
    # The location carries the one-time authKey: followed, never printed.
    back = web.get(submitted.headers["location"])
    for _ in range(12):
        if back.status_code != 503:
            break
        # The service's database is away for a moment: a person reloads the page.
        time.sleep(float(back.headers.get("Retry-After", "5")))
        back = web.get(submitted.headers["location"])
    if back.status_code != 303 or "status=registered" not in back.headers.get("location", ""):
        raise DemoError(f"the success redirect answered {back.status_code}: {back.text[:200]}")


class Browser:
    """Headless Chromium clicking through the hosted card page (a handful of registrations)."""

    def __init__(self) -> None:
        from playwright.sync_api import sync_playwright

        self._pw = sync_playwright().start()
        self._browser = browser.launch(self._pw)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._browser.close()
        self._pw.stop()

    def register_card(self, ep: Endpoints, customer_key: str, card: str) -> None:
        page = self._browser.new_page()
        try:
            page.goto(f"{ep.service_url}/billing/cards/{customer_key}")
            page.click("#register")  # the page calls the SDK's requestBillingAuth
            page.wait_for_url(f"{ep.sandbox_url}/v2/billing-auth?**")
            page.fill("#cardNumber", " ".join(card[i : i + 4] for i in range(0, len(card), 4)))
            page.fill("#expiry", "12/35")
            page.fill("#identity", "900101")
            # The success redirect goes through the service, then on to the app (not running).
            with page.expect_request(lambda r: "status=registered" in r.url, timeout=60_000):
                page.click("#submit")
        finally:
            page.close()


# ------------------------------------------------------------------------------ Toss side


@contextmanager
def toss(ep: Endpoints) -> Iterator[httpx.Client]:
    """The sandbox as the merchant sees it (Basic auth with the test secret key)."""
    token = base64.b64encode(f"{ep.secret_key}:".encode()).decode()
    with httpx.Client(
        base_url=ep.sandbox_url, headers={"Authorization": f"Basic {token}"}, timeout=60
    ) as client:
        yield client


def ledger(api: httpx.Client) -> list[dict[str, Any]]:
    """The sandbox's record of every approval and cancel, without the billing keys."""
    entries: list[dict[str, Any]] = api.get("/_sandbox/ledger").json()["entries"]
    return [{k: v for k, v in e.items() if k != "billingKey"} for e in entries]


def delete_billing_key(api: httpx.Client, customer_key: str) -> bool:
    """Toss deletes the billing key of a customerKey (found in the sandbox's ledger); the
    sandbox then sends BILLING_DELETED. False when that key was never charged."""
    entries = api.get("/_sandbox/ledger").json()["entries"]
    keys = {e["billingKey"] for e in entries if e["customerKey"] == customer_key}
    for key in keys:
        if api.delete(f"/v1/billing/{key}").status_code != 200:
            return False
    return bool(keys)


def webhooks_pending(api: httpx.Client) -> int:
    deliveries = api.get("/_sandbox/webhooks").json()["deliveries"]
    return sum(1 for d in deliveries if d["state"] == "pending")

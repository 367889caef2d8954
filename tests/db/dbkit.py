"""Drives billing core the way its callers do: as the owner (operator, pg_cron), as the service role
``billing_service`` and as signed-in subscribers (role ``authenticated`` + ``request.jwt.claims``).

Toss is the project's own sandbox (``service/sandbox``), served on loopback and driven through its
HTTP API the way the service drives Toss: billing keys are issued by it, charges, lookups and
cancels go to it, and its answers (errors included, classified by ``toss.classify``) are what the
database is told. Its clock is the test database's clock.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, TypeVar
from urllib.parse import quote
from zoneinfo import ZoneInfo

import httpx
import psycopg
import pytest
from liveserver import LiveServer
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb

from service import db
from service.crypto import Keyring
from service.runtime.cluster import Runtime
from service.sandbox.app import build_app
from service.sandbox.cards import DEFAULT_TEST_CARD
from service.sandbox.clock import Clock
from service.toss import KST, classify

SEOUL = ZoneInfo("Asia/Seoul")
Row = dict[str, Any]
T = TypeVar("T")

# A test keyring: billing keys reach the database only as the service's envelopes.
KEYRING = Keyring({"test-k1": bytes(range(32))}, "test-k1")

# Toss's public docs test keys (API 개별 연동 키); they move no money.
SECRET_KEY = "test_sk_zXLkKEypNArWmo50nX3lmeaxYG5R"
CLIENT_KEY = "test_ck_D5GePWvyJnrK0W0k6q8gLzN97Eoq"
GOOD_CARD = DEFAULT_TEST_CARD
# service/sandbox/cards.py: every charge on it is declined with 403 REJECT_CARD_PAYMENT.
DECLINING_CARD = "4000000001000000"
APPROVED = frozenset({"DONE", "CANCELED", "PARTIAL_CANCELED"})
# Codes that mean a billing key is already gone at Toss: its deletion is done (service/workers.py).
KEY_ALREADY_GONE = frozenset({"ALREADY_REMOVED_BILLING_KEY", "NOT_FOUND_BILLING"})

# How Toss is made to answer a request, each the way Toss itself produces it:
#   "ok"          as it comes (the card and Toss's state decide);
#   an error code sent as ``TossPayments-Test-Code``: Toss answers that error with its status
#                 (processed, so replayed under the same Idempotency-Key, unless 409 or 429);
#   "throttled"   429 TOO_MANY_REQUESTS before processing (a sandbox fault);
#   "lost"        processed, then the connection drops before the answer (a sandbox fault);
#   "unsent"      the connection never reached Toss: no request at all.
How = str

# Tables whose rows have a status; each transition is copied into billing.events.
STATEFUL = (
    "card_registrations",
    "payment_methods",
    "subscriptions",
    "billing_periods",
    "charge_attempts",
    "payments",
    "refunds",
    "credit_grants",
    "webhook_events",
    "key_deletions",
)

# Per row of a stateful table: one creation event, a chain of transitions each starting where the
# previous one ended, ending in the current status. Customers (no status): one creation event.
_AUDIT_TABLE = """
  select '{t}' as entity_type, t.id::text as id from billing.{t} t
   where (select count(*) from billing.events e
           where e.entity_id = t.id and e.entity_type = '{t}' and e.action = 'created') <> 1
      or exists (select 1 from (
                   select e.action, e.old_status,
                          lag(e.new_status) over (order by e.id) as prev
                     from billing.events e
                    where e.entity_id = t.id and e.entity_type = '{t}'
                      and e.action in ('created', 'status_changed')) ev
                  where ev.action = 'status_changed' and ev.old_status is distinct from ev.prev)
      or (select e.new_status from billing.events e
           where e.entity_id = t.id and e.entity_type = '{t}'
             and e.action in ('created', 'status_changed')
           order by e.id desc limit 1) is distinct from t.status::text"""
AUDIT_GAPS = "\nunion all".join(
    [_AUDIT_TABLE.format(t=t) for t in STATEFUL]
    + [
        """
  select 'customers', c.id::text from billing.customers c
   where (select count(*) from billing.events e
           where e.entity_id = c.id and e.entity_type = 'customers'
             and e.action = 'created') <> 1"""
    ]
)


# Periods anchored on 2027-12-31 10:00 KST, written out by hand: month ends clamp (Feb 29 in the
# leap year 2028, Feb 28 in 2029) and every other month returns to the 31st.
ANCHOR_31_PERIOD_STARTS = [
    "2027-12-31 10:00",
    "2028-01-31 10:00",
    "2028-02-29 10:00",
    "2028-03-31 10:00",
    "2028-04-30 10:00",
    "2028-05-31 10:00",
    "2028-06-30 10:00",
    "2028-07-31 10:00",
    "2028-08-31 10:00",
    "2028-09-30 10:00",
    "2028-10-31 10:00",
    "2028-11-30 10:00",
    "2028-12-31 10:00",
    "2029-01-31 10:00",
    "2029-02-28 10:00",
]


def kst(*args: int) -> datetime:
    """A wall-clock time in Asia/Seoul."""
    return datetime(*args, tzinfo=SEOUL)  # type: ignore[misc]


def sha256_hex(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


@contextlib.contextmanager
def raises_sqlstate(
    code: str,
) -> Iterator[pytest.ExceptionInfo[psycopg.Error | db.BillingError]]:
    """A database refusal with this SQLSTATE, raw (owner and api calls) or through service/db.py."""
    with pytest.raises((psycopg.Error, db.BillingError)) as info:
        yield info
    assert info.value.sqlstate == code, f"expected {code}, got {info.value.sqlstate}: {info.value}"


def _call_sql(
    schema: str, fn: str, args: tuple[Any, ...], kwargs: dict[str, Any], rows: bool
) -> str:
    parts = ["%s"] * len(args) + [f"{k} => %s" for k in kwargs]
    target = f"{schema}.{fn}({', '.join(parts)})"
    # Names come from the tests themselves; every value travels as a parameter.
    return f"select * from {target}" if rows else f"select {target} as result"  # noqa: S608


def _adapt(value: Any) -> Any:
    return Jsonb(value) if isinstance(value, dict | list) else value


class Billing:
    """Connections to one test database, one per kind of caller."""

    def __init__(self, rt: Runtime, dbname: str, toss: TossSandbox | None = None) -> None:
        self.rt = rt
        self.dbname = dbname
        self.toss = toss
        self.owner: psycopg.Connection[Row] = psycopg.connect(
            rt.dsn(dbname, "postgres"), autocommit=True, row_factory=dict_row
        )
        self.svc: psycopg.Connection[Row] = psycopg.connect(
            rt.dsn(dbname, "postgres"), autocommit=True, row_factory=dict_row
        )
        self.svc.execute("set role billing_service")
        self.user_conn: psycopg.Connection[Row] = psycopg.connect(
            rt.dsn(dbname, "postgres"), row_factory=dict_row
        )

    def close(self) -> None:
        for c in (self.owner, self.svc, self.user_conn):
            c.close()

    # --- owner ------------------------------------------------------------------------------
    def all(self, query: str, params: Any = None) -> list[Row]:
        return self.owner.execute(query, params).fetchall()

    def one(self, query: str, params: Any = None) -> Row:
        row = self.owner.execute(query, params).fetchone()
        assert row is not None, query
        return row

    def scalar(self, query: str, params: Any = None) -> Any:
        return next(iter(self.one(query, params).values()))

    def billing(self, fn: str, *args: Any, **kwargs: Any) -> Any:
        """Calls billing.<fn> as the owner (operator tooling, pg_cron)."""
        sql = _call_sql("billing", fn, args, kwargs, rows=False)
        params = [_adapt(a) for a in (*args, *kwargs.values())]
        return self.owner.execute(sql, params).fetchone()["result"]  # type: ignore[index]

    def enable_clock(self, at: datetime) -> None:
        self.billing("enable_test_clock")
        self.set_clock(at)

    def set_clock(self, at: datetime) -> datetime:
        return self._moved(self.billing("set_test_clock", at))

    def advance(self, by: timedelta) -> datetime:
        return self._moved(self.billing("advance_test_clock", by))

    def _moved(self, now: datetime) -> datetime:
        """The sandbox keeps Toss's time on the database's test clock."""
        if self.toss is not None:
            self.toss.clock.follow(now)
        return now

    def now(self) -> datetime:
        return self.scalar("select billing.now()")  # type: ignore[no-any-return]

    def tick(self) -> dict[str, Any]:
        return self.billing("tick")  # type: ignore[no-any-return]

    def audit_gaps(self) -> list[Row]:
        """Rows whose state changes are not all in the audit log (should be none)."""
        return self.all(AUDIT_GAPS)

    # --- service ----------------------------------------------------------------------------
    def run(self, call: db.Call[T]) -> T:
        """Runs a service call from service/db.py as the role billing_service."""
        return db.run_sync(self.svc, call)

    # --- subscribers ------------------------------------------------------------------------
    def api(
        self, sub: str | None, fn: str, *args: Any, claims: dict[str, Any] | None = None
    ) -> Any:
        """Calls api.<fn> in one transaction as role authenticated with the JWT sub ``sub``."""
        jwt = dict(claims or {})
        if sub is not None:
            jwt.setdefault("sub", sub)
        jwt.setdefault("role", "authenticated")
        with self.user_conn.transaction():
            self.user_conn.execute("set local role authenticated")
            self.user_conn.execute(
                "select set_config('request.jwt.claims', %s, true)", (json.dumps(jwt),)
            )
            sql = _call_sql("api", fn, args, {}, rows=False)
            row = self.user_conn.execute(sql, [_adapt(a) for a in args]).fetchone()
            assert row is not None
            return row["result"]

    # --- composite steps --------------------------------------------------------------------
    @property
    def sandbox(self) -> TossSandbox:
        assert self.toss is not None, "this Billing has no Toss sandbox"
        return self.toss

    def register(self, sub: str, card: str = GOOD_CARD) -> dict[str, Any]:
        """A subscriber registers a card: the sandbox issues the billing key from an authKey, and
        the service seals it and records it with the card Toss described (as service/app.py)."""
        reg = self.api(sub, "begin_registration", "pro", claims={"email": f"{sub}@example.com"})
        customer_key = reg["customerKey"]
        issued = self.sandbox.issue_billing_key(customer_key, card)
        billing_key = issued["billingKey"]
        done = self.run(
            db.service_complete_registration(
                customer_key, KEYRING.seal(billing_key, customer_key), card_of(issued)
            )
        )
        return {
            "registrationId": done.registration_id,
            "subscriptionId": done.subscription_id,
            "paymentMethodId": done.payment_method_id,
            "attemptId": done.attempt_id,
            "replacedPaymentMethodId": done.replaced_payment_method_id,
            "customerKey": customer_key,
            "billingKey": billing_key,
        }

    def claim(self, worker: str = "w", batch: int = 10) -> list[db.ClaimedAttempt]:
        return self.run(db.service_claim_attempts(worker, batch))

    # --- the service's side of each call to Toss (as service/workers.py does it) -------------
    def call_toss(self, row: db.ClaimedAttempt, how: How = "ok") -> Answer:
        """The request a claimed attempt makes: a charge under its orderId and Idempotency-Key
        (mode ``charge``), or a lookup of its orderId (mode ``lookup``). ``how`` makes Toss
        answer one way or another (see ``How``); the request itself is always the service's."""
        if row.mode is db.AttemptMode.LOOKUP:
            return self.sandbox.send("get_payment_by_order", how, "GET", _order_path(row.order_id))
        body: dict[str, object] = {
            "customerKey": row.customer_key,
            "amount": row.amount,
            "orderId": row.order_id,
            "orderName": row.order_name,
        }
        if row.customer_email is not None:
            body["customerEmail"] = row.customer_email
        if row.customer_name is not None:
            body["customerName"] = row.customer_name
        return self.sandbox.send(
            "charge",
            how,
            "POST",
            _billing_path(billing_key_of(row)),
            body,
            idempotency_key=str(row.idempotency_key),
        )

    def record(self, row: db.ClaimedAttempt, answer: Answer) -> db.Recorded:
        """Writes an answer back as the service does (see ``result_of``)."""
        return self.run(result_of(row, answer))

    def serve(self, row: db.ClaimedAttempt, how: How = "ok") -> db.Recorded:
        """One claimed attempt from claim to result: the call to Toss, then its record."""
        return self.record(row, self.call_toss(row, how))

    def stray_charge(
        self, row: db.ClaimedAttempt, amount: int | None = None, order_id: str | None = None
    ) -> Answer:
        """A charge on the attempt's card that is not the service's request under its key (a
        request whose answer was lost to another sender, or a buggy one): sent without the
        attempt's Idempotency-Key, optionally for another amount or order."""
        body = {
            "customerKey": row.customer_key,
            "amount": row.amount if amount is None else amount,
            "orderId": row.order_id if order_id is None else order_id,
            "orderName": row.order_name,
        }
        return self.sandbox.send("charge", "ok", "POST", _billing_path(billing_key_of(row)), body)

    def call_refund(self, row: db.ClaimedRefund, how: How = "ok") -> Answer:
        """POST /v1/payments/{paymentKey}/cancel with the refund's id as Idempotency-Key."""
        body = {"cancelReason": row.cancel_reason, "cancelAmount": row.cancel_amount}
        return self.sandbox.send(
            "cancel",
            how,
            "POST",
            f"/v1/payments/{quote(row.payment_key, safe='')}/cancel",
            body,
            idempotency_key=str(row.idempotency_key),
        )

    def record_refund(self, row: db.ClaimedRefund, answer: Answer) -> db.Recorded:
        return self.run(refund_result_of(row, answer))

    def serve_key_deletion(self, row: db.ClaimedKeyDeletion, how: How = "ok") -> db.Recorded:
        """DELETE /v1/billing/{billingKey}; a key Toss no longer has counts as deleted."""
        key = billing_key_of(row)
        answer = self.sandbox.send("delete_billing_key", how, "DELETE", _billing_path(key))
        if answer.ok or answer.code in KEY_ALREADY_GONE:
            return self.run(db.service_record_key_deleted(row.key_deletion_id, row.lease_token))
        return self.run(
            db.service_record_key_deleted(
                row.key_deletion_id, row.lease_token, answer.code or "NO_RESPONSE", answer.detail
            )
        )

    def process_webhook(self, row: db.ClaimedWebhook) -> db.WebhookOutcome:
        """A claimed webhook as the service handles it: never applied as sent; the payment is
        re-fetched from Toss with the secret key and that snapshot applied."""
        data = row.payload.get("data")
        data = data if isinstance(data, Mapping) else {}
        if row.event_type == "BILLING_DELETED":
            assert "billingKey" not in data, "a billing key reached the inbox"
            self.run(
                db.service_mark_payment_method_deleted(data["billingKeySha256"], data["reason"])
            )
            return db.WebhookOutcome.PROCESSED
        if row.event_type == "PAYMENT_STATUS_CHANGED":
            found = self.sandbox.send(
                "get_payment", "ok", "GET", f"/v1/payments/{quote(data['paymentKey'], safe='')}"
            )
        elif row.event_type == "DEPOSIT_CALLBACK":
            found = self.sandbox.send(
                "get_payment_by_order", "ok", "GET", _order_path(row.payload["orderId"])
            )
        else:
            return db.WebhookOutcome.IGNORED
        if found.payment is None:
            assert found.code == "NOT_FOUND_PAYMENT", found
            return db.WebhookOutcome.IGNORED
        self.run(db.service_apply_payment_snapshot(found.payment))
        return db.WebhookOutcome.PROCESSED


def card_of(issued: Mapping[str, Any]) -> dict[str, Any]:
    """The card of an issued billing key, as the service records it (service/app.py)."""
    fields = ("number", "issuerCode", "acquirerCode", "cardType", "ownerType")
    return {k: issued["card"][k] for k in fields}


def result_of(row: db.ClaimedAttempt, answer: Answer) -> db.Call[db.Recorded]:
    """The service_record_* call for what Toss answered a claimed attempt, with the lease token
    of its claim (service/workers.py makes the same choice)."""
    aid, token, payment = row.attempt_id, row.lease_token, answer.payment
    if row.mode is db.AttemptMode.CHARGE:
        if payment is not None:
            return db.service_record_charge_success(aid, token, payment)
        if answer.code is not None:
            return db.service_record_charge_failure(
                aid, token, answer.code, answer.message, answer.classification
            )
        return db.service_record_charge_unknown(aid, token, answer.detail)
    if answer.code == "NOT_FOUND_PAYMENT":
        return db.service_record_lookup_not_found(aid, token)
    if payment is not None and payment["status"] in APPROVED and payment["approvedAt"]:
        return db.service_record_charge_success(aid, token, payment)
    if payment is not None and payment["status"] in ("ABORTED", "EXPIRED"):
        # A failed charge Toss kept: classified like the answer the charge itself got.
        failure = payment["failure"] or {"code": "UNKNOWN_PAYMENT_ERROR", "message": None}
        return db.service_record_charge_failure(
            aid, token, failure["code"], failure["message"], str(classify(failure["code"]))
        )
    # The lookup itself got no usable answer: still unknown, looked up again later.
    return db.service_record_charge_unknown(aid, token, answer.detail)


def refund_result_of(row: db.ClaimedRefund, answer: Answer) -> db.Call[db.Recorded]:
    """The service_record_refund_result call for what Toss answered a cancel."""
    if answer.payment is not None:
        return db.service_record_refund_result(row.refund_id, row.lease_token, answer.payment)
    # No answer: not known to be processed, so the same cancel under the same key settles it.
    code = answer.code or "NO_RESPONSE"
    classification = answer.classification if answer.code else "unprocessed"
    return db.service_record_refund_result(
        row.refund_id, row.lease_token, None, code, answer.detail, classification
    )


def billing_key_of(row: db.ClaimedAttempt | db.ClaimedKeyDeletion) -> str:
    """What the service decrypts from a claimed row's envelope (the customerKey is its
    associated data)."""
    return KEYRING.open(row.billing_key_ciphertext, row.billing_key_key_id, row.customer_key)


def _billing_path(billing_key: str) -> str:
    return f"/v1/billing/{quote(billing_key, safe='')}"


def _order_path(order_id: str) -> str:
    return f"/v1/payments/orders/{quote(order_id, safe='')}"


# --- Toss: the project's sandbox --------------------------------------------------------------


@dataclass(frozen=True)
class Answer:
    """What the service heard back from one request: a Payment (or an empty 200), Toss's error
    (code, message, HTTP status), or nothing at all (``lost`` says why)."""

    payment: dict[str, Any] | None = None
    code: str | None = None
    message: str | None = None
    status: int | None = None
    lost: str | None = None

    @property
    def ok(self) -> bool:
        return self.code is None and self.lost is None

    @property
    def classification(self) -> str:
        """The billing.failure_class of an error answer: ``toss.classify`` on the real one."""
        assert self.code is not None, self
        return str(classify(self.code, self.status))

    @property
    def detail(self) -> str:
        return self.message or self.lost or self.code or ""


class FollowClock(Clock):
    """The sandbox's time is the test database's (``billing.now()``), so Toss's timestamps, its
    15-day Idempotency-Key window and its webhooks move with the simulated time, back and forth.
    Without a test clock: wall time."""

    def __init__(self) -> None:
        super().__init__()
        self._at: datetime | None = None
        self._guard = threading.Lock()

    def follow(self, at: datetime | None) -> None:
        with self._guard:
            self._at = at

    def now(self) -> datetime:
        with self._guard:
            at = self._at
        return (at or datetime.now(KST)).astimezone(KST)

    def advance(self, delta: timedelta) -> datetime:
        raise AssertionError("the sandbox follows the database's clock; move that one")

    def reset(self) -> None:
        self.follow(None)


@contextlib.contextmanager
def serve_sandbox() -> Iterator[tuple[str, FollowClock]]:
    """The Toss sandbox on a loopback port: one merchant with the docs' test keys, no rate limit
    (these tests are not about throttling, which a fault produces where needed)."""
    clock = FollowClock()
    app = build_app(clock=clock, secret_keys=[f"{CLIENT_KEY}:{SECRET_KEY}"], rate_limit=None)
    with LiveServer(app) as server:
        yield server.url, clock


class TossSandbox:
    """Toss as the service reaches it: Basic auth with the secret key, Toss's wire format."""

    def __init__(self, url: str, clock: FollowClock) -> None:
        token = base64.b64encode(f"{SECRET_KEY}:".encode()).decode()
        self.clock = clock
        self.http = httpx.Client(
            base_url=url, headers={"Authorization": f"Basic {token}"}, timeout=30
        )
        self._webhooks_seen = 0
        # Requests that may have changed Toss's state (anything but a GET), so that the ledger
        # and the webhooks are read again only after one.
        self._writes = 0
        self._ledger: tuple[int, list[dict[str, Any]]] | None = None
        self._webhooks_read = -1

    def close(self) -> None:
        self.http.close()

    def reset(self) -> None:
        """Forgets every key, payment, idempotency record, fault and webhook."""
        self._ok(self.http.post("/_sandbox/reset", json={}))
        self.clock.follow(None)
        self._webhooks_seen = 0
        self._writes += 1

    @staticmethod
    def _ok(response: httpx.Response) -> Any:
        assert response.is_success, (response.status_code, response.text)
        return response.json() if response.content else None

    # --- the API, as the service calls it ---------------------------------------------------
    def send(
        self,
        endpoint: str,
        how: How,
        method: str,
        path: str,
        body: Mapping[str, object] | None = None,
        idempotency_key: str | None = None,
    ) -> Answer:
        """One request to the API, made to answer as ``how`` says (see ``How``)."""
        headers = {} if idempotency_key is None else {"Idempotency-Key": idempotency_key}
        if how == "unsent":
            return Answer(lost="connect timeout")
        if method != "GET":
            self._writes += 1
        if how == "throttled":
            self.fault(endpoint, "error", status=429)
        elif how == "lost":
            self.fault(endpoint, "drop_after_commit")
        elif how != "ok":
            headers["TossPayments-Test-Code"] = how
        try:
            response = self.http.request(method, path, json=body, headers=headers)
        except httpx.TransportError as exc:
            return Answer(lost=type(exc).__name__)
        if response.is_success:
            return Answer(payment=response.json() if response.content else None)
        error = response.json()
        return Answer(code=error["code"], message=error["message"], status=response.status_code)

    def payment(self, payment_key: str) -> dict[str, Any]:
        """GET /v1/payments/{paymentKey}: the payment as Toss holds it now."""
        found = self.send("get_payment", "ok", "GET", f"/v1/payments/{quote(payment_key, safe='')}")
        assert found.payment is not None, found
        return found.payment

    def cancel(
        self, payment_key: str, amount: int | None, reason: str, idempotency_key: str
    ) -> dict[str, Any]:
        """A cancel the operator makes at Toss directly (not through a refund row)."""
        body: dict[str, object] = {"cancelReason": reason}
        if amount is not None:
            body["cancelAmount"] = amount
        path = f"/v1/payments/{quote(payment_key, safe='')}/cancel"
        done = self.send("cancel", "ok", "POST", path, body, idempotency_key)
        assert done.payment is not None, done
        return done.payment

    def delete_billing_key(self, billing_key: str) -> Answer:
        """A key ended at Toss from outside the service (Toss then sends BILLING_DELETED)."""
        return self.send("delete_billing_key", "ok", "DELETE", _billing_path(billing_key))

    # --- the sandbox's control API ----------------------------------------------------------
    def fault(self, endpoint: str, kind: str, **spec: object) -> None:
        """A fault for the next matching request only."""
        self._ok(
            self.http.post(
                "/_sandbox/faults", json={"endpoint": endpoint, "kind": kind, "count": 1, **spec}
            )
        )

    def issue_billing_key(self, customer_key: str, card: str = GOOD_CARD) -> dict[str, Any]:
        """The card window's authKey, exchanged for a billing key as the service does."""
        minted = self._ok(
            self.http.post(
                "/_sandbox/auth-keys", json={"customerKey": customer_key, "cardNumber": card}
            )
        )
        body = {"authKey": minted["authKey"], "customerKey": customer_key}
        issued = self.http.post(
            "/v1/billing/authorizations/issue",
            json=body,
            headers={"Idempotency-Key": sha256_hex(f"issue:{customer_key}:{minted['authKey']}")},
        )
        return self._ok(issued)  # type: ignore[no-any-return]

    def ledger(self) -> list[dict[str, Any]]:
        """Every approval and cancel Toss made, in order."""
        if self._ledger is None or self._ledger[0] != self._writes:
            self._ledger = (self._writes, self._ok(self.http.get("/_sandbox/ledger"))["entries"])
        return self._ledger[1]

    def approvals(self) -> list[dict[str, Any]]:
        return [e for e in self.ledger() if e["kind"] == "approval"]

    def balances(self) -> dict[str, int]:
        """paymentKey -> what Toss still holds of it (approved less cancelled)."""
        held: dict[str, int] = {}
        for e in self.ledger():
            sign = 1 if e["kind"] == "approval" else -1
            held[e["paymentKey"]] = held.get(e["paymentKey"], 0) + sign * e["amount"]
        return held

    def new_webhooks(self) -> list[tuple[str, str, dict[str, Any]]]:
        """Events Toss emitted since the last call: (transmission id, eventType, body), to be
        delivered to the service's endpoint (the sandbox has no URL for them here)."""
        if self._webhooks_read == self._writes:
            return []
        self._webhooks_read = self._writes
        deliveries = self._ok(self.http.get("/_sandbox/webhooks"))["deliveries"]
        fresh = deliveries[self._webhooks_seen :]
        self._webhooks_seen = len(deliveries)
        return [(d["transmissionId"], d["eventType"], json.loads(d["body"])) for d in fresh]

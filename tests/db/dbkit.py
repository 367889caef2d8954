"""Drives billing core the way its callers do: as the owner (operator, pg_cron), as the service role
``billing_service`` and as signed-in subscribers (role ``authenticated`` + ``request.jwt.claims``).

Also holds a tiny scripted stand-in for Toss's answers, used only to produce the JSON the service
would hand to the database (the Toss sandbox proper lives elsewhere and is tested there).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, TypeVar
from zoneinfo import ZoneInfo

import psycopg
import pytest
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb

from service import db
from service.crypto import Keyring
from service.runtime.cluster import Runtime

SEOUL = ZoneInfo("Asia/Seoul")
Row = dict[str, Any]
T = TypeVar("T")

# A test keyring: billing keys reach the database only as the service's envelopes.
KEYRING = Keyring({"test-k1": bytes(range(32))}, "test-k1")

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

    def __init__(self, rt: Runtime, dbname: str) -> None:
        self.rt = rt
        self.dbname = dbname
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
        self.billing("set_test_clock", at)

    def set_clock(self, at: datetime) -> datetime:
        return self.billing("set_test_clock", at)  # type: ignore[no-any-return]

    def advance(self, by: timedelta) -> datetime:
        return self.billing("advance_test_clock", by)  # type: ignore[no-any-return]

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
    def register(
        self, sub: str, key: str | None = None, card_no: str = "4330****1234"
    ) -> dict[str, Any]:
        """A subscriber registers a card and the service records the issued billing key."""
        reg = self.api(sub, "begin_registration", "pro", claims={"email": f"{sub}@example.com"})
        billing_key = key or f"bk_{uuid.uuid4().hex}"
        done = self.run(
            db.service_complete_registration(
                reg["customerKey"],
                KEYRING.seal(billing_key, reg["customerKey"]),
                {
                    "card": {
                        "number": card_no,
                        "issuerCode": "61",
                        "cardType": "신용",
                        "ownerType": "개인",
                    }
                },
            )
        )
        return {
            "registrationId": done.registration_id,
            "subscriptionId": done.subscription_id,
            "paymentMethodId": done.payment_method_id,
            "attemptId": done.attempt_id,
            "replacedPaymentMethodId": done.replaced_payment_method_id,
            "customerKey": reg["customerKey"],
            "billingKey": billing_key,
        }

    def claim(self, worker: str = "w", batch: int = 10) -> list[db.ClaimedAttempt]:
        return self.run(db.service_claim_attempts(worker, batch))


# Toss's error answers as the service classifies them: (code, message, billing.failure_class).
TOSS_FAILURES: dict[str, tuple[str, str, str]] = {
    # Not processed (409, 429): the same request goes again under the same key.
    "busy": ("IDEMPOTENT_REQUEST_PROCESSING", "이전 멱등 요청이 처리중입니다.", "unprocessed"),
    "throttled": ("TOO_MANY_REQUESTS", "요청이 너무 많습니다.", "unprocessed"),
    # Processed, failed for a passing reason: the key replays it; look up, then a new attempt.
    "transient": ("FAILED_INTERNAL_SYSTEM_PROCESSING", "잠시 후 다시 시도해주세요.", "transient"),
    "provider": ("PROVIDER_ERROR", "일시적인 오류가 발생했습니다.", "transient"),
    "refund_failed": ("FAILED_REFUND_PROCESS", "환불 처리에 실패했습니다.", "transient"),
    # Toss's state may differ from ours: look the order up first.
    "duplicated": (
        "DUPLICATED_ORDER_ID",
        "이미 승인 및 취소가 진행된 중복된 주문번호",
        "reconcile",
    ),
    "decline": ("REJECT_CARD_PAYMENT", "한도초과 혹은 잔액부족", "decline"),
    "dead": ("INVALID_STOPPED_CARD", "정지된 카드", "needs_new_card"),
    "removed": ("ALREADY_REMOVED_BILLING_KEY", "이미 삭제된 빌링키입니다", "needs_new_card"),
    "rejected": ("REFUND_REJECTED", "환불이 거절되었습니다.", "decline"),
    "bug": ("NOT_MATCHES_CUSTOMER_KEY", "customerKey 불일치", "bug"),
}


@dataclass
class FakeToss:
    """Approvals and cancels as Toss reports them (Payment JSON), with idempotent replays, and
    its error answers with the class the service gives them (``failure``)."""

    billing: Billing
    payments: dict[str, dict[str, Any]] = field(default_factory=dict)  # by orderId
    by_key: dict[str, dict[str, Any]] = field(default_factory=dict)  # by paymentKey
    cancel_replies: dict[str, dict[str, Any]] = field(default_factory=dict)  # by Idempotency-Key
    deleted_keys: set[str] = field(default_factory=set)

    def _iso(self) -> str:
        return self.billing.now().astimezone(SEOUL).isoformat()

    def approve(self, order_id: str, amount: int, order_name: str = "order") -> dict[str, Any]:
        """Charges once per orderId; a repeated orderId returns the first approval."""
        if order_id in self.payments:
            return self.payments[order_id]
        key = f"pk_{uuid.uuid4().hex}"
        payment = {
            "paymentKey": key,
            "orderId": order_id,
            "orderName": order_name,
            "type": "BILLING",
            "method": "카드",
            "status": "DONE",
            "totalAmount": amount,
            "balanceAmount": amount,
            "approvedAt": self._iso(),
            "requestedAt": self._iso(),
            "lastTransactionKey": uuid.uuid4().hex.upper(),
            "secret": f"ps_{uuid.uuid4().hex[:20]}",
            "receipt": {"url": f"https://dashboard-sandbox.tosspayments.com/receipt/{key}"},
            "cancels": None,
        }
        self.payments[order_id] = payment
        self.by_key[key] = payment
        return payment

    def cancel(self, payment_key: str, amount: int, reason: str, idem: str) -> dict[str, Any]:
        if idem in self.cancel_replies:
            return self.cancel_replies[idem]
        payment = self.by_key[payment_key]
        assert amount <= payment["balanceAmount"], "NOT_CANCELABLE_AMOUNT"
        tx = f"txrd_{uuid.uuid4().hex[:24]}"
        cancels = list(payment["cancels"] or [])
        balance = payment["balanceAmount"] - amount
        cancels.append(
            {
                "cancelAmount": amount,
                "cancelReason": reason,
                "refundableAmount": balance,
                "canceledAt": self._iso(),
                "transactionKey": tx,
                "cancelStatus": "DONE",
            }
        )
        payment.update(
            balanceAmount=balance,
            cancels=cancels,
            lastTransactionKey=tx,
            status="CANCELED" if balance == 0 and len(cancels) == 1 else "PARTIAL_CANCELED",
        )
        reply = json.loads(json.dumps(payment))
        self.cancel_replies[idem] = reply
        return reply

    def snapshot(self, payment_key: str) -> dict[str, Any]:
        return json.loads(json.dumps(self.by_key[payment_key]))

    @staticmethod
    def failure(kind: str) -> tuple[str, str, str]:
        """An error answer: (code, message, classification), see TOSS_FAILURES."""
        return TOSS_FAILURES[kind]

"""Billing core under random interleavings of everything its callers do, checked after every step.

Each example is a fresh clone of the migrated database and a generated list of operations, driven
only through the public SQL functions: subscribers (``api.*`` as ``authenticated`` with JWT
claims) register and replace cards, cancel, resume and spend credits; the service
(``billing.service_*`` through service/db.py as ``billing_service``) claims attempts, refunds,
webhooks and key deletions, talks to the Toss sandbox and records what it heard with the lease token
it was handed, sometimes late (after its lease expired: only approvals still count), twice, or
never; the operator and pg_cron (the owner) tick with clock jumps from a
minute to three months, move the test clock back, cancel at once with a prorated refund, refund
and change the price. Toss is the project's sandbox, driven through its HTTP API: its answers
(approvals, errors by ``TossPayments-Test-Code``, 429s and lost answers by its faults) are replayed
per Idempotency-Key as Toss replays them, its keys are deleted for real, and its webhooks are
delivered late, out of order and twice.

After every operation the invariants of ARCHITECTURE §3 are checked in SQL (one query) and
against the sandbox's ledger: no period charged twice at Toss, and every approval at Toss in our
ledger once its answer is written back. At the end of each example the service settles all
outstanding work and the ledger must agree with Toss.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any

import psycopg
from dbkit import (
    KEYRING,
    Answer,
    Billing,
    Row,
    TossSandbox,
    billing_key_of,
    card_of,
    kst,
    sha256_hex,
)
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from service import db
from service.runtime import testdb
from service.runtime.cluster import Runtime

USERS = ("ana", "ben", "cho")
STARTS = (kst(2027, 12, 31, 10, 0), kst(2028, 1, 29, 23, 30), kst(2028, 3, 15, 9, 0))
MINUTE, HOUR, DAY = timedelta(minutes=1), timedelta(hours=1), timedelta(days=1)
JUMPS = (MINUTE, 2 * MINUTE, 5 * MINUTE, 30 * MINUTE, HOUR, 6 * HOUR, DAY, 2 * DAY, 3 * DAY,
         8 * DAY, 15 * DAY, 31 * DAY, 62 * DAY, 93 * DAY)  # fmt: skip
BACKS = (MINUTE, HOUR, DAY, 10 * DAY, 40 * DAY)
PRICE_OFFSETS = (timedelta(0), MINUTE, DAY, 10 * DAY, 40 * DAY)
LIVE = ("incomplete", "active", "past_due")

# What happens to a charge the service sends (the first entry is what shrinking tends to).
# "busy" is Toss not processing it (409: the same request again); "transient" and "duplicated"
# are errors Toss processed (the key is spent: the order is looked up). Each is made the way
# Toss makes it, see CHARGE_HOW and Run.toss_charge.
CHARGE = ("ok", "ok", "ok", "ok", "ok", "ok", "ok", "ok", "decline", "decline", "decline",
          "transient", "busy", "timeout_after", "timeout_before", "dead", "ok", "ok", "bug",
          "charged_but_declined", "timeout_after", "charged_but_declined", "busy",
          "duplicated")  # fmt: skip
# A lookup (GET by orderId) answers, is throttled (not processed: still unknown) or times out.
LOOKUP = ("answer", "answer", "answer", "answer", "throttled", "timeout")
REFUND = ("ok", "ok", "ok", "ok", "busy", "rejected", "ok", "refund_failed")
# How the sandbox is made to answer (see dbkit.How): Toss's own error codes as
# TossPayments-Test-Code, faults for 429s and lost answers.
CHARGE_HOW = {
    "ok": "ok",
    "decline": "REJECT_CARD_PAYMENT",
    "dead": "INVALID_STOPPED_CARD",
    "bug": "NOT_MATCHES_CUSTOMER_KEY",
    "transient": "FAILED_INTERNAL_SYSTEM_PROCESSING",
    "busy": "IDEMPOTENT_REQUEST_PROCESSING",
    "timeout_after": "lost",
    "timeout_before": "unsent",
    "charged_but_declined": "REJECT_CARD_PAYMENT",
    "duplicated": "ok",
}
LOOKUP_HOW = {"answer": "ok", "throttled": "throttled", "timeout": "lost"}
REFUND_HOW = {
    "ok": "ok",
    "busy": "IDEMPOTENT_REQUEST_PROCESSING",
    "rejected": "REFUND_REJECTED",
    "refund_failed": "FAILED_REFUND_PROCESS",
}
# Classes of an answer after which the database does not look the order up: an approval made
# meanwhile by another request stays hidden from it until reconciliation.
HIDING = ("decline", "needs_new_card", "bug")

# ---------------------------------------------------------------------------------------------
# The invariants, as one query: each row is a violation (rule, id).
# ---------------------------------------------------------------------------------------------
INVARIANTS = """
select 'two applied payments for one period' as rule, period_id::text as id
  from billing.payments where applied group by period_id having count(*) > 1
union all
select 'two succeeded attempts for one period', period_id::text
  from billing.charge_attempts where status = 'succeeded' group by period_id having count(*) > 1
union all
select 'two attempts of one period in flight', period_id::text
  from billing.charge_attempts where status in ('queued', 'claimed', 'unknown')
 group by period_id having count(*) > 1
union all
select 'approved attempt without its payment', ca.id::text from billing.charge_attempts ca
 where ca.status in ('succeeded', 'duplicate')
   and not exists (select 1 from billing.payments p where p.attempt_id = ca.id)
union all
select 'paid period not paid by an applied payment of a succeeded attempt', bp.id::text
  from billing.billing_periods bp
 where bp.status = 'paid'
   and not exists (select 1 from billing.payments p
                     join billing.charge_attempts ca on ca.id = p.attempt_id
                    where p.id = bp.payment_id and p.applied and p.period_id = bp.id
                      and ca.status = 'succeeded')
union all
select 'applied payment of a period it does not pay', p.id::text
  from billing.payments p join billing.billing_periods bp on bp.id = p.period_id
 where p.applied and (bp.status <> 'paid' or bp.payment_id <> p.id)
union all
select 'applied payment amount differs from its period', p.id::text
  from billing.payments p join billing.billing_periods bp on bp.id = p.period_id
 where p.applied and p.total_amount <> bp.amount
union all
select 'period amount is not the price in effect at its start', bp.id::text
  from billing.billing_periods bp join billing.subscriptions s on s.id = bp.subscription_id
 where (bp.price_id, bp.amount)
       <> (select x.id, x.amount from billing.price_at(s.plan_id, bp.starts_at) x)
union all
select 'attempt amount differs from its period', ca.id::text
  from billing.charge_attempts ca join billing.billing_periods bp on bp.id = ca.period_id
 where ca.amount <> bp.amount
union all
select 'refunds exceed the payment', p.id::text from billing.payments p
 where (select coalesce(sum(r.amount), 0) from billing.refunds r
         where r.payment_id = p.id and r.status = 'succeeded') > p.total_amount
union all
select 'balance is not total less succeeded refunds', p.id::text from billing.payments p
 where p.total_amount - p.balance_amount
       <> (select coalesce(sum(r.amount), 0) from billing.refunds r
            where r.payment_id = p.id and r.status = 'succeeded')
union all
select 'pending refunds exceed the balance', p.id::text from billing.payments p
 where (select coalesce(sum(r.amount), 0) from billing.refunds r
         where r.payment_id = p.id and r.status in ('requested', 'claimed')) > p.balance_amount
union all
select 'unapplied payment with a balance and no refund of it', p.id::text from billing.payments p
 where not p.applied and p.balance_amount > 0
   and not exists (select 1 from billing.refunds r where r.payment_id = p.id
                      and r.source::text in ('duplicate_charge', 'late_charge', 'wrong_amount'))
union all
select 'credit grant disagrees with its ledger', g.id::text from billing.credit_grants g
 where g.remaining < 0
    or g.remaining <> (select coalesce(sum(e.amount), 0) from billing.credit_entries e
                        where e.grant_id = g.id)
union all
select 'credits for a period that is not paid', g.id::text
  from billing.credit_grants g join billing.billing_periods bp on bp.id = g.period_id
 where bp.status <> 'paid' or bp.payment_id <> g.payment_id
union all
select 'live subscription without an open or paid current period', s.id::text
  from billing.subscriptions s left join billing.billing_periods bp on bp.id = s.current_period_id
 where s.status in ('incomplete', 'active', 'past_due')
   and (bp.id is null or bp.subscription_id <> s.id or bp.status not in ('open', 'paid')
        or (bp.period_index, bp.starts_at, bp.ends_at)
           <> (s.current_period_index, s.current_period_starts_at, s.current_period_ends_at))
union all
select 'active subscription with an unpaid period and no charge on its way', s.id::text
  from billing.subscriptions s join billing.billing_periods bp on bp.id = s.current_period_id
 where s.status = 'active' and bp.status = 'open'
   and not exists (select 1 from billing.charge_attempts ca
                    where ca.period_id = bp.id and ca.status in ('queued', 'claimed', 'unknown'))
union all
select 'cancel waiting for a charge with no charge in flight', s.id::text
  from billing.subscriptions s join billing.billing_periods bp on bp.id = s.current_period_id
 where s.status in ('incomplete', 'active', 'past_due') and s.cancel_at_period_end
   and bp.status = 'open'
   and not exists (select 1 from billing.charge_attempts ca
                    where ca.subscription_id = s.id
                      and (ca.status in ('claimed', 'unknown')
                           or (ca.status = 'queued' and ca.sends > 0)))
union all
select 'incomplete or past_due subscription whose period is not open', s.id::text
  from billing.subscriptions s join billing.billing_periods bp on bp.id = s.current_period_id
 where s.status in ('incomplete', 'past_due') and (bp.status <> 'open' or s.grace_ends_at is null)
union all
select 'open period that is not the current period of a live subscription', bp.id::text
  from billing.billing_periods bp join billing.subscriptions s on s.id = bp.subscription_id
 where bp.status = 'open'
   and (s.current_period_id <> bp.id or s.status not in ('incomplete', 'active', 'past_due'))
union all
select 'period is not the calendar month from the anchor', bp.id::text
  from billing.billing_periods bp join billing.subscriptions s on s.id = bp.subscription_id
 where bp.starts_at <> billing.period_start(s.billing_anchor, bp.period_index - 1)
    or bp.ends_at <> billing.period_start(s.billing_anchor, bp.period_index)
union all
select 'ended subscription with an attempt queued to charge', ca.id::text
  from billing.charge_attempts ca join billing.subscriptions s on s.id = ca.subscription_id
 where s.status in ('canceled', 'unpaid') and ca.status = 'queued'
union all
select 'billing key neither in use, deleted nor queued for deletion', pm.id::text
  from billing.payment_methods pm
 where pm.status <> 'deleted'
   and not exists (select 1 from billing.subscriptions s
                    where s.payment_method_id = pm.id
                      and s.status in ('incomplete', 'active', 'past_due'))
   and not exists (select 1 from billing.key_deletions kd where kd.payment_method_id = pm.id)
union all
select 'order id used twice', order_id from billing.charge_attempts
 group by order_id having count(*) > 1
union all
select 'idempotency key used twice', k::text
  from (select idempotency_key as k from billing.charge_attempts
        union all select id from billing.refunds) x group by k having count(*) > 1
union all
select 'payment order id that is not its attempt''s', p.id::text
  from billing.payments p join billing.charge_attempts ca on ca.id = p.attempt_id
 where p.order_id <> ca.order_id
"""


def op_strategy() -> st.SearchStrategy[tuple[str, int, int]]:
    weights = {
        "tick": 6,
        "period_end": 4,
        "serve": 9,
        "register": 2,
        "complete_pending": 1,
        "claim": 3,
        "answer": 4,
        "redeliver": 2,
        "expire_leases": 1,
        "late_worker": 3,
        "clock_back": 1,
        "cancel": 1,
        "resume": 1,
        "cancel_now": 1,
        "refund": 3,
        "serve_refunds": 3,
        "answer_refund": 2,
        "consume": 2,
        "deliver_webhook": 3,
        "serve_webhooks": 2,
        "odd_webhook": 1,
        "issuer_deletes_key": 1,
        "serve_key_deletions": 1,
        "change_price": 1,
        "reconcile": 1,
        "stale_snapshot": 1,
        "notifications": 1,
    }
    names = [name for name, weight in weights.items() for _ in range(weight)]
    return st.tuples(st.sampled_from(names), st.integers(0, 99), st.integers(0, 99))


class Run:
    """One example: a database of its own, a fresh sandbox, and the service's memory."""

    def __init__(self, rt: Runtime, dbname: str, start: datetime, toss: TossSandbox) -> None:
        toss.reset()
        self.toss = toss
        self.bl = Billing(rt, dbname, toss)
        self.bl.enable_clock(start)
        # What happened at Toss beside the service's own requests (see toss_charge).
        self.hidden: Counter[Any] = Counter()  # period -> approvals answered as a failure
        # Orders approved at Toss whose approval the service has not written back yet (answers
        # held by a worker or lost, approvals by another request).
        self.unrecorded: set[str] = set()
        # The service's side
        self.history: dict[str, list[dict[str, Any]]] = defaultdict(list)  # paymentKey -> snaps
        self.outbox: list[tuple[str, str, dict[str, Any]]] = []  # webhooks Toss is delivering
        # attempt -> (its claim with the lease token, what Toss answered), until written back
        self.held: dict[Any, tuple[db.ClaimedAttempt, Answer]] = {}
        self.held_refunds: dict[Any, tuple[db.ClaimedRefund, Answer]] = {}
        # results recorded (with the claim they were recorded under), to repeat
        self.delivered: list[tuple[db.ClaimedAttempt, Answer]] = []
        self.ingested: dict[str, Any] = {}  # transmission id -> webhook event id
        self.pending: list[tuple[str, dict[str, Any]]] = []  # registrations not completed yet
        self.user_of_key: dict[str, str] = {}  # customerKey -> user
        self.keys: dict[str, str] = {}  # sha256 -> billing key
        self.key_order: dict[str, int] = {}  # billing key -> when it was issued (a stable order)
        self.counter = 0
        self.windows = 0
        self.rejected_refunds = 0

    def close(self) -> None:
        self.bl.close()

    def next_id(self, prefix: str) -> str:
        self.counter += 1
        return f"{prefix}_{self.counter:04d}"

    # --- helpers ------------------------------------------------------------------------------
    def now(self) -> datetime:
        return self.bl.now()

    @staticmethod
    def attempt(call: Callable[[], Any], allowed: tuple[str, ...] = ()) -> tuple[Any, str | None]:
        """Runs a call; an error is acceptable only with one of the ``allowed`` SQLSTATEs."""
        try:
            return call(), None
        except (psycopg.Error, db.BillingError) as exc:
            error = exc
        assert error.sqlstate in allowed, f"{error.sqlstate}: {error}"
        event(f"refused with {error.sqlstate}")
        return None, error.sqlstate

    def live_subscription(self, user: str) -> Row | None:
        rows = self.bl.all(
            "select * from billing.subscriptions where user_id = %s and status in"
            " ('incomplete', 'active', 'past_due')",
            (user,),
        )
        return rows[0] if rows else None

    def check(self) -> None:
        violations = self.bl.all(INVARIANTS)
        assert violations == [], violations
        gaps = self.bl.audit_gaps()
        assert gaps == [], gaps
        self.check_toss()

    def check_toss(self, settled: bool = False) -> None:
        """The invariants at Toss, read from the sandbox's ledger (every approval it made).

        1. No period charged twice: per period, the approvals at Toss (each counted, refunded or
           not: a refund gives the money back but the card was charged twice) are at most one,
           plus one for each approval another request made while the service's own request was
           answered with a failure after which nobody looks the order up (``hidden``): only
           reconciliation can find those, and refunds them.
        2. Every approval at Toss is in our ledger, except one whose answer the service has not
           written back yet (``unrecorded``); once everything is settled, none is missing.
        """
        approvals = self.toss.approvals()
        if not approvals:
            return
        ours = self.bl.all(
            "select order_id as key, period_id from billing.charge_attempts"
            " union all select payment_key, null from billing.payments"
        )
        period_of = {r["key"]: r["period_id"] for r in ours if r["period_id"] is not None}
        per_period = Counter(period_of[a["orderId"]] for a in approvals)
        twice = {p: n for p, n in per_period.items() if n > 1 + self.hidden[p]}
        assert twice == {}, ("a period charged twice at Toss", twice)
        ledger = {r["key"] for r in ours if r["period_id"] is None}
        missing = {a["orderId"] for a in approvals if a["paymentKey"] not in ledger}
        excused = set() if settled else self.unrecorded
        assert missing <= excused, ("approved at Toss, missing from the ledger", missing - excused)

    # --- subscribers --------------------------------------------------------------------------
    def begin(self, user: str) -> dict[str, Any] | None:
        pending = self.bl.scalar(
            "select count(*) from billing.card_registrations where user_id = %s"
            " and status = 'pending' and expires_at > billing.now()",
            (user,),
        )
        reg, err = self.attempt(
            lambda: self.bl.api(
                user, "begin_registration", "pro", claims={"email": f"{user}@x.kr"}
            ),
            ("SB422",),
        )
        assert (err == "SB422") == (pending >= 5)
        return reg  # type: ignore[no-any-return]

    def complete(self, user: str, reg: dict[str, Any], expect_ok: bool) -> None:
        issued = self.toss.issue_billing_key(reg["customerKey"])
        key = issued["billingKey"]
        self.key_order[key] = len(self.key_order)
        done, err = self.attempt(
            lambda: self.bl.run(
                db.service_complete_registration(
                    reg["customerKey"], KEYRING.seal(key, reg["customerKey"]), card_of(issued)
                )
            ),
            () if expect_ok else ("SB409",),
        )
        assert (err is None) == expect_ok
        if done is not None:
            self.user_of_key[reg["customerKey"]] = user
            self.keys[sha256_hex(key)] = key
            s = self.bl.one(
                "select * from billing.subscriptions where id = %s", (done.subscription_id,)
            )
            assert s["user_id"] == user
            assert s["status"] in LIVE

    def op_register(self, a: int, b: int) -> None:
        user = USERS[a % len(USERS)]
        reg = self.begin(user)
        if reg is None:
            return
        kind = b % 10
        if kind < 7:
            self.complete(user, reg, expect_ok=True)
        elif kind == 7:
            out = self.bl.run(
                db.service_fail_registration(reg["customerKey"], "PAY_PROCESS_CANCELED", "취소")
            )
            assert out.changed is True
        else:
            self.pending.append((user, reg))

    def op_complete_pending(self, a: int, b: int) -> None:
        if not self.pending:
            return
        user, reg = self.pending.pop(a % len(self.pending))
        row = self.bl.one(
            "select status::text, expires_at > billing.now() as fresh"
            " from billing.card_registrations where customer_key = %s",
            (reg["customerKey"],),
        )
        self.complete(user, reg, expect_ok=row["status"] == "pending" and row["fresh"])

    def op_cancel(self, a: int, b: int) -> None:
        user = USERS[a % len(USERS)]
        if b % 2:
            return  # changed their mind before pressing the button (keeps subscribers around)
        live = self.live_subscription(user)
        paid = live is not None and self.bl.scalar(
            "select status = 'paid' from billing.billing_periods where id = %s",
            (live["current_period_id"],),
        )
        in_flight = live is not None and self.bl.scalar(
            "select exists (select 1 from billing.charge_attempts where subscription_id = %s"
            " and (status in ('claimed', 'unknown') or (status = 'queued' and sends > 0)))",
            (live["id"],),
        )
        out, err = self.attempt(lambda: self.bl.api(user, "cancel_subscription"), ("SB404",))
        assert (err is None) == (live is not None)
        if live is not None:
            # Access runs to the end of a paid period; with nothing paid for it, it ends now,
            # unless a charge for it may be at Toss: then that charge's outcome decides.
            if live["status"] == "active" and paid:
                assert (out["status"], out["cancelAtPeriodEnd"]) == ("active", True)
            elif in_flight:
                event("cancel while a charge is in flight")
                assert (out["status"], out["cancelAtPeriodEnd"]) == (live["status"], True)
                assert out["chargeInFlight"] is True
            else:
                assert out["status"] == "canceled"

    def op_resume(self, a: int, b: int) -> None:
        user = USERS[a % len(USERS)]
        live = self.live_subscription(user)
        _, err = self.attempt(lambda: self.bl.api(user, "resume_subscription"), ("SB404", "SB409"))
        if live is None:
            assert err == "SB404"
        else:
            ok = (
                live["status"] == "active"
                and live["cancel_at_period_end"]
                and live["current_period_ends_at"] > self.now()
            )
            assert err == (None if ok else "SB409")

    def op_consume(self, a: int, b: int) -> None:
        user = USERS[a % len(USERS)]
        balance = self.bl.api(user, "my_credits")["balance"]
        assert balance >= 0
        out, err = self.attempt(lambda: self.bl.api(user, "consume_credit", "saju"), ("SB422",))
        if balance > 0:
            assert err is None
            assert out["balance"] == balance - 1
        else:
            assert err == "SB422"

    # --- the operator and the scheduler -------------------------------------------------------
    def op_tick(self, a: int, b: int) -> None:
        self.bl.advance(JUMPS[a % len(JUMPS)])
        self.bl.tick()

    def op_period_end(self, a: int, b: int) -> None:
        """Straight to the next end of a live subscription's period (plus a little) and tick; then,
        before the service charges the renewals, maybe something else happens to a subscriber."""
        due = self.bl.scalar(
            "select min(current_period_ends_at) from billing.subscriptions"
            " where status in ('incomplete', 'active', 'past_due')"
            " and current_period_ends_at > billing.now()"
        )
        if due is None:
            return
        self.bl.set_clock(due + JUMPS[a % 6])
        self.bl.tick()
        renewing = [
            i
            for i, user in enumerate(USERS)
            if self.bl.scalar(
                "select exists (select 1 from billing.subscriptions s join billing.billing_periods"
                " bp on bp.id = s.current_period_id where s.user_id = %s and s.status = 'active'"
                " and bp.status = 'open')",
                (user,),
            )
        ]
        if not renewing:
            return
        i = renewing[a % len(renewing)]
        self.windows += 1
        window = (b + self.windows) % 4
        if window == 1:  # registers a new card
            self.op_register(i, 0)
        elif window == 2:  # the card company deletes the key; Toss's webhook is handled at once
            self.op_issuer_deletes_key(i, 0)
            self.op_deliver_webhook(0, 1)
            self.op_serve_webhooks(0, 1)
        elif window == 3:  # cancels
            self.op_cancel(i, 0)

    def op_expire_leases(self, a: int, b: int) -> None:
        self.bl.advance(timedelta(minutes=3))
        self.bl.tick()

    def op_clock_back(self, a: int, b: int) -> None:
        self.bl.set_clock(self.now() - BACKS[a % len(BACKS)])
        self.bl.tick()

    def op_cancel_now(self, a: int, b: int) -> None:
        live = [s for s in (self.live_subscription(u) for u in USERS) if s is not None]
        if not live:
            return
        if b % 3:
            return  # support talked them out of it (keeps subscribers around)
        s = live[a % len(live)]
        out = self.bl.billing("cancel_subscription_now", s["id"], a % 2 == 0, "support")
        assert out["status"] == "canceled"

    def payments_in_ledger(self) -> list[Row]:
        """Payments in the order Toss approved them (deterministic, unlike their ids)."""
        rows = {r["payment_key"]: r for r in self.bl.all("select * from billing.payments")}
        return [rows[k] for k in self.approval_order() if k in rows]

    def approval_order(self) -> list[str]:
        """paymentKeys in the order Toss approved them."""
        return [a["paymentKey"] for a in self.toss.approvals()]

    def op_refund(self, a: int, b: int) -> None:
        payments = self.payments_in_ledger()
        if not payments:
            return
        pay = payments[a % len(payments)]
        pending = self.bl.scalar(
            "select coalesce(sum(amount), 0) from billing.refunds where payment_id = %s"
            " and status in ('requested', 'claimed')",
            (pay["id"],),
        )
        refundable = pay["balance_amount"] - pending
        amount = (None, 1000, 3000, pay["balance_amount"], pay["total_amount"] + 1)[b % 5]
        _, err = self.attempt(
            lambda: self.bl.billing("request_refund", pay["id"], amount, "support"),
            ("SB400", "SB409", "SB422"),
        )
        if amount is not None and amount <= 0:
            assert err == "SB400"
        elif pay["status"] not in ("DONE", "PARTIAL_CANCELED"):
            assert err == "SB409"
        elif (amount or refundable) > refundable or refundable <= 0:
            assert err == "SB422"
        else:
            assert err is None
            if a % 2 == 0:  # the doorbell rings and the service picks it up at once
                self.op_serve_refunds(b, a)

    def op_change_price(self, a: int, b: int) -> None:
        self.attempt(
            lambda: self.bl.billing(
                "change_plan_price",
                "pro",
                9900 + 1000 * (a % 5),
                self.now() + PRICE_OFFSETS[b % len(PRICE_OFFSETS)],
            ),
            ("SB409", "SB422"),
        )

    # --- the service: charges -----------------------------------------------------------------
    def toss_charge(self, row: db.ClaimedAttempt, outcome: str) -> Answer:
        """POST /v1/billing/{billingKey}, made to answer as ``outcome`` says; returns what the
        service heard. Two outcomes involve another request for the same order, sent without
        the attempt's Idempotency-Key (its answer lost to whoever sent it): "duplicated" (it
        came first, so Toss answers the service DUPLICATED_ORDER_ID) and "charged_but_declined"
        (it came after the service was answered with a decline)."""
        stray: Answer | None = None
        if outcome == "duplicated":
            stray = self.bl.stray_charge(row)
        answer = self.bl.call_toss(row, CHARGE_HOW[outcome])
        if outcome == "charged_but_declined":
            stray = self.bl.stray_charge(row)
        if answer.payment is not None or answer.lost is not None:
            self.unrecorded.add(row.order_id)  # until the service writes an approval back
        if answer.payment is not None:
            self.history[answer.payment["paymentKey"]].append(answer.payment)
        if stray is not None and stray.payment is not None:
            self.unrecorded.add(row.order_id)
            self.history[stray.payment["paymentKey"]].append(stray.payment)
            if answer.code is not None and answer.classification in HIDING:
                event("Toss approved an order the service was told had failed")
                self.hidden[row.period_id] += 1
        return answer

    def toss_lookup(self, row: db.ClaimedAttempt, outcome: str) -> Answer:
        """GET /v1/payments/orders/{orderId}: answered, throttled (429) or its answer lost."""
        answer = self.bl.call_toss(row, LOOKUP_HOW[outcome])
        if answer.payment is not None:
            self.unrecorded.add(row.order_id)
        return answer

    def claim_sorted(self, worker: str) -> list[db.ClaimedAttempt]:
        """Claims every due attempt, checking that none is handed out while leased elsewhere."""
        leased = {
            r["id"]
            for r in self.bl.all(
                "select id from billing.charge_attempts where status = 'claimed'"
                " and lease_expires_at > billing.now()"
            )
        }
        rows = self.bl.claim(worker, 100)
        ids = [r.attempt_id for r in rows]
        assert len(set(ids)) == len(ids)
        assert not leased & set(ids), "an attempt was handed out while leased"
        tokens = self.bl.all(
            "select id, lease_token from billing.charge_attempts where id = any(%s)", (ids,)
        )
        assert {r["id"]: r["lease_token"] for r in tokens} == {
            r.attempt_id: r.lease_token for r in rows
        }
        for r in rows:
            # Charged only while its period needs paying; anything else is looked up.
            allowed = self.bl.scalar("select billing.resend_allowed(%s)", (r.attempt_id,))
            assert r.mode == db.AttemptMode.LOOKUP or allowed, r
        assert self.bl.claim("another-worker", 100) == [], "claimable twice at once"
        return sorted(
            rows,
            key=lambda r: (self.user_of_key[r.customer_key], r.order_name, r.attempt_number),
        )

    def call_toss(self, row: db.ClaimedAttempt, pick: int) -> Answer:
        if row.mode == db.AttemptMode.CHARGE:
            return self.toss_charge(row, CHARGE[pick % len(CHARGE)])
        return self.toss_lookup(row, LOOKUP[pick % len(LOOKUP)])

    def op_claim(self, a: int, b: int) -> None:
        """A worker claims what is due and calls Toss at once (within its lease); writing the
        answers back comes later (op_answer), or never (a crash: the lease runs out)."""
        for i, row in enumerate(self.claim_sorted(self.next_id("w"))):
            self.held[row.attempt_id] = (row, self.call_toss(row, b + 5 * i))

    def op_serve(self, a: int, b: int) -> None:
        """A healthy worker: claims what is due, calls Toss and writes each answer back at once."""
        for i, row in enumerate(self.claim_sorted(self.next_id("w"))):
            answer = self.call_toss(row, b + 5 * i)
            self.record(row, answer, ())
            self.delivered.append((row, answer))

    def record(
        self, row: db.ClaimedAttempt, answer: Answer, allowed: tuple[str, ...]
    ) -> db.Recorded | None:
        """Writes what Toss answered back to the database, as the service does (dbkit.result_of),
        with the lease token of the claim it was heard under. Returns the result (None when
        refused)."""
        kind = "approval" if answer.payment is not None else answer.code or "no answer"
        event(f"{row.mode} answer: {kind}" + (" (late)" if allowed else ""))
        out: db.Recorded | None
        out, _ = self.attempt(lambda: self.bl.record(row, answer), allowed)
        if out is not None and answer.payment is not None:
            self.unrecorded.discard(row.order_id)
        return out

    def lease_is_current(self, row: db.ClaimedAttempt) -> bool:
        now = self.bl.one(
            "select status::text, lease_token from billing.charge_attempts where id = %s",
            (row.attempt_id,),
        )
        return (now["status"], now["lease_token"]) == ("claimed", row.lease_token)

    def op_answer(self, a: int, b: int) -> None:
        if not self.held:
            return
        attempt_id = list(self.held)[a % len(self.held)]
        row, answer = self.held.pop(attempt_id)
        fresh = self.lease_is_current(row)
        # A worker whose lease ran out may find the attempt settled or claimed by another: 409,
        # no change (an approval is a fact and is recorded whoever reports it).
        out = self.record(row, answer, () if fresh else ("SB409",))
        if not fresh and out is not None and answer.payment is None:
            assert out.changed is False, out
        self.delivered.append((row, answer))

    def op_late_worker(self, a: int, b: int) -> None:
        """A worker claims, calls Toss, then stalls past its lease; the lease is expired (tick)
        and maybe another worker claims the attempt again. The stalled worker then writes back:
        a decline is refused (SB409) and changes nothing; an approval is still recorded."""
        rows = self.claim_sorted(self.next_id("w"))
        if not rows:
            self.op_period_end(a, b)  # nothing due: on to the next renewals
            rows = self.claim_sorted(self.next_id("w"))
        held = [(row, self.call_toss(row, b + 7 * i)) for i, row in enumerate(rows)]
        if not held:
            return
        expiry = max(row.lease_expires_at for row, _ in held)
        self.bl.set_clock(max(expiry, self.now()) + MINUTE)
        self.bl.tick()
        if a % 2:
            # Another worker takes the work over (its own answers are written back at once).
            self.op_serve(a, b + 1)
        for row, answer in held:
            assert not self.lease_is_current(row)
            before = self.bl.one(
                "select to_jsonb(ca) as row, (select count(*) from billing.events) as events,"
                " (select count(*) from billing.charge_attempts) as attempts"
                " from billing.charge_attempts ca where ca.id = %s",
                (row.attempt_id,),
            )
            out = self.record(row, answer, ("SB409",))
            if answer.payment is not None:
                event("late approval recorded")
                assert isinstance(out, db.Recorded), out
                assert self.bl.scalar(
                    "select count(*) from billing.payments where attempt_id = %s",
                    (row.attempt_id,),
                )
                assert out.status in ("succeeded", "duplicate")
                continue
            late_decline = (
                row.mode is db.AttemptMode.CHARGE
                and answer.code is not None
                and answer.classification in ("decline", "needs_new_card")
            )
            if late_decline:
                event("late decline refused")
                assert out is None, f"a late decline was recorded: {out}"
            elif isinstance(out, db.Recorded):
                assert out.changed is False, out
            after = self.bl.one(
                "select to_jsonb(ca) as row, (select count(*) from billing.events) as events,"
                " (select count(*) from billing.charge_attempts) as attempts"
                " from billing.charge_attempts ca where ca.id = %s",
                (row.attempt_id,),
            )
            assert after == before, (answer, before, after)
            self.delivered.append((row, answer))

    def op_redeliver(self, a: int, b: int) -> None:
        if not self.delivered:
            return
        row, answer = self.delivered[a % len(self.delivered)]
        before = self.bl.scalar("select count(*) from billing.payments")
        out = self.record(row, answer, ("SB409",))
        # The same result again from the same worker changes nothing.
        if out is not None:
            assert out.changed is False, out
        if answer.payment is not None:
            assert self.bl.scalar("select count(*) from billing.payments") == before

    def op_reconcile(self, a: int, b: int) -> None:
        """The daily reconciliation: every payment Toss has is applied as Toss has it now."""
        for key in self.approval_order():
            out = self.bl.run(db.service_apply_payment_snapshot(self.toss.payment(key)))
            assert out.matched in ("attempt", "payment")

    def op_stale_snapshot(self, a: int, b: int) -> None:
        """A snapshot older than what the ledger has arrives late: it changes nothing."""
        keys = list(self.history)
        if not keys or len(self.history[keys[a % len(keys)]]) < 2:
            return
        key = keys[a % len(keys)]
        old = self.history[key][b % (len(self.history[key]) - 1)]
        rows = self.bl.all(
            "select balance_amount from billing.payments where payment_key = %s", (key,)
        )
        self.bl.run(db.service_apply_payment_snapshot(old))
        after = self.bl.scalar(
            "select balance_amount from billing.payments where payment_key = %s", (key,)
        )
        if rows:
            event("older snapshot after a newer one")
            assert after == min(rows[0]["balance_amount"], old["balanceAmount"])
        assert after >= self.toss.balances()[key]

    # --- the service: refunds -----------------------------------------------------------------
    def toss_cancel(self, row: db.ClaimedRefund, outcome: str) -> Answer:
        """POST /v1/payments/{paymentKey}/cancel with the refund id as Idempotency-Key; a re-send
        gets Toss's first answer again."""
        answer = self.bl.call_refund(row, REFUND_HOW[outcome])
        # The database never asks for more than Toss still holds.
        assert answer.code not in ("NOT_CANCELABLE_AMOUNT", "ALREADY_CANCELED_PAYMENT"), answer
        if answer.payment is not None:
            self.history[row.payment_key].append(answer.payment)
        return answer

    def op_serve_refunds(self, a: int, b: int) -> None:
        """Claims due refunds and calls Toss; most answers are written back at once, some later
        (op_answer_refund) or never (the lease runs out and the cancel is re-sent)."""
        rows = self.bl.run(db.service_claim_refunds(self.next_id("w"), 100))
        order = {k: i for i, k in enumerate(self.approval_order())}
        rows.sort(key=lambda r: (order[r.payment_key], r.cancel_amount, r.cancel_reason))
        for i, row in enumerate(rows):
            answer = self.toss_cancel(row, REFUND[(b + 3 * i) % len(REFUND)])
            self.held_refunds[row.refund_id] = (row, answer)
            if (a + i) % 4:
                self.op_answer_refund(len(self.held_refunds) - 1, b + i)

    def record_refund(
        self, row: db.ClaimedRefund, answer: Answer, allowed: tuple[str, ...]
    ) -> db.Recorded | None:
        out: db.Recorded | None
        out, _ = self.attempt(lambda: self.bl.record_refund(row, answer), allowed)
        if answer.payment is not None:
            assert out is None or out.status == "succeeded"
        else:
            classification = answer.classification if answer.code else "unprocessed"
            # Only a cancel Toss did not process is sent again (ten tries); any other error is
            # final.
            if out is not None and out.changed:
                tries = self.bl.scalar(
                    "select attempts from billing.refunds where id = %s", (row.refund_id,)
                )
                again = classification == "unprocessed" and tries < 10
                assert out.status == ("requested" if again else "failed"), (out, tries)
            if out is not None and out.changed and out.status == "failed":
                self.rejected_refunds += 1
        return out

    def op_answer_refund(self, a: int, b: int) -> None:
        if not self.held_refunds:
            return
        refund_id = list(self.held_refunds)[a % len(self.held_refunds)]
        row, answer = self.held_refunds.pop(refund_id)
        now = self.bl.one(
            "select status::text, lease_token from billing.refunds where id = %s", (refund_id,)
        )
        fresh = (now["status"], now["lease_token"]) == ("claimed", row.lease_token)
        out = self.record_refund(row, answer, () if fresh else ("SB409",))
        if not fresh and out is not None and answer.payment is None:
            assert out.changed is False, out
        if b % 3 == 0:  # the service retries its write after a lost reply
            again = self.record_refund(row, answer, ("SB409",))
            assert again is None or again.changed is False, again
        elif b % 3 == 1 and answer.payment is not None:
            # A re-fetch made before this cancel (for an earlier webhook) lands after it.
            self.op_stale_snapshot(list(self.history).index(row.payment_key), a)

    # --- the service: webhooks and billing keys -----------------------------------------------
    def ingest(self, tid: str, event_type: str | None, body: dict[str, Any]) -> db.IngestedWebhook:
        row = self.bl.run(db.service_ingest_webhook(tid, event_type, body))
        if tid in self.ingested:
            event("webhook delivered twice")
            assert (row.duplicate, row.webhook_event_id) == (True, self.ingested[tid])
        else:
            assert row.duplicate is False
            self.ingested[tid] = row.webhook_event_id
        return row

    def collect_webhooks(self) -> None:
        """What Toss has sent since the last look (cancels, deleted keys) joins its outbox."""
        self.outbox += self.toss.new_webhooks()

    def op_deliver_webhook(self, a: int, b: int) -> None:
        """Toss delivers what it has, not in the order it happened; a delivery whose 200 it did
        not get stays in its outbox and comes again later."""
        self.collect_webhooks()
        if not self.outbox:
            return
        k = a % len(self.outbox)
        batch, self.outbox = self.outbox[k:] + self.outbox[:k], []
        for i, (tid, event_type, body) in enumerate(batch):
            self.ingest(tid, event_type, body)
            if (b + i) % 3 == 0:
                self.outbox.append((tid, event_type, body))

    def op_odd_webhook(self, a: int, b: int) -> None:
        payments = self.payments_in_ledger()
        kind = a % 4
        tid = self.next_id("whtrans_odd")
        if kind == 0:
            body = {
                "eventType": "CUSTOMER_STATUS_CHANGED",
                "createdAt": "x",
                "data": {"status": "X"},
            }
            assert self.ingest(tid, None, body).status == "ignored"
        elif kind == 1 or not payments:
            order_id = payments[0]["order_id"] if payments else "ord_forged"
            body = {"createdAt": "x", "secret": "ps_forged", "status": "DONE",
                    "transactionKey": "t", "orderId": order_id}  # fmt: skip
            row = self.ingest(tid, None, body)
            assert (row.status, row.resolved_event_type) == ("ignored", "DEPOSIT_CALLBACK")
        elif kind == 2:
            pay = payments[b % len(payments)]
            body = {"createdAt": "x", "secret": pay["secret"], "status": "DONE",
                    "transactionKey": "t", "orderId": pay["order_id"]}  # fmt: skip
            assert self.ingest(tid, None, body).status == "received"
        else:
            pay = payments[b % len(payments)]
            forged = dict(self.toss.payment(pay["payment_key"]), balanceAmount=0, secret="ps_x")
            body = {"eventType": "PAYMENT_STATUS_CHANGED", "createdAt": "x", "data": forged}
            assert self.ingest(tid, "PAYMENT_STATUS_CHANGED", body).status == "ignored"

    def process_webhook(self, row: db.ClaimedWebhook, race: bool = False) -> db.WebhookOutcome:
        outcome = self.bl.process_webhook(row)
        key = row.payload.get("data", {}).get("paymentKey")
        if race and row.event_type == "PAYMENT_STATUS_CHANGED" and len(self.history[key]) > 1:
            # Another worker's re-fetch of an earlier event, answered before this one, lands last.
            event("older snapshot after a newer one")
            self.bl.run(db.service_apply_payment_snapshot(self.history[key][-2]))
        return outcome

    def finish_webhook(self, row: db.ClaimedWebhook, outcome: db.WebhookOutcome) -> None:
        done = self.bl.run(
            db.service_record_webhook_result(row.webhook_event_id, row.lease_token, outcome, "x")
        )
        assert done.changed is True, done

    def op_serve_webhooks(self, a: int, b: int) -> None:
        rows = self.bl.run(db.service_claim_webhooks(self.next_id("w"), 100))
        arrival = {tid: i for i, tid in enumerate(self.ingested)}
        for i, row in enumerate(sorted(rows, key=lambda r: arrival[r.transmission_id])):
            outcome = (
                db.WebhookOutcome.RETRY
                if (b + i) % 5 == 0
                else self.process_webhook(row, (b + i) % 5 == 1)
            )
            self.finish_webhook(row, outcome)

    def op_issuer_deletes_key(self, a: int, b: int) -> None:
        """The card company ends a subscriber's billing key at Toss; Toss says so by webhook."""
        s = self.live_subscription(USERS[a % len(USERS)])
        if s is None:
            return
        sha = self.bl.scalar(
            "select billing_key_sha256 from billing.payment_methods where id = %s",
            (s["payment_method_id"],),
        )
        gone = self.toss.delete_billing_key(self.keys[sha])
        assert gone.ok or gone.code == "ALREADY_REMOVED_BILLING_KEY", gone  # ended before

    def op_serve_key_deletions(self, a: int, b: int) -> None:
        rows = self.bl.run(db.service_claim_key_deletions(self.next_id("w"), 100))
        # Envelopes and keys are random; the order the keys were issued in is repeatable.
        rows.sort(key=lambda r: self.key_order[billing_key_of(r)])
        for i, row in enumerate(rows):
            key = billing_key_of(row)
            # Never while a charge on the key may still be on its way.
            assert not self.bl.scalar(
                "select exists (select 1 from billing.charge_attempts where payment_method_id = %s"
                " and status in ('queued', 'claimed', 'unknown'))",
                (row.payment_method_id,),
            )
            assert self.keys[sha256_hex(key)] == key
            if (b + i) % 4 == 3:
                out = self.bl.serve_key_deletion(row, "throttled")
                assert out.status in ("requested", "failed")
                continue
            # Toss deletes it (or had it deleted already) and sends BILLING_DELETED.
            out = self.bl.serve_key_deletion(row)
            assert (out.status, out.changed) == ("deleted", True)

    def op_notifications(self, a: int, b: int) -> None:
        for row in self.bl.run(db.service_claim_notifications(self.next_id("w"), 100)):
            out = self.bl.run(
                db.service_record_notification_delivered(row.notification_id, row.lease_token)
            )
            assert (out.status, out.changed) == ("delivered", True)

    # --- the end of an example: the service settles everything, the ledger agrees with Toss ---
    def settle(self) -> None:
        self.held.clear()
        self.held_refunds.clear()
        for _ in range(60):
            self.bl.tick()
            # The daily reconciliation first: approvals the ledger missed may need refunds.
            known = self.bl.scalar("select count(*) from billing.payments")
            self.op_reconcile(0, 0)
            busy = self.bl.scalar("select count(*) from billing.payments") != known
            for row in self.claim_sorted(self.next_id("settle")):
                answer = (
                    self.toss_charge(row, "ok")
                    if row.mode == db.AttemptMode.CHARGE
                    else self.toss_lookup(row, "answer")
                )
                self.record(row, answer, ())
                busy = True
            for refund in self.bl.run(db.service_claim_refunds(self.next_id("settle"), 100)):
                self.record_refund(refund, self.toss_cancel(refund, "ok"), ())
                busy = True
            self.collect_webhooks()
            while self.outbox:
                self.ingest(*self.outbox.pop(0))
            for webhook in self.bl.run(db.service_claim_webhooks(self.next_id("settle"), 100)):
                self.finish_webhook(webhook, self.process_webhook(webhook))
                busy = True
            self.op_serve_key_deletions(0, 0)
            self.check()
            if busy:
                continue
            due = self.bl.scalar(
                """select min(t) from (
                     select min(not_before) t from billing.charge_attempts
                      where status in ('queued', 'unknown')
                     union all select min(lease_expires_at) from billing.charge_attempts
                      where status = 'claimed'
                     union all select min(not_before) from billing.refunds
                      where status = 'requested'
                     union all select min(lease_expires_at) from billing.refunds
                      where status = 'claimed'
                     union all select min(not_before) from billing.webhook_events
                      where status = 'received'
                     union all select min(lease_expires_at) from billing.webhook_events
                      where status = 'processing'
                   ) due"""
            )
            if due is None:
                break
            self.bl.set_clock(max(due, self.now()) + MINUTE)
        self.check()
        self.check_toss(settled=True)

        # Every payment Toss approved is in the ledger, with Toss's balance.
        ledger = {r["payment_key"]: r for r in self.bl.all("select * from billing.payments")}
        assert {k: r["balance_amount"] for k, r in ledger.items()} == self.toss.balances()
        assert (
            self.bl.all("select id from billing.refunds where status in ('requested', 'claimed')")
            == []
        )
        # A charge that must not stand was given back, unless Toss refused the refund (alerted).
        unrefunded = [r for r in ledger.values() if not r["applied"] and r["balance_amount"] > 0]
        if unrefunded:
            assert self.rejected_refunds > 0
            assert "refund failed" in {
                r["topic"]
                for r in self.bl.all(
                    "select payload ->> 'topic' as topic from billing.notifications"
                    " where kind = 'alert'"
                )
            }
        summary = self.bl.one(
            """select (select max(period_index) from billing.billing_periods) as periods,
                      (select count(*) from billing.charge_attempts where status = 'duplicate')
                        as duplicates,
                      (select count(*) from billing.payments where not applied) as unapplied,
                      (select count(*) from billing.refunds where status = 'succeeded') as refunds,
                      (select count(*) from billing.subscriptions where past_due_since is not null
                          or status = 'unpaid') as dunned,
                      (select count(*) from billing.key_deletions where status = 'deleted')
                        as keys_deleted,
                      (select count(*) from billing.payment_methods where status = 'deleted'
                          and status_reason like 'deleted at Toss:%') as keys_deleted_by_issuer"""
        )
        for name, n in summary.items():
            event(f"{name}: {'0' if not n else '1' if n == 1 else '2+'}")


@settings(
    max_examples=40,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(start=st.sampled_from(STARTS), ops=st.lists(op_strategy(), min_size=20, max_size=40))
def test_random_interleavings_keep_every_invariant(
    rt: Runtime,
    template: str,
    sandbox_server: TossSandbox,
    start: datetime,
    ops: list[tuple[str, int, int]],
) -> None:
    dbname = testdb.clone(rt, template)
    run = Run(rt, dbname, start, sandbox_server)
    try:
        for a in range(2):  # two subscribers to start with; more come and go
            run.op_register(a, 0)
        run.check()
        for name, a, b in ops:
            getattr(run, f"op_{name}")(a, b)
            run.check()
        run.settle()
    finally:
        run.close()
        testdb.drop(rt, dbname)

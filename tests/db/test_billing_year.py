"""A simulated year of billing on the test clock, driven only through the SQL functions that the
service (billing_service), subscribers (api, as authenticated), the operator and pg_cron
(billing.tick) call; it ends with the architecture's invariants checked over everything that
happened."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any

from dbkit import (
    ANCHOR_31_PERIOD_STARTS,
    SEOUL,
    Billing,
    Row,
    billing_key_of,
    kst,
    raises_sqlstate,
    result_of,
    sha256_hex,
)

from service import db

START = kst(2027, 12, 31, 10, 0)
END = kst(2029, 1, 2, 0, 0)


class Sim:
    """The service's loop: claim every kind of work until none is left, each answered by Toss (the
    sandbox), as the scripts of each subscriber say."""

    def __init__(self, bl: Billing) -> None:
        self.bl = bl
        self.toss = bl.sandbox
        self.user_of_key: dict[str, str] = {}  # customerKey -> user
        self.billing_keys: dict[str, str] = {}  # sha256 -> billing key (the service can decrypt)
        self.scripts: dict[str, list[str]] = {}
        self.notifications: list[Row] = []
        self.delivered: Counter[str] = Counter()  # webhooks Toss sent, by eventType

    # --- subscribers ----------------------------------------------------------------------
    def register(self, user: str) -> dict[str, Any]:
        done = self.bl.register(user)
        self.user_of_key[done["customerKey"]] = user
        self.billing_keys[sha256_hex(done["billingKey"])] = done["billingKey"]
        return done

    # --- the service ----------------------------------------------------------------------
    def drain(self) -> None:
        bl = self.bl
        for _ in range(1000):
            progressed = self.deliver_webhooks()
            for row in bl.claim("sim", 10):
                self.handle_attempt(row)
                progressed = True
            for refund in bl.run(db.service_claim_refunds("sim", 10)):
                result = bl.record_refund(refund, bl.call_refund(refund))
                assert result.status == "succeeded"
                progressed = True
            for webhook in bl.run(db.service_claim_webhooks("sim", 10)):
                outcome = bl.process_webhook(webhook)
                assert outcome is db.WebhookOutcome.PROCESSED
                done = bl.run(
                    db.service_record_webhook_result(
                        webhook.webhook_event_id, webhook.lease_token, outcome
                    )
                )
                assert (done.status, done.changed) == ("processed", True)
                progressed = True
            for deletion in bl.run(db.service_claim_key_deletions("sim", 10)):
                assert bl.serve_key_deletion(deletion).status == "deleted"
                progressed = True
            for note in bl.run(db.service_claim_notifications("sim", 50)):
                self.notifications.append({"user_id": note.user_id, "kind": note.kind})
                delivered = bl.run(
                    db.service_record_notification_delivered(note.notification_id, note.lease_token)
                )
                assert (delivered.status, delivered.changed) == ("delivered", True)
                progressed = True
            if not progressed:
                return
        raise AssertionError("the service loop did not settle")

    def deliver_webhooks(self) -> bool:
        """What Toss sent since the last look reaches the service's endpoint, each twice."""
        sent = self.toss.new_webhooks()
        for tid, event_type, body in sent:
            ingest = db.service_ingest_webhook(tid, event_type, body)
            first = self.bl.run(ingest)
            again = self.bl.run(ingest)
            assert first.duplicate is False
            assert (again.duplicate, again.webhook_event_id) == (True, first.webhook_event_id)
            self.delivered[event_type] += 1
        return bool(sent)

    def handle_attempt(self, row: db.ClaimedAttempt) -> None:
        bl = self.bl
        if row.mode == db.AttemptMode.LOOKUP:
            assert bl.serve(row).changed is True
            return
        # The service opens the envelope it stored, with the customerKey as associated data.
        key = billing_key_of(row)
        assert self.billing_keys[sha256_hex(key)] == key
        user = self.user_of_key[row.customer_key]
        script = self.scripts.get(user, [])
        outcome = script.pop(0) if script else "ok"
        if outcome == "ok":
            record = result_of(row, bl.call_toss(row))
            first = bl.run(record)
            assert first.changed is True
            # The service retrying its write after a lost reply applies nothing twice.
            again = bl.run(record)
            assert again.changed is False
            assert again.detail["paymentId"] == first.detail["paymentId"]
        elif outcome == "decline":
            bl.serve(row, "REJECT_CARD_PAYMENT")
        elif outcome == "declined_but_charged":
            # Answered declined, approved all the same by a request whose answer was lost.
            bl.serve(row, "REJECT_CARD_PAYMENT")
            assert bl.stray_charge(row).payment is not None
        elif outcome == "dead":
            bl.serve(row, "INVALID_STOPPED_CARD")
        elif outcome == "transient":
            # Processed by Toss: the key is spent, so the order is looked up at once.
            spent = bl.serve(row, "FAILED_INTERNAL_SYSTEM_PROCESSING")
            assert (spent.status, spent.detail["next"]["action"]) == ("unknown", "lookup")
        elif outcome == "busy":
            # Not processed: the very same request goes again after a backoff.
            assert bl.serve(row, "IDEMPOTENT_REQUEST_PROCESSING").status == "queued"
        elif outcome == "timeout_after":
            assert bl.serve(row, "lost").status == "unknown"  # charged, the answer lost
        elif outcome == "timeout_before":
            assert bl.serve(row, "unsent").status == "unknown"
        elif outcome == "duplicated":
            # Another request approved the order first: Toss answers DUPLICATED_ORDER_ID.
            assert bl.stray_charge(row).payment is not None
            assert bl.serve(row).status == "unknown"
        else:
            raise AssertionError(outcome)

    # --- time -----------------------------------------------------------------------------
    def next_due(self) -> datetime | None:
        return self.bl.scalar(
            """select min(t) from (
                 select min(not_before) t from billing.charge_attempts
                  where status in ('queued', 'unknown')
                 union all select min(current_period_ends_at) from billing.subscriptions
                  where status = 'active'
                 union all select min(grace_ends_at) from billing.subscriptions
                  where status in ('incomplete', 'past_due')
                 union all select min(expires_at) from billing.credit_grants
                  where status = 'active'
                 union all select min(not_before) from billing.refunds
                  where status = 'requested'
                 union all select min(not_before) from billing.webhook_events
                  where status = 'received'
                 union all select min(not_before) from billing.key_deletions
                  where status = 'requested'
                 union all select min(expires_at) from billing.card_registrations
                  where status = 'pending'
               ) due"""
        )

    def step(self) -> None:
        self.bl.tick()
        self.drain()

    def run_until(self, until: datetime) -> None:
        """Moves the clock from event to event up to ``until``, ticking and serving at each stop."""
        for _ in range(5000):
            self.step()
            now = self.bl.now()
            due = self.next_due()
            if due is not None and due <= now:
                # Due but not actionable yet (e.g. waiting for a card): look again a minute later.
                due = now + timedelta(minutes=1)
            if due is None or due > until:
                if until > now:
                    self.bl.set_clock(until)
                    self.step()
                return
            self.bl.set_clock(due)
        raise AssertionError("time did not advance to the target")


def local_dates(rows: list[Row], column: str = "starts_at") -> list[str]:
    return [r[column].astimezone(SEOUL).strftime("%Y-%m-%d %H:%M") for r in rows]


def sub_of(bl: Billing, user: str) -> Row:
    """The user's latest subscription."""
    rows = bl.all(
        "select * from billing.subscriptions where user_id = %s order by created_at desc, id desc",
        (user,),
    )
    return rows[0]


def periods(bl: Billing, subscription_id: Any) -> list[Row]:
    return bl.all(
        "select * from billing.billing_periods where subscription_id = %s order by period_index",
        (subscription_id,),
    )


def test_a_year_of_billing(bl: Billing) -> None:
    bl.enable_clock(START)
    sim = Sim(bl)
    sim.scripts.update(
        alice=["busy"],
        bob=["ok", "ok", "decline", "decline"],
        carol=["ok"] + ["decline"] * 5,
        dave=["ok", "ok"] + ["decline"] * 5,
        erin=["ok", "ok", "dead"],
        frank=["transient", "timeout_after", "timeout_before", "ok", "duplicated"],
        ivan=["decline"],
        jun=["ok", "declined_but_charged"],
        kim=["ok", "timeout_after"],
    )
    checks: dict[str, Any] = {}

    def consume(user: str, n: int) -> int:
        """Spends up to n credits; one more than the balance is refused with SB422."""
        balance = bl.api(user, "my_credits")["balance"]
        for _ in range(min(n, balance)):
            bl.api(user, "consume_credit", "saju test")
        if n > balance:
            with raises_sqlstate("SB422"):
                bl.api(user, "consume_credit", "saju test")
        return min(n, balance)

    def payment_of(user: str, period_index: int) -> Row:
        return bl.one(
            """select p.* from billing.payments p
                 join billing.billing_periods bp on bp.id = p.period_id
                where p.user_id = %s and bp.period_index = %s and p.applied""",
            (user, period_index),
        )

    def at_start() -> None:
        sim.register("alice")

    def alice_credits_monthly() -> None:
        checks.setdefault("alice_consumed", 0)
        checks["alice_consumed"] += consume("alice", 3)

    def bob_overspends() -> None:
        checks["bob_feb"] = consume("bob", 11)

    def alice_partial_refund() -> None:
        pay = payment_of("alice", 3)  # 2028-02-29 .. 2028-03-31
        checks["alice_p3_payment"] = pay["id"]
        bl.billing("request_refund", pay["id"], 3000, "goodwill")

    def alice_full_refund() -> None:
        pay_id = checks["alice_p3_payment"]
        with raises_sqlstate("SB422"):
            bl.billing("request_refund", pay_id, 7000, "more than left")
        bl.billing("request_refund", pay_id, None, "refund the rest")

    def alice_after_refund() -> None:
        with raises_sqlstate("SB422"):
            bl.api("alice", "consume_credit", "no credits after a full refund")
        # An older snapshot (before the refunds) arriving late changes nothing.
        pay = bl.one("select * from billing.payments where id = %s", (checks["alice_p3_payment"],))
        old = dict(pay["raw"], balanceAmount=pay["total_amount"], status="DONE", cancels=None)
        result = bl.run(db.service_apply_payment_snapshot(old))
        assert result.detail["replay"] is True
        assert result.detail["sync"]["stale"] is True

    def erin_new_card() -> None:
        sim.register("erin")

    def erin_card_deleted_at_issuer() -> None:
        pm = bl.one(
            """select pm.billing_key_sha256 from billing.subscriptions s
                 join billing.payment_methods pm on pm.id = s.payment_method_id
                where s.user_id = 'erin' and s.status = 'active'"""
        )
        # The card company ends the key at Toss, which tells the service by BILLING_DELETED.
        assert sim.toss.delete_billing_key(sim.billing_keys[pm["billing_key_sha256"]]).ok

    def grace_cancel() -> None:
        out = bl.api("grace", "cancel_subscription")
        assert out["cancelAtPeriodEnd"] is True
        assert out["status"] == "active"

    def grace_resume() -> None:
        out = bl.api("grace", "resume_subscription")
        assert out["cancelAtPeriodEnd"] is False

    def hana_cancel_now() -> None:
        s = sub_of(bl, "hana")
        out = bl.billing("cancel_subscription_now", s["id"], True, "moved abroad")
        checks["hana_refund"] = out["refundAmount"]

    def kim_cancel_now() -> None:
        s = sub_of(bl, "kim")
        attempt = bl.one(
            "select status from billing.charge_attempts where subscription_id = %s "
            "order by created_at desc limit 1",
            (s["id"],),
        )
        assert attempt["status"] == "unknown"
        bl.billing("cancel_subscription_now", s["id"], False, "asked on the phone")

    def odd_webhooks() -> None:
        unknown = bl.run(
            db.service_ingest_webhook(
                "whtrans_odd_1", "METHOD_UPDATED", {"eventType": "METHOD_UPDATED", "data": {}}
            )
        )
        deposit = bl.run(
            db.service_ingest_webhook(
                "whtrans_odd_2",
                None,
                {
                    "createdAt": "x",
                    "secret": "ps_forged",
                    "status": "DONE",
                    "transactionKey": "t",
                    "orderId": "ord_forged",
                },
            )
        )
        assert unknown.status == "ignored"
        assert deposit.status == "ignored"
        assert deposit.resolved_event_type == "DEPOSIT_CALLBACK"

    def reconcile() -> None:
        # Daily reconciliation: every approval Toss knows of must be in the ledger.
        known = {r["payment_key"] for r in bl.all("select payment_key from billing.payments")}
        for approval in sim.toss.approvals():
            if approval["paymentKey"] not in known:
                payment = sim.toss.payment(approval["paymentKey"])
                sim.bl.run(db.service_apply_payment_snapshot(payment))
                checks.setdefault("reconciled", 0)
                checks["reconciled"] += 1

    timeline: list[tuple[datetime, Callable[[], None]]] = [
        (START, at_start),
        (kst(2028, 1, 15, 9, 30), lambda: sim.register("bob")),
        (kst(2028, 1, 20, 11, 0), lambda: sim.register("erin")),
        (kst(2028, 2, 1, 8, 0), lambda: sim.register("carol")),
        (kst(2028, 2, 1, 12, 0), bob_overspends),
        (kst(2028, 2, 10, 10, 0), lambda: sim.register("frank")),
        (kst(2028, 2, 20, 12, 0), lambda: sim.register("hana")),
        (kst(2028, 3, 5, 10, 0), lambda: sim.register("grace")),
        (kst(2028, 3, 10, 12, 0), alice_partial_refund),
        (kst(2028, 3, 12, 12, 0), alice_full_refund),
        (kst(2028, 3, 13, 12, 0), alice_after_refund),
        (kst(2028, 3, 22, 11, 0), erin_new_card),
        (kst(2028, 4, 1, 9, 0), lambda: sim.register("ivan")),
        (kst(2028, 4, 10, 15, 0), lambda: sim.register("dave")),
        (kst(2028, 5, 1, 12, 0), grace_cancel),
        (kst(2028, 5, 3, 12, 0), grace_resume),
        (kst(2028, 5, 5, 10, 0), lambda: sim.register("jun")),
        (
            kst(2028, 6, 1, 0, 0),
            lambda: bl.billing(
                "configure_plan_dunning", "pro", "{1 day,3 days,5 days,7 days}", "unpaid"
            ),
        ),
        (kst(2028, 6, 10, 12, 0), lambda: sim.register("carol")),
        (
            kst(2028, 6, 15, 0, 0),
            lambda: bl.billing("change_plan_price", "pro", 10900, kst(2028, 7, 1, 0, 0)),
        ),
        (kst(2028, 6, 25, 12, 0), hana_cancel_now),
        (kst(2028, 7, 5, 12, 0), erin_card_deleted_at_issuer),
        (kst(2028, 7, 21, 9, 0), erin_new_card),
        (kst(2028, 8, 1, 12, 0), grace_cancel),
        (kst(2028, 9, 9, 10, 0), lambda: sim.register("kim")),
        (kst(2028, 10, 9, 10, 0, 30), kim_cancel_now),
        (kst(2028, 11, 11, 11, 11), odd_webhooks),
        (kst(2029, 1, 1, 23, 0), reconcile),
    ]
    timeline += [
        (kst(y, m, 1, 9, 0), alice_credits_monthly) for y, m in [(2028, i) for i in range(1, 13)]
    ]
    timeline.sort(key=lambda item: item[0])
    for when, action in timeline:
        sim.run_until(when)
        assert bl.now() == when
        action()
    sim.run_until(END)

    # --- what each subscriber ended with ------------------------------------------------------
    status = {
        u: sub_of(bl, u)["status"]
        for u in [
            "alice",
            "bob",
            "carol",
            "dave",
            "erin",
            "frank",
            "grace",
            "hana",
            "ivan",
            "jun",
            "kim",
        ]
    }
    assert status == {
        "alice": "active",
        "bob": "active",
        "carol": "active",
        "dave": "unpaid",
        "erin": "active",
        "frank": "active",
        "grace": "canceled",
        "hana": "canceled",
        "ivan": "canceled",
        "jun": "active",
        "kim": "canceled",
    }

    alice = periods(bl, sub_of(bl, "alice")["id"])
    assert local_dates(alice) == ANCHOR_31_PERIOD_STARTS[:13]
    assert [p["status"] for p in alice] == ["paid"] * 13
    assert [p["amount"] for p in alice] == [9900] * 7 + [10900] * 6
    alice_p3 = bl.one("select * from billing.payments where id = %s", (checks["alice_p3_payment"],))
    assert (alice_p3["status"], alice_p3["balance_amount"]) == ("PARTIAL_CANCELED", 0)
    assert bl.all(
        "select amount, status::text, source::text from billing.refunds where payment_id ="
        " %s order by created_at",
        (alice_p3["id"],),
    ) == [
        {"amount": 3000, "status": "succeeded", "source": "operator"},
        {"amount": 6900, "status": "succeeded", "source": "operator"},
    ]
    assert bl.one(
        "select status::text, remaining from billing.credit_grants where payment_id = %s",
        (alice_p3["id"],),
    ) == {"status": "revoked", "remaining": 0}
    # 3 on the 1st of each month; the refund revoked only what was left of period 3 afterwards.
    assert checks["alice_consumed"] == 36
    assert checks["bob_feb"] == 10

    bob = periods(bl, sub_of(bl, "bob")["id"])
    bob_p3 = bl.all(
        "select status::text, not_before from billing.charge_attempts where period_id = %s"
        " order by attempt_number",
        (bob[2]["id"],),
    )
    assert [a["status"] for a in bob_p3] == ["declined", "declined", "succeeded"]
    assert local_dates(bob_p3, "not_before") == [
        "2028-03-15 09:30",
        "2028-03-16 09:30",
        "2028-03-18 09:30",
    ]
    assert bob[2]["starts_at"] == kst(2028, 3, 15, 9, 30)

    carol_subs = bl.all(
        "select * from billing.subscriptions where user_id = 'carol' order by created_at"
    )
    assert [s["status"] for s in carol_subs] == ["canceled", "active"]
    assert carol_subs[0]["ended_at"] == kst(2028, 3, 8, 8, 0)
    carol_p2 = periods(bl, carol_subs[0]["id"])[1]
    assert carol_p2["status"] == "unpaid"
    assert local_dates(
        bl.all(
            "select not_before from billing.charge_attempts where period_id = %s order by"
            " attempt_number",
            (carol_p2["id"],),
        ),
        "not_before",
    ) == [
        "2028-03-01 08:00",
        "2028-03-02 08:00",
        "2028-03-04 08:00",
        "2028-03-06 08:00",
        "2028-03-08 08:00",
    ]

    dave = sub_of(bl, "dave")
    assert dave["ended_at"] == kst(2028, 6, 17, 15, 0)
    assert [p["status"] for p in periods(bl, dave["id"])] == ["paid", "paid", "unpaid"]

    erin = sub_of(bl, "erin")
    erin_pms = bl.all(
        "select status::text from billing.payment_methods where user_id = 'erin' order by"
        " created_at"
    )
    assert [p["status"] for p in erin_pms] == ["deleted", "deleted", "active"]
    erin_p = periods(bl, erin["id"])
    assert erin_p[2]["paid_at"] == kst(2028, 3, 22, 11, 0)
    assert erin_p[6]["paid_at"] == kst(2028, 7, 21, 9, 0)  # renewal 7-20 had no usable card
    assert erin_p[6]["starts_at"] == kst(2028, 7, 20, 11, 0)

    frank_attempts = bl.all(
        """select bp.period_index, ca.status::text, ca.sends, ca.lookups, ca.transient_failures
             from billing.charge_attempts ca join billing.billing_periods bp on bp.id = ca.period_id
            where ca.user_id = 'frank' and bp.period_index <= 3
            order by bp.period_index, ca.attempt_number"""
    )
    # Period 1: the processed temporary error spent the first attempt's key; its lookup found
    # nothing, so it failed and a new attempt (new orderId) followed after a backoff. Period 3:
    # DUPLICATED_ORDER_ID is looked up first, and the lookup finds the approval.
    assert frank_attempts == [
        {
            "period_index": 1,
            "status": "failed",
            "sends": 1,
            "lookups": 1,
            "transient_failures": 1,
        },
        {
            "period_index": 1,
            "status": "succeeded",
            "sends": 1,
            "lookups": 1,
            "transient_failures": 0,
        },
        {
            "period_index": 2,
            "status": "succeeded",
            "sends": 2,
            "lookups": 1,
            "transient_failures": 0,
        },
        {
            "period_index": 3,
            "status": "succeeded",
            "sends": 1,
            "lookups": 1,
            "transient_failures": 1,
        },
    ]
    frank_p1 = bl.all(
        """select ca.order_id, ca.idempotency_key, ca.not_before, ca.classification::text
             from billing.charge_attempts ca join billing.billing_periods bp on bp.id = ca.period_id
            where ca.user_id = 'frank' and bp.period_index = 1 order by ca.attempt_number"""
    )
    assert frank_p1[0]["classification"] == "transient"
    assert frank_p1[1]["order_id"] != frank_p1[0]["order_id"]
    assert frank_p1[1]["idempotency_key"] != frank_p1[0]["idempotency_key"]
    assert frank_p1[1]["not_before"] >= frank_p1[0]["not_before"] + timedelta(minutes=10)

    # Toss busy (409) on alice's first charge: the same request went again, under the same key.
    alice_p1 = bl.all(
        """select ca.status::text, ca.sends, ca.transient_failures
             from billing.charge_attempts ca join billing.billing_periods bp on bp.id = ca.period_id
            where ca.user_id = 'alice' and bp.period_index = 1"""
    )
    assert alice_p1 == [{"status": "succeeded", "sends": 2, "transient_failures": 1}]

    grace = sub_of(bl, "grace")
    assert grace["ended_at"] == kst(2028, 8, 5, 10, 0)
    assert [p["status"] for p in periods(bl, grace["id"])] == ["paid"] * 5

    assert checks["hana_refund"] == 8250  # 9,900 × 25 of 30 days left
    hana = sub_of(bl, "hana")
    assert hana["ended_at"] == kst(2028, 6, 25, 12, 0)

    ivan = sub_of(bl, "ivan")
    assert (ivan["ended_at"], ivan["status_reason"]) == (
        kst(2028, 4, 2, 9, 0),
        "first charge never succeeded",
    )

    jun_payments = bl.all(
        "select applied, balance_amount from billing.payments where user_id = 'jun' order"
        " by approved_at, applied"
    )
    assert checks["reconciled"] == 1
    assert sum(1 for p in jun_payments if not p["applied"]) == 1
    assert [p["balance_amount"] for p in jun_payments if not p["applied"]] == [0]
    assert (
        bl.scalar(
            "select count(*) from billing.charge_attempts where user_id = 'jun' and status"
            " = 'duplicate'"
        )
        == 1
    )

    kim_late = bl.one("select * from billing.payments where user_id = 'kim' and not applied")
    assert kim_late["balance_amount"] == 0
    assert (
        bl.scalar(
            "select source::text from billing.refunds where payment_id = %s", (kim_late["id"],)
        )
        == "late_charge"
    )

    kinds = Counter((n["user_id"], n["kind"]) for n in sim.notifications)
    assert kinds["carol", "payment_failed"] == 4
    assert kinds["carol", "canceled"] == 1
    assert kinds["bob", "payment_failed"] == 2
    assert kinds["erin", "card_needed"] == 3  # dead card, key deleted, renewal without a card
    assert kinds["alice", "renewed"] == 12
    assert kinds["alice", "activated"] == 1
    # Toss told the service of every refund that changed its payment's status (all but alice's
    # second partial one, after which the payment stays PARTIAL_CANCELED) and of every key that
    # ended; each was delivered twice and stored once.
    refunds = bl.scalar("select count(*) from billing.refunds where status = 'succeeded'")
    assert sim.delivered["PAYMENT_STATUS_CHANGED"] == refunds - 1
    assert sim.delivered["BILLING_DELETED"] == bl.scalar(
        "select count(*) from billing.payment_methods where status = 'deleted'"
    )

    check_invariants(bl)


def check_invariants(bl: Billing) -> None:
    def none(query: str, params: Any = None) -> None:
        rows = bl.all(query, params)
        assert rows == [], (query, rows)

    # 1. No period charged twice: one applied payment and one succeeded attempt per period, every
    #    other approval refunded in full, and what Toss kept per period within the period's amount.
    none("select period_id from billing.payments where applied group by 1 having count(*) > 1")
    none(
        "select period_id from billing.charge_attempts where status = 'succeeded' "
        "group by 1 having count(*) > 1"
    )
    none("select id from billing.payments where not applied and balance_amount <> 0")
    period_of = {
        r["order_id"]: r["period_id"]
        for r in bl.all("select order_id, period_id from billing.charge_attempts")
    }
    held = bl.sandbox.balances()
    kept: Counter[Any] = Counter()
    for approval in bl.sandbox.approvals():
        kept[period_of[approval["orderId"]]] += held[approval["paymentKey"]]
    amounts = {
        r["id"]: r["amount"] for r in bl.all("select id, amount from billing.billing_periods")
    }
    assert [p for p in kept if kept[p] > amounts[p]] == []

    # 2. Every payment Toss approved is in the ledger with Toss's balance, and what was refunded
    #    of each is exactly its succeeded refunds.
    ledger = {
        r["payment_key"]: r["balance_amount"]
        for r in bl.all("select payment_key, balance_amount from billing.payments")
    }
    assert ledger == held
    none(
        """select p.id from billing.payments p
            where p.total_amount - p.balance_amount
                  <> coalesce((select sum(r.amount) from billing.refunds r
                                where r.payment_id = p.id and r.status = 'succeeded'), 0)"""
    )
    none("select id from billing.refunds where status <> 'succeeded'")

    # 3. Credits never negative, and the ledger explains every grant's remainder.
    none("select id from billing.credit_grants where remaining < 0")
    none(
        """select g.id from billing.credit_grants g
            where g.remaining <> (select sum(e.amount) from billing.credit_entries e
                                   where e.grant_id = g.id)"""
    )

    # 4. Amounts come from the price versions: each period's amount is the price at its start,
    #    and each applied payment charged exactly that.
    none(
        """select bp.id from billing.billing_periods bp
             join billing.subscriptions s on s.id = bp.subscription_id
            where bp.amount <> (billing.price_at(s.plan_id, bp.starts_at)).amount"""
    )
    none(
        """select p.id from billing.payments p
             join billing.billing_periods bp on bp.id = p.period_id
            where p.applied and p.total_amount <> bp.amount"""
    )

    # 5. The audit log has an event for every state change: per row, one creation event, a chain
    #    of transitions each starting where the previous ended, ending in the current status.
    assert bl.audit_gaps() == []

    # Subscriptions agree with their current period.
    none(
        """select s.id from billing.subscriptions s
             join billing.billing_periods bp on bp.id = s.current_period_id
            where (bp.period_index, bp.starts_at, bp.ends_at)
                  <> (s.current_period_index, s.current_period_starts_at,
                      s.current_period_ends_at)"""
    )

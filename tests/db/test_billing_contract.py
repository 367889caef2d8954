"""The billing core read against the architecture's invariants (§3) and lifecycle (§4), one
targeted scenario per rule: amounts only from the price tables, unknown outcomes never charged
under a new orderId, billing keys deleted when a subscription ends for good, webhooks verified and
convergent, subscribers, the service and the analyst confined to what they may reach, and test
clock moves that never charge twice."""

from __future__ import annotations

import dataclasses
import itertools
import json
from datetime import timedelta
from typing import Any

import psycopg
import pytest
from dbkit import (
    DECLINING_CARD,
    KEYRING,
    Billing,
    Row,
    billing_key_of,
    kst,
    raises_sqlstate,
    sha256_hex,
)

from service import db
from service.crypto import SealedKey

START = kst(2028, 1, 10, 10, 0)
ALERT = "select payload ->> 'topic' as topic from billing.notifications where kind = 'alert'"


def alerts(bl: Billing) -> list[str]:
    return [r["topic"] for r in bl.all(ALERT + " order by id")]


def claim_one(bl: Billing, mode: str = "charge") -> db.ClaimedAttempt:
    rows = bl.claim()
    assert len(rows) == 1, rows
    assert rows[0].mode == mode, rows[0]
    return rows[0]


def pay(bl: Billing, row: db.ClaimedAttempt) -> dict[str, Any]:
    """Toss approves the claimed charge and the service records it; returns the Payment."""
    answer = bl.call_toss(row)
    assert answer.payment is not None, answer
    result = bl.record(row, answer)
    assert result.detail["applied"] is True, result
    return answer.payment


def fail(bl: Billing, row: db.ClaimedAttempt, code: str) -> db.Recorded:
    """Toss answers the claimed charge with this error; the service records it as classified."""
    return bl.serve(row, code)


def unknown(bl: Billing, row: db.ClaimedAttempt) -> db.Recorded:
    """The charge never reached Toss (a connect timeout): its outcome is unknown to the service."""
    return bl.serve(row, "unsent")


def snapshot(bl: Billing, payment: dict[str, Any]) -> db.SnapshotApplied:
    return bl.run(db.service_apply_payment_snapshot(payment))


def subscribed(bl: Billing, user: str) -> dict[str, Any]:
    """A subscriber whose first period is paid."""
    done = bl.register(user)
    pay(bl, claim_one(bl))
    return done


def approvals(bl: Billing) -> int:
    """How many charges Toss approved."""
    return len(bl.sandbox.approvals())


def sub_row(bl: Billing, subscription_id: Any) -> Row:
    return bl.one("select * from billing.subscriptions where id = %s", (subscription_id,))


def periods(bl: Billing, subscription_id: Any) -> list[tuple[int, str]]:
    return [
        (r["period_index"], r["status"])
        for r in bl.all(
            "select period_index, status::text from billing.billing_periods"
            " where subscription_id = %s order by period_index",
            (subscription_id,),
        )
    ]


def renew(bl: Billing, done: dict[str, Any]) -> Row:
    """Moves the clock to the end of the current period and ticks: the renewal attempt is queued."""
    bl.set_clock(sub_row(bl, done["subscriptionId"])["current_period_ends_at"])
    assert bl.tick()["renewals"] == 1
    return bl.one(
        "select * from billing.charge_attempts where subscription_id = %s and status = 'queued'",
        (done["subscriptionId"],),
    )


# --- §3.3 amounts come from the price tables, never from a request body ---------------------------


@pytest.mark.parametrize("path", ["charge_result", "lookup"])
def test_a_payment_of_another_amount_never_pays_the_period(bl: Billing, path: str) -> None:
    bl.enable_clock(START)
    done = bl.register("u")
    row = claim_one(bl)
    # A charge of the order for another amount reached Toss (a buggy request) and was approved.
    wrong = bl.stray_charge(row, amount=row.amount * 10).payment
    assert wrong is not None
    if path == "charge_result":
        recorded = bl.run(db.service_record_charge_success(row.attempt_id, row.lease_token, wrong))
        assert (recorded.detail["applied"], recorded.status) == (False, "failed")
    else:
        unknown(bl, row)
        result = snapshot(bl, wrong)
        assert (result.detail["applied"], result.detail["attemptStatus"]) == (False, "failed")

    attempt = bl.one(
        "select status::text, classification::text, error_code from billing.charge_attempts"
        " where id = %s",
        (row.attempt_id,),
    )
    assert attempt == {"status": "failed", "classification": "bug", "error_code": "AMOUNT_MISMATCH"}
    assert periods(bl, done["subscriptionId"]) == [(1, "open")]
    assert sub_row(bl, done["subscriptionId"])["status"] == "incomplete"
    assert bl.scalar("select count(*) from billing.credit_grants") == 0
    # Kept in the ledger (Toss holds the money), unapplied, refunded in full, operators alerted.
    payment = bl.one("select applied, total_amount from billing.payments")
    assert payment == {"applied": False, "total_amount": 99000}
    refund = bl.one("select amount, source::text, status::text from billing.refunds")
    assert refund == {"amount": 99000, "source": "wrong_amount", "status": "requested"}
    assert "charged amount differs from the period amount" in alerts(bl)
    # Delivered again: nothing more.
    again = snapshot(bl, wrong)
    assert again.detail["replay"] is True
    assert bl.scalar("select count(*) from billing.refunds") == 1


def test_a_renewal_charged_at_another_amount_makes_the_subscription_past_due(bl: Billing) -> None:
    bl.enable_clock(START)
    done = subscribed(bl, "u")
    renew(bl, done)
    row = claim_one(bl)
    wrong = bl.stray_charge(row, amount=row.amount - 1).payment
    assert wrong is not None
    result = bl.run(db.service_record_charge_success(row.attempt_id, row.lease_token, wrong))
    assert result.detail["applied"] is False
    assert periods(bl, done["subscriptionId"]) == [(1, "paid"), (2, "open")]
    assert sub_row(bl, done["subscriptionId"])["status"] == "past_due"


def test_a_payment_of_another_order_is_refused_and_changes_nothing(bl: Billing) -> None:
    bl.enable_clock(START)
    bl.register("u")
    row = claim_one(bl)
    other = bl.stray_charge(row, order_id="ord_someone_else").payment
    assert other is not None
    events = bl.scalar("select count(*) from billing.events")
    with raises_sqlstate("SB400"):
        bl.run(db.service_record_charge_success(row.attempt_id, row.lease_token, other))
    assert bl.scalar("select count(*) from billing.events") == events
    assert bl.scalar("select count(*) from billing.payments") == 0
    assert bl.scalar(
        "select status::text from billing.charge_attempts where id = %s", (row.attempt_id,)
    ) == ("claimed")


def test_a_price_never_reaches_back_over_existing_periods(bl: Billing) -> None:
    bl.enable_clock(START)
    done = subscribed(bl, "u")
    # A period starts right now: a price from now on would contradict its amount.
    with raises_sqlstate("SB422"):
        bl.billing("change_plan_price", "pro", 12900, START)
    # The test clock moved back: "the future" may lie before periods that already exist.
    bl.set_clock(START - timedelta(days=5))
    with raises_sqlstate("SB422"):
        bl.billing("change_plan_price", "pro", 12900, START - timedelta(days=1))
    bl.set_clock(START + timedelta(days=1))
    bl.billing("change_plan_price", "pro", 12900, START + timedelta(days=2))
    renew(bl, done)
    assert bl.all(
        """select bp.period_index, bp.amount, (billing.price_at(s.plan_id, bp.starts_at)).amount
                  as price
             from billing.billing_periods bp join billing.subscriptions s
               on s.id = bp.subscription_id order by 1"""
    ) == [
        {"period_index": 1, "amount": 9900, "price": 9900},
        {"period_index": 2, "amount": 12900, "price": 12900},
    ]


# --- §3.1 no period charged twice -----------------------------------------------------------------


def test_a_pending_renewal_is_never_renewed_past(bl: Billing) -> None:
    """A clock jump of months with ticks before the service answers renews one period at a time."""
    bl.enable_clock(START)
    done = subscribed(bl, "u")
    bl.set_clock(kst(2028, 4, 10, 10, 1))
    for _ in range(3):
        bl.tick()
        bl.advance(timedelta(minutes=1))
    assert periods(bl, done["subscriptionId"]) == [(1, "paid"), (2, "open")]
    # Settling each month in turn catches up, one charge per period.
    for _ in range(3):
        pay(bl, claim_one(bl))
        bl.tick()
    assert periods(bl, done["subscriptionId"]) == [(i, "paid") for i in (1, 2, 3, 4)]
    assert bl.claim() == []
    assert bl.scalar("select count(*) from billing.refunds") == 0
    assert approvals(bl) == 4


def test_a_new_card_during_a_pending_renewal_charges_the_renewal(bl: Billing) -> None:
    bl.enable_clock(START)
    done = subscribed(bl, "u")
    renew(bl, done)
    again = bl.register("u")
    assert again["subscriptionId"] == done["subscriptionId"]
    assert again["attemptId"] is not None, "the unsent renewal went with the old card"
    row = claim_one(bl)
    assert row.attempt_id == again["attemptId"]
    assert billing_key_of(row) == again["billingKey"]
    pay(bl, row)
    assert periods(bl, done["subscriptionId"]) == [(1, "paid"), (2, "paid")]
    assert sub_row(bl, done["subscriptionId"])["status"] == "active"


def test_a_key_deleted_during_a_pending_renewal_ends_in_dunning(bl: Billing) -> None:
    bl.enable_clock(START)
    done = subscribed(bl, "u")
    renew(bl, done)
    bl.run(db.service_mark_payment_method_deleted(sha256_hex(done["billingKey"]), "카드사 요청"))
    s = sub_row(bl, done["subscriptionId"])
    assert (s["status"], s["awaiting_card"]) == ("past_due", True)
    assert s["grace_ends_at"] is not None
    bl.set_clock(s["grace_ends_at"])
    assert bl.tick()["endedAfterGrace"] == 1
    assert periods(bl, done["subscriptionId"]) == [(1, "paid"), (2, "unpaid")]
    assert sub_row(bl, done["subscriptionId"])["status"] == "canceled"


def test_cancelling_while_a_renewal_is_unsent_ends_now_and_charges_nothing(bl: Billing) -> None:
    """The paid period is over: cancelling must not leave a month of free access, nor a charge."""
    bl.enable_clock(START)
    done = subscribed(bl, "u")
    renewal = renew(bl, done)
    bl.api("u", "cancel_subscription")
    s = sub_row(bl, done["subscriptionId"])
    assert (s["status"], s["cancel_at_period_end"]) == ("canceled", False)
    assert periods(bl, done["subscriptionId"]) == [(1, "paid"), (2, "void")]
    status = "select status::text from billing.charge_attempts where id = %s"
    assert bl.scalar(status, (renewal["id"],)) == "canceled"
    assert bl.claim() == []
    assert approvals(bl) == 1


@pytest.mark.parametrize("outcome", ["decline", "not_found", "approved"])
def test_cancelling_while_a_renewal_is_in_flight_never_leads_to_dunning(
    bl: Billing, outcome: str
) -> None:
    bl.enable_clock(START)
    done = subscribed(bl, "u")
    renew(bl, done)
    row = claim_one(bl)  # the charge is on its way to Toss and cannot be withdrawn
    # The cancel cannot call the charge back: it waits for the charge's outcome (chargeInFlight).
    out = bl.api("u", "cancel_subscription")
    assert (out["chargeInFlight"], out["cancelAtPeriodEnd"]) == (True, True)
    s = sub_row(bl, done["subscriptionId"])
    assert (s["status"], s["cancel_at_period_end"]) == ("active", True)
    if outcome == "decline":
        fail(bl, row, "REJECT_CARD_PAYMENT")
    elif outcome == "not_found":
        unknown(bl, row)
        bl.advance(timedelta(minutes=5))
        lookup = claim_one(bl, mode="lookup")
        recorded = bl.serve(lookup)  # Toss: NOT_FOUND_PAYMENT
        assert (recorded.status, recorded.detail["ended"]) == ("canceled", True)
    else:
        pay(bl, row)
    if outcome == "approved":
        # The charge paid the period: access runs to its end, then the subscription ends.
        s = sub_row(bl, done["subscriptionId"])
        assert (s["status"], s["cancel_at_period_end"]) == ("active", True)
        ended = [(1, "paid"), (2, "paid")]
    else:
        # Nothing paid: the subscription ends at once, the unpaid period void.
        assert sub_row(bl, done["subscriptionId"])["status"] == "canceled"
        ended = [(1, "paid"), (2, "void")]
    for days in (1, 3, 5, 7, 30):
        bl.set_clock(START + timedelta(days=31 + days))
        bl.tick()
        assert bl.claim() == [], f"a canceled subscriber was charged again after {days} days"
    assert sub_row(bl, done["subscriptionId"])["status"] == "canceled"
    assert periods(bl, done["subscriptionId"]) == ended
    assert approvals(bl) == 1 + (outcome == "approved")


def test_a_resend_for_a_period_paid_meanwhile_is_looked_up_not_charged(bl: Billing) -> None:
    bl.enable_clock(START)
    done = subscribed(bl, "u")
    renew(bl, done)
    first = claim_one(bl)
    # The answer said declined, yet the order was approved (by a request whose answer the service
    # never saw); dunning queues a retry for tomorrow.
    fail(bl, first, "REJECT_CARD_PAYMENT")
    charged = bl.stray_charge(first).payment
    assert charged is not None
    bl.advance(timedelta(days=1))
    retry = claim_one(bl)
    # A processed temporary error spends the key: the order is to be looked up at once.
    recorded = fail(bl, retry, "FAILED_INTERNAL_SYSTEM_PROCESSING")
    assert (recorded.status, recorded.detail["next"]["action"]) == ("unknown", "lookup")
    # Reconciliation finds the first approval: the period is paid.
    assert snapshot(bl, charged).detail["applied"] is True
    bl.advance(timedelta(minutes=5))
    row = claim_one(bl, mode="lookup")
    assert row.attempt_id == retry.attempt_id
    # Nothing charged under the spent key: the attempt fails, and no new one follows (paid).
    recorded = bl.serve(row)
    assert (recorded.status, recorded.detail["next"]["action"]) == ("failed", "none")
    assert periods(bl, done["subscriptionId"]) == [(1, "paid"), (2, "paid")]
    assert bl.claim() == []


def test_two_late_approvals_of_one_ended_period_are_both_recorded_and_refunded(bl: Billing) -> None:
    bl.enable_clock(START)
    done = bl.register("u")
    first = claim_one(bl)
    # Reported declined, approved at Toss all the same (by a request whose answer was lost).
    fail(bl, first, "REJECT_CARD_PAYMENT")
    approved_first = bl.stray_charge(first).payment
    assert approved_first is not None
    bl.register("u")  # a new card: charged at once
    second = claim_one(bl)
    assert bl.serve(second, "lost").status == "unknown"  # approved, the answer lost
    # Support ends it now, the period void. (A subscriber's own cancel would now wait for the
    # charge in flight: see test_cancelling_while_a_renewal_is_in_flight_never_leads_to_dunning.)
    bl.billing("cancel_subscription_now", done["subscriptionId"], False, "support")
    bl.advance(timedelta(minutes=5))
    lookup = claim_one(bl, mode="lookup")
    found = bl.call_toss(lookup).payment
    assert found is not None
    late = snapshot(bl, found)
    assert late.detail["applied"] is False
    # Reconciliation finds the first approval too.
    again = snapshot(bl, approved_first)
    assert again.detail["applied"] is False
    assert again.detail["attemptStatus"] == "duplicate"
    assert bl.all(
        "select amount, source::text from billing.refunds order by created_at, amount"
    ) == [{"amount": 9900, "source": "late_charge"}, {"amount": 9900, "source": "late_charge"}]
    assert bl.scalar("select count(*) from billing.payments where not applied") == 2


# --- §2 an unknown outcome is resolved by a lookup, never by a new orderId ------------------------


@pytest.mark.parametrize("new_card", [False, True], ids=["same_card", "new_card"])
def test_an_unknown_outcome_is_never_charged_under_a_new_order_id(
    bl: Billing, new_card: bool
) -> None:
    bl.enable_clock(START)
    done = subscribed(bl, "u")
    attempt = renew(bl, done)
    row = claim_one(bl)
    unknown(bl, row)

    def orders() -> set[str]:
        return {
            r["order_id"]
            for r in bl.all(
                "select order_id from billing.charge_attempts where period_id = %s",
                (attempt["period_id"],),
            )
        }

    # Nothing any caller does while it is unknown creates another orderId for the period.
    with raises_sqlstate("SB409"):
        bl.billing("retry_subscription_charge", done["subscriptionId"], "try again")
    if new_card:
        bl.register("u")
    for _ in range(3):
        bl.advance(timedelta(days=4))
        bl.tick()
    assert orders() == {row.order_id}
    assert sub_row(bl, done["subscriptionId"])["status"] == "active"
    # Lookups that get no answer keep it unknown: Toss busy (not processed), then a lost answer.
    lookup = claim_one(bl, mode="lookup")
    recorded = bl.serve(lookup, "throttled")
    assert recorded.status == "unknown"
    bl.advance(timedelta(hours=1))
    lookup = claim_one(bl, mode="lookup")
    assert bl.serve(lookup, "lost").status == "unknown"
    assert orders() == {row.order_id}
    bl.advance(timedelta(hours=1))
    lookup = claim_one(bl, mode="lookup")
    found = bl.serve(lookup)  # Toss: NOT_FOUND_PAYMENT
    if not new_card:
        # "Not found" on the subscription's card re-sends the very same order.
        assert found.status == "queued"
        resend = claim_one(bl)
        assert (resend.order_id, resend.idempotency_key) == (row.order_id, row.idempotency_key)
        assert orders() == {row.order_id}
        return
    # The old card is gone: the order is never sent again on it, and since nothing was charged
    # the period is charged on the new card (a new order, now that the first one is settled).
    assert (found.status, found.detail["next"]["action"]) == ("canceled", "retry")
    charge = claim_one(bl)
    assert str(charge.attempt_id) == found.detail["next"]["attemptId"]
    assert charge.order_id != row.order_id
    assert billing_key_of(charge) != done["billingKey"]
    pay(bl, charge)
    assert periods(bl, done["subscriptionId"]) == [(1, "paid"), (2, "paid")]


# --- fencing: a result counts only from the holder of the current lease ---------------------------

ATTEMPT_STATE = (
    "select to_jsonb(ca) as attempt, (select count(*) from billing.events) as events,"
    " (select count(*) from billing.charge_attempts) as attempts,"
    " (select count(*) from billing.notifications) as notifications"
    " from billing.charge_attempts ca where ca.id = %s"
)


@pytest.mark.parametrize("answer", ["decline", "approval"])
def test_a_worker_whose_lease_expired_is_refused_but_its_approval_stands(
    bl: Billing, answer: str
) -> None:
    bl.enable_clock(START)
    done = subscribed(bl, "u")
    renew(bl, done)
    old = claim_one(bl)
    bl.set_clock(old.lease_expires_at + timedelta(seconds=1))
    bl.tick()
    new = claim_one(bl)  # the same order, re-sent under the same key by another worker
    assert (new.attempt_id, new.order_id) == (old.attempt_id, old.order_id)
    assert new.lease_token != old.lease_token
    if answer == "decline":
        before = bl.one(ATTEMPT_STATE, (old.attempt_id,))
        declined = bl.call_toss(old, "REJECT_CARD_PAYMENT")
        with raises_sqlstate("SB409"):
            bl.record(old, declined)
        with raises_sqlstate("SB409"):
            unknown(bl, old)
        with raises_sqlstate("SB400"):
            bl.record(dataclasses.replace(old, lease_token=None), declined)  # type: ignore[arg-type]
        assert bl.one(ATTEMPT_STATE, (old.attempt_id,)) == before
        # The current holder's answer is recorded.
        assert fail(bl, new, "REJECT_CARD_PAYMENT").status == "declined"
        assert sub_row(bl, done["subscriptionId"])["status"] == "past_due"
        return
    # An approval is a fact about money: recorded whoever reports it.
    late = bl.serve(old)
    assert (late.status, late.changed, late.detail["applied"]) == ("succeeded", True, True)
    # The current holder got the same approval (Toss replays it): nothing applies twice.
    again = bl.serve(new)
    assert (again.status, again.changed) == ("succeeded", False)
    assert approvals(bl) == 2
    assert periods(bl, done["subscriptionId"]) == [(1, "paid"), (2, "paid")]
    assert bl.scalar("select count(*) from billing.payments") == 2


def test_a_request_toss_did_not_process_is_sent_again_with_the_same_key(bl: Billing) -> None:
    bl.enable_clock(START)
    done = subscribed(bl, "u")
    renew(bl, done)
    first = claim_one(bl)
    recorded = fail(bl, first, "IDEMPOTENT_REQUEST_PROCESSING")
    assert recorded.status == "queued"
    assert bl.claim() == [], "re-sent before its backoff"
    bl.advance(timedelta(minutes=1))
    again = claim_one(bl)
    assert (again.attempt_id, again.order_id, again.idempotency_key) == (
        first.attempt_id,
        first.order_id,
        first.idempotency_key,
    )
    pay(bl, again)
    assert sub_row(bl, done["subscriptionId"])["status"] == "active"
    assert (
        bl.scalar("select count(*) from billing.notifications where kind = 'payment_failed'") == 0
    )


def test_processed_temporary_errors_get_three_new_attempts_then_dunning(bl: Billing) -> None:
    """A processed temporary error spends the attempt's key: the order is looked up, and when
    nothing was charged a new attempt (new orderId and key) follows after 10, 20, 40 minutes;
    the fourth such failure in a period counts as a decline (past_due, dunning)."""
    bl.enable_clock(START)
    done = subscribed(bl, "u")
    renew(bl, done)
    orders: list[str] = []
    actions: list[str] = []
    waits: list[timedelta] = []
    for _ in range(4):
        row = claim_one(bl)
        orders.append(row.order_id)
        spent = fail(bl, row, "FAILED_INTERNAL_SYSTEM_PROCESSING")
        assert (spent.status, spent.detail["next"]["action"]) == ("unknown", "lookup")
        assert sub_row(bl, done["subscriptionId"])["status"] == "active"
        lookup = claim_one(bl, mode="lookup")  # at once
        assert lookup.order_id == row.order_id
        found = bl.serve(lookup)  # Toss: NOT_FOUND_PAYMENT
        assert found.status == "failed"
        actions.append(found.detail["next"]["action"])
        not_before = bl.scalar(
            "select not_before from billing.charge_attempts where id = %s",
            (found.detail["next"]["attemptId"],),
        )
        waits.append(not_before - bl.now())
        bl.set_clock(not_before)
    assert actions == ["retry"] * 4
    assert waits[:3] == [timedelta(minutes=10), timedelta(minutes=20), timedelta(minutes=40)]
    assert len(set(orders)) == 4
    # The fourth counted as the period's first decline: past_due, the dunning schedule, notified.
    s = sub_row(bl, done["subscriptionId"])
    assert s["status"] == "past_due"
    assert waits[3] >= timedelta(hours=12)
    assert (
        bl.scalar("select count(*) from billing.notifications where kind = 'payment_failed'") == 1
    )
    # From then on each passing error counts as a dunning step: the next retry waits for the next
    # step (never at once), and the end of the schedule ends the subscription.
    steps = 0
    while True:
        row = claim_one(bl)
        fail(bl, row, "FAILED_INTERNAL_SYSTEM_PROCESSING")
        found = bl.serve(claim_one(bl, mode="lookup"))
        following = found.detail["next"]
        if following["action"] == "ended":
            break
        steps += 1
        assert following["action"] == "retry", following
        not_before = bl.scalar(
            "select not_before from billing.charge_attempts where id = %s",
            (following["attemptId"],),
        )
        assert not_before > bl.now()
        assert steps < 10, "dunning never ended"
        bl.set_clock(not_before)
    schedule = bl.scalar(
        "select cardinality(dunning_schedule) from billing.plans where code = 'pro'"
    )
    assert steps == schedule - 1
    assert sub_row(bl, done["subscriptionId"])["status"] in ("unpaid", "canceled")


def test_no_dunning_retry_on_a_card_deleted_during_the_charge(bl: Billing) -> None:
    bl.enable_clock(START)
    done = subscribed(bl, "u")
    renew(bl, done)
    row = claim_one(bl)
    # The card company deletes the key while the charge is at Toss; Toss then declines it.
    bl.run(db.service_mark_payment_method_deleted(sha256_hex(done["billingKey"]), "카드사 요청"))
    recorded = fail(bl, row, "REJECT_CARD_PAYMENT")
    assert (recorded.status, recorded.detail["next"]["action"]) == ("declined", "await_card")
    s = sub_row(bl, done["subscriptionId"])
    assert (s["status"], s["awaiting_card"]) == ("past_due", True)
    for days in (1, 3, 5):
        bl.set_clock(START + timedelta(days=31 + days))
        bl.tick()
        assert bl.claim() == [], "a retry on a deleted card"
    # A new card is charged at once.
    again = bl.register("u")
    pay(bl, claim_one(bl))
    assert sub_row(bl, again["subscriptionId"])["status"] == "active"


# --- §4 billing keys are deleted at Toss when a subscription ends for good ------------------------


def _end_at_period_end(bl: Billing, done: dict[str, Any]) -> None:
    bl.api("u", "cancel_subscription")
    bl.set_clock(sub_row(bl, done["subscriptionId"])["current_period_ends_at"])
    bl.tick()


def _end_now(bl: Billing, done: dict[str, Any]) -> None:
    bl.billing("cancel_subscription_now", done["subscriptionId"], True, "support")


def _end_when_past_due(bl: Billing, done: dict[str, Any]) -> None:
    renew(bl, done)
    fail(bl, claim_one(bl), "REJECT_CARD_PAYMENT")
    bl.api("u", "cancel_subscription")


def _end_after_dunning(bl: Billing, done: dict[str, Any]) -> None:
    renew(bl, done)
    for _ in range(5):
        for row in bl.claim():
            fail(bl, row, "REJECT_CARD_PAYMENT")
        bl.advance(timedelta(days=2))
        bl.tick()


def _end_after_dead_card(bl: Billing, done: dict[str, Any]) -> None:
    renew(bl, done)
    fail(bl, claim_one(bl), "INVALID_STOPPED_CARD")
    bl.advance(timedelta(days=8))
    bl.tick()


@pytest.mark.parametrize(
    "end",
    [_end_at_period_end, _end_now, _end_when_past_due, _end_after_dunning, _end_after_dead_card],
    ids=["period_end", "immediate", "api_past_due", "dunning_exhausted", "dead_card_grace"],
)
def test_a_subscription_that_ends_queues_its_billing_key_for_deletion(
    bl: Billing, end: Any
) -> None:
    bl.enable_clock(START)
    done = subscribed(bl, "u")
    end(bl, done)
    assert sub_row(bl, done["subscriptionId"])["status"] in ("canceled", "unpaid")
    rows = bl.run(db.service_claim_key_deletions("w", 10))
    assert [r.payment_method_id for r in rows] == [done["paymentMethodId"]]
    assert billing_key_of(rows[0]) == done["billingKey"]


def test_an_incomplete_subscription_that_never_paid_queues_its_key_for_deletion(
    bl: Billing,
) -> None:
    bl.enable_clock(START)
    done = bl.register("u", card=DECLINING_CARD)
    assert bl.serve(claim_one(bl)).status == "declined"  # Toss: REJECT_CARD_PAYMENT
    bl.advance(timedelta(days=1))
    assert bl.tick()["endedAfterGrace"] == 1
    rows = bl.run(db.service_claim_key_deletions("w", 10))
    assert [r.payment_method_id for r in rows] == [done["paymentMethodId"]]


# --- §4 webhooks ----------------------------------------------------------------------------------


def ingest(
    bl: Billing, tid: str, event_type: str | None, body: dict[str, Any]
) -> db.IngestedWebhook:
    return bl.run(db.service_ingest_webhook(tid, event_type, body))


def psc(payment: dict[str, Any]) -> dict[str, Any]:
    return {
        "eventType": "PAYMENT_STATUS_CHANGED",
        "createdAt": "2028-01-10T10:00:00.000000",
        "data": payment,
    }


def test_a_payment_status_change_whose_secret_contradicts_the_stored_one_is_refused(
    bl: Billing,
) -> None:
    bl.enable_clock(START)
    bl.register("u")
    row = claim_one(bl)
    payment = pay(bl, row)
    forged = dict(payment, status="CANCELED", balanceAmount=0, secret="ps_forged")
    assert ingest(bl, "wh_1", "PAYMENT_STATUS_CHANGED", psc(forged)).status == "ignored"
    no_secret = {k: v for k, v in forged.items() if k != "secret"}
    assert ingest(bl, "wh_2", "PAYMENT_STATUS_CHANGED", psc(no_secret)).status == "ignored"
    genuine = dict(payment, status="CANCELED", balanceAmount=0)
    assert ingest(bl, "wh_3", "PAYMENT_STATUS_CHANGED", psc(genuine)).status == "received"
    # A payment not in the ledger yet (its charge answer was lost) is kept, to be re-fetched.
    unseen = bl.stray_charge(row, order_id="ord_unseen_000").payment
    assert unseen is not None
    assert ingest(bl, "wh_4", "PAYMENT_STATUS_CHANGED", psc(unseen)).status == "received"
    # Only the genuine and the unseen ones are handed out for processing.
    claimed = bl.run(db.service_claim_webhooks("w", 10))
    assert sorted(r.transmission_id for r in claimed) == ["wh_3", "wh_4"]


def test_a_deposit_callback_is_checked_against_the_stored_secret(bl: Billing) -> None:
    bl.enable_clock(START)
    bl.register("u")
    payment = pay(bl, claim_one(bl))
    flat = {
        "createdAt": "2028-01-10T10:00:00.000",
        "status": "DONE",
        "transactionKey": "t",
        "orderId": payment["orderId"],
    }
    assert ingest(bl, "wh_1", None, dict(flat, secret="ps_forged")).status == "ignored"
    good = ingest(bl, "wh_2", None, dict(flat, secret=payment["secret"]))
    assert (good.status, good.resolved_event_type) == ("received", "DEPOSIT_CALLBACK")


def test_unknown_event_types_are_stored_and_ignored_once(bl: Billing) -> None:
    body = {"eventType": "METHOD_UPDATED", "createdAt": "x", "data": {"status": "ENABLED"}}
    first = ingest(bl, "wh_1", "METHOD_UPDATED", body)
    again = ingest(bl, "wh_1", "METHOD_UPDATED", body)
    assert (first.status, first.duplicate) == ("ignored", False)
    assert (again.status, again.duplicate, again.webhook_event_id) == (
        "ignored",
        True,
        first.webhook_event_id,
    )
    assert bl.one("select payload, event_type from billing.webhook_events") == {
        "payload": body,
        "event_type": "METHOD_UPDATED",
    }
    assert bl.run(db.service_claim_webhooks("w", 10)) == []


def test_payment_snapshots_converge_in_any_order_and_under_duplicates(bl: Billing) -> None:
    """Six payments, each partly then fully refunded at Toss; each gets the three snapshots in
    another order (each delivered twice): all end in the same state as Toss."""
    bl.enable_clock(START)
    histories = []
    for i in range(6):
        bl.register(f"u{i}")
        payment = pay(bl, claim_one(bl))
        key = payment["paymentKey"]
        snaps = [bl.sandbox.payment(key)]
        snaps.append(bl.sandbox.cancel(key, 3000, "partial", f"idem-{i}-1"))
        snaps.append(bl.sandbox.cancel(key, 6900, "the rest", f"idem-{i}-2"))
        histories.append(snaps)
    for snaps, order in zip(histories, itertools.permutations(range(3)), strict=True):
        for i in order:
            for _ in range(2):
                snapshot(bl, snaps[i])
    state = bl.all(
        """select p.status, p.balance_amount, g.status::text as credits,
                  (select array_agg(r.amount order by r.amount) from billing.refunds r
                    where r.payment_id = p.id and r.status = 'succeeded') as refunds
             from billing.payments p join billing.credit_grants g on g.payment_id = p.id"""
    )
    assert (
        state
        == [
            {
                "status": "PARTIAL_CANCELED",
                "balance_amount": 0,
                "credits": "revoked",
                "refunds": [3000, 6900],
            }
        ]
        * 6
    )


# --- §3.7 who may reach what ----------------------------------------------------------------------

API_CALLS: list[tuple[str, tuple[Any, ...]]] = [
    ("my_subscription", ()),
    ("my_payments", ()),
    ("my_credits", ()),
    ("consume_credit", ("saju test",)),
    ("cancel_subscription", ()),
    ("resume_subscription", ()),
    ("begin_registration", ("pro",)),
]


def owned_state(bl: Billing, user: str) -> list[Row]:
    """Everything billing keeps about one user, to compare before and after."""
    out: list[Row] = []
    for table in (
        "customers",
        "card_registrations",
        "payment_methods",
        "subscriptions",
        "billing_periods",
        "charge_attempts",
        "payments",
        "refunds",
        "credit_grants",
        "credit_entries",
        "notifications",
    ):
        out += bl.all(
            f"select '{table}' as t, to_jsonb(x) as row from billing.{table} x"  # noqa: S608
            " where user_id = %s order by 2::text",
            (user,),
        )
    return out


def test_a_subscriber_never_sees_or_changes_another_subscribers_rows(bl: Billing) -> None:
    bl.enable_clock(START)
    a = subscribed(bl, "alice")
    b = subscribed(bl, "bob")
    alice_before = owned_state(bl, "alice")
    ids_of_alice = {
        str(r["row"][k])
        for r in alice_before
        for k in ("id", "order_id", "payment_key", "customer_key", "idempotency_key")
        if len(str(r["row"].get(k))) >= 20
    }
    assert str(a["subscriptionId"]) in ids_of_alice
    # Bob does everything a subscriber can (each call succeeds on his own rows).
    for fn, args in API_CALLS:
        result = bl.api("bob", fn, *args)
        text = json.dumps(result, default=str)
        assert not any(i in text for i in ids_of_alice), (fn, result)
    assert owned_state(bl, "alice") == alice_before
    assert bl.api("bob", "my_subscription")["subscriptionId"] == str(b["subscriptionId"])
    # A JWT for someone else's sub is that someone else; claims beside sub change nothing.
    spoof = bl.api("bob", "my_subscription", claims={"user_id": "alice", "email": "alice@x"})
    assert spoof["subscriptionId"] == str(b["subscriptionId"])


Conn = psycopg.Connection[tuple[Any, ...]]


def refused_as(conn: Conn, role: str, statement: str | db.Call[Any]) -> None:
    """``statement`` (or a service call) run as ``role`` fails for lack of privilege (42501) and
    changes nothing."""
    with conn.transaction(force_rollback=True):
        conn.execute(f"set local role {role}")
        with raises_sqlstate("42501"), conn.transaction():
            if isinstance(statement, db.Call):
                db.run_sync(conn, statement)
            else:
                conn.execute(statement)


@pytest.mark.parametrize("role", ["authenticated", "anon", "billing_service", "analyst"])
def test_no_role_but_the_owner_touches_billing_tables(
    bl: Billing, admin_conn: Conn, role: str
) -> None:
    bl.register("u")
    statements: list[str | db.Call[Any]] = [
        "select * from billing.subscriptions",
        "update billing.charge_attempts set amount = 1",
        "insert into billing.refunds (payment_id, amount, reason, source, requested_by)"
        " values (gen_random_uuid(), 1, 'x', 'operator', 'x')",
        "delete from billing.events",
        "select billing.tick()",
        "select billing.request_refund(gen_random_uuid(), 1, 'x')",
        "select billing.set_test_clock(now())",
    ]
    if role != "authenticated":
        statements.append("select api.my_subscription()")
    if role != "billing_service":
        statements.append(db.service_claim_attempts("w", 10))
    for statement in statements:
        refused_as(admin_conn, role, statement)
    assert bl.scalar("select count(*) from billing.charge_attempts where amount = 1") == 0


def test_the_analyst_reads_analytics_only(bl: Billing, admin_conn: Conn) -> None:
    bl.enable_clock(START)
    subscribed(bl, "u")
    with admin_conn.transaction(force_rollback=True):
        admin_conn.execute("set local role analyst")
        rows = admin_conn.execute("select * from analytics.subscription_counts").fetchall()
        assert rows == [("pro", "active", 1)]
    for role in ("authenticated", "anon", "billing_service"):
        refused_as(admin_conn, role, "select * from analytics.subscription_counts")


def test_a_customer_key_is_the_callers_own_and_expires(bl: Billing) -> None:
    bl.enable_clock(START)
    reg = bl.api("alice", "begin_registration", "pro", claims={"user_id": "bob"})
    row = bl.one("select user_id, expires_at, customer_key from billing.card_registrations")
    assert row["user_id"] == "alice"
    assert row["customer_key"] == reg["customerKey"]
    assert row["customer_key"] not in ("alice", "alice@example.com")
    assert row["expires_at"] == START + timedelta(hours=1)
    with raises_sqlstate("SB401"):
        bl.api(None, "begin_registration", "pro")
    # Only the service's envelope is accepted for a billing key, never the key as it is.
    plain = SealedKey(b"bk_plain_key_0123456789abcdef0123", "k1", sha256_hex("bk_plain"))
    with raises_sqlstate("SB400"):
        bl.run(db.service_complete_registration(reg["customerKey"], plain, None))
    assert bl.scalar("select count(*) from billing.payment_methods") == 0
    bl.set_clock(START + timedelta(hours=1))
    issued = bl.sandbox.issue_billing_key(reg["customerKey"])["billingKey"]
    with raises_sqlstate("SB409"):
        bl.run(
            db.service_complete_registration(
                reg["customerKey"], KEYRING.seal(issued, reg["customerKey"]), None
            )
        )
    assert bl.scalar("select count(*) from billing.subscriptions") == 0


# --- §3.6 every state change is in the audit log --------------------------------------------------


def test_customers_are_audited(bl: Billing) -> None:
    bl.api("u", "begin_registration", "pro")
    customer = bl.one("select id from billing.customers")
    assert bl.all(
        "select actor_role, actor_sub, action from billing.events where entity_id = %s",
        (customer["id"],),
    ) == [{"actor_role": "authenticated", "actor_sub": "u", "action": "created"}]


# --- §4 time travel: moving the test clock never charges twice ------------------------------------


def test_moving_the_clock_back_and_forth_never_charges_twice(bl: Billing) -> None:
    bl.enable_clock(START)
    done = subscribed(bl, "u")
    renew(bl, done)
    pay(bl, claim_one(bl))
    now = bl.now()
    # Back before the subscription began, forward past its end, and back again, ticking.
    for at in (START - timedelta(days=40), now + timedelta(days=35), START, now):
        bl.set_clock(at)
        bl.tick()
        for row in bl.claim():
            pay(bl, row)
    assert periods(bl, done["subscriptionId"]) == [(1, "paid"), (2, "paid"), (3, "paid")]
    assert approvals(bl) == 3
    assert bl.scalar("select count(*) from billing.charge_attempts") == 3
    assert bl.scalar("select count(*) from billing.refunds") == 0

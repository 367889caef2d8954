"""Two (or more) sessions at once: every claim path hands a row to one worker only, recording the
same result twice applies it once, and credits are never spent below zero."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import timedelta
from typing import Any

import psycopg
import pytest
from dbkit import Billing, Row, kst, raises_sqlstate, refund_result_of, result_of
from psycopg.rows import dict_row

from service import db
from service.runtime.cluster import Runtime


@contextmanager
def service_session(rt: Runtime, dbname: str) -> Iterator[psycopg.Connection[Row]]:
    """A non-autocommit session acting as billing_service; fails fast instead of hanging."""
    with psycopg.connect(rt.dsn(dbname, "postgres"), row_factory=dict_row) as c:
        c.execute("set role billing_service")
        c.execute("set statement_timeout = '20s'")
        c.commit()
        yield c


def wait_until_blocked(bl: Billing, pid: int) -> None:
    """Returns once the backend ``pid`` waits for a lock (so the race really happened)."""
    for _ in range(2000):
        row = bl.all("select wait_event_type from pg_stat_activity where pid = %s", (pid,))
        if row and row[0]["wait_event_type"] == "Lock":
            return
        threading.Event().wait(0.01)
    raise AssertionError(f"backend {pid} never blocked on a lock")


def run_blocked(
    bl: Billing,
    rt: Runtime,
    dbname: str,
    first: psycopg.Connection[Row],
    second_call: Callable[[psycopg.Connection[Row]], Any],
) -> Any:
    """Runs ``second_call`` in its own session while ``first`` holds its locks, then commits
    ``first`` and returns what the second call got once it could proceed."""
    result: dict[str, Any] = {}
    ready = threading.Event()

    def worker() -> None:
        with service_session(rt, dbname) as c:
            result["pid"] = c.info.backend_pid
            ready.set()
            try:
                result["value"] = second_call(c)
                c.commit()
            except (psycopg.Error, db.BillingError) as exc:
                result["error"] = exc

    t = threading.Thread(target=worker)
    t.start()
    ready.wait(10)
    wait_until_blocked(bl, result["pid"])
    first.commit()
    t.join(30)
    assert not t.is_alive()
    if "error" in result:
        raise result["error"]
    return result["value"]


@pytest.fixture
def twelve(bl: Billing) -> list[dict[str, Any]]:
    """Twelve subscribers whose first charges are due."""
    bl.enable_clock(kst(2028, 1, 10, 10, 0))
    return [bl.register(f"user-{i:02}") for i in range(12)]


# --- claims: a locked row is skipped, never handed out twice -------------------------------------

ClaimCall = Callable[[str, int], db.Call[list[Any]]]

# Each queue's claim call (from service/db.py) and the attribute naming the claimed row.
CLAIMS: dict[str, tuple[ClaimCall, str]] = {
    "service_claim_attempts": (db.service_claim_attempts, "attempt_id"),
    "service_claim_refunds": (db.service_claim_refunds, "refund_id"),
    "service_claim_webhooks": (db.service_claim_webhooks, "webhook_event_id"),
    "service_claim_key_deletions": (db.service_claim_key_deletions, "key_deletion_id"),
    "service_claim_notifications": (db.service_claim_notifications, "notification_id"),
}


def approve(bl: Billing, row: db.ClaimedAttempt) -> db.Recorded:
    """Toss approves a claimed charge and the service records it."""
    recorded = bl.serve(row)
    assert recorded.status == "succeeded", recorded
    return recorded


def make_work(bl: Billing, kind: str) -> int:
    """Creates due work of one kind; returns how many rows are claimable."""
    if kind == "service_claim_attempts":
        return len([bl.register(f"a-{i}") for i in range(12)])
    if kind == "service_claim_refunds":
        n = 0
        for i in range(4):
            bl.register(f"r-{i}")
        for row in bl.claim("setup", 10):
            approve(bl, row)
            pay = bl.scalar(
                "select id from billing.payments where attempt_id = %s", (row.attempt_id,)
            )
            for amount in (1000, 2000, 3000):
                bl.billing("request_refund", pay, amount, "partial")
                n += 1
        return n
    if kind == "service_claim_webhooks":
        for i in range(12):
            bl.run(
                db.service_ingest_webhook(
                    f"whtrans_{i}",
                    "PAYMENT_STATUS_CHANGED",
                    {"eventType": "PAYMENT_STATUS_CHANGED", "data": {"paymentKey": f"pk_{i}"}},
                )
            )
        return 12
    if kind == "service_claim_key_deletions":
        for i in range(6):
            bl.register(f"k-{i}")
            bl.register(f"k-{i}")  # a second card replaces the first, whose key is to be deleted
        return 6
    if kind == "service_claim_notifications":
        for i in range(8):
            bl.register(f"n-{i}")
        for row in bl.claim("setup", 10):
            bl.serve(row, "REJECT_CARD_PAYMENT")
        return bl.scalar("select count(*) from billing.notifications")  # type: ignore[no-any-return]
    raise AssertionError(kind)


@pytest.mark.parametrize("claim", list(CLAIMS))
def test_two_workers_never_claim_the_same_row(
    bl: Billing, rt: Runtime, dbname: str, claim: str
) -> None:
    bl.enable_clock(kst(2028, 1, 10, 10, 0))
    total = make_work(bl, claim)
    assert total >= 6
    claim_call, key = CLAIMS[claim]
    with service_session(rt, dbname) as a, service_session(rt, dbname) as b:
        first = db.run_sync(a, claim_call("worker-a", 5))  # a's transaction stays open: locked
        second = db.run_sync(b, claim_call("worker-b", 100))  # must skip a's rows, not wait
        b.commit()
        a.commit()
        third = db.run_sync(b, claim_call("worker-c", 100))  # leases held: nothing left
        b.commit()
    got_a = {getattr(r, key) for r in first}
    got_b = {getattr(r, key) for r in second}
    assert len(got_a) == 5
    assert len(got_b) == total - 5
    assert got_a.isdisjoint(got_b)
    assert third == []
    # Every claim carries its own fencing token.
    tokens = [r.lease_token for r in [*first, *second]]
    assert len(set(tokens)) == len(tokens)


def test_racing_workers_split_all_attempts(
    bl: Billing, rt: Runtime, dbname: str, twelve: list[dict[str, Any]]
) -> None:
    claimed: list[list[Any]] = [[], [], []]
    barrier = threading.Barrier(3)

    def worker(i: int) -> None:
        with service_session(rt, dbname) as c:
            c.autocommit = True
            barrier.wait()
            while batch := db.run_sync(c, db.service_claim_attempts(f"w{i}", 1)):
                claimed[i].extend(r.attempt_id for r in batch)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    everything = [a for w in claimed for a in w]
    assert len(everything) == 12
    assert len(set(everything)) == 12
    assert set(everything) == {r["attemptId"] for r in twelve}


# --- recording the same result twice applies it once ---------------------------------------------


def test_concurrent_identical_success_applies_once(
    bl: Billing, rt: Runtime, dbname: str, twelve: list[dict[str, Any]]
) -> None:
    row = bl.claim("w", 1)[0]
    record = result_of(row, bl.call_toss(row))  # Toss approved it
    with service_session(rt, dbname) as first:
        one = db.run_sync(first, record)
        two = run_blocked(bl, rt, dbname, first, lambda c: db.run_sync(c, record))
    assert (one.changed, two.changed) == (True, False)
    assert two.detail["paymentId"] == one.detail["paymentId"]
    sub = row.subscription_id
    assert (
        bl.scalar("select count(*) from billing.payments where subscription_id = %s", (sub,)) == 1
    )
    assert (
        bl.scalar(
            "select count(*) from billing.credit_entries e join billing.credit_grants g on"
            " g.id = e.grant_id "
            "where g.subscription_id = %s",
            (sub,),
        )
        == 1
    )
    assert (
        bl.scalar("select status::text from billing.subscriptions where id = %s", (sub,))
        == "active"
    )
    assert (
        bl.scalar(
            "select count(*) from billing.notifications where subscription_id = %s and"
            " kind = 'activated'",
            (sub,),
        )
        == 1
    )


def test_concurrent_successes_of_two_attempts_pay_the_period_once(
    bl: Billing, rt: Runtime, dbname: str, twelve: list[dict[str, Any]]
) -> None:
    for row in bl.claim("w", 12):
        approve(bl, row)
    bl.advance(timedelta(days=31))
    bl.tick()
    renewal, *others = bl.claim("w", 12)
    for row in others:
        approve(bl, row)
    # The service heard a decline for the renewal, yet Toss approved the order (a request whose
    # answer was lost to another sender); the dunning retry is approved too.
    bl.serve(renewal, "REJECT_CARD_PAYMENT")
    payment_a = bl.stray_charge(renewal).payment
    bl.advance(timedelta(days=1))
    retry = bl.claim("w", 1)[0]
    assert retry.period_id == renewal.period_id
    payment_b = bl.call_toss(retry).payment
    assert payment_a is not None
    assert payment_b is not None
    with service_session(rt, dbname) as first:
        paid = db.run_sync(first, db.service_apply_payment_snapshot(payment_b))
        late = run_blocked(
            bl,
            rt,
            dbname,
            first,
            lambda c: db.run_sync(c, db.service_apply_payment_snapshot(payment_a)),
        )
    assert paid.detail["applied"] is True
    assert late.detail["applied"] is False
    assert late.detail["attemptStatus"] == "duplicate"
    assert (
        bl.scalar(
            "select count(*) from billing.payments where period_id = %s and applied",
            (renewal.period_id,),
        )
        == 1
    )
    assert (
        bl.scalar(
            "select count(*) from billing.charge_attempts where period_id = %s and status"
            " = 'succeeded'",
            (renewal.period_id,),
        )
        == 1
    )
    refund = bl.one(
        "select r.amount, r.source::text from billing.refunds r join billing.payments p on"
        " p.id = r.payment_id "
        "where p.payment_key = %s",
        (payment_a["paymentKey"],),
    )
    assert refund == {"amount": 9900, "source": "duplicate_charge"}


def test_concurrent_identical_decline_schedules_one_retry(
    bl: Billing, rt: Runtime, dbname: str, twelve: list[dict[str, Any]]
) -> None:
    for row in bl.claim("w", 12):
        approve(bl, row)
    bl.advance(timedelta(days=31))
    bl.tick()
    row = bl.claim("w", 1)[0]
    record = result_of(row, bl.call_toss(row, "REJECT_CARD_PAYMENT"))
    with service_session(rt, dbname) as first:
        one = db.run_sync(first, record)
        two = run_blocked(bl, rt, dbname, first, lambda c: db.run_sync(c, record))
    assert (one.changed, two.changed) == (True, False)
    assert (
        bl.scalar(
            "select count(*) from billing.charge_attempts where period_id = %s", (row.period_id,)
        )
        == 2
    )
    assert (
        bl.scalar(
            "select count(*) from billing.notifications where subscription_id = %s and"
            " kind = 'payment_failed'",
            (row.subscription_id,),
        )
        == 1
    )


def test_a_stale_lease_loses_the_race_to_the_new_holder(
    bl: Billing, rt: Runtime, dbname: str, twelve: list[dict[str, Any]]
) -> None:
    """The first worker's lease ran out and a second worker holds the attempt: while the new
    holder records its decline, the old holder's late decline waits, then is refused."""
    old = bl.claim("w-old", 1)[0]
    bl.advance(timedelta(minutes=3))
    bl.tick()
    new = bl.claim("w-new", 12)
    [again] = [r for r in new if r.attempt_id == old.attempt_id]
    assert again.lease_token != old.lease_token
    # Both sent the same request under the same key: Toss answered both with the same decline.
    declined = bl.call_toss(again, "REJECT_CARD_PAYMENT")
    with service_session(rt, dbname) as first:
        one = db.run_sync(first, result_of(again, declined))
        with raises_sqlstate("SB409"):
            run_blocked(bl, rt, dbname, first, lambda c: db.run_sync(c, result_of(old, declined)))
    assert one.changed is True
    assert (
        bl.scalar(
            "select count(*) from billing.notifications where subscription_id = %s and"
            " kind = 'payment_failed'",
            (old.subscription_id,),
        )
        == 1
    )


def test_concurrent_refund_results_apply_once(
    bl: Billing, rt: Runtime, dbname: str, twelve: list[dict[str, Any]]
) -> None:
    row = bl.claim("w", 1)[0]
    approve(bl, row)
    pay_id = bl.scalar("select id from billing.payments where attempt_id = %s", (row.attempt_id,))
    bl.billing("request_refund", pay_id, None, "full")
    claimed = bl.run(db.service_claim_refunds("w", 10))[0]
    record = refund_result_of(claimed, bl.call_refund(claimed))  # Toss cancelled it
    with service_session(rt, dbname) as first:
        one = db.run_sync(first, record)
        two = run_blocked(bl, rt, dbname, first, lambda c: db.run_sync(c, record))
    assert (one.changed, two.changed) == (True, False)
    assert bl.scalar("select count(*) from billing.refunds where payment_id = %s", (pay_id,)) == 1
    assert bl.scalar("select count(*) from billing.credit_entries where kind = 'revoke'") == 1
    assert bl.scalar("select balance_amount from billing.payments where id = %s", (pay_id,)) == 0


def test_concurrent_webhook_deliveries_store_one_row(bl: Billing, rt: Runtime, dbname: str) -> None:
    body = {"eventType": "PAYMENT_STATUS_CHANGED", "data": {"paymentKey": "pk_x"}}
    ingest = db.service_ingest_webhook("whtrans_same", "PAYMENT_STATUS_CHANGED", body)
    with service_session(rt, dbname) as first:
        one = db.run_sync(first, ingest)
        two = run_blocked(bl, rt, dbname, first, lambda c: db.run_sync(c, ingest))
    assert (one.duplicate, two.duplicate) == (False, True)
    assert one.webhook_event_id == two.webhook_event_id
    assert bl.scalar("select count(*) from billing.webhook_events") == 1


def test_concurrent_key_deleted_records_apply_once(
    bl: Billing, rt: Runtime, dbname: str, twelve: list[dict[str, Any]]
) -> None:
    bl.register("user-00")  # replaces user-00's first card
    deletion = bl.run(db.service_claim_key_deletions("w", 10))[0]
    record = db.service_record_key_deleted(deletion.key_deletion_id, deletion.lease_token)
    with service_session(rt, dbname) as first:
        one = db.run_sync(first, record)
        two = run_blocked(bl, rt, dbname, first, lambda c: db.run_sync(c, record))
    assert (one.changed, two.changed) == (True, False)
    assert (
        bl.scalar(
            "select status::text from billing.payment_methods where id = %s",
            (deletion.payment_method_id,),
        )
        == "deleted"
    )
    assert (
        bl.scalar(
            "select count(*) from billing.events where entity_id = %s and new_status = 'deleted'",
            (deletion.payment_method_id,),
        )
        == 1
    )


# --- a claim and a subscriber's cancel serialise on the subscription -----------------------------


def cancel_as(c: psycopg.Connection[Row], user: str) -> Any:
    """api.cancel_subscription as the signed-in subscriber ``user``, in c's open transaction."""
    c.execute("set local role authenticated")
    c.execute(
        "select set_config('request.jwt.claims', %s, true)",
        (json.dumps({"sub": user, "role": "authenticated"}),),
    )
    row = c.execute("select api.cancel_subscription() as result").fetchone()
    assert row is not None
    return row["result"]


def renewal_due(bl: Billing) -> str:
    """One subscriber whose first period is paid and whose renewal is queued; returns the user."""
    bl.enable_clock(kst(2028, 1, 10, 10, 0))
    bl.register("u")
    approve(bl, bl.claim("w", 1)[0])
    bl.advance(timedelta(days=31))
    assert bl.tick()["renewals"] == 1
    return "u"


def test_a_claim_passes_by_a_subscription_being_canceled(
    bl: Billing, rt: Runtime, dbname: str
) -> None:
    user = renewal_due(bl)
    with service_session(rt, dbname) as subscriber:
        out = cancel_as(subscriber, user)  # uncommitted: the subscription stays locked
        assert out["status"] == "canceled"  # nothing sent yet: it ends now
        # The claim does not wait for the cancel, nor hand out the attempt it is withdrawing.
        assert bl.claim("w", 10) == []
        subscriber.commit()
    assert bl.claim("w", 10) == []
    assert bl.scalar("select status::text from billing.subscriptions") == "canceled"
    assert bl.scalar("select count(*) from billing.charge_attempts where status = 'canceled'") == 1


def test_a_cancel_after_a_claim_waits_for_it_and_sees_the_charge_in_flight(
    bl: Billing, rt: Runtime, dbname: str
) -> None:
    user = renewal_due(bl)
    with service_session(rt, dbname) as worker:
        [row] = db.run_sync(worker, db.service_claim_attempts("w", 10))  # holds the subscription
        out = run_blocked(bl, rt, dbname, worker, lambda c: cancel_as(c, user))
    # The charge may be at Toss: the cancel waits for its outcome instead of ending now.
    assert (out["status"], out["cancelAtPeriodEnd"], out["chargeInFlight"]) == (
        "active",
        True,
        True,
    )
    recorded = bl.serve(row, "REJECT_CARD_PAYMENT")
    assert recorded.detail["next"]["action"] == "ended"
    assert bl.scalar("select status::text from billing.subscriptions") == "canceled"
    assert bl.claim("w", 10) == []


# --- credits: many concurrent consumers, never below zero ----------------------------------------


def test_concurrent_consume_credit_never_goes_below_zero(
    bl: Billing, rt: Runtime, dbname: str, twelve: list[dict[str, Any]]
) -> None:
    row = bl.claim("w", 1)[0]
    approve(bl, row)
    user = bl.scalar(
        "select user_id from billing.subscriptions where id = %s", (row.subscription_id,)
    )
    outcomes: list[str] = []
    lock = threading.Lock()
    barrier = threading.Barrier(16)

    def consumer() -> None:
        with psycopg.connect(rt.dsn(dbname, "postgres")) as c:
            c.execute("set statement_timeout = '20s'")
            c.commit()
            barrier.wait()
            try:
                with c.transaction():
                    c.execute("set local role authenticated")
                    c.execute(
                        "select set_config('request.jwt.claims', %s, true)",
                        (json.dumps({"sub": user, "role": "authenticated"}),),
                    )
                    c.execute("select api.consume_credit('saju test')")
                outcome = "ok"
            except psycopg.Error as exc:
                outcome = exc.sqlstate or "?"
            with lock:
                outcomes.append(outcome)

    threads = [threading.Thread(target=consumer) for _ in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sorted(outcomes) == ["SB422"] * 6 + ["ok"] * 10
    assert bl.api(user, "my_credits")["balance"] == 0
    assert (
        bl.scalar(
            "select remaining from billing.credit_grants where subscription_id = %s",
            (row.subscription_id,),
        )
        == 0
    )
    with raises_sqlstate("SB422"):
        bl.api(user, "consume_credit", "one more")


# --- the scheduler -------------------------------------------------------------------------------


def test_overlapping_ticks_do_the_work_once(
    bl: Billing, rt: Runtime, dbname: str, twelve: list[dict[str, Any]]
) -> None:
    for row in bl.claim("w", 12):
        approve(bl, row)
    bl.advance(timedelta(days=31))
    with psycopg.connect(rt.dsn(dbname, "postgres"), row_factory=dict_row) as first:
        busy = first.execute("select billing.tick() as t").fetchone()
        assert busy is not None
        assert busy["t"]["renewals"] == 12
        other = bl.tick()  # while the first is uncommitted
        first.commit()
    assert other["skipped"] is True
    assert bl.tick()["renewals"] == 0
    assert bl.scalar("select count(*) from billing.billing_periods where period_index = 2") == 12

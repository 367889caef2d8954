"""The service contract's guarantees, each proven by the sequence that used to break it: fenced
leases, one attempt in flight per period, cancel against claim, no retries on a dead card, what
may be re-sent under the same Idempotency-Key, envelopes only, and an inbox without secrets."""

from __future__ import annotations

import base64
import dataclasses
import inspect
import threading
from datetime import datetime, timedelta
from typing import Any
from uuid import UUID

import psycopg
import pytest
from dbkit import KEYRING, Billing, kst, raises_sqlstate, result_of, sha256_hex
from psycopg.rows import dict_row

from service import db
from service.crypto import EnvelopeError, Keyring, SealedKey
from service.runtime.cluster import Runtime
from service.toss import FailureClass

SHORT = timedelta(seconds=10)


def _paid_subscription(bl: Billing, sub: str = "u1") -> dict[str, Any]:
    """A subscriber whose first period is paid, the clock on 2028-01-10 10:00 KST."""
    bl.enable_clock(kst(2028, 1, 10, 10, 0))
    done = bl.register(sub)
    [first] = bl.claim("setup")
    assert bl.serve(first).status == "succeeded"
    return done


def _renewal_due(bl: Billing) -> dict[str, Any]:
    done = _paid_subscription(bl)
    bl.set_clock(kst(2028, 2, 10, 10, 1))
    assert bl.tick()["renewals"] == 1
    return done


def _state(bl: Billing) -> list[dict[str, Any]]:
    """Everything a refused call must leave untouched."""
    return bl.all(
        """select (select count(*) from billing.events) as events,
                  (select jsonb_agg(to_jsonb(ca) order by ca.id)
                     from billing.charge_attempts ca) as attempts,
                  (select jsonb_agg(to_jsonb(s) order by s.id)
                     from billing.subscriptions s) as subs,
                  (select count(*) from billing.notifications) as notifications"""
    )


# --- hole 1: a worker whose lease expired -----------------------------------------------------


def test_a_late_decline_from_an_expired_lease_is_refused_and_changes_nothing(bl: Billing) -> None:
    _renewal_due(bl)
    [w1] = bl.run(db.service_claim_attempts("worker-1", 1, SHORT))
    bl.advance(timedelta(seconds=11))
    assert bl.tick()["leasesExpired"]["attempts"] == 1
    [w2] = bl.run(db.service_claim_attempts("worker-2", 1))
    assert (w2.attempt_id, w2.order_id, w2.idempotency_key) == (
        w1.attempt_id,
        w1.order_id,
        w1.idempotency_key,
    ), "the re-send must reuse the orderId and Idempotency-Key"
    assert w2.lease_token != w1.lease_token
    before = _state(bl)
    declined = bl.call_toss(w1, "REJECT_CARD_PAYMENT")  # what worker 1 heard, before it stalled
    with raises_sqlstate("SB409"):
        bl.record(w1, declined)
    assert _state(bl) == before
    # No second attempt (new orderId) was opened while the first is still with worker 2.
    assert (
        bl.scalar(
            "select count(*) from billing.charge_attempts where period_id = "
            "(select period_id from billing.charge_attempts where id = %s)",
            (w1.attempt_id,),
        )
        == 1
    )
    # Worker 2's re-send under the same key gets the decline Toss replays: recorded once, by the
    # holder of the lease, and only now may a retry (a new order) follow.
    done = bl.serve(w2)
    assert (done.status, done.changed) == ("declined", True)
    assert done.detail["next"]["action"] == "retry"
    assert len(bl.sandbox.approvals()) == 1  # the first period's only


def test_an_expired_lease_is_refused_even_before_anyone_claims_again(
    bl: Billing,
) -> None:
    _renewal_due(bl)
    [w1] = bl.run(db.service_claim_attempts("worker-1", 1, SHORT))
    bl.advance(timedelta(seconds=11))
    bl.tick()  # handed back: queued for the same request, nobody holds it
    before = _state(bl)
    for late in (
        db.service_record_charge_unknown(w1.attempt_id, w1.lease_token, "read timeout"),
        db.service_record_charge_failure(
            w1.attempt_id, w1.lease_token, "IDEMPOTENT_REQUEST_PROCESSING", None, "unprocessed"
        ),
    ):
        with raises_sqlstate("SB409"):
            bl.run(late)
    assert _state(bl) == before


def test_a_late_approval_from_an_expired_lease_is_still_recorded(bl: Billing) -> None:
    _renewal_due(bl)
    [w1] = bl.run(db.service_claim_attempts("worker-1", 1, SHORT))
    bl.advance(timedelta(seconds=11))
    bl.tick()
    [w2] = bl.run(db.service_claim_attempts("worker-2", 1))
    first = bl.serve(w1)
    assert (first.status, first.changed, first.detail["applied"]) == ("succeeded", True, True)
    # Worker 2's re-send under the same key got the same approval: nothing applies twice.
    again = bl.serve(w2)
    assert (again.status, again.changed) == ("succeeded", False)
    assert len(bl.sandbox.approvals()) == 2


@pytest.mark.parametrize(
    "how",
    ["REJECT_CARD_PAYMENT", "unsent", "PROVIDER_ERROR"],
    ids=["decline", "unknown", "transient"],
)
def test_every_charge_result_needs_the_current_lease(bl: Billing, how: str) -> None:
    _renewal_due(bl)
    [claimed] = bl.claim()
    answer = bl.call_toss(claimed, how)
    before = _state(bl)
    with raises_sqlstate("SB409"):
        bl.record(dataclasses.replace(claimed, lease_token=UUID(int=1)), answer)
    with raises_sqlstate("SB400"):
        bl.record(dataclasses.replace(claimed, lease_token=None), answer)  # type: ignore[arg-type]
    assert _state(bl) == before
    # The holder's result goes through, and repeating it changes nothing.
    assert bl.record(claimed, answer).changed is True
    assert bl.record(claimed, answer).changed is False


def test_the_database_allows_one_attempt_in_flight_per_period(bl: Billing) -> None:
    _renewal_due(bl)
    before = _state(bl)
    with raises_sqlstate("23505") as info:
        bl.one(
            """select billing.create_attempt(period_id, billing.now(), 'a second one')
                 from billing.charge_attempts where status = 'queued'"""
        )
    assert info.value.diag.constraint_name == "charge_attempts_one_in_flight_per_period_key"  # type: ignore[union-attr]
    assert _state(bl) == before


def test_the_exact_two_worker_sequence_through_two_sessions(
    bl: Billing, rt: Runtime, dbname: str
) -> None:
    """Worker 1 and worker 2 on their own connections, as two service replicas would be."""
    _renewal_due(bl)

    def session() -> psycopg.Connection[dict[str, Any]]:
        c = psycopg.connect(rt.dsn(dbname, "postgres"), autocommit=True, row_factory=dict_row)
        c.execute("set role billing_service")
        return c

    with session() as one, session() as two:
        [w1] = db.run_sync(one, db.service_claim_attempts("replica-1", 1, SHORT))
        assert db.run_sync(two, db.service_claim_attempts("replica-2", 1)) == []
        bl.advance(timedelta(seconds=11))
        bl.tick()
        [w2] = db.run_sync(two, db.service_claim_attempts("replica-2", 1))
        assert w2.attempt_id == w1.attempt_id
        with pytest.raises(db.Conflict):
            db.run_sync(one, result_of(w1, bl.call_toss(w1, "REJECT_CARD_PAYMENT")))
        recorded = db.run_sync(two, result_of(w2, bl.call_toss(w2)))  # Toss replays the decline
    assert recorded.status == "declined"
    assert recorded.detail["next"]["action"] == "retry"


# --- hole 2: a claim and a cancel at the same time ----------------------------------------------


def test_cancel_waits_for_a_claim_in_progress_and_reports_the_charge(
    bl: Billing, rt: Runtime, dbname: str
) -> None:
    _renewal_due(bl)
    with psycopg.connect(rt.dsn(dbname, "postgres"), row_factory=dict_row) as worker:
        worker.execute("set role billing_service")
        [claimed] = db.run_sync(worker, db.service_claim_attempts("w", 1))  # not committed yet
        result: dict[str, Any] = {}

        def cancel() -> None:
            result["value"] = bl.api("u1", "cancel_subscription")

        t = threading.Thread(target=cancel)
        t.start()
        for _ in range(500):  # the cancel must wait on the claim's subscription lock
            waiting = bl.all(
                "select 1 from pg_stat_activity where wait_event_type = 'Lock' and datname = %s",
                (dbname,),
            )
            if waiting:
                break
            threading.Event().wait(0.01)
        assert waiting, "the cancel did not wait for the claim"
        worker.commit()
        t.join(20)
    out = result["value"]
    assert out["chargeInFlight"] is True
    assert (out["status"], out["cancelAtPeriodEnd"]) == ("active", True)
    # The charge in flight decides: declined → the subscription ends now, with no dunning.
    recorded = bl.serve(claimed, "REJECT_CARD_PAYMENT")
    assert recorded.detail["next"]["action"] == "ended"
    assert bl.scalar("select status::text from billing.subscriptions") == "canceled"
    assert bl.claim() == []


def test_a_cancel_that_holds_the_subscription_makes_the_claim_pass_it_by(
    bl: Billing, rt: Runtime, dbname: str
) -> None:
    done = _renewal_due(bl)
    with psycopg.connect(rt.dsn(dbname, "postgres")) as holder:
        holder.execute(
            "select 1 from billing.subscriptions where id = %s for update",
            (done["subscriptionId"],),
        )
        assert bl.claim() == []  # skipped, not waited for
        holder.rollback()
    assert len(bl.claim()) == 1


def test_an_approved_charge_in_flight_keeps_the_paid_period_then_ends(bl: Billing) -> None:
    _renewal_due(bl)
    [claimed] = bl.claim()
    assert bl.api("u1", "cancel_subscription")["chargeInFlight"] is True
    ok = bl.serve(claimed)
    assert ok.detail["applied"] is True
    assert bl.scalar("select count(*) from billing.refunds") == 0  # no late-charge refund
    bl.set_clock(kst(2028, 3, 10, 10, 1))
    assert bl.tick()["endedAtPeriodEnd"] == 1
    assert bl.claim() == []


def test_a_pending_cancel_ends_when_the_lookup_finds_nothing(bl: Billing) -> None:
    _renewal_due(bl)
    [claimed] = bl.claim()
    bl.serve(claimed, "unsent")
    assert bl.api("u1", "cancel_subscription")["chargeInFlight"] is True
    bl.advance(timedelta(minutes=2))
    [lookup] = bl.claim()
    assert lookup.mode is db.AttemptMode.LOOKUP
    out = bl.serve(lookup)  # Toss: NOT_FOUND_PAYMENT
    assert (out.status, out.detail["ended"]) == ("canceled", True)
    assert bl.scalar("select status::text from billing.subscriptions") == "canceled"


# --- hole 3: a dead card ----------------------------------------------------------------------


def test_no_dunning_on_a_card_deleted_while_its_charge_was_in_flight(bl: Billing) -> None:
    done = _renewal_due(bl)
    [claimed] = bl.claim()
    bl.run(db.service_mark_payment_method_deleted(sha256_hex(done["billingKey"]), "카드사 요청"))
    out = bl.serve(claimed, "REJECT_CARD_PAYMENT")
    assert out.detail["next"]["action"] == "await_card"
    assert (
        bl.scalar(
            "select count(*) from billing.charge_attempts"
            " where status in ('queued', 'claimed', 'unknown')"
        )
        == 0
    )
    sub = bl.one("select status::text, awaiting_card from billing.subscriptions")
    assert sub == {"status": "past_due", "awaiting_card": True}
    bl.advance(timedelta(days=3))
    bl.tick()
    assert bl.claim() == []


def test_a_claim_never_charges_a_deleted_card(bl: Billing) -> None:
    done = _renewal_due(bl)
    [claimed] = bl.claim()
    bl.serve(claimed, "unsent")
    bl.run(db.service_mark_payment_method_deleted(sha256_hex(done["billingKey"]), None))
    bl.advance(timedelta(minutes=2))
    [again] = bl.claim()
    assert again.mode is db.AttemptMode.LOOKUP  # an unknown on a dead card: only looked up
    out = bl.serve(again)  # Toss: NOT_FOUND_PAYMENT
    assert out.status == "canceled"


# --- hole 4: what may be re-sent under the same key --------------------------------------------


def test_an_unprocessed_answer_resends_the_same_request(bl: Billing) -> None:
    _renewal_due(bl)
    [first] = bl.claim()
    out = bl.serve(first, "IDEMPOTENT_REQUEST_PROCESSING")
    assert out.status == "queued"
    bl.advance(timedelta(minutes=1))
    [again] = bl.claim()
    assert again.mode is db.AttemptMode.CHARGE
    assert (again.attempt_id, again.order_id, again.idempotency_key) == (
        first.attempt_id,
        first.order_id,
        first.idempotency_key,
    )


def test_a_processed_temporary_error_is_looked_up_then_retried_with_a_new_key(bl: Billing) -> None:
    _renewal_due(bl)
    seen: list[tuple[str, Any]] = []
    for _ in range(4):
        [charge] = bl.claim()
        assert charge.mode is db.AttemptMode.CHARGE
        seen.append((charge.order_id, charge.idempotency_key))
        out = bl.serve(charge, "PROVIDER_ERROR")
        assert (out.status, out.detail["next"]["action"]) == ("unknown", "lookup")
        [lookup] = bl.claim()  # looked up at once, never re-sent under the spent key
        assert (lookup.mode, lookup.attempt_id) == (db.AttemptMode.LOOKUP, charge.attempt_id)
        after = bl.serve(lookup)  # Toss: NOT_FOUND_PAYMENT
        assert after.status == "failed"
        if len(seen) < 4:
            assert after.detail["next"]["action"] == "retry"
            bl.set_clock(datetime.fromisoformat(after.detail["next"]["notBefore"]))
        else:
            # Three new attempts did not help: now it is dunning, as after a decline.
            assert after.detail["next"]["action"] == "retry"
            assert bl.scalar("select status::text from billing.subscriptions") == "past_due"
    assert len({s[0] for s in seen}) == 4
    assert len({s[1] for s in seen}) == 4
    gaps = bl.all(
        """select a.not_before - b.resolved_at as gap from billing.charge_attempts a
             join billing.charge_attempts b on b.period_id = a.period_id
                                           and b.attempt_number = a.attempt_number - 1
            where a.attempt_number between 3 and 4 order by a.attempt_number"""
    )
    assert [g["gap"] for g in gaps] == [timedelta(minutes=20), timedelta(minutes=40)]


def test_a_lookup_that_finds_the_approval_pays_the_period(bl: Billing) -> None:
    _renewal_due(bl)
    [charge] = bl.claim()
    bl.serve(charge, "FAILED_INTERNAL_SYSTEM_PROCESSING")
    [lookup] = bl.claim()
    # The order was approved all the same (by a request whose answer was lost to another
    # sender); the lookup finds it, and the snapshot pays the period.
    assert bl.stray_charge(lookup).payment is not None
    found = bl.call_toss(lookup).payment
    assert found is not None
    applied = bl.run(db.service_apply_payment_snapshot(found))
    assert applied.matched == "attempt"
    assert (
        bl.scalar(
            "select status::text from billing.billing_periods order by period_index desc limit 1"
        )
        == "paid"
    )
    assert bl.claim() == []


# --- hole 5: the billing key reaches the database only as an envelope ---------------------------


@pytest.mark.parametrize(
    "ciphertext",
    [
        b"bk_plaintext_billing_key_0123456789abcdef",
        bytes([2, 7]) + b"test-k1" + bytes(40),
        bytes([1, 7]) + b"other-k" + bytes(40),
        bytes([1, 7]) + b"test-k1" + bytes(12),
        b"",
    ],
    ids=["plaintext", "version", "key-id", "short", "empty"],
)
def test_only_an_envelope_is_accepted_as_the_ciphertext(bl: Billing, ciphertext: bytes) -> None:
    bl.enable_clock(kst(2028, 1, 10, 10, 0))
    reg = bl.api("u1", "begin_registration", "pro")
    before = _state(bl)
    sealed = SealedKey(ciphertext, "test-k1", sha256_hex("bk"))
    with raises_sqlstate("SB400"):
        bl.run(db.service_complete_registration(reg["customerKey"], sealed, None))
    assert _state(bl) == before


def test_the_table_refuses_a_plaintext_key_even_from_the_owner(bl: Billing) -> None:
    bl.enable_clock(kst(2028, 1, 10, 10, 0))
    done = bl.register("u1")
    with raises_sqlstate("23514") as info:
        bl.owner.execute(
            "update billing.payment_methods set billing_key_ciphertext = %s",
            (done["billingKey"].encode(),),
        )
    assert info.value.diag.constraint_name == "payment_methods_billing_key_envelope_check"  # type: ignore[union-attr]


def test_an_envelope_opens_only_for_its_customer_and_keyring() -> None:
    sealed = KEYRING.seal("bk_secret", "ck_a")
    assert sealed.key_id == "test-k1"
    assert b"bk_secret" not in sealed.ciphertext
    assert KEYRING.open(sealed.ciphertext, sealed.key_id, "ck_a") == "bk_secret"
    with pytest.raises(EnvelopeError):
        KEYRING.open(sealed.ciphertext, sealed.key_id, "ck_b")
    other = Keyring({"test-k1": bytes(32)}, "test-k1")
    with pytest.raises(EnvelopeError):
        other.open(sealed.ciphertext, sealed.key_id, "ck_a")
    rotated = Keyring.parse(
        f"k2:{Keyring.generate_key()},test-k1:{base64.b64encode(bytes(range(32))).decode()}"
    )
    moved = rotated.reseal(sealed.ciphertext, sealed.key_id, "ck_a")
    assert moved.key_id == "k2"
    assert rotated.open(moved.ciphertext, "k2", "ck_a") == "bk_secret"
    assert "AAEC" not in repr(rotated)


# --- hole 6: no secret in the webhook inbox ------------------------------------------------------


@pytest.mark.parametrize(
    ("event_type", "payload"),
    [
        ("BILLING_DELETED", {"eventType": "BILLING_DELETED", "data": {"billingKey": "bk_SECRET1"}}),
        ("PAYMENT_STATUS_CHANGED", {"billingKey": "bk_SECRET1", "data": {"orderId": "x"}}),
        (
            "BILLING_DELETED",
            {"eventType": "PAYMENT_STATUS_CHANGED", "data": {"billingKey": "bk_SECRET1"}},
        ),
        ("SOMETHING_NEW", {"data": {"items": [{"deep": {"billingKey": "bk_SECRET1"}}]}}),
        (None, {"eventType": "METHOD_UPDATED", "data": [{"billingKey": "bk_SECRET1"}]}),
    ],
    ids=["billing-deleted", "top-level", "mismatched-type", "unknown-nested", "array"],
)
def test_the_inbox_never_stores_a_billing_key(
    bl: Billing, event_type: str | None, payload: dict[str, Any]
) -> None:
    headers = {
        "Authorization": "Basic dGVzdF9za186",
        "Cookie": "session=abc",
        "TossPayments-Webhook-Transmission-Id": "whtrans_1",
        "tosspayments-webhook-transmission-time": "2028-01-10T10:00:00+09:00",
        "Content-Type": "application/json",
    }
    bl.run(db.service_ingest_webhook("whtrans_1", event_type, payload, headers))
    stored = bl.one("select payload::text, headers from billing.webhook_events")
    assert "bk_SECRET1" not in stored["payload"]
    assert sha256_hex("bk_SECRET1") in stored["payload"]
    assert stored["headers"] == {
        "tosspayments-webhook-transmission-id": "whtrans_1",
        "tosspayments-webhook-transmission-time": "2028-01-10T10:00:00+09:00",
        "content-type": "application/json",
    }


def test_billing_deleted_still_finds_its_payment_method(bl: Billing) -> None:
    done = _paid_subscription(bl)
    payload = {"eventType": "BILLING_DELETED", "data": {"billingKey": done["billingKey"]}}
    bl.run(db.service_ingest_webhook("whtrans_2", None, payload))
    [event] = bl.run(db.service_claim_webhooks("w", 10))
    marked = bl.run(
        db.service_mark_payment_method_deleted(event.payload["data"]["billingKeySha256"], None)
    )
    assert (marked.found, marked.changed) == (True, True)


# --- hole 7: the small ones ---------------------------------------------------------------------


@pytest.mark.parametrize("reason", ["\t", "\n\n", " \t\r\n "])
def test_a_blank_credit_reason_is_refused(bl: Billing, reason: str) -> None:
    _paid_subscription(bl)
    with raises_sqlstate("SB400"):
        bl.api("u1", "consume_credit", reason)
    assert bl.scalar("select count(*) from billing.credit_entries where kind = 'consume'") == 0


def test_refusals_name_the_row_they_refuse(bl: Billing) -> None:
    done = _paid_subscription(bl)
    with raises_sqlstate("SB409") as info:
        bl.api("u1", "resume_subscription")
    assert str(done["subscriptionId"]) in str(info.value)
    assert "<NULL>" not in str(info.value)


# --- the contract itself ------------------------------------------------------------------------


def test_db_py_covers_every_service_function_with_its_sql_names(bl: Billing) -> None:
    sql = {
        r["proname"]: r["args"]
        for r in bl.all(
            """select p.proname, array_agg(a.name order by a.n) filter (where a.mode in ('i', 'b'))
                      as args
                 from pg_proc p
                 cross join lateral unnest(coalesce(p.proargnames, '{}'), coalesce(p.proargmodes,
                      array_fill('i'::"char", array[cardinality(coalesce(p.proargnames, '{}'))])))
                      with ordinality as a(name, mode, n)
                where p.pronamespace = 'billing'::regnamespace and p.proname like 'service\\_%'
                group by p.proname"""
        )
    }
    python = {n for n in dir(db) if n.startswith("service_")}
    assert python == set(sql), "service/db.py must have exactly one function per billing.service_*"
    for name in python:
        call = getattr(db, name)
        # Every named parameter the statement sends is the SQL function's own.
        params = set(inspect.signature(call).parameters)
        assert set(sql[name] or ()) >= params - {"sealed"}, name


@pytest.mark.parametrize(
    ("enum", "sql_type"),
    [
        (db.AttemptStatus, "billing.attempt_status"),
        (db.AttemptMode, "billing.attempt_mode"),
        # toss.classify's labels are what service_record_charge_failure stores.
        (FailureClass, "billing.failure_class"),
    ],
)
def test_python_enums_are_the_sql_enums(bl: Billing, enum: Any, sql_type: str) -> None:
    labels = bl.scalar(f"select enum_range(null::{sql_type})::text[]")
    assert [e.value for e in enum] == labels

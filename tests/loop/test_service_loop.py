"""The unattended loop end to end: registration through the redirects, billing.tick → pg_net
doorbell → service → Toss sandbox → SQL, dunning, refunds, webhooks, key deletion, replicas."""

from __future__ import annotations

import asyncio
import base64
import logging
import threading
import time
from datetime import timedelta
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import psycopg
import pytest
from dbkit import Billing, kst
from liveserver import LiveServer, wait_until
from loopkit import APP_URL, SECRET_KEY, Receiver, Stack
from psycopg import sql
from security.seckit import changed, contents

from service import db
from service.app import build_app
from service.runtime.cluster import ADMIN_USER, Runtime


def _sub_status(stack: Stack, sub: str) -> str | None:
    rows = stack.bl.all(
        "select status::text as status from billing.subscriptions where user_id = %s", (sub,)
    )
    return rows[0]["status"] if rows else None


def _paid_periods(stack: Stack, sub: str) -> int:
    return stack.bl.scalar(  # type: ignore[no-any-return]
        "select count(*) from billing.billing_periods where user_id = %s and status = 'paid'",
        (sub,),
    )


def test_a_card_registered_through_the_redirects_is_charged_at_once(stack: Stack) -> None:
    back = stack.register("u1")
    assert back.status_code == 303
    target = urlsplit(back.headers["location"])
    assert f"{target.scheme}://{target.netloc}{target.path}" == APP_URL
    assert parse_qs(target.query)["status"] == ["registered"]
    stack.wait(lambda: _sub_status(stack, "u1") == "active", "the first charge")
    order = stack.bl.scalar("select order_id from billing.charge_attempts")
    approvals = [e for e in stack.ledger() if e["kind"] == "approval"]
    assert [(e["orderId"], e["amount"]) for e in approvals] == [(order, 9900)]
    # The billing key is stored only as an envelope.
    stored = stack.bl.one("select billing_key_ciphertext from billing.payment_methods")
    assert approvals[0]["billingKey"].encode() not in bytes(stored["billing_key_ciphertext"])


def test_the_fail_redirect_records_the_code_and_explains(stack: Stack) -> None:
    reg = stack.bl.api("u2", "begin_registration", "pro")
    with httpx.Client() as web:
        page = web.get(
            f"{stack.service.url}/billing/fail",
            params={
                "code": "PAY_PROCESS_CANCELED",
                "message": "사용자에 의해 결제가 취소되었습니다.",
                "customerKey": reg["customerKey"],
            },
        )
    assert page.status_code == 200
    assert "PAY_PROCESS_CANCELED" in page.text
    assert "Card registration did not complete" in page.text
    row = stack.bl.one("select status::text, fail_code from billing.card_registrations")
    assert row == {"status": "failed", "fail_code": "PAY_PROCESS_CANCELED"}


def test_a_renewal_rung_by_the_tick_reaches_toss_with_the_attempts_keys(stack: Stack) -> None:
    stack.register("u1")
    stack.wait(lambda: _paid_periods(stack, "u1") == 1, "the first charge")
    stack.bl.set_clock(kst(2028, 2, 10, 10, 1))
    summary = stack.bl.tick()  # the same function pg_cron runs; it rings through pg_net
    assert summary["renewals"] == 1
    assert summary["doorbellRequestId"] is not None
    stack.wait(lambda: _paid_periods(stack, "u1") == 2, "the renewal")
    renewal = stack.bl.one(
        "select order_id, idempotency_key::text from billing.charge_attempts"
        " where attempt_number = 1 order by created_at desc limit 1"
    )
    with stack.toss() as api:
        found = api.get(f"/v1/payments/orders/{renewal['order_id']}").json()
    assert (found["status"], found["totalAmount"]) == ("DONE", 9900)
    assert len([e for e in stack.ledger() if e["kind"] == "approval"]) == 2


def test_a_declined_renewal_is_dunned_and_recovers_with_a_new_card(stack: Stack) -> None:
    stack.register("u1", card="4000000011000000")  # approved once, then REJECT_CARD_PAYMENT
    stack.wait(lambda: _paid_periods(stack, "u1") == 1, "the first charge")
    stack.bl.set_clock(kst(2028, 2, 10, 10, 1))
    stack.bl.tick()
    stack.wait(lambda: _sub_status(stack, "u1") == "past_due", "the decline")
    retry = stack.bl.one(
        "select status::text, not_before from billing.charge_attempts where status = 'queued'"
    )
    assert retry["not_before"] == kst(2028, 3, 10, 10, 1) - timedelta(days=28)  # +1 day
    stack.register("u1")  # a new card: the unpaid period is charged on it at once
    stack.wait(lambda: _sub_status(stack, "u1") == "active", "recovery on the new card")
    assert _paid_periods(stack, "u1") == 2


def test_an_unknown_outcome_is_resolved_by_lookup_with_one_charge(stack: Stack) -> None:
    with stack.toss() as api:
        added = api.post(
            "/_sandbox/faults",
            json={"endpoint": "charge", "kind": "drop_after_commit", "count": 1},
        )
        assert added.status_code == 200, added.text
    stack.register("u1")
    stack.wait(
        lambda: stack.bl.scalar("select status::text from billing.charge_attempts") == "unknown",
        "the lost answer",
    )
    stack.bl.advance(timedelta(minutes=2))
    stack.bl.tick()
    stack.wait(lambda: _sub_status(stack, "u1") == "active", "the lookup")
    assert len([e for e in stack.ledger() if e["kind"] == "approval"]) == 1
    assert stack.bl.scalar("select lookups from billing.charge_attempts") == 1


def test_a_refund_is_made_at_toss_and_synced(stack: Stack) -> None:
    stack.register("u1")
    stack.wait(lambda: _paid_periods(stack, "u1") == 1, "the first charge")
    payment_id = stack.bl.scalar("select id from billing.payments")
    stack.bl.billing("request_refund", payment_id, 3000, "goodwill")
    stack.bl.tick()
    stack.wait(
        lambda: stack.bl.scalar("select status::text from billing.refunds") == "succeeded",
        "the refund",
    )
    assert stack.bl.scalar("select balance_amount from billing.payments") == 6900
    cancels = [e for e in stack.ledger() if e["kind"] != "approval"]
    assert [e["amount"] for e in cancels] == [3000]


def test_billing_deleted_stops_retries(stack: Stack) -> None:
    stack.register("u1", card="4000000011000000")
    stack.wait(lambda: _paid_periods(stack, "u1") == 1, "the first charge")
    with stack.toss() as api:
        api.put("/_sandbox/webhook", json={"url": f"{stack.service.url}/webhooks/toss"})
        key = stack.ledger()[0]["billingKey"]
        assert api.delete(f"/v1/billing/{key}").status_code == 200
        api.post("/_sandbox/webhooks/flush")
    stack.wait(
        lambda: stack.bl.scalar("select status::text from billing.payment_methods") == "deleted",
        "BILLING_DELETED",
    )
    stack.bl.set_clock(kst(2028, 2, 10, 10, 1))
    stack.bl.tick()
    assert stack.bl.scalar("select awaiting_card from billing.subscriptions") is True
    assert stack.bl.scalar("select count(*) from billing.charge_attempts") == 1
    stored = stack.bl.one("select payload::text, headers::text from billing.webhook_events")
    assert key not in stored["payload"]
    assert SECRET_KEY not in stored["headers"]


def test_cancel_at_period_end_deletes_the_key_at_toss(stack: Stack) -> None:
    stack.register("u1")
    stack.wait(lambda: _paid_periods(stack, "u1") == 1, "the first charge")
    key = stack.ledger()[0]["billingKey"]
    stack.bl.api("u1", "cancel_subscription")
    stack.bl.set_clock(kst(2028, 2, 10, 10, 1))
    assert stack.bl.tick()["endedAtPeriodEnd"] == 1
    stack.wait(
        lambda: stack.bl.scalar("select status::text from billing.key_deletions") == "deleted",
        "the key deletion",
    )
    customer_key = stack.bl.scalar("select customer_key from billing.payment_methods")
    with stack.toss() as api:
        gone = api.post(
            f"/v1/billing/{key}",
            json={
                "customerKey": customer_key,
                "amount": 100,
                "orderId": "after-end-1",
                "orderName": "x",
            },
        )
    assert (gone.status_code, gone.json()["code"]) == (400, "ALREADY_REMOVED_BILLING_KEY")


def test_the_doorbell_refuses_a_wrong_token_and_bad_webhooks_get_a_clear_4xx(
    stack: Stack,
) -> None:
    with httpx.Client(base_url=stack.service.url) as web:
        assert web.post("/internal/doorbell").status_code == 401
        wrong = web.post("/internal/doorbell", headers={"Authorization": "Bearer nope"})
        assert (wrong.status_code, wrong.json()["code"]) == (401, "UNAUTHORIZED")
        bad = web.post("/webhooks/toss", content=b"not json")
        assert (bad.status_code, bad.json()["code"]) == (400, "INVALID_JSON")
        array = web.post("/webhooks/toss", json=[1, 2])
        assert array.status_code == 400
        big = web.post("/webhooks/toss", content=b"{" + b" " * (300 * 1024) + b"}")
        assert big.status_code == 413
        assert 'saju_queue_depth{queue="charge_attempts",state="ready"}' in web.get("/metrics").text
        spec = web.get("/openapi.json").json()
        assert {"/internal/doorbell", "/webhooks/toss", "/billing/success"} <= set(spec["paths"])
        assert web.get("/readyz").json()["database"] is True
    assert stack.bl.scalar("select count(*) from billing.webhook_events") == 0


def test_two_replicas_drain_one_queue_without_charging_twice(stack: Stack) -> None:
    for i in range(12):
        stack.register(f"r{i}")
    stack.wait(
        lambda: (
            stack.bl.scalar("select count(*) from billing.subscriptions where status = 'active'")
            == 12
        ),
        "first charges",
    )
    stack.bl.set_clock(kst(2028, 2, 10, 10, 1))
    second = stack.settings.model_copy(update={"worker_name": "svc-test-2"})
    with LiveServer(build_app(second)) as replica:
        stack.bl.tick()  # rings the first replica
        token = stack.settings.doorbell_token.get_secret_value()
        threading.Thread(
            target=lambda: httpx.post(
                f"{replica.url}/internal/doorbell", headers={"Authorization": f"Bearer {token}"}
            )
        ).start()
        stack.wait(
            lambda: (
                stack.bl.scalar(
                    "select count(*) from billing.billing_periods where status = 'paid'"
                )
                == 24
            ),
            "every renewal",
        )
    orders = [e["orderId"] for e in stack.ledger() if e["kind"] == "approval"]
    assert len(orders) == len(set(orders)) == 24
    per_period = stack.bl.scalar(
        "select max(n) from (select count(*) n from billing.payments group by period_id) x"
    )
    assert per_period == 1


@pytest.mark.parametrize("path", ["/billing/success", "/billing/success?customerKey=ck_x"])
def test_a_success_redirect_without_its_keys_changes_nothing(stack: Stack, path: str) -> None:
    with httpx.Client(base_url=stack.service.url) as web:
        page = web.get(path)
    assert page.status_code == 400
    assert stack.bl.scalar("select count(*) from billing.payment_methods") == 0
    assert base64.b64encode(SECRET_KEY.encode()).decode() not in page.text


def test_reconciliation_applies_an_approval_the_ledger_missed(stack: Stack) -> None:
    with stack.toss() as api:
        api.post(
            "/_sandbox/faults", json={"endpoint": "charge", "kind": "drop_after_commit", "count": 1}
        )
    stack.register("u1")
    stack.wait(
        lambda: stack.bl.scalar("select status::text from billing.charge_attempts") == "unknown",
        "the lost answer",
    )
    assert stack.bl.scalar("select count(*) from billing.payments") == 0
    # The sandbox keeps wall time: reconcile the real hour around now.
    run = stack.bl.scalar(
        "select billing.request_reconciliation("
        "now() - interval '1 hour', now() + interval '1 hour')"
    )
    with httpx.Client() as web:
        token = stack.settings.doorbell_token.get_secret_value()
        web.post(
            f"{stack.service.url}/internal/doorbell", headers={"Authorization": f"Bearer {token}"}
        )
    stack.wait(
        lambda: (
            stack.bl.scalar(
                "select status::text from billing.reconciliation_runs where id = %s", (run,)
            )
            == "done"
        ),
        "the reconciliation",
    )
    report = stack.bl.one("select * from billing.ops_reconciliation_report(3650)")
    assert (report["listed"], report["unknown"], report["missing"]) == (1, 0, 0)
    assert _sub_status(stack, "u1") == "active"  # applied like a late approval
    assert stack.bl.scalar("select status::text from billing.charge_attempts") == "succeeded"


def test_no_secret_reaches_the_database_logs_responses_or_metrics(
    stack: Stack, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    responses: list[str] = []
    responses.append(stack.register("u1").text)
    responses.append(stack.register("u2", card="4000000011000000").text)
    stack.wait(lambda: _paid_periods(stack, "u2") == 1, "first charges")
    stack.bl.set_clock(kst(2028, 2, 10, 10, 1))
    stack.bl.api("u1", "cancel_subscription")
    stack.bl.tick()  # u1 ends (key deleted at Toss), u2 is declined (dunning)
    stack.wait(
        lambda: (
            stack.bl.scalar("select count(*) from billing.key_deletions where status = 'deleted'")
            == 1
        ),
        "the key deletion",
    )
    stack.wait(lambda: _sub_status(stack, "u2") == "past_due", "the decline")
    with httpx.Client(base_url=stack.service.url) as web:
        for path in ("/metrics", "/readyz", "/healthz", "/openapi.json"):
            responses.append(web.get(path).text)
    billing_keys = {e["billingKey"] for e in stack.ledger()}
    assert len(billing_keys) == 2
    assert len(stack.auth_keys) == 2
    secrets_ = [SECRET_KEY, base64.b64encode(f"{SECRET_KEY}:".encode()).decode()]
    secrets_ += [*billing_keys, *stack.auth_keys]
    dump = "\n".join(
        str(r)
        for table in stack.bl.all(
            "select tablename from pg_tables where schemaname = 'billing' order by 1"
        )
        for r in stack.bl.all(f"select t::text from billing.{table['tablename']} t")  # noqa: S608
    )
    # The service's own records (its server thread); the test's client stands in for a browser.
    own = [r for r in caplog.records if r.thread == stack.service.thread_id]
    assert any(r.name == "saju_billing.access" for r in own)
    logs = "\n".join(f"{r.getMessage()} {r.__dict__}" for r in own)
    for secret in secrets_:
        assert secret not in dump
        assert secret not in logs
        assert all(secret not in text for text in responses)


@pytest.mark.slow
def test_the_pg_cron_job_itself_rings_the_renewal(stack: Stack, rt: Runtime, dbname: str) -> None:
    """pg_cron (not a direct call) runs billing.tick() in this database; its doorbell reaches the
    service through the net worker, and the renewal is charged at Toss."""
    stack.register("u1")
    stack.wait(lambda: _paid_periods(stack, "u1") == 1, "the first charge")
    stack.bl.set_clock(kst(2028, 2, 10, 10, 1))
    with psycopg.connect(rt.dsn("postgres", "postgres"), autocommit=True) as main:
        job = main.execute(
            "select cron.schedule_in_database(%s, '* * * * *', 'select billing.tick()', %s)",
            (f"tick-{dbname}", dbname),
        ).fetchone()
        assert job is not None
        try:
            wait_until(lambda: _paid_periods(stack, "u1") == 2, "the cron tick's renewal", 150)
        finally:
            main.execute("select cron.unschedule(%s)", (job[0],))
    renewal = stack.bl.one(
        "select e.actor_role from billing.events e join billing.charge_attempts ca"
        " on ca.id = e.entity_id where e.action = 'created' and ca.attempt_number = 1"
        " order by e.id desc limit 1"
    )
    assert renewal["actor_role"] == "postgres"  # created by the job, as the database owner


def test_notifications_reach_the_app_signed_per_standard_webhooks(
    notify_stack: Stack, receiver: Receiver
) -> None:
    notify_stack.register("u1")
    notify_stack.wait(lambda: len(receiver.received) >= 1, "the activation notification")
    notify_stack.wait(
        lambda: (
            notify_stack.bl.scalar(
                "select count(*) from billing.notifications where delivered_at is null"
            )
            == 0
        ),
        "every notification delivered",
    )
    kinds = [n["type"] for n in receiver.received]
    assert "billing.activated" in kinds
    assert receiver.refused == []
    activated = next(n for n in receiver.received if n["type"] == "billing.activated")
    assert activated["data"]["userId"] == "u1"
    assert activated["data"]["amount"] == 9900
    assert len({n["id"] for n in receiver.received}) == len(receiver.received)


def _drop_connections(stack: Stack, admin: psycopg.Connection[Any]) -> int:
    """Ends every client session in the test database but the test's own (``admin`` and the
    Billing connections), the service's pooled ones among them; returns how many ended."""
    ours = [c.info.backend_pid for c in (stack.bl.owner, stack.bl.svc, stack.bl.user_conn)]
    dropped = admin.execute(
        "select count(*) filter (where pg_terminate_backend(pid)) from pg_stat_activity"
        " where datname = current_database() and backend_type = 'client backend'"
        "   and pid <> pg_backend_pid() and pid <> all(%s)",
        (ours,),
    ).fetchone()
    assert dropped is not None
    return int(dropped[0])


def test_a_registration_after_the_database_dropped_every_pooled_connection(
    stack: Stack, rt: Runtime, dbname: str
) -> None:
    # What a database restart does to the service: every connection it pooled is gone. The
    # success redirect issues the billing key at Toss (spending the one-time authKey) before it
    # records it, so a stale connection there would lose the card and leave its key at Toss.
    assert stack.register("u-before").status_code == 303
    stack.wait(lambda: _sub_status(stack, "u-before") == "active", "the first charge")
    with psycopg.connect(rt.dsn(dbname, ADMIN_USER), autocommit=True) as admin:
        assert _drop_connections(stack, admin) >= 1
    back = stack.register("u-after")
    assert back.status_code == 303, back.text
    assert parse_qs(urlsplit(back.headers["location"]).query)["status"] == ["registered"]
    stack.wait(lambda: _sub_status(stack, "u-after") == "active", "the first charge")


def test_the_pool_hands_out_a_live_connection_soon_after_losing_all_of_them(
    bl: Billing, rt: Runtime, dbname: str
) -> None:
    # Eight pooled connections dropped together: without the sweep the pool walks them one at a
    # time with 0 + 1 + 2 + 4 s of backoff and this 5 s wait gives up.
    size = 8

    async def scenario() -> bool:
        pool = db.connection_pool(rt.dsn(dbname, "postgres"), "billing_service", size)
        await pool.open(wait=True, timeout=30)
        try:
            held = [await pool.getconn() for _ in range(size)]
            pids = [c.info.backend_pid for c in held]
            for c in held:
                await pool.putconn(c)
            with psycopg.connect(rt.dsn(dbname, ADMIN_USER), autocommit=True) as admin:
                admin.execute("select pg_terminate_backend(p) from unnest(%s::int[]) p", (pids,))
                # Lost means gone: pg_terminate_backend only signals, and a backend that has not
                # yet ended has not yet told its client either.
                deadline = time.monotonic() + 30
                while admin.execute(
                    "select count(*) from pg_stat_activity where pid = any(%s)", (pids,)
                ).fetchone() != (0,):
                    assert time.monotonic() < deadline, "the backends did not end"
                    await asyncio.sleep(0.05)
            async with pool.connection(timeout=5) as conn:
                return await db.ping(conn)
        finally:
            await pool.close()

    assert asyncio.run(scenario())


def test_the_service_answers_503_while_its_database_refuses_it_and_recovers(
    impatient_stack: Stack, rt: Runtime, dbname: str
) -> None:
    stack = impatient_stack
    webhook = {
        "eventType": "METHOD_UPDATED",
        "createdAt": "2028-01-10T10:00:00.000000",
        "data": {"customerKey": "ck_away"},
    }
    headers = {"tosspayments-webhook-transmission-id": "whtrans_away"}
    limit = sql.SQL("alter database {} connection limit {}")
    with (
        psycopg.connect(rt.dsn(dbname, ADMIN_USER), autocommit=True) as admin,
        httpx.Client(base_url=stack.service.url, timeout=30) as web,
    ):
        before = contents(admin)
        # The service's login (not a superuser) may open no session; the ones it has end.
        admin.execute(limit.format(sql.Identifier(dbname), sql.Literal(0)))
        try:
            assert _drop_connections(stack, admin) >= 1
            away = web.post("/webhooks/toss", json=webhook, headers=headers)
            after = contents(admin)
        finally:
            admin.execute(limit.format(sql.Identifier(dbname), sql.Literal(-1)))
        assert away.status_code == 503, away.text
        assert away.headers["Retry-After"] == "5"
        assert '<code id="code">DATABASE_UNAVAILABLE</code>' in away.text
        assert changed(before, after) == []

        # Back: the same delivery, retried as Retry-After asks, is stored once.
        answers: list[httpx.Response] = []

        def answered() -> bool:
            answers.append(web.post("/webhooks/toss", json=webhook, headers=headers))
            return answers[-1].status_code != 503

        stack.wait(answered, "the service to reach its database again")
        assert answers[-1].status_code == 200, answers[-1].text
        assert answers[-1].json() == {"received": True, "duplicate": False}
        assert web.get("/readyz").json()["database"] is True
    stored = stack.bl.all(
        "select event_type, status::text from billing.webhook_events"
        " where transmission_id = 'whtrans_away'"
    )
    assert stored == [{"event_type": "METHOD_UPDATED", "status": "ignored"}]


def test_an_idle_connection_is_handed_out_without_a_round_trip_until_the_server_ends_it(
    bl: Billing, rt: Runtime, dbname: str
) -> None:
    # The pool's check asks the server only when it has spoken on an idle connection, which it
    # does only to end it.
    async def scenario() -> tuple[bool, bool]:
        conn = await psycopg.AsyncConnection.connect(rt.dsn(dbname, "postgres"), autocommit=True)
        try:
            await conn.execute("select 1")
            quiet = db._server_spoke(conn)
            with psycopg.connect(rt.dsn(dbname, ADMIN_USER), autocommit=True) as admin:
                admin.execute("select pg_terminate_backend(%s)", (conn.info.backend_pid,))
            wait_until(lambda: db._server_spoke(conn), "the server's goodbye", 10)
            return quiet, db._server_spoke(conn)
        finally:
            await conn.close()

    assert asyncio.run(scenario()) == (False, True)

"""The burst path: billing.run_ticks() (what pg_cron calls) works through a burst in rounds that
each commit, so attempts become claimable while the rest is still being renewed; the renewals
written in sets leave the same audit facts per subscription as one by one; and pg_cron 1.4 runs the
procedure as its job (a top-level CALL may commit)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import timedelta

import psycopg
import pytest
from dbkit import kst

from service.bench import loader
from service.runtime import testdb
from service.runtime.cluster import ADMIN_USER, Runtime

START = kst(2028, 1, 1, 9, 0)
N = 1_400  # three batches of 500 (the last one short)
BATCH = 500

Conn = psycopg.Connection[tuple[object, ...]]


@pytest.fixture
def bunched(rt: Runtime, template: str) -> Iterator[str]:
    """N subscribers who all registered within one hour: their renewals fall due together."""
    name = testdb.clone(rt, template)
    try:
        with psycopg.connect(rt.dsn(name, ADMIN_USER), autocommit=True) as conn:
            conn.execute("select billing.enable_test_clock()")
            loader.load_subscribers(conn, N, START, timedelta(hours=1), prefix="rt-")
            conn.execute("select billing.set_test_clock(%s)", (START + timedelta(days=32),))
        yield name
    finally:
        testdb.drop(rt, name)


def _scalar(conn: Conn, query: str) -> object:
    row = conn.execute(query).fetchone()
    assert row is not None
    return row[0]


def test_run_ticks_commits_each_round_and_keeps_every_audit_fact(rt: Runtime, bunched: str) -> None:
    with psycopg.connect(rt.dsn(bunched, "postgres"), autocommit=True) as conn:
        # A zero round budget: every due step does exactly one batch per round.
        conn.execute("call billing.run_ticks(round_budget => interval '0 seconds')")
        renewed = conn.execute(
            """select count(*), count(distinct ca.xmin::text)
                 from billing.charge_attempts ca
                where ca.status = 'queued' and ca.attempt_number = 1
                  and ca.status_reason = 'renewal of period 2'"""
        ).fetchone()
        # Every subscriber renewed, in one committed transaction per batch.
        assert renewed == (N, -(-N // BATCH))
        assert (
            _scalar(
                conn,
                """select count(*) from billing.subscriptions
                    where status = 'active' and current_period_ends_at <= billing.now()""",
            )
            == 0
        )
        assert (
            _scalar(conn, "select count(*) from billing.credit_grants where status = 'active'") == 0
        )
        # Per subscription, the log reads as the one-by-one renewal wrote it.
        histories = conn.execute(
            """select array_agg(concat_ws(':', e.entity_type, e.action, e.new_status, e.reason,
                                          e.details::text) order by e.id)
                 from billing.subscriptions su
                 join billing.billing_periods bp
                   on bp.subscription_id = su.id and bp.period_index = 2
                 join billing.charge_attempts ca on ca.period_id = bp.id
                 join billing.events e on e.entity_id in (su.id, bp.id, ca.id)
                where e.occurred_at > %s
                group by su.id""",
            (START + timedelta(days=1),),
        ).fetchall()
        assert len(histories) == N
        expected = [
            "billing_periods:created:open:renewal",
            'subscriptions:settings_changed:{"current_period_index": 2}',
            "charge_attempts:created:queued:renewal of period 2",
        ]
        assert {tuple(h[0]) for h in histories} == {tuple(expected)}
        expired = conn.execute(
            """select count(*) from billing.events
                where entity_type = 'credit_grants' and action = 'status_changed'
                  and old_status = 'active' and new_status = 'expired'
                  and reason = 'period ended'"""
        ).fetchone()
        assert expired == (N,)
        ledger = conn.execute(
            "select count(*), sum(amount) from billing.credit_entries where kind = 'expire'"
        ).fetchone()
        assert ledger == (N, -10 * N)


def test_tick_works_for_callers_in_one_transaction(rt: Runtime, bunched: str) -> None:
    with psycopg.connect(rt.dsn(bunched, "postgres")) as conn:
        result = _scalar(conn, "select billing.tick()")
        conn.rollback()  # a caller's own transaction: nothing of it stays
        assert isinstance(result, dict)
        assert result["renewals"] == N
        assert "more" not in result
        assert result["steps"]["renew"]["batches"] == -(-N // BATCH)
        assert (
            _scalar(conn, "select count(*) from billing.charge_attempts where status = 'queued'")
            == 0
        )


def test_run_ticks_refuses_to_run_inside_a_transaction(rt: Runtime, bunched: str) -> None:
    with (
        psycopg.connect(rt.dsn(bunched, "postgres")) as conn,
        pytest.raises(psycopg.errors.InvalidTransactionTermination),
    ):
        conn.execute("call billing.run_ticks()")


@pytest.mark.slow
def test_pg_cron_calls_run_ticks_as_its_job(rt: Runtime, bunched: str) -> None:
    with psycopg.connect(rt.dsn("postgres", "postgres"), autocommit=True) as main:
        job = main.execute(
            "select cron.schedule_in_database(%s, '* * * * *', 'call billing.run_ticks()', %s)",
            (f"run-ticks-{bunched}", bunched),
        ).fetchone()
        assert job is not None
        try:
            deadline = time.monotonic() + 150
            status: object = None
            while time.monotonic() < deadline and status is None:
                time.sleep(1)
                status = _scalar(
                    main,
                    f"select max(status) from cron.job_run_details where jobid = {int(job[0])}"  # noqa: S608
                    " and status in ('succeeded', 'failed')",
                )
            details = main.execute(
                "select status, return_message from cron.job_run_details where jobid = %s",
                (job[0],),
            ).fetchall()
        finally:
            main.execute("select cron.unschedule(%s)", (job[0],))
    assert details
    assert details[0][0] == "succeeded", details
    with psycopg.connect(rt.dsn(bunched, "postgres"), autocommit=True) as conn:
        queued = conn.execute(
            "select count(*), count(distinct xmin::text) from billing.charge_attempts"
            " where status = 'queued'"
        ).fetchone()
    assert queued is not None
    assert queued[0] == N
    assert queued[1] >= 1

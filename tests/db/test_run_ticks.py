"""The burst path: billing.run_ticks() (what pg_cron calls) works through a burst in rounds that
each commit, so attempts become claimable while the rest is still being renewed; the renewals
written in sets leave the same audit facts per subscription as one by one; and pg_cron 1.4 runs the
procedure as its job (a top-level CALL may commit)."""

from __future__ import annotations

import threading
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


def _scalar(conn: Conn, query: str, params: tuple[object, ...] | None = None) -> object:
    row = conn.execute(query, params).fetchone()
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


def test_renewals_go_first_and_the_steps_after_them_wait(rt: Runtime, bunched: str) -> None:
    with psycopg.connect(rt.dsn(bunched, "postgres")) as conn:
        # A zero budget: each due step does exactly one batch per round.
        rounds = [
            _scalar(conn, "select billing.tick_run(interval '0 seconds', false)") for _ in range(3)
        ]
        conn.rollback()
    steps = [r["steps"] for r in rounds if isinstance(r, dict)]
    assert [s["renew"]["rows"] for s in steps] == [BATCH, BATCH, N - 2 * BATCH]
    # Renewals were left over after the first two rounds: the credits of the same subscribers,
    # due at the same instant, waited; the round that finished the renewals expired a batch.
    deferred = {"rows": 0, "batches": 0, "ms": 0, "deferred": True}
    assert [s["expireCredits"] for s in steps[:2]] == [deferred, deferred]
    assert steps[2]["expireCredits"]["rows"] == BATCH
    assert all(isinstance(r, dict) and r["more"] for r in rounds)


def test_the_second_renewer_and_the_tick_share_a_burst(rt: Runtime, bunched: str) -> None:
    """pg_cron starts both at the minute: each takes due subscriptions the other has not locked."""
    errors: list[BaseException] = []

    def call(procedure: str) -> None:
        try:
            with psycopg.connect(rt.dsn(bunched, "postgres"), autocommit=True) as c:
                c.execute(f"call billing.{procedure}()")
        except BaseException as exc:  # reported below, in the test's thread
            errors.append(exc)

    threads = [threading.Thread(target=call, args=(p,)) for p in ("run_ticks", "run_renewals")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    with psycopg.connect(rt.dsn(bunched, "postgres"), autocommit=True) as conn:
        renewed = conn.execute(
            """select count(*), count(distinct ca.subscription_id), count(distinct bp.id)
                 from billing.charge_attempts ca
                 join billing.billing_periods bp on bp.id = ca.period_id and bp.period_index = 2
                where ca.status = 'queued'"""
        ).fetchone()
        # Every subscriber renewed once: one new period and one attempt each.
        assert renewed == (N, N, N)
        assert (
            _scalar(conn, "select count(*) from billing.billing_periods where period_index = 2")
            == N
        )
        # The tick went on to the credits once the renewals were done.
        assert (
            _scalar(conn, "select count(*) from billing.credit_grants where status = 'active'") == 0
        )


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


# --- The idle minute: the stored horizon instead of the probe ------------------------------------

QUIET_N = 20


@pytest.fixture
def quiet(rt: Runtime, template: str) -> Iterator[Conn]:
    """QUIET_N subscribers a day into their first month, their welcome notifications delivered:
    nothing is due until the first renewal."""
    name = testdb.clone(rt, template)
    try:
        with psycopg.connect(rt.dsn(name, ADMIN_USER), autocommit=True) as admin:
            admin.execute("select billing.enable_test_clock()")
            loader.load_subscribers(admin, QUIET_N, START, timedelta(hours=1), prefix="q-")
            admin.execute("select billing.set_test_clock(%s)", (START + timedelta(days=1),))
            admin.execute(
                "update billing.notifications set delivered_at = billing.now()"
                " where delivered_at is null"
            )
        with psycopg.connect(rt.dsn(name, "postgres"), autocommit=True) as conn:
            yield conn
    finally:
        testdb.drop(rt, name)


def _wakeup(conn: Conn) -> tuple[int, object, bool]:
    """The generation, the horizon (None for -infinity: now) and whether a tick would sleep."""
    row = conn.execute(
        """select w.generation, nullif(w.next_at, '-infinity'), billing.tick_asleep(billing.now())
             from billing.tick_wakeup w"""
    ).fetchone()
    assert row is not None
    return int(row[0]), row[1], bool(row[2])  # type: ignore[call-overload]


def _settle(conn: Conn) -> tuple[int, object]:
    """Full ticks until one stores a horizon. A transaction of another database that holds an id
    while the horizon is read keeps it at -infinity (the test cluster is shared), so a few tries."""
    for _ in range(50):
        conn.execute("call billing.run_ticks()")
        generation, next_at, asleep = _wakeup(conn)
        if asleep:
            return generation, next_at
        time.sleep(0.1)
    raise AssertionError("the tick never stored a horizon")


def test_an_idle_minute_reads_the_horizon_and_the_first_due_renewal_wakes_it(quiet: Conn) -> None:
    generation, next_at = _settle(quiet)
    first_due = _scalar(
        quiet,
        """select least(min(su.current_period_ends_at), min(cg.expires_at))
             from billing.subscriptions su
             join billing.credit_grants cg on cg.subscription_id = su.id and cg.status = 'active'
            where su.status = 'active'""",
    )
    # The horizon is the earliest instant any step has work: the first renewal (and its credits).
    assert next_at == first_due
    assert _scalar(quiet, "select count(*) from billing.tick_signals") == 0
    # An idle minute leaves everything as it was: no new generation, no signal.
    quiet.execute("call billing.run_ticks()")
    assert _wakeup(quiet)[:2] == (generation, next_at)
    idle = _scalar(quiet, "select billing.tick()")
    assert isinstance(idle, dict)
    assert idle["renewals"] == 0
    assert not any(idle["claimable"].values())
    # One microsecond before the horizon it still sleeps; at the horizon the renewal runs.
    quiet.execute("select billing.set_test_clock(%s - interval '1 microsecond')", (next_at,))
    assert _wakeup(quiet)[2] is True
    quiet.execute("select billing.set_test_clock(%s)", (next_at,))
    assert _wakeup(quiet)[2] is False
    quiet.execute("call billing.run_ticks()")
    queued = _scalar(quiet, "select count(*) from billing.charge_attempts where status = 'queued'")
    assert isinstance(queued, int)
    assert queued >= 1


def test_a_write_that_brings_work_due_wakes_the_next_tick(quiet: Conn) -> None:
    _settle(quiet)
    # A retry moved to now (as an operator's retry or a decline's schedule would) is claimable.
    attempt = quiet.execute(
        """update billing.charge_attempts set status = 'queued', not_before = billing.now()
            where id = (select id from billing.charge_attempts order by id limit 1)
        returning id"""
    ).fetchone()
    assert attempt is not None
    assert _scalar(quiet, "select count(*) from billing.tick_signals") == 1
    assert _wakeup(quiet)[2] is False
    result = _scalar(quiet, "select billing.tick()")
    assert isinstance(result, dict)
    assert result["claimable"]["attempts"] is True


def test_a_writer_running_while_the_horizon_is_read_keeps_it_at_now(
    rt: Runtime, quiet: Conn
) -> None:
    _settle(quiet)
    with psycopg.connect(rt.dsn(quiet.info.dbname, "postgres")) as writer:
        # Holds a transaction id, as a write whose trigger found an old signal would.
        writer.execute("select pg_current_xact_id()")
        # A full tick runs once the last one is 10 minutes old, whatever the signals say.
        quiet.execute("update billing.tick_wakeup set settled_at = now() - interval '11 minutes'")
        assert _wakeup(quiet)[2] is False
        quiet.execute("call billing.run_ticks()")
        assert _wakeup(quiet)[1:] == (None, False)
        writer.rollback()
    _settle(quiet)


def test_only_the_tick_that_cleared_last_stores_its_horizon(quiet: Conn) -> None:
    first = _scalar(quiet, "select billing.tick_wake()")
    second = _scalar(quiet, "select billing.tick_wake()")
    assert isinstance(first, int)
    assert second == first + 1
    assert _scalar(quiet, "select billing.tick_settle(%s)", (first,)) is None
    assert _scalar(quiet, "select billing.tick_settle(%s)", (second,)) is not None


def test_writes_under_repeatable_read_always_signal(rt: Runtime, quiet: Conn) -> None:
    _settle(quiet)
    quiet.execute("insert into billing.tick_signals default values")
    quiet.execute("update billing.subscriptions set grace_ends_at = null where false")
    with psycopg.connect(rt.dsn(quiet.info.dbname, "postgres")) as conn:
        conn.execute("set transaction isolation level repeatable read")
        conn.execute("update billing.subscriptions set grace_ends_at = null where false")
        conn.execute("update billing.subscriptions set status_reason = status_reason where false")
        conn.commit()
    # Read committed found the signal there and left none; repeatable read left its own; an
    # update of a column no probe reads left nothing.
    assert _scalar(quiet, "select count(*) from billing.tick_signals") == 2

"""``saju-billing bench scale``: billing at N subscribers, in durable mode, timed from the client.

Loads N subscribers with the bulk loader into a database of its own (anchors spread over 30 days
from START, so one day's renewals are N/30), then measures:

* ``idle_tick_ms``: ``call billing.run_ticks()`` with nothing due, each in a new session (as pg_cron
  runs it), after the first idle minute stored the horizon; median of the runs. Beside it: that
  first minute (it probes every table) and ``select billing.tick()``'s probe while writes are
  signalled.
* ``api_call_ms``: each ``api.*`` function as a signed-in subscriber; the slowest function's median.
* ``due_to_attempts_s``: one day's renewals due at once; pg_cron's two calls each minute
  (``billing.run_ticks()`` and ``billing.run_renewals()``, at once) until every one of them is a
  claimable attempt, timed from the first minute's start.
* ``steady_tick_ms``: the clock moved a minute at a time after that, each tick renewing what a
  minute brings; median.
* ``db_ms_per_charge``: the burst's attempts claimed (batches of 50) and recorded as approved by
  one worker straight through the service's SQL calls (``service/db.py``; no Toss): database time
  per charge from ``pg_stat_statements`` (the claims' and records' execution time over charges).
* ``db_charges_per_s``: the same with four workers at once, charges per second of wall time.

``idle_tick_ms`` is taken with the loaded subscribers' welcome notifications delivered (as the
service would have delivered them), so nothing is claimable; the tick that rings the doorbell for
them is reported beside it. Before the measurements the database is vacuumed, analyzed and
checkpointed (``_settle``), as autovacuum keeps a product that grew to this size. The next day's
burst is also timed through ``select billing.tick()`` alone (one transaction a minute, for callers
that want one), as ``detail.tick_burst``.

Times include the loopback round trip. Results go to ``bench-results/scale.json`` and a readable
``bench-results/scale.txt``.
"""

from __future__ import annotations

import contextlib
import json
import statistics
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql
from psycopg.rows import TupleRow

from service import db
from service.bench import harness, loader
from service.runtime import testdb
from service.runtime.cluster import ADMIN_USER, Runtime

START = datetime(2028, 1, 1, 0, 0, tzinfo=UTC)
SPREAD = timedelta(days=30)
CRON_INTERVAL_S = 60.0
API_CALLS = (
    "api.my_subscription()",
    "api.my_payments()",
    "api.my_credits()",
    "api.consume_credit('bench')",
    "api.cancel_subscription()",
    "api.resume_subscription()",
    "api.begin_registration('pro')",
)
SETTINGS = (
    "fsync",
    "synchronous_commit",
    "full_page_writes",
    "shared_buffers",
    "work_mem",
    "effective_cache_size",
    "max_connections",
    "wal_level",
    "shared_preload_libraries",
)
TABLES = (
    "subscriptions",
    "billing_periods",
    "charge_attempts",
    "payments",
    "credit_grants",
    "notifications",
    "events",
)

Conn = psycopg.Connection[TupleRow]
CHARGE_BATCH = 50
WORKERS = 4
SERVICE_ROLE = "billing_service"


def _ms(seconds: float) -> float:
    return round(seconds * 1000, 3)


def _timed(run: Callable[[], object]) -> float:
    started = time.perf_counter()
    run()
    return time.perf_counter() - started


def _scalar(conn: Conn, query: str, params: Any = None) -> Any:
    row = conn.execute(query, params).fetchone()
    return None if row is None else row[0]


def _tick(conn: Conn) -> tuple[float, dict[str, Any]]:
    started = time.perf_counter()
    result: dict[str, Any] = _scalar(conn, "select billing.tick()")
    return time.perf_counter() - started, result


def _idle_ticks(rt: Runtime, dbname: str, runs: int) -> list[float]:
    times = []
    for _ in range(runs):
        with psycopg.connect(rt.dsn(dbname, "postgres"), autocommit=True) as conn:
            elapsed, result = _tick(conn)
            assert result["renewals"] == 0, result
            times.append(elapsed)
    return times


def _api_calls(rt: Runtime, dbname: str, n: int, samples: int) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {call: [] for call in API_CALLS}
    with psycopg.connect(rt.dsn(dbname, "postgres")) as conn:
        for k in range(samples):
            sub = loader.user_id("load-", (k * 7919) % n)
            claims = json.dumps({"sub": sub, "role": "authenticated", "email": f"{sub}@x.test"})
            for call in API_CALLS:
                with conn.transaction():
                    conn.execute("set local role authenticated")
                    conn.execute("select set_config('request.jwt.claims', %s, true)", (claims,))
                    started = time.perf_counter()
                    conn.execute(f"select {call}")
                    times[call].append(time.perf_counter() - started)
    return times


def _burst(conn: Conn, at: datetime) -> dict[str, Any]:
    conn.execute("select billing.set_test_clock(%s)", (at,))
    due = _scalar(
        conn,
        """select count(*) from billing.subscriptions
            where status = 'active' and current_period_ends_at <= billing.now()""",
    )
    ticks: list[dict[str, Any]] = []
    while True:
        elapsed, result = _tick(conn)
        ticks.append({"s": round(elapsed, 3), "renewals": result["renewals"]})
        if result["renewals"] == 0:
            break
    working = [t for t in ticks if t["renewals"] > 0]
    renewed = sum(t["renewals"] for t in working)
    last = working[-1]["s"] if working else 0.0
    return {
        "due": due,
        "renewed": renewed,
        "ticks": working,
        "work_s": round(sum(t["s"] for t in working), 3),
        "longest_tick_s": max((t["s"] for t in working), default=0.0),
        # pg_cron starts one tick a minute: the last batch commits (len - 1) minutes after the
        # first tick started, plus its own duration.
        "due_to_attempts_s": round((len(working) - 1) * CRON_INTERVAL_S + last, 3),
        "claimable_attempts": _scalar(
            conn, "select count(*) from billing.charge_attempts where status = 'queued'"
        ),
    }


def _steady(conn: Conn, runs: int) -> tuple[list[float], list[int]]:
    times, renewals = [], []
    for _ in range(runs):
        conn.execute("select billing.advance_test_clock('1 minute')")
        elapsed, result = _tick(conn)
        times.append(elapsed)
        renewals.append(int(result["renewals"]))
    return times, renewals


def _approval(claim: db.ClaimedAttempt, at: datetime) -> dict[str, Any]:
    """The Toss Payment an approval of this claim returns (as the sandbox answers it)."""
    return {
        "paymentKey": f"pk_{claim.order_id}",
        "orderId": claim.order_id,
        "status": "DONE",
        "method": "카드",
        "totalAmount": claim.amount,
        "balanceAmount": claim.amount,
        "approvedAt": at.isoformat(timespec="seconds"),
        "secret": f"ps_{claim.order_id[:20]}",
        "lastTransactionKey": f"tx_{claim.order_id}",
        "receipt": {"url": f"https://receipt.example/{claim.order_id}"},
        "cancels": None,
    }


def _charge(dsn: str, worker: str, limit: int, counts: list[int]) -> None:
    """Claims and records approvals until ``limit`` charges or an empty queue, as the service
    does (its role, autocommit, one call per statement)."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        db.run_sync(conn, db.set_role(SERVICE_ROLE))
        done = 0
        while done < limit:
            claims = db.run_sync(
                conn, db.service_claim_attempts(worker, min(CHARGE_BATCH, limit - done))
            )
            if not claims:
                break
            at = datetime.now(UTC)
            for claim in claims:
                db.run_sync(
                    conn,
                    db.service_record_charge_success(
                        claim.attempt_id, claim.lease_token, _approval(claim, at)
                    ),
                )
            done += len(claims)
        counts.append(done)


def _statements(admin: Conn, dbname: str, charges: int, top: int = 15) -> list[dict[str, Any]]:
    """pg_stat_statements for this database: the costliest statements (nested ones included)."""
    rows = admin.execute(
        """select s.toplevel, s.calls, s.total_exec_time, s.rows,
                  regexp_replace(s.query, '\\s+', ' ', 'g')
             from extensions.pg_stat_statements s
            where s.dbid = (select oid from pg_database where datname = %s)
            order by s.total_exec_time desc
            limit %s""",
        (dbname, top),
    ).fetchall()
    return [
        {
            "toplevel": toplevel,
            "calls": calls,
            "total_ms": round(total, 1),
            "ms_per_charge": round(total / max(charges, 1), 4),
            "rows": n,
            "query": str(query)[:200],
        }
        for toplevel, calls, total, n, query in rows
    ]


def _charge_db_ms(admin: Conn, dbname: str) -> float:
    """Top-level execution time of the claims and the records, in ms."""
    return float(
        _scalar(
            admin,
            """select coalesce(sum(s.total_exec_time), 0) from extensions.pg_stat_statements s
                where s.dbid = (select oid from pg_database where datname = %s) and s.toplevel
                  and (s.query like '%%service_claim_attempts%%'
                       or s.query like '%%service_record_charge_success%%')""",
            (dbname,),
        )
    )


def _charges(rt: Runtime, dbname: str, admin: Conn, workers: int, limit: int) -> dict[str, Any]:
    """``workers`` workers charging up to ``limit`` in all; throughput and database time."""
    admin.execute("select extensions.pg_stat_statements_reset()")
    counts: list[int] = []
    threads = [
        threading.Thread(
            target=_charge,
            args=(rt.dsn(dbname, "postgres"), f"bench-{k}", limit // workers, counts),
        )
        for k in range(workers)
    ]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - started
    charges = sum(counts)
    db_ms = _charge_db_ms(admin, dbname)
    return {
        "workers": workers,
        "batch": CHARGE_BATCH,
        "charges": charges,
        "wall_s": round(wall, 3),
        "charges_per_s": round(charges / wall, 1) if wall else 0.0,
        "db_ms_per_charge": round(db_ms / max(charges, 1), 4),
        "wall_ms_per_charge": round(wall * 1000 * workers / max(charges, 1), 4),
        "statements": _statements(admin, dbname, charges),
    }


def _minute(rt: Runtime, dbname: str, queued: Callable[[], int], target: int) -> dict[str, Any]:
    """One minute of pg_cron: ``call billing.run_ticks()`` and ``call billing.run_renewals()`` in
    two sessions at once; meanwhile ``queued()`` is polled until it reaches ``target``."""
    timings: dict[str, float] = {}
    errors: list[BaseException] = []

    def call(name: str) -> None:
        try:
            with psycopg.connect(rt.dsn(dbname, "postgres"), autocommit=True) as c:
                timings[name] = _timed(lambda: c.execute(f"call billing.{name}()"))
        except BaseException as exc:  # raised again below, in the benchmark's own thread
            errors.append(exc)

    threads = [threading.Thread(target=call, args=(n,)) for n in ("run_ticks", "run_renewals")]
    started = time.perf_counter()
    for t in threads:
        t.start()
    reached: float | None = None
    while any(t.is_alive() for t in threads):
        if reached is None and queued() >= target:
            reached = time.perf_counter() - started
        time.sleep(0.1)
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    if reached is None and queued() >= target:
        reached = max(timings.values())
    return {
        "run_ticks_s": round(timings["run_ticks"], 3),
        "run_renewals_s": round(timings["run_renewals"], 3),
        "claimable_s": None if reached is None else round(reached, 3),
    }


def _run_ticks_burst(rt: Runtime, dbname: str) -> dict[str, Any]:
    """The burst as pg_cron runs it: each minute ``billing.run_ticks()`` and
    ``billing.run_renewals()`` at once, until nothing is due. ``s`` is when every due renewal was a
    claimable attempt (a third session counts them every 100 ms), from the first minute's start at
    pg_cron's cadence; each call's duration includes what follows the renewals (credit expiry)."""
    due_query = """select count(*) from billing.subscriptions
                    where status = 'active' and current_period_ends_at <= billing.now()"""
    queued_query = "select count(*) from billing.charge_attempts where status = 'queued'"
    with psycopg.connect(rt.dsn(dbname, "postgres"), autocommit=True) as conn:
        conn.execute("select billing.set_test_clock(%s)", (START + timedelta(days=32),))
        due = int(_scalar(conn, due_query))
        target = int(_scalar(conn, queued_query)) + due
        calls: list[dict[str, Any]] = []
        claimable_s: float | None = None
        left = due
        while left:
            minute = _minute(rt, dbname, lambda: int(_scalar(conn, queued_query)), target)
            if claimable_s is None and minute["claimable_s"] is not None:
                claimable_s = len(calls) * CRON_INTERVAL_S + minute["claimable_s"]
            left = _scalar(conn, due_query)
            calls.append({**minute, "left": left})
        queued = _scalar(conn, queued_query)
    return {
        "due": due,
        "calls": calls,
        "claimable_attempts": queued,
        "s": round(claimable_s, 3) if claimable_s is not None else 0.0,
    }


def _settle(admin: Conn) -> None:
    """What autovacuum does for a product that grew to this size over years, for one that was
    loaded and updated in bulk a minute ago: every table vacuumed (hint bits and the visibility map
    set, the bulk update's dead rows gone) and analyzed; then a checkpoint, so that each run
    measures from the same point (the first change to a page after it writes the whole page to the
    WAL, as on Supabase)."""
    admin.execute("vacuum (analyze)")
    admin.execute("checkpoint")


def _asleep_after(rt: Runtime, dbname: str) -> list[float]:
    """The first idle minutes after writes: ``call billing.run_ticks()`` in new sessions, each
    probing in full, until one has stored the horizon (a transaction elsewhere in the cluster
    holding an id while it is read keeps it at now)."""
    times: list[float] = []
    while len(times) < 20:
        times += _cold_calls(rt, dbname, "call billing.run_ticks()", runs=1)
        with psycopg.connect(rt.dsn(dbname, "postgres"), autocommit=True) as conn:
            if _scalar(conn, "select billing.tick_asleep(billing.now())"):
                return times
    raise RuntimeError("run_ticks never stored a horizon")


def _cold_calls(rt: Runtime, dbname: str, query: str, runs: int) -> list[float]:
    times = []
    for _ in range(runs):
        with psycopg.connect(rt.dsn(dbname, "postgres"), autocommit=True) as conn:
            times.append(_timed(lambda: conn.execute(query)))
    return times


def _sizes(conn: Conn) -> dict[str, Any]:
    return {
        table: {
            "rows": _scalar(conn, f"select count(*) from billing.{table}"),  # noqa: S608
            "bytes": _scalar(
                conn,
                "select coalesce(sum(pg_total_relation_size(c.oid)), 0)::bigint"
                "  from pg_class c where c.oid = %s::regclass"
                "    or c.oid in (select inhrelid from pg_inherits where inhparent = %s::regclass)",
                (f"billing.{table}", f"billing.{table}"),
            ),
        }
        for table in TABLES
    }


def _median_ms(values: list[float]) -> float:
    return _ms(statistics.median(values))


def run(
    subscriptions: int, out_dir: Path, keep: bool = False, runtime: Runtime | None = None
) -> dict[str, Any]:
    """Runs the benchmark; returns the results (also written to ``out_dir``). ``runtime``: a
    cluster to run on as it is (the tests' own, at a tiny size), instead of the durable one."""
    with contextlib.nullcontext(runtime) if runtime else harness.bench_runtime(durable=True) as rt:
        results = _run(rt, subscriptions, keep)
    harness.write(out_dir, "scale", results, table)
    return results


def _run(rt: Runtime, subscriptions: int, keep: bool) -> dict[str, Any]:
    dbname = testdb.clone(rt, testdb.migrated_template(rt), prefix="bench")
    charges_one = max(100, min(2_000, subscriptions // 50))
    try:
        with psycopg.connect(rt.dsn(dbname, ADMIN_USER), autocommit=True) as admin:
            admin.execute("select billing.enable_test_clock()")
            admin.execute("select billing.set_test_clock(%s)", (START,))
            load_s = _timed(
                lambda: loader.load_subscribers(admin, subscriptions, START, SPREAD, "load-")
            )
            # Per-statement costs, nested statements included, for every later session.
            admin.execute("create extension if not exists pg_stat_statements schema extensions")
            admin.execute(
                sql.SQL("alter database {} set pg_stat_statements.track = 'all'").format(
                    sql.Identifier(dbname)
                )
            )
            with psycopg.connect(rt.dsn(dbname, "postgres"), autocommit=True) as conn:
                conn.execute("select billing.set_test_clock(%s)", (START + SPREAD,))
                environment = harness.environment(conn, rt, SETTINGS)
                _tick(conn)  # the clock jump's own catch-up (registrations, notifications)
                ringing = _idle_ticks(rt, dbname, runs=5)
                # The welcome notifications, delivered as the service would have delivered them.
                admin.execute(
                    "update billing.notifications set delivered_at = billing.now()"
                    " where delivered_at is null"
                )
                settle_s = _timed(lambda: _settle(admin))
                probed = _idle_ticks(rt, dbname, runs=10)
                waking = _asleep_after(rt, dbname)
                idle = _cold_calls(rt, dbname, "call billing.run_ticks()", runs=10)
                api = _api_calls(rt, dbname, subscriptions, samples=20)
                burst = _run_ticks_burst(rt, dbname)
                one = _charges(rt, dbname, admin, workers=1, limit=charges_one)
                four = _charges(rt, dbname, admin, workers=WORKERS, limit=charges_one * WORKERS)
                # The next day's burst through billing.tick() (one transaction a minute).
                tick_burst = _burst(conn, START + timedelta(days=33))
                steady, steady_renewals = _steady(conn, runs=10)
                sizes = _sizes(conn)
        api_medians = {call: _median_ms(times) for call, times in api.items()}
        results: dict[str, Any] = {
            "benchmark": "scale",
            "at": datetime.now(UTC).isoformat(timespec="seconds"),
            "subscriptions": subscriptions,
            "figures": {
                "api_call_ms": max(api_medians.values()),
                "steady_tick_ms": _median_ms(steady),
                "idle_tick_ms": _median_ms(idle),
                "due_to_attempts_s": burst["s"],
                "db_ms_per_charge": one["db_ms_per_charge"],
                "db_charges_per_s": four["charges_per_s"],
            },
            "detail": {
                "load_s": round(load_s, 1),
                "settle_s": round(settle_s, 1),
                "api_call_ms_median": api_medians,
                "api_call_ms_max": {call: _ms(max(times)) for call, times in api.items()},
                "idle_tick_ms_runs": [_ms(t) for t in idle],
                "idle_probe_ms_runs": [_ms(t) for t in probed],
                "idle_waking_ms_runs": [_ms(t) for t in waking],
                "idle_tick_ringing_ms_runs": [_ms(t) for t in ringing],
                "steady_tick_ms_runs": [_ms(t) for t in steady],
                "steady_tick_renewals": steady_renewals,
                "burst": burst,
                "tick_burst": tick_burst,
                "charges_1_worker": one,
                "charges_4_workers": four,
                "sizes": sizes,
            },
            **environment,
        }
    finally:
        if not keep:
            testdb.drop(rt, dbname)
    return results


def table(results: dict[str, Any]) -> str:
    """The figures as a readable table."""
    figures = results["figures"]
    detail = results["detail"]
    burst, tick_burst = detail["burst"], detail["tick_burst"]
    four = detail["charges_4_workers"]
    rows = [
        ("subscriptions", f"{results['subscriptions']:,}"),
        ("api_call_ms (slowest api.* median)", f"{figures['api_call_ms']:.3f}"),
        ("idle_tick_ms (new session, median)", f"{figures['idle_tick_ms']:.3f}"),
        ("  first idle minute after writes (probes)", f"{detail['idle_waking_ms_runs'][0]:.3f}"),
        (
            "  select billing.tick() after writes (median)",
            f"{statistics.median(detail['idle_probe_ms_runs']):.3f}",
        ),
        ("steady_tick_ms (median)", f"{figures['steady_tick_ms']:.3f}"),
        ("due_to_attempts_s (one day's renewals)", f"{figures['due_to_attempts_s']:.3f}"),
        ("  renewals due / pg_cron minutes", f"{burst['due']:,} / {len(burst['calls'])}"),
        (
            "  next day by billing.tick(): ticks / work / longest (s)",
            f"{len(tick_burst['ticks'])} / {tick_burst['work_s']} / {tick_burst['longest_tick_s']}",
        ),
        ("db_ms_per_charge (1 worker, batch 50)", f"{figures['db_ms_per_charge']:.3f}"),
        ("db_charges_per_s (4 workers)", f"{figures['db_charges_per_s']:.1f}"),
        ("  db_ms_per_charge at 4 workers", f"{four['db_ms_per_charge']:.3f}"),
        ("load (s)", f"{detail['load_s']}"),
        ("settle: vacuum, analyze, checkpoint (s)", f"{detail.get('settle_s', '-')}"),
        (
            "load average (1, 5, 15 min)",
            " ".join(str(x) for x in results["load_average_before"]),
        ),
        ("durable mode", str(results["durable_mode"])),
        ("compute size", str(results.get("compute", "local"))),
        ("postgres", str(results["postgres"]).split(" on ")[0]),
    ]
    rows += [(f"  {call}", f"{ms:.3f}") for call, ms in detail["api_call_ms_median"].items()]
    width = max(len(name) for name, _ in rows)
    return "".join(f"{name.ljust(width)}  {value}\n" for name, value in rows)

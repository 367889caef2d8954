"""Plan shapes at a size where a missing index shows: 20,000 subscribers loaded as the real path
leaves them, a day's burst of renewals, and backlogs in every work queue. Each statement runs inside
its real function with auto_explain reporting every nested statement's plan to this session; no
plan may read a big table sequentially or sort more than a batch: as plpgsql's plan cache chooses
(custom plans, generic after five calls when cheaper), and for the scheduler also forced generic."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import psycopg
import pytest
from dbkit import kst
from psycopg.types.json import Jsonb

from service.bench import loader
from service.runtime import testdb
from service.runtime.cluster import ADMIN_USER, Runtime

N = 20_000
START = kst(2028, 1, 1, 9, 0)
SPREAD = timedelta(days=30)
BACKLOG = 2_000
# Tables that grow with subscribers or time (events: its partitions).
BIG = {
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
    "webhook_events",
    "key_deletions",
    "notifications",
}
LARGEST_SORT = 500  # a tick batch; claims hand out at most 100
# The other queues: a backlog of ready work among many finished rows (setup data, inserted
# directly).
BACKLOGS = """
insert into billing.refunds (payment_id, user_id, amount, reason, source, requested_by, not_before,
                             status, toss_transaction_key)
select p.id, p.user_id, 1000, 'refund', 'operator', 'postgres', p.approved_at,
       (case when n <= %(backlog)s then 'requested' else 'succeeded' end)::billing.refund_status,
       case when n > %(backlog)s then 'tk-' || n end
  from (select p.*, row_number() over (order by p.approved_at) n from billing.payments p) p;
insert into billing.webhook_events (transmission_id, event_type, payload, not_before, status)
select 'tx-' || g, 'PAYMENT_STATUS_CHANGED', '{}', %(start)s,
       (case when g <= %(backlog)s then 'received' else 'processed' end)::billing.webhook_status
  from generate_series(1, %(n)s) g;
insert into billing.key_deletions (payment_method_id, reason, not_before, status, deleted_at)
select pm.id, 'ended', pm.created_at,
       (case when n <= %(backlog)s then 'requested' else 'deleted' end)
         ::billing.key_deletion_status,
       case when n > %(backlog)s then pm.created_at end
  from (select pm.*, row_number() over (order by pm.created_at) n
          from billing.payment_methods pm) pm;
analyze billing.refunds, billing.webhook_events, billing.key_deletions;
"""


@dataclass
class Plans:
    """Collects the plans auto_explain sends as notices."""

    seen: list[dict[str, Any]] = field(default_factory=list)

    def __call__(self, diag: psycopg.errors.Diagnostic) -> None:
        message = diag.message_primary or ""
        if "plan:" in message:
            self.seen.append(json.loads(message[message.index("{") :]))


def nodes(plan: dict[str, Any]) -> Iterator[dict[str, Any]]:
    yield plan
    for child in plan.get("Plans", []):
        yield from nodes(child)


def is_big(relation: str) -> bool:
    return relation in BIG or relation.startswith("events_")


def problems(seen: list[dict[str, Any]]) -> list[str]:
    out = []
    for entry in seen:
        for node in nodes(entry["Plan"]):
            kind = node["Node Type"]
            if kind == "Seq Scan" and is_big(node["Relation Name"]):
                out.append(f"Seq Scan on {node['Relation Name']}: {entry['Query Text'][:300]}")
            # A sort of a statement's own rows (the audit triggers' transition tables) is as
            # large as the statement; only a sort over a big table's rows is a problem.
            reads_big = any(is_big(n.get("Relation Name", "")) for n in nodes(node))
            too_big = node.get("Plan Rows", 0) > LARGEST_SORT and reads_big
            if kind in ("Sort", "Incremental Sort") and too_big:
                out.append(f"{kind} of {node['Plan Rows']} rows: {entry['Query Text'][:300]}")
    return out


@dataclass
class Big:
    conn: psycopg.Connection[tuple[Any, ...]]
    plans: Plans

    def explained(self, run: Callable[[], object], generic: bool) -> list[dict[str, Any]]:
        """Runs ``run`` with every nested statement's plan collected; returns the plans."""
        # auto: plpgsql's own choice (custom plans first, generic after five calls if cheaper).
        self.conn.execute("set plan_cache_mode = " + ("force_generic_plan" if generic else "auto"))
        self.plans.seen.clear()
        self.conn.execute("set auto_explain.log_min_duration = 0")
        try:
            run()
        finally:
            self.conn.execute("set auto_explain.log_min_duration = -1")
        return list(self.plans.seen)

    def as_user(self, sub: str, call: str, *args: object) -> object:
        with self.conn.transaction():
            self.conn.execute("set local role authenticated")
            self.conn.execute(
                "select set_config('request.jwt.claims', %s, true)",
                (json.dumps({"sub": sub, "role": "authenticated", "email": f"{sub}@x.test"}),),
            )
            row = self.conn.execute(f"select {call}", args).fetchone()
        return row[0] if row else None

    def as_service(self, call: str, *args: object) -> list[tuple[Any, ...]]:
        with self.conn.transaction():
            self.conn.execute("set local role billing_service")
            return self.conn.execute(f"select * from {call}", args).fetchall()  # noqa: S608


@pytest.fixture(scope="module")
def big(rt: Runtime, template: str) -> Iterator[Big]:
    name = testdb.clone(rt, template)
    try:
        with psycopg.connect(rt.dsn(name, ADMIN_USER), autocommit=True) as conn:
            conn.execute("select billing.enable_test_clock()")
            loader.load_subscribers(conn, N, START, SPREAD, prefix="big-")
            params = {"n": N, "backlog": BACKLOG, "start": START}
            psycopg.ClientCursor(conn).execute(BACKLOGS, params)
            conn.execute("load 'auto_explain'")
            for setting in (
                "auto_explain.log_nested_statements = on",
                "auto_explain.log_format = json",
                "auto_explain.log_level = notice",
                "auto_explain.log_min_duration = -1",
                "client_min_messages = notice",
            ):
                conn.execute(f"set {setting}")
            plans = Plans()
            conn.add_notice_handler(plans)
            yield Big(conn, plans)
    finally:
        testdb.drop(rt, name)


def test_subscriber_calls_find_rows_by_user(big: Big) -> None:
    """Seven subscribers in one session, so plpgsql's plan cache makes its own choice."""
    seen = big.explained(
        lambda: [
            (
                big.as_user(sub, "api.my_subscription()"),
                big.as_user(sub, "api.my_payments()"),
                big.as_user(sub, "api.my_credits()"),
                big.as_user(sub, "api.consume_credit(%s)", "a reading"),
                big.as_user(sub, "api.cancel_subscription()"),
                big.as_user(sub, "api.resume_subscription()"),
                big.as_user(sub, "api.begin_registration('pro')"),
            )
            for sub in [f"big-{i}" for i in range(100, 107)]
        ],
        generic=False,
    )
    assert len(seen) > 7 * 7
    assert problems(seen) == []


@pytest.mark.parametrize("generic", [False, True], ids=["custom", "generic"])
def test_a_days_burst_of_renewals_and_an_idle_tick_read_only_what_is_due(
    big: Big, generic: bool
) -> None:
    # The first run brings the first day's subscribers due; the second, the next day's.
    day = 1 if not generic else 2
    big.conn.execute(
        "select billing.set_test_clock(%s)", (START + timedelta(days=31 + day, minutes=1),)
    )
    due = big.conn.execute(
        """select count(*) from billing.subscriptions
            where status = 'active' and current_period_ends_at <= billing.now()
              and current_period_index = 1"""
    ).fetchone()
    assert due is not None
    assert due[0] > 600
    # Five ticks so that plpgsql's plan cache has settled on its choice.
    results: list[dict[str, Any]] = []
    seen = big.explained(
        lambda: results.extend(
            big.conn.execute("select billing.tick()").fetchone()[0]  # type: ignore[index]
            for _ in range(6)
        ),
        generic,
    )
    assert results[0]["renewals"] == due[0]
    assert results[0]["steps"]["renew"]["batches"] == due[0] // 500 + 1
    assert all(r["renewals"] == 0 for r in results[1:])
    assert problems(seen) == []


def test_claims_walk_their_queue_in_order(big: Big) -> None:
    """Six claims per queue in one session, so plpgsql's plan cache makes its own choice."""
    backlog = big.conn.execute(
        "select count(*) from billing.charge_attempts where status = 'queued'"
    ).fetchone()
    assert backlog is not None
    assert backlog[0] > 600  # the renewals above
    big.conn.execute("analyze billing.charge_attempts, billing.notifications")
    claimed: list[int] = []
    seen = big.explained(
        lambda: [
            claimed.append(len(big.as_service(f"billing.{fn}('plan-check', 10)")))
            for fn in (
                "service_claim_attempts",
                "service_claim_refunds",
                "service_claim_webhooks",
                "service_claim_key_deletions",
                "service_claim_notifications",
            )
            for _ in range(6)
        ],
        generic=False,
    )
    assert claimed == [10] * 30
    assert problems(seen) == []


def test_a_full_refund_finds_the_credits_by_payment(big: Big) -> None:
    row = big.conn.execute(
        """select p.raw from billing.payments p
             join billing.credit_grants cg on cg.payment_id = p.id and cg.status = 'active'
            where p.user_id = 'big-19000'"""
    ).fetchone()
    assert row is not None
    refunded = {
        **row[0],
        "status": "CANCELED",
        "balanceAmount": 0,
        "cancels": [
            {
                "transactionKey": "tx-refund-19000",
                "cancelAmount": row[0]["totalAmount"],
                "cancelReason": "refund",
                "canceledAt": "2028-02-01T00:00:00+09:00",
                "cancelStatus": "DONE",
            }
        ],
    }
    results: list[Any] = []
    seen = big.explained(
        lambda: results.append(
            big.as_service("billing.service_apply_payment_snapshot(%s)", Jsonb(refunded))
        ),
        generic=False,
    )
    assert results[0][0][0]["matched"] == "attempt"
    revoked = big.conn.execute(
        "select status::text from billing.credit_grants where user_id = 'big-19000'"
    ).fetchone()
    assert revoked == ("revoked",)
    assert problems(seen) == []


def test_recording_approvals_reads_only_the_charged_rows(big: Big) -> None:
    """Claims and records six approvals in one session (plpgsql's plan cache makes its choice):
    every nested statement of the record path, the audit triggers' included, uses an index."""
    claims = big.as_service("billing.service_claim_attempts('plan-check-record', 6)")
    assert len(claims) == 6
    results: list[tuple[Any, ...]] = []
    seen = big.explained(
        lambda: [
            results.extend(
                big.as_service(
                    "billing.service_record_charge_success(%s, %s, %s)",
                    claim[0],
                    claim[1],
                    Jsonb(
                        {
                            "paymentKey": f"pk_{claim[3]}",
                            "orderId": claim[3],
                            "status": "DONE",
                            "method": "카드",
                            "totalAmount": claim[5],
                            "balanceAmount": claim[5],
                            "approvedAt": "2028-02-03T00:00:00+09:00",
                        }
                    ),
                )
            )
            for claim in claims
        ],
        generic=False,
    )
    assert [(r[1], r[2]) for r in results] == [("succeeded", True)] * 6
    assert all(r[3]["applied"] is True and r[3]["sync"]["stale"] is False for r in results)
    assert problems(seen) == []


def test_billing_never_compiles_its_statements(big: Big) -> None:
    """With JIT on for every plan (jit_above_cost 0), the session's own statements are compiled
    and nothing nested in billing's functions is: a generic plan over a million rows is estimated
    above the default threshold, and compiling it cost more than running it."""
    big.conn.execute("select billing.set_test_clock(%s)", (START + timedelta(days=34, minutes=1),))
    sent = {
        "select billing.tick()",
        "select * from billing.service_claim_attempts('plan-check-jit', 10)",
        "select api.my_subscription()",
        "select api.my_payments()",
        "select set_config('request.jwt.claims', $1, true)",  # as_user's own
    }
    for setting in ("jit = on", "jit_above_cost = 0", "jit_optimize_above_cost = -1"):
        big.conn.execute(f"set {setting}")
    try:
        results: list[Any] = []
        seen = big.explained(
            lambda: results.extend(
                [
                    big.conn.execute("select billing.tick()").fetchone(),
                    big.as_service("billing.service_claim_attempts('plan-check-jit', 10)"),
                    big.as_user("big-200", "api.my_subscription()"),
                    big.as_user("big-200", "api.my_payments()"),
                ]
            ),
            generic=True,
        )
    finally:
        for setting in ("jit", "jit_above_cost", "jit_optimize_above_cost"):
            big.conn.execute(f"reset {setting}")
    assert results[0][0]["renewals"] >= 500  # at least a batch
    assert len(results[1]) == 10
    compiled = {entry["Query Text"] for entry in seen if "JIT" in entry}
    assert compiled & sent, "the session's own statements are compiled"
    assert len(seen) > 20
    assert compiled <= sent


def test_a_cancel_a_resume_and_a_spent_credit_stay_on_their_page(big: Big) -> None:
    """None of these changes an indexed column, so with room on the bulk-loaded page each is a HOT
    update: the row's new version stays on its page and no index gets an entry."""
    sub = "big-18500"  # a day-28 subscriber: no renewal in this module touches it
    # This transaction's own counters (the session's earlier work may share it): before and after.
    counters = """select c.relname, pg_stat_get_xact_tuples_updated(c.oid),
                         pg_stat_get_xact_tuples_hot_updated(c.oid)
                    from pg_class c
                   where c.relnamespace = 'billing'::regnamespace
                     and c.relname in ('subscriptions', 'credit_grants')
                   order by 1"""
    with big.conn.transaction():
        before = big.conn.execute(counters).fetchall()
        big.conn.execute("set local role authenticated")
        big.conn.execute(
            "select set_config('request.jwt.claims', %s, true)",
            (json.dumps({"sub": sub, "role": "authenticated", "email": f"{sub}@x.test"}),),
        )
        big.conn.execute("select api.cancel_subscription()")
        big.conn.execute("select api.resume_subscription()")
        big.conn.execute("select api.consume_credit('a reading')")
        big.conn.execute("reset role")
        after = big.conn.execute(counters).fetchall()
    updates = [(b[0], a[1] - b[1], a[2] - b[2]) for b, a in zip(before, after, strict=True)]
    assert updates == [("credit_grants", 1, 1), ("subscriptions", 2, 2)]

"""The demo report's figures: one named query per figure, read as the database's owner.

Each figure is one function running one SQL statement (the constant of the same name in capitals),
so any of them can later read an ``analytics`` view instead without the rest changing. Months are
calendar months in Asia/Seoul from the first subscription to ``billing.now()`` (the demo's test
clock). Definitions:

* MRR of a month: the amounts of the paid periods covering the month's last instant (``now`` for
  the month still running), leaving out periods whose payment was refunded in full. The same
  instant's count is the paying subscribers.
* new: subscriptions whose first period was paid that month; churned: subscriptions that had paid
  at least once and ended that month; recovered: periods paid that month after at least one failed
  charge attempt (a dunning retry on the same card, or a new card).
* charge success rate: succeeded / (succeeded + declined + failed) over charge attempts (withdrawn
  attempts and duplicates are not outcomes).
* dunning recovery: of the periods with a failed attempt, how many were paid in the end, lost
  (unpaid or void), or are still open; and the mean time from the first failure to the payment.
* invariants, against the Toss sandbox's ledger: periods approved twice, approvals missing from
  ``billing.payments``, attempts left unknown, and the net money at Toss vs the payments' balances.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from datetime import date, datetime
from typing import Any

import psycopg
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb

Row = dict[str, Any]

_MONTHS = """
  with bounds as (
    select date_trunc('month', min(s.created_at) at time zone 'Asia/Seoul') as first_month,
           date_trunc('month', billing.now() at time zone 'Asia/Seoul') as last_month
      from billing.subscriptions s
  ), months as (
    select m::date as month,
           m at time zone 'Asia/Seoul' as starts_at,
           (m + interval '1 month') at time zone 'Asia/Seoul' as ends_at,
           least((m + interval '1 month') at time zone 'Asia/Seoul', billing.now()) as snapshot_at
      from bounds, generate_series(bounds.first_month, bounds.last_month, interval '1 month') m
  )
"""

# The month queries share the month series; every part is a constant.
MRR_BY_MONTH = (
    _MONTHS  # noqa: S608
    + """
  select mo.month, coalesce(sum(bp.amount), 0)::bigint as mrr,
         count(bp.id)::integer as paying
    from months mo
    left join billing.billing_periods bp
      on bp.status = 'paid' and bp.starts_at <= mo.snapshot_at and bp.ends_at > mo.snapshot_at
     and not exists (select 1 from billing.payments p
                      where p.id = bp.payment_id and p.balance_amount = 0)
   group by mo.month
   order by mo.month
"""
)

MOVEMENTS_BY_MONTH = (
    _MONTHS  # noqa: S608
    + """
  , firsts as (
    select bp.subscription_id, min(bp.paid_at) as first_paid_at
      from billing.billing_periods bp where bp.status = 'paid' group by bp.subscription_id
  ), recovered as (
    select bp.paid_at from billing.billing_periods bp
     where bp.status = 'paid'
       and exists (select 1 from billing.charge_attempts ca
                    where ca.period_id = bp.id and ca.status in ('declined', 'failed'))
  )
  select mo.month,
         (select count(*) from firsts f
           where f.first_paid_at >= mo.starts_at and f.first_paid_at < mo.ends_at)::integer as new,
         (select count(*) from billing.subscriptions s join firsts f on f.subscription_id = s.id
           where s.ended_at >= mo.starts_at and s.ended_at < mo.ends_at)::integer as churned,
         (select count(*) from recovered r
           where r.paid_at >= mo.starts_at and r.paid_at < mo.ends_at)::integer as recovered
    from months mo
   order by mo.month
"""
)

SUBSCRIBERS_BY_STATUS = """
  select s.status::text as status, count(*)::integer as subscriptions
    from billing.subscriptions s
   group by s.status
   order by s.status
"""

CHARGE_OUTCOMES_BY_MONTH = (
    _MONTHS  # noqa: S608
    + """
  select mo.month,
         count(ca.id) filter (where ca.status = 'succeeded')::integer as succeeded,
         count(ca.id) filter (where ca.status = 'declined')::integer as declined,
         count(ca.id) filter (where ca.status = 'failed')::integer as failed
    from months mo
    left join billing.charge_attempts ca
      on ca.resolved_at >= mo.starts_at and ca.resolved_at < mo.ends_at
     and ca.status in ('succeeded', 'declined', 'failed')
   group by mo.month
   order by mo.month
"""
)

DECLINE_REASONS = """
  select ca.error_code as code, ca.classification::text as classification,
         count(*)::integer as attempts
    from billing.charge_attempts ca
   where ca.status in ('declined', 'failed')
   group by ca.error_code, ca.classification
   order by attempts desc, code
"""

DUNNING_RECOVERY = """
  with troubled as (
    select bp.id, bp.status, bp.paid_at,
           (select min(ca.resolved_at) from billing.charge_attempts ca
             where ca.period_id = bp.id and ca.status in ('declined', 'failed')) as first_failure_at
      from billing.billing_periods bp
     where exists (select 1 from billing.charge_attempts ca
                    where ca.period_id = bp.id and ca.status in ('declined', 'failed'))
  )
  select count(*)::integer as periods,
         count(*) filter (where t.status = 'paid')::integer as recovered,
         count(*) filter (where t.status in ('unpaid', 'void'))::integer as lost,
         count(*) filter (where t.status = 'open')::integer as in_progress,
         coalesce(avg(extract(epoch from t.paid_at - t.first_failure_at) / 86400.0)
                    filter (where t.status = 'paid'), 0)::float8 as mean_days_to_recover
    from troubled t
"""

REVENUE_BY_MONTH = (
    _MONTHS  # noqa: S608
    + """
  select mo.month,
         (select coalesce(sum(p.total_amount), 0) from billing.billing_periods bp
            join billing.payments p on p.id = bp.payment_id
           where bp.status = 'paid' and bp.paid_at >= mo.starts_at and bp.paid_at < mo.ends_at
         )::bigint as gross,
         (select coalesce(sum(r.amount), 0) from billing.refunds r
           where r.status = 'succeeded'
             and r.created_at >= mo.starts_at and r.created_at < mo.ends_at)::bigint as refunded
    from months mo
   order by mo.month
"""
)

REFUNDS = """
  select count(*)::integer as requested,
         count(*) filter (where r.status = 'succeeded')::integer as succeeded,
         count(*) filter (where r.status = 'failed')::integer as failed,
         count(*) filter (where r.status = 'succeeded' and r.amount = p.total_amount)::integer
           as full,
         count(*) filter (where r.status = 'succeeded' and r.amount < p.total_amount)::integer
           as partial,
         coalesce(sum(r.amount) filter (where r.status = 'succeeded'), 0)::bigint as amount
    from billing.refunds r
    join billing.payments p on p.id = r.payment_id
"""

CREDITS = """
  select coalesce(sum(e.amount) filter (where e.kind = 'grant'), 0)::bigint as granted,
         coalesce(-sum(e.amount) filter (where e.kind = 'consume'), 0)::bigint as used,
         coalesce(-sum(e.amount) filter (where e.kind = 'expire'), 0)::bigint as expired,
         coalesce(-sum(e.amount) filter (where e.kind = 'revoke'), 0)::bigint as revoked
    from billing.credit_entries e
"""

# The sandbox's ledger arrives as a JSON array of {kind, orderId, paymentKey, amount}.
INVARIANTS = """
  with ledger as (
    select * from jsonb_to_recordset(%(ledger)s::jsonb)
      as l(kind text, "orderId" text, "paymentKey" text, amount bigint)
  )
  select
    (select count(*) from (
       select ca.period_id from ledger l
         join billing.charge_attempts ca on ca.order_id = l."orderId"
        where l.kind = 'approval' group by ca.period_id having count(*) > 1) twice
    )::integer as periods_charged_twice,
    (select count(*) from ledger l
      where l.kind = 'approval'
        and not exists (select 1 from billing.payments p where p.payment_key = l."paymentKey")
    )::integer as approvals_missing,
    (select count(*) from billing.charge_attempts ca where ca.status = 'unknown')::integer
      as attempts_unknown,
    ((select coalesce(sum(case when l.kind = 'approval' then l.amount else -l.amount end), 0)
        from ledger l)
     - (select coalesce(sum(p.balance_amount), 0) from billing.payments p))::bigint
      as money_difference
"""

SIMULATED_SPAN = """
  select (select min(s.created_at) from billing.subscriptions s) as started_at,
         billing.now() as ended_at,
         (select count(*) from billing.customers)::integer as customers,
         (select count(*) from billing.charge_attempts)::integer as attempts,
         (select count(*) from billing.webhook_events)::integer as webhooks
"""


def _rows(conn: psycopg.Connection[Any], query: str, params: Any = None) -> list[Row]:
    with conn.cursor(row_factory=dict_row) as cur:
        cur.execute(query.encode(), params)
        return cur.fetchall()


@dataclass(frozen=True, slots=True)
class MonthMrr:
    month: date
    mrr: int
    paying: int


@dataclass(frozen=True, slots=True)
class MonthMovements:
    month: date
    new: int
    churned: int
    recovered: int


@dataclass(frozen=True, slots=True)
class MonthCharges:
    month: date
    succeeded: int
    declined: int
    failed: int


@dataclass(frozen=True, slots=True)
class DeclineReason:
    code: str
    classification: str
    attempts: int


@dataclass(frozen=True, slots=True)
class DunningRecovery:
    periods: int
    recovered: int
    lost: int
    in_progress: int
    mean_days_to_recover: float


@dataclass(frozen=True, slots=True)
class MonthRevenue:
    month: date
    gross: int
    refunded: int


@dataclass(frozen=True, slots=True)
class Refunds:
    requested: int
    succeeded: int
    failed: int
    full: int
    partial: int
    amount: int


@dataclass(frozen=True, slots=True)
class Credits:
    granted: int
    used: int
    expired: int
    revoked: int


@dataclass(frozen=True, slots=True)
class Invariants:
    periods_charged_twice: int
    approvals_missing: int
    attempts_unknown: int
    money_difference: int

    @property
    def ok(self) -> bool:
        return not any(asdict(self).values())


@dataclass(frozen=True, slots=True)
class Span:
    started_at: datetime
    ended_at: datetime
    customers: int
    attempts: int
    webhooks: int


def mrr_by_month(conn: psycopg.Connection[Any]) -> list[MonthMrr]:
    return [MonthMrr(**r) for r in _rows(conn, MRR_BY_MONTH)]


def movements_by_month(conn: psycopg.Connection[Any]) -> list[MonthMovements]:
    return [MonthMovements(**r) for r in _rows(conn, MOVEMENTS_BY_MONTH)]


def subscribers_by_status(conn: psycopg.Connection[Any]) -> dict[str, int]:
    return {r["status"]: r["subscriptions"] for r in _rows(conn, SUBSCRIBERS_BY_STATUS)}


def charge_outcomes_by_month(conn: psycopg.Connection[Any]) -> list[MonthCharges]:
    return [MonthCharges(**r) for r in _rows(conn, CHARGE_OUTCOMES_BY_MONTH)]


def decline_reasons(conn: psycopg.Connection[Any]) -> list[DeclineReason]:
    return [DeclineReason(**r) for r in _rows(conn, DECLINE_REASONS)]


def dunning_recovery(conn: psycopg.Connection[Any]) -> DunningRecovery:
    return DunningRecovery(**_rows(conn, DUNNING_RECOVERY)[0])


def revenue_by_month(conn: psycopg.Connection[Any]) -> list[MonthRevenue]:
    return [MonthRevenue(**r) for r in _rows(conn, REVENUE_BY_MONTH)]


def refunds(conn: psycopg.Connection[Any]) -> Refunds:
    return Refunds(**_rows(conn, REFUNDS)[0])


def credits(conn: psycopg.Connection[Any]) -> Credits:
    return Credits(**_rows(conn, CREDITS)[0])


def invariants(conn: psycopg.Connection[Any], ledger: list[dict[str, Any]]) -> Invariants:
    """Checks against the Toss sandbox's ledger (entries without billing keys)."""
    slim = [{k: e.get(k) for k in ("kind", "orderId", "paymentKey", "amount")} for e in ledger]
    return Invariants(**_rows(conn, INVARIANTS, {"ledger": Jsonb(slim)})[0])


def span(conn: psycopg.Connection[Any]) -> Span:
    return Span(**_rows(conn, SIMULATED_SPAN)[0])


@dataclass(frozen=True, slots=True)
class Report:
    span: Span
    mrr: list[MonthMrr]
    movements: list[MonthMovements]
    statuses: dict[str, int]
    charges: list[MonthCharges]
    declines: list[DeclineReason]
    dunning: DunningRecovery
    revenue: list[MonthRevenue]
    refunds: Refunds
    credits: Credits
    invariants: Invariants

    @property
    def success_rate(self) -> float:
        ok = sum(m.succeeded for m in self.charges)
        total = ok + sum(m.declined + m.failed for m in self.charges)
        return ok / total if total else 0.0

    def to_json(self) -> str:
        return json.dumps(asdict(self), default=str, indent=2, ensure_ascii=False)


def build(conn: psycopg.Connection[Any], ledger: list[dict[str, Any]]) -> Report:
    """Every figure, read in one snapshot."""
    with conn.transaction():
        conn.execute("set transaction isolation level repeatable read, read only")
        return Report(
            span=span(conn),
            mrr=mrr_by_month(conn),
            movements=movements_by_month(conn),
            statuses=subscribers_by_status(conn),
            charges=charge_outcomes_by_month(conn),
            declines=decline_reasons(conn),
            dunning=dunning_recovery(conn),
            revenue=revenue_by_month(conn),
            refunds=refunds(conn),
            credits=credits(conn),
            invariants=invariants(conn, ledger),
        )

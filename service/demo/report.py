"""The demo report's figures: read from the ``analytics`` views as the ``analyst`` role reads them.

Every figure is one named query over one view (the constant of the same name in capitals), run
after ``SET LOCAL ROLE analyst`` so the report can see nothing an analyst cannot; the definitions
(what counts as churn, how a refund changes MRR, …) are the views' own, kept as their comments
(``\\d+ analytics.mrr_by_month`` in psql). A query only orders the view's rows or sums them over
months; totals across rows (success rate, recovery rate) are computed here from those rows.

The invariants are not analytics: they compare the Toss sandbox's ledger with the billing tables,
so they are read first, as the owner, in the same snapshot.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from datetime import date, datetime
from decimal import Decimal
from typing import Any

import psycopg
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb

Row = dict[str, Any]
ANALYST = "analyst"

CLOCK = """
  select (select min(d.day) from analytics.calendar_days d) as started_on,
         clk.as_of
    from analytics.clock clk
"""

MRR_BY_MONTH = """
  select month, measured_at, paying_subscriptions, mrr, arr
    from analytics.mrr_by_month order by month
"""

MOVEMENTS_BY_MONTH = """
  select month, new_subscriptions, reactivated, churned, churned_voluntary, churned_involuntary,
         net_change
    from analytics.subscription_movements_by_month order by month
"""

SUBSCRIBERS_BY_STATUS = """
  select status, subscriptions, cancel_at_period_end, awaiting_card
    from analytics.subscribers_by_status order by subscriptions desc, status
"""

# The daily view summed per month (the month axis is the views' own calendar).
CHARGES_BY_MONTH = """
  select c.month,
         coalesce(sum(d.attempts), 0)::bigint as attempts,
         coalesce(sum(d.succeeded), 0)::bigint as succeeded,
         coalesce(sum(d.declined), 0)::bigint as declined,
         coalesce(sum(d.failed), 0)::bigint as failed
    from analytics.calendar_months c
    left join analytics.charge_success_by_day d
      on d.day >= c.month and d.day < (c.month + interval '1 month')::date
   group by c.month
   order by c.month
"""

CHARGES_BY_ATTEMPT_NUMBER = """
  select attempt_number,
         sum(attempts)::bigint as attempts, sum(succeeded)::bigint as succeeded,
         sum(declined)::bigint as declined, sum(failed)::bigint as failed
    from analytics.charge_success_by_attempt_number
   group by attempt_number
   order by attempt_number
"""

DECLINE_REASONS = """
  select error_code, classification, sum(attempts)::bigint as attempts
    from analytics.decline_reasons_by_month
   group by error_code, classification
   order by attempts desc, error_code
"""

DUNNING_BY_MONTH = """
  select month, episodes, recovered, lost, in_progress, recovery_rate, avg_hours_to_recover,
         median_hours_to_recover
    from analytics.dunning_recovery_by_month order by month
"""

REVENUE_BY_MONTH = """
  select month, payments, gross, refunds, refunded, net
    from analytics.revenue_by_month order by month
"""

COHORT_RETENTION = """
  select cohort_month, months_since_start, cohort_size, retained, retention_rate
    from analytics.cohort_retention order by cohort_month, months_since_start
"""

CREDITS_BY_MONTH = """
  select month, grants, granted, consumed, expired, revoked, remaining, used_rate
    from analytics.credits_by_month order by month
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

SET_ANALYST = "set local role analyst"


def _rows(conn: psycopg.Connection[Any], query: str, params: Any = None) -> list[Row]:
    with conn.cursor(row_factory=dict_row) as cur:
        cur.execute(query.encode(), params)
        return cur.fetchall()


def _rate(part: int, whole: int) -> float:
    return part / whole if whole else 0.0


@dataclass(frozen=True, slots=True)
class Clock:
    started_on: date | None  # the first day of the views' calendar (the first subscription)
    as_of: datetime  # billing's clock (the demo's test clock)


@dataclass(frozen=True, slots=True)
class MonthMrr:
    month: date
    measured_at: datetime
    paying_subscriptions: int
    mrr: int
    arr: int


@dataclass(frozen=True, slots=True)
class MonthMovements:
    month: date
    new_subscriptions: int
    reactivated: int
    churned: int
    churned_voluntary: int
    churned_involuntary: int
    net_change: int


@dataclass(frozen=True, slots=True)
class StatusCount:
    status: str
    subscriptions: int
    cancel_at_period_end: int
    awaiting_card: int


@dataclass(frozen=True, slots=True)
class MonthCharges:
    month: date
    attempts: int
    succeeded: int
    declined: int
    failed: int


@dataclass(frozen=True, slots=True)
class AttemptCharges:
    attempt_number: int
    attempts: int
    succeeded: int
    declined: int
    failed: int

    @property
    def success_rate(self) -> float:
        return _rate(self.succeeded, self.attempts)


@dataclass(frozen=True, slots=True)
class DeclineReason:
    error_code: str | None
    classification: str | None
    attempts: int


@dataclass(frozen=True, slots=True)
class MonthDunning:
    month: date
    episodes: int
    recovered: int
    lost: int
    in_progress: int
    recovery_rate: Decimal | None
    avg_hours_to_recover: Decimal | None
    median_hours_to_recover: Decimal | None


@dataclass(frozen=True, slots=True)
class MonthRevenue:
    month: date
    payments: int
    gross: int
    refunds: int
    refunded: int
    net: int


@dataclass(frozen=True, slots=True)
class CohortCell:
    cohort_month: date
    months_since_start: int
    cohort_size: int
    retained: int
    retention_rate: Decimal


@dataclass(frozen=True, slots=True)
class MonthCredits:
    month: date
    grants: int
    granted: int
    consumed: int
    expired: int
    revoked: int
    remaining: int
    used_rate: Decimal | None


@dataclass(frozen=True, slots=True)
class Invariants:
    periods_charged_twice: int
    approvals_missing: int
    attempts_unknown: int
    money_difference: int

    @property
    def ok(self) -> bool:
        return not any(asdict(self).values())


def invariants(conn: psycopg.Connection[Any], ledger: list[dict[str, Any]]) -> Invariants:
    """Checks against the Toss sandbox's ledger (entries without billing keys), as the owner."""
    slim = [{k: e.get(k) for k in ("kind", "orderId", "paymentKey", "amount")} for e in ledger]
    return Invariants(**_rows(conn, INVARIANTS, {"ledger": Jsonb(slim)})[0])


@dataclass(frozen=True, slots=True)
class Report:
    clock: Clock
    mrr: list[MonthMrr]
    movements: list[MonthMovements]
    statuses: list[StatusCount]
    charges: list[MonthCharges]
    by_attempt: list[AttemptCharges]
    declines: list[DeclineReason]
    dunning: list[MonthDunning]
    revenue: list[MonthRevenue]
    cohorts: list[CohortCell]
    credits: list[MonthCredits]
    invariants: Invariants

    # Totals over the views' rows ----------------------------------------------------------
    @property
    def subscriptions(self) -> int:
        return sum(s.subscriptions for s in self.statuses)

    @property
    def attempts(self) -> int:
        return sum(m.attempts for m in self.charges)

    @property
    def success_rate(self) -> float:
        return _rate(sum(m.succeeded for m in self.charges), self.attempts)

    @property
    def mrr_now(self) -> int:
        return self.mrr[-1].mrr if self.mrr else 0

    def dunning_total(self, field: str) -> int:
        return int(sum(getattr(m, field) for m in self.dunning))

    @property
    def recovery_rate(self) -> float:
        recovered = self.dunning_total("recovered")
        return _rate(recovered, recovered + self.dunning_total("lost"))

    @property
    def mean_hours_to_recover(self) -> float:
        """The months' averages weighted by their recovered episodes."""
        weighted = sum(float(m.avg_hours_to_recover or 0) * m.recovered for m in self.dunning)
        recovered = self.dunning_total("recovered")
        return weighted / recovered if recovered else 0.0

    def revenue_total(self, field: str) -> int:
        return int(sum(getattr(m, field) for m in self.revenue))

    def credits_total(self, field: str) -> int:
        return int(sum(getattr(m, field) for m in self.credits))

    def to_json(self) -> str:
        return json.dumps(asdict(self), default=str, indent=2, ensure_ascii=False)


def build(conn: psycopg.Connection[Any], ledger: list[dict[str, Any]]) -> Report:
    """Every figure in one read-only snapshot: the invariants as the owner, then the views as the
    analyst (``conn`` must be the owner, a member of ``analyst``)."""
    with conn.transaction():
        conn.execute("set transaction isolation level repeatable read, read only")
        checks = invariants(conn, ledger)
        conn.execute(SET_ANALYST)
        clock = _rows(conn, CLOCK)[0]
        return Report(
            clock=Clock(**clock),
            mrr=[MonthMrr(**r) for r in _rows(conn, MRR_BY_MONTH)],
            movements=[MonthMovements(**r) for r in _rows(conn, MOVEMENTS_BY_MONTH)],
            statuses=[StatusCount(**r) for r in _rows(conn, SUBSCRIBERS_BY_STATUS)],
            charges=[MonthCharges(**r) for r in _rows(conn, CHARGES_BY_MONTH)],
            by_attempt=[AttemptCharges(**r) for r in _rows(conn, CHARGES_BY_ATTEMPT_NUMBER)],
            declines=[DeclineReason(**r) for r in _rows(conn, DECLINE_REASONS)],
            dunning=[MonthDunning(**r) for r in _rows(conn, DUNNING_BY_MONTH)],
            revenue=[MonthRevenue(**r) for r in _rows(conn, REVENUE_BY_MONTH)],
            cohorts=[CohortCell(**r) for r in _rows(conn, COHORT_RETENTION)],
            credits=[MonthCredits(**r) for r in _rows(conn, CREDITS_BY_MONTH)],
            invariants=checks,
        )

-- Analytics: read-only views for role analyst over the billing tables. No view exposes a user id,
-- an email, a card number, a customerKey or anything of a billing key; they return counts and sums.
--
-- Conventions for every view here:
-- * Owned by postgres, security_barrier, revoked from everyone, SELECT granted to analyst alone
--   (as analytics.subscription_counts). The owner reads the billing tables; the analyst reads only
--   what the view returns.
-- * Days and months are Asia/Seoul (KST) calendar days and months; `day` / `month` is the KST date
--   (a month as its first day). Amounts are KRW.
-- * "Now" is the clock of billing (analytics.clock), so a test clock moves these views too.
-- * Time series come from analytics.calendar_days / calendar_months, and each day or month reads
--   its rows through a range on an indexed timestamp (the indexes below). A filter on `day` /
--   `month` (`where month >= date '2026-06-01'`) is applied to the calendar first, so a recent
--   window reads only that window's rows. Without a filter a view walks the whole history, which is
--   one pass over the rows involved: acceptable for an analyst's query, not for a dashboard poll.

-- Lets the owner (and tests) read the views as the analyst with SET ROLE, which is the only way to
-- see what the analyst sees (a function inside a view runs with the reader's privileges).
grant analyst to postgres;

-- ---------------------------------------------------------------------------------------------
-- Indexes for the time ranges the views read (small partial indexes where a status narrows them)
-- ---------------------------------------------------------------------------------------------
create index subscriptions_created_at_idx on billing.subscriptions (created_at);
create index subscriptions_ended_at_idx on billing.subscriptions (ended_at) where ended_at is not null;
create index billing_periods_first_paid_idx on billing.billing_periods (paid_at)
  where period_index = 1 and status = 'paid';
create index billing_periods_paid_ends_at_idx on billing.billing_periods (ends_at) where status = 'paid';
create index charge_attempts_resolved_idx on billing.charge_attempts (resolved_at)
  where status in ('succeeded', 'declined', 'failed');
create index refunds_canceled_at_idx on billing.refunds (canceled_at) where status = 'succeeded';
create index credit_grants_granted_at_idx on billing.credit_grants (granted_at);

-- ---------------------------------------------------------------------------------------------
-- The clock and the calendar
-- ---------------------------------------------------------------------------------------------

-- billing.now() is owner-only, and a function inside a view runs with the reader's privileges, so
-- the analyst could not call it here; this view reads billing.clock with billing.now()'s own
-- expression instead (17_analytics.sql checks that the two agree).
create view analytics.clock
with (security_barrier = true) as
select t.as_of,
       pg_catalog.timezone('Asia/Seoul', t.as_of)::date as kst_date,
       pg_catalog.date_trunc('month', pg_catalog.timezone('Asia/Seoul', t.as_of))::date as kst_month
  from (select case when c.enabled then coalesce(c.frozen_at, pg_catalog.now() + c.clock_offset)
                    else pg_catalog.now() end as as_of
          from billing.clock c
         where c.singleton) as t;
revoke all on analytics.clock from public, anon, authenticated, service_role, billing_service;
grant select on analytics.clock to analyst;
comment on view analytics.clock is
  'The instant the analytics views call "now" (billing''s clock, which a test clock moves), with its '
  'Asia/Seoul date and month. For role analyst.';

create view analytics.calendar_days
with (security_barrier = true) as
select g.d::date as day,
       pg_catalog.timezone('Asia/Seoul', g.d) as starts_at,
       pg_catalog.timezone('Asia/Seoul', g.d + interval '1 day') as ends_at
  from analytics.clock clk
 cross join lateral pg_catalog.generate_series(
         pg_catalog.date_trunc('day', pg_catalog.timezone('Asia/Seoul',
           (select pg_catalog.min(s.created_at) from billing.subscriptions s))),
         clk.kst_date::timestamp, interval '1 day') as g(d);
revoke all on analytics.calendar_days from public, anon, authenticated, service_role, billing_service;
grant select on analytics.calendar_days to analyst;
comment on view analytics.calendar_days is
  'Asia/Seoul calendar days from the day the first subscription was created to today (KST), with '
  'each day''s instants [starts_at, ends_at). The time axis of the daily views. For role analyst.';

create view analytics.calendar_months
with (security_barrier = true) as
select g.m::date as month,
       pg_catalog.timezone('Asia/Seoul', g.m) as starts_at,
       pg_catalog.timezone('Asia/Seoul', g.m + interval '1 month') as ends_at
  from analytics.clock clk
 cross join lateral pg_catalog.generate_series(
         pg_catalog.date_trunc('month', pg_catalog.timezone('Asia/Seoul',
           (select pg_catalog.min(s.created_at) from billing.subscriptions s))),
         clk.kst_month::timestamp, interval '1 month') as g(m);
revoke all on analytics.calendar_months from public, anon, authenticated, service_role, billing_service;
grant select on analytics.calendar_months to analyst;
comment on view analytics.calendar_months is
  'Asia/Seoul calendar months (as their first day) from the month the first subscription was '
  'created to the current month (KST), with each month''s instants [starts_at, ends_at). The time '
  'axis of the monthly views. For role analyst.';

-- ---------------------------------------------------------------------------------------------
-- Recurring revenue and subscribers
-- ---------------------------------------------------------------------------------------------

-- Reads every period paid and running at the measured instant: about one row per paying
-- subscriber per month shown, which an exact MRR cannot avoid. Periods are calendar months (at
-- most 31 days; plan_interval has only 'month'), so a running period ends within 32 days of the
-- instant: that upper bound keeps the index range to one month of periods.
create view analytics.mrr_by_month
with (security_barrier = true) as
select c.month, t.measured_at, x.paying_subscriptions, x.mrr, x.mrr * 12 as arr
  from analytics.calendar_months c
 cross join analytics.clock clk
 cross join lateral (select least(c.ends_at, clk.as_of) as measured_at) as t
 cross join lateral (
   select pg_catalog.count(*) as paying_subscriptions, coalesce(pg_catalog.sum(bp.amount), 0)::bigint as mrr
     from billing.billing_periods bp
     join billing.subscriptions s on s.id = bp.subscription_id
     join billing.payments pay on pay.id = bp.payment_id
    where bp.status = 'paid'
      and bp.ends_at >= t.measured_at and bp.ends_at < t.measured_at + interval '32 days'
      and bp.starts_at < t.measured_at
      and (s.ended_at is null or s.ended_at >= t.measured_at)
      and pay.balance_amount > 0) as x;
revoke all on analytics.mrr_by_month from public, anon, authenticated, service_role, billing_service;
grant select on analytics.mrr_by_month to analyst;
comment on view analytics.mrr_by_month is
  'MRR and ARR per Asia/Seoul month, measured at the end of the month (measured_at = the next '
  'month''s first instant, or now for the current month). MRR = the sum of the amounts of the paid '
  'billing periods running at that instant (starts_at < measured_at <= ends_at) on subscriptions '
  'not ended before it; ARR = 12 × MRR; paying_subscriptions counts those periods. A past_due '
  'subscription is not in MRR until its period is paid. Refunds: a period whose payment was refunded '
  'in full (balance 0) does not count, also for months measured before the refund; a partial refund '
  'does not change MRR (see revenue_by_month). A subscription set to cancel at period end counts '
  'until that end. For role analyst.';

-- A full scan of billing.subscriptions: a snapshot of every subscription has to look at each.
create view analytics.subscribers_by_status
with (security_barrier = true) as
select s.status::text as status,
       pg_catalog.count(*) as subscriptions,
       pg_catalog.count(*) filter (where s.cancel_at_period_end) as cancel_at_period_end,
       pg_catalog.count(*) filter (where s.awaiting_card) as awaiting_card
  from billing.subscriptions s
 group by s.status;
revoke all on analytics.subscribers_by_status from public, anon, authenticated, service_role, billing_service;
grant select on analytics.subscribers_by_status to analyst;
comment on view analytics.subscribers_by_status is
  'Subscriptions now, per status: incomplete (first charge not paid yet), active, past_due (a '
  'renewal unpaid, in dunning), canceled, unpaid (ended by dunning when the plan says unpaid); '
  'cancel_at_period_end counts those set to end at the period end, awaiting_card those waiting for '
  'a new card. For role analyst.';

create view analytics.subscription_movements_by_month
with (security_barrier = true) as
select c.month, n.first_paid - n.reactivated as new_subscriptions, n.reactivated, ch.churned,
       ch.churned_voluntary, ch.churned_involuntary, n.first_paid - ch.churned as net_change
  from analytics.calendar_months c
 cross join lateral (
   select pg_catalog.count(*) as first_paid,
          pg_catalog.count(*) filter (where e.earlier) as reactivated
     from billing.billing_periods f
     join billing.subscriptions s on s.id = f.subscription_id
    cross join lateral (
      select exists (select 1
                       from billing.subscriptions s0
                       join billing.billing_periods f0
                         on f0.subscription_id = s0.id and f0.period_index = 1 and f0.status = 'paid'
                      where s0.customer_id = s.customer_id and s0.id <> s.id and f0.paid_at < f.paid_at)
             as earlier) as e
    where f.period_index = 1 and f.status = 'paid'
      and f.paid_at >= c.starts_at and f.paid_at < c.ends_at) as n
 cross join lateral (
   select pg_catalog.count(*) as churned,
          pg_catalog.count(*) filter (where cur.status <> 'unpaid') as churned_voluntary,
          pg_catalog.count(*) filter (where cur.status = 'unpaid') as churned_involuntary
     from billing.subscriptions s
     join billing.billing_periods f on f.subscription_id = s.id and f.period_index = 1 and f.status = 'paid'
     join billing.billing_periods cur on cur.id = s.current_period_id
    where s.ended_at >= c.starts_at and s.ended_at < c.ends_at) as ch;
revoke all on analytics.subscription_movements_by_month
  from public, anon, authenticated, service_role, billing_service;
grant select on analytics.subscription_movements_by_month to analyst;
comment on view analytics.subscription_movements_by_month is
  'Per Asia/Seoul month. new_subscriptions: subscriptions whose first period was paid in the month, '
  'of customers with no earlier paid subscription; reactivated: the same for customers who had one '
  'before (a subscription never restarts once ended, so a returning customer is a new subscription); '
  'churned: subscriptions that had paid (period 1 paid) and ended in the month (ended_at), voluntary '
  'when cancelled (by the subscriber, at period end, or by support) and involuntary when dunning or '
  'the grace period ended them unpaid (their last period is unpaid). A subscription whose first '
  'charge never succeeded is neither new nor churned. Resuming before the period end is not a '
  'movement (nothing ended). net_change = new + reactivated - churned. For role analyst.';

-- ---------------------------------------------------------------------------------------------
-- Charges
-- ---------------------------------------------------------------------------------------------
create view analytics.charge_success_by_day
with (security_barrier = true) as
select d.day, x.attempts, x.succeeded, x.declined, x.failed,
       pg_catalog.round(x.succeeded::numeric / nullif(x.attempts, 0), 4) as success_rate
  from analytics.calendar_days d
 cross join lateral (
   select pg_catalog.count(*) as attempts,
          pg_catalog.count(*) filter (where ca.status = 'succeeded') as succeeded,
          pg_catalog.count(*) filter (where ca.status = 'declined') as declined,
          pg_catalog.count(*) filter (where ca.status = 'failed') as failed
     from billing.charge_attempts ca
    where ca.status in ('succeeded', 'declined', 'failed')
      and ca.resolved_at >= d.starts_at and ca.resolved_at < d.ends_at) as x;
revoke all on analytics.charge_success_by_day from public, anon, authenticated, service_role, billing_service;
grant select on analytics.charge_success_by_day to analyst;
comment on view analytics.charge_success_by_day is
  'Charge attempts settled per Asia/Seoul day (by resolved_at): attempts = succeeded + declined '
  '(the card was refused or is dead) + failed (a processed error that charged nothing, or a bug); '
  'success_rate = succeeded / attempts. Not counted: attempts still queued, in flight or unknown, '
  'attempts withdrawn before they were sent (canceled), and duplicate approvals of an already paid '
  'period (refunded automatically). For role analyst.';

create view analytics.charge_success_by_attempt_number
with (security_barrier = true) as
select c.month, x.attempt_number, x.attempts, x.succeeded, x.declined, x.failed,
       pg_catalog.round(x.succeeded::numeric / nullif(x.attempts, 0), 4) as success_rate
  from analytics.calendar_months c
 cross join lateral (
   select ca.attempt_number,
          pg_catalog.count(*) as attempts,
          pg_catalog.count(*) filter (where ca.status = 'succeeded') as succeeded,
          pg_catalog.count(*) filter (where ca.status = 'declined') as declined,
          pg_catalog.count(*) filter (where ca.status = 'failed') as failed
     from billing.charge_attempts ca
    where ca.status in ('succeeded', 'declined', 'failed')
      and ca.resolved_at >= c.starts_at and ca.resolved_at < c.ends_at
    group by ca.attempt_number) as x;
revoke all on analytics.charge_success_by_attempt_number
  from public, anon, authenticated, service_role, billing_service;
grant select on analytics.charge_success_by_attempt_number to analyst;
comment on view analytics.charge_success_by_attempt_number is
  'Settled charge attempts per Asia/Seoul month (by resolved_at) and attempt number within their '
  'period (1 = the first charge of the period, 2 and on = retries: dunning steps, a new card, or a '
  'new attempt after a processed temporary error); counted as in charge_success_by_day. Months '
  'without settled attempts have no rows. For role analyst.';

create view analytics.decline_reasons_by_month
with (security_barrier = true) as
select c.month, x.error_code, x.classification, x.attempts, x.subscriptions
  from analytics.calendar_months c
 cross join lateral (
   select ca.error_code, ca.classification::text as classification,
          pg_catalog.count(*) as attempts,
          pg_catalog.count(distinct ca.subscription_id) as subscriptions
     from billing.charge_attempts ca
    where ca.status in ('declined', 'failed')
      and ca.resolved_at >= c.starts_at and ca.resolved_at < c.ends_at
    group by ca.error_code, ca.classification) as x;
revoke all on analytics.decline_reasons_by_month from public, anon, authenticated, service_role, billing_service;
grant select on analytics.decline_reasons_by_month to analyst;
comment on view analytics.decline_reasons_by_month is
  'Declined and failed charge attempts per Asia/Seoul month (by resolved_at), per Toss error code '
  'and our classification (decline, needs_new_card, transient, reconcile, bug): attempts, and the '
  'distinct subscriptions they belong to. For role analyst.';

-- ---------------------------------------------------------------------------------------------
-- Dunning
-- ---------------------------------------------------------------------------------------------
create view analytics.dunning_recovery_by_month
with (security_barrier = true) as
select c.month, x.episodes, x.recovered, x.lost, x.in_progress,
       pg_catalog.round(x.recovered::numeric / nullif(x.recovered + x.lost, 0), 4) as recovery_rate,
       pg_catalog.round(x.avg_hours_to_recover, 2) as avg_hours_to_recover,
       pg_catalog.round(x.median_hours_to_recover::numeric, 2) as median_hours_to_recover
  from analytics.calendar_months c
 cross join lateral (
   select pg_catalog.count(*) as episodes,
          pg_catalog.count(*) filter (where bp.status = 'paid') as recovered,
          pg_catalog.count(*) filter (where bp.status in ('unpaid', 'void')) as lost,
          pg_catalog.count(*) filter (where bp.status = 'open') as in_progress,
          pg_catalog.avg(h.hours) as avg_hours_to_recover,
          pg_catalog.percentile_cont(0.5) within group (order by h.hours) as median_hours_to_recover
     from billing.charge_attempts ca
     join billing.billing_periods bp on bp.id = ca.period_id
    cross join lateral (
      select pg_catalog.date_part('epoch', bp.paid_at - ca.resolved_at)::numeric / 3600 as hours) as h
    where ca.status = 'declined'
      and ca.resolved_at >= c.starts_at and ca.resolved_at < c.ends_at
      and bp.period_index > 1
      and not exists (select 1 from billing.charge_attempts e
                       where e.period_id = ca.period_id and e.status = 'declined'
                         and e.attempt_number < ca.attempt_number)) as x;
revoke all on analytics.dunning_recovery_by_month from public, anon, authenticated, service_role, billing_service;
grant select on analytics.dunning_recovery_by_month to analyst;
comment on view analytics.dunning_recovery_by_month is
  'Dunning episodes per Asia/Seoul month in which they began. An episode is a renewal period '
  '(period 2 and on) whose charge was declined (card refused or dead), starting at its first '
  'declined attempt (resolved_at); the first period of a subscription is not dunning (it waits for '
  'a card), nor are processed temporary errors, which get new attempts within hours. recovered: the '
  'period was paid later (any attempt, also on a new card); lost: it ended unpaid or void (dunning '
  'exhausted, grace over, or cancelled meanwhile); in_progress: still open. recovery_rate = '
  'recovered / (recovered + lost), settled episodes only. Hours to recover: from the first decline '
  'to the payment of the period (avg and median over recovered episodes). For role analyst.';

-- ---------------------------------------------------------------------------------------------
-- Revenue (cash basis: a charge on the day Toss approved it, a refund on the day Toss made it)
-- ---------------------------------------------------------------------------------------------
create view analytics.revenue_by_day
with (security_barrier = true) as
select d.day, g.payments, g.gross, r.refunds, r.refunded, g.gross - r.refunded as net
  from analytics.calendar_days d
 cross join lateral (
   select pg_catalog.count(*) as payments, coalesce(pg_catalog.sum(p.total_amount), 0)::bigint as gross
     from billing.payments p
    where p.approved_at >= d.starts_at and p.approved_at < d.ends_at) as g
 cross join lateral (
   select pg_catalog.count(*) as refunds, coalesce(pg_catalog.sum(rf.amount), 0)::bigint as refunded
     from billing.refunds rf
    where rf.status = 'succeeded'
      and rf.canceled_at >= d.starts_at and rf.canceled_at < d.ends_at) as r;
revoke all on analytics.revenue_by_day from public, anon, authenticated, service_role, billing_service;
grant select on analytics.revenue_by_day to analyst;
comment on view analytics.revenue_by_day is
  'Revenue per Asia/Seoul day, cash basis. gross: the total of payments Toss approved that day '
  '(approved_at), including charges refunded automatically (duplicates, late charges); refunded: '
  'the refunds Toss made that day (canceledAt of a succeeded refund, full or partial, ours or made '
  'in Toss''s console), whatever day the payment was; net = gross - refunded (negative on a day '
  'with more refunds than charges). For role analyst.';

create view analytics.revenue_by_month
with (security_barrier = true) as
select c.month, g.payments, g.gross, r.refunds, r.refunded, g.gross - r.refunded as net
  from analytics.calendar_months c
 cross join lateral (
   select pg_catalog.count(*) as payments, coalesce(pg_catalog.sum(p.total_amount), 0)::bigint as gross
     from billing.payments p
    where p.approved_at >= c.starts_at and p.approved_at < c.ends_at) as g
 cross join lateral (
   select pg_catalog.count(*) as refunds, coalesce(pg_catalog.sum(rf.amount), 0)::bigint as refunded
     from billing.refunds rf
    where rf.status = 'succeeded'
      and rf.canceled_at >= c.starts_at and rf.canceled_at < c.ends_at) as r;
revoke all on analytics.revenue_by_month from public, anon, authenticated, service_role, billing_service;
grant select on analytics.revenue_by_month to analyst;
comment on view analytics.revenue_by_month is
  'revenue_by_day per Asia/Seoul month: gross (payments approved in the month), refunded (refunds '
  'made in the month, whatever month the payment was), net = gross - refunded. For role analyst.';

-- ---------------------------------------------------------------------------------------------
-- Cohorts and credits
-- ---------------------------------------------------------------------------------------------
create view analytics.cohort_retention
with (security_barrier = true) as
select c.month as cohort_month, k.n as months_since_start, r.cohort_size, r.retained,
       pg_catalog.round(r.retained::numeric / r.cohort_size, 4) as retention_rate
  from analytics.calendar_months c
 cross join analytics.clock clk
 cross join lateral pg_catalog.generate_series(0,
         ((pg_catalog.date_part('year', clk.kst_month) - pg_catalog.date_part('year', c.month)) * 12
          + pg_catalog.date_part('month', clk.kst_month) - pg_catalog.date_part('month', c.month))::integer) as k(n)
 cross join lateral (
   select pg_catalog.count(*) as cohort_size,
          pg_catalog.count(*) filter (where bp.status = 'paid') as retained
     from billing.billing_periods f
     left join billing.billing_periods bp on bp.subscription_id = f.subscription_id and bp.period_index = k.n + 1
    where f.period_index = 1 and f.status = 'paid'
      and f.paid_at >= c.starts_at and f.paid_at < c.ends_at) as r
 where r.cohort_size > 0;
revoke all on analytics.cohort_retention from public, anon, authenticated, service_role, billing_service;
grant select on analytics.cohort_retention to analyst;
comment on view analytics.cohort_retention is
  'Subscriptions grouped by the Asia/Seoul month their first period was paid (cohort_month; a '
  'returning customer''s new subscription joins the cohort of its own first payment). retained at '
  'months_since_start = k: members whose period k+1 (the one starting k calendar months after their '
  'start) is paid; k = 0 is the whole cohort. Rows run up to the current month, whose diagonal is '
  'still filling (renewals due later this month are not paid yet). For role analyst.';

create view analytics.credits_by_month
with (security_barrier = true) as
select c.month, x.grants, x.granted, x.consumed, x.expired, x.revoked, x.remaining,
       pg_catalog.round(x.consumed::numeric / nullif(x.granted, 0), 4) as used_rate
  from analytics.calendar_months c
 cross join lateral (
   select pg_catalog.count(*) as grants,
          coalesce(pg_catalog.sum(g.amount), 0)::bigint as granted,
          coalesce(pg_catalog.sum(e.consumed), 0)::bigint as consumed,
          coalesce(pg_catalog.sum(e.expired), 0)::bigint as expired,
          coalesce(pg_catalog.sum(e.revoked), 0)::bigint as revoked,
          coalesce(pg_catalog.sum(g.remaining), 0)::bigint as remaining
     from billing.credit_grants g
    cross join lateral (
      select -coalesce(pg_catalog.sum(ce.amount) filter (where ce.kind = 'consume'), 0) as consumed,
             -coalesce(pg_catalog.sum(ce.amount) filter (where ce.kind = 'expire'), 0) as expired,
             -coalesce(pg_catalog.sum(ce.amount) filter (where ce.kind = 'revoke'), 0) as revoked
        from billing.credit_entries ce
       where ce.grant_id = g.id) as e
    where g.granted_at >= c.starts_at and g.granted_at < c.ends_at) as x;
revoke all on analytics.credits_by_month from public, anon, authenticated, service_role, billing_service;
grant select on analytics.credits_by_month to analyst;
comment on view analytics.credits_by_month is
  'Credits granted per Asia/Seoul month (grants by granted_at: one per paid period) and what became '
  'of them, whenever it happened: consumed (spent by the subscriber), expired (left at the period '
  'end or when the subscription ended), revoked (the payment was refunded in full), remaining '
  '(still spendable). granted = consumed + expired + revoked + remaining; used_rate = consumed / '
  'granted. For role analyst.';

select billing.assert_surface_locked_down();

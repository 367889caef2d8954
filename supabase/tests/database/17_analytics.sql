-- The analytics views: who may read them, what they expose, and their numbers on a small world of
-- eight subscriptions whose every figure is computed by hand below. The world is written straight
-- into the billing tables (as the owner), in the states the billing functions leave behind, so each
-- timestamp is exactly where the arithmetic needs it. Times are KST (+09); "now" is the test clock.
begin;
select plan(30);

select billing.enable_test_clock() is not null as _ \gset
select billing.set_test_clock('2028-04-15 12:00+09') is not null as _ \gset

-- Fixture builders (session-local, rolled back with the file) --------------------------------------
create function pg_temp.customer(sub text) returns uuid language sql as $$
  insert into billing.customers (user_id, email, created_at)
  values (sub, sub || '@example.com', '2028-01-01 00:00+09') returning id
$$;

-- A subscription of the Pro plan with a completed card registration, anchored (and created) at `anchor`.
create function pg_temp.subscription(customer uuid, anchor timestamptz) returns uuid language plpgsql as $$
declare
  c billing.customers;
  v_plan uuid := (select id from billing.plans where code = 'pro');
  v_key text := 'bk_' || replace(gen_random_uuid()::text, '-', '');
  v_ck text := 'ck_' || replace(gen_random_uuid()::text, '-', '');
  v_reg uuid;
  v_pm uuid;
  v_sub uuid;
begin
  select * into strict c from billing.customers cu where cu.id = customer;
  insert into billing.card_registrations (customer_id, user_id, plan_id, customer_key, expires_at, created_at)
  values (c.id, c.user_id, v_plan, v_ck, anchor + interval '1 hour', anchor - interval '1 minute')
  returning id into v_reg;
  insert into billing.payment_methods (customer_id, user_id, registration_id, customer_key, billing_key_ciphertext,
                                       billing_key_key_id, billing_key_sha256, card_number_masked, created_at)
  values (c.id, c.user_id, v_reg, v_ck, tests.envelope(v_key), 'k1',
          encode(extensions.digest(v_key, 'sha256'), 'hex'), '4330****1234', anchor)
  returning id into v_pm;
  insert into billing.subscriptions (customer_id, user_id, plan_id, status, billing_anchor, current_period_starts_at,
                                     current_period_ends_at, payment_method_id, created_at)
  values (c.id, c.user_id, v_plan, 'active', anchor, anchor, billing.period_start(anchor, 1), v_pm, anchor)
  returning id into v_sub;
  update billing.card_registrations
     set status = 'completed', completed_at = anchor, payment_method_id = v_pm, subscription_id = v_sub
   where id = v_reg;
  return v_sub;
end $$;

-- Period n of a subscription (9,900 KRW, calendar months from the anchor), made current.
create function pg_temp.period(subscription uuid, n integer) returns uuid language plpgsql as $$
declare
  s billing.subscriptions;
  v_id uuid;
begin
  select * into strict s from billing.subscriptions su where su.id = subscription;
  insert into billing.billing_periods (subscription_id, user_id, period_index, starts_at, ends_at, price_id, amount,
                                       created_at)
  values (s.id, s.user_id, n, billing.period_start(s.billing_anchor, n - 1), billing.period_start(s.billing_anchor, n),
          (select pp.id from billing.plan_prices pp where pp.plan_id = s.plan_id), 9900,
          billing.period_start(s.billing_anchor, n - 1))
  returning id into v_id;
  update billing.subscriptions su
     set current_period_id = v_id, current_period_index = n,
         current_period_starts_at = billing.period_start(s.billing_anchor, n - 1),
         current_period_ends_at = billing.period_start(s.billing_anchor, n)
   where su.id = s.id;
  return v_id;
end $$;

-- Attempt n of a period, settled at `at` (or, when unknown, sent and not settled).
create function pg_temp.attempt(period uuid, n integer, outcome billing.attempt_status, at timestamptz,
                                code text default null, class billing.failure_class default null)
returns uuid language sql as $$
  insert into billing.charge_attempts (period_id, subscription_id, user_id, payment_method_id, attempt_number,
                                       order_id, amount, order_name, status, not_before, sends, classification,
                                       error_code, resolved_at, created_at)
  select p.id, p.subscription_id, p.user_id, s.payment_method_id, n, 'ord_' || replace(gen_random_uuid()::text, '-', ''),
         p.amount, 'Saju Pro', outcome, at, 1, class, code,
         case when outcome <> 'unknown' then at end, at
    from billing.billing_periods p
    join billing.subscriptions s on s.id = p.subscription_id
   where p.id = period
  returning id
$$;

-- The approved payment of an attempt (9,900 KRW at `at`); applied pays its period.
create function pg_temp.pay(attempt uuid, at timestamptz, applies boolean default true)
returns uuid language plpgsql as $$
declare
  a billing.charge_attempts;
  v_pay uuid;
begin
  select * into strict a from billing.charge_attempts ca where ca.id = attempt;
  insert into billing.payments (payment_key, order_id, attempt_id, subscription_id, period_id, customer_id, user_id,
                                applied, status, method, total_amount, balance_amount, approved_at, raw, created_at)
  select 'pk_' || a.order_id, a.order_id, a.id, a.subscription_id, a.period_id, s.customer_id, a.user_id,
         applies, 'DONE', '카드', a.amount, a.amount, at, '{}', at
    from billing.subscriptions s where s.id = a.subscription_id
  returning id into v_pay;
  if applies then
    update billing.billing_periods set status = 'paid', paid_at = at, payment_id = v_pay where id = a.period_id;
  end if;
  return v_pay;
end $$;

-- A refund of `amount` made by Toss at `at` (status succeeded), or one that failed.
create function pg_temp.refund(payment uuid, refunded bigint, at timestamptz,
                               outcome billing.refund_status default 'succeeded') returns void language plpgsql as $$
begin
  insert into billing.refunds (payment_id, user_id, amount, reason, source, status, toss_transaction_key,
                               canceled_at, error_code, requested_by, created_at)
  select p.id, p.user_id, refunded, 'fixture', 'operator', outcome,
         case when outcome = 'succeeded' then 'tx_' || replace(gen_random_uuid()::text, '-', '') end,
         case when outcome = 'succeeded' then at end,
         case when outcome = 'failed' then 'NOT_CANCELABLE_AMOUNT' end, 'postgres', at
    from billing.payments p where p.id = payment;
  if outcome = 'succeeded' then
    update billing.payments p
       set balance_amount = p.balance_amount - refunded,
           status = case when p.balance_amount = refunded then 'CANCELED' else 'PARTIAL_CANCELED' end
     where p.id = payment;
  end if;
end $$;

-- The 10 credits of a paid period: `consumed` spent one by one, the rest closed as `closing`
-- (expired / revoked) or left active.
create function pg_temp.credits(period uuid, consumed integer, closing billing.credit_grant_status)
returns void language plpgsql as $$
declare
  p billing.billing_periods;
  s billing.subscriptions;
  v_grant uuid;
begin
  select * into strict p from billing.billing_periods bp where bp.id = period;
  select * into strict s from billing.subscriptions su where su.id = p.subscription_id;
  insert into billing.credit_grants (customer_id, user_id, subscription_id, period_id, payment_id, amount, remaining,
                                     status, granted_at, expires_at)
  values (s.customer_id, s.user_id, s.id, p.id, p.payment_id, 10, case when closing = 'active' then 10 - consumed else 0 end,
          closing, p.paid_at, p.ends_at)
  returning id into v_grant;
  insert into billing.credit_entries (customer_id, user_id, grant_id, kind, amount, reason)
  values (s.customer_id, s.user_id, v_grant, 'grant', 10, 'fixture');
  insert into billing.credit_entries (customer_id, user_id, grant_id, kind, amount, reason)
  select s.customer_id, s.user_id, v_grant, 'consume', -1, 'saju test' from generate_series(1, consumed);
  if closing <> 'active' and consumed < 10 then
    insert into billing.credit_entries (customer_id, user_id, grant_id, kind, amount, reason)
    values (s.customer_id, s.user_id, v_grant,
            case closing when 'revoked' then 'revoke'::billing.credit_entry_kind else 'expire' end, consumed - 10, 'fixture');
  end if;
end $$;

-- The world ---------------------------------------------------------------------------------------
-- A: anchored 01-05 10:00. P1 paid 01-05 10:00 by attempt 1; attempt 2 approved again at 10:05
--    (duplicate, not applied, refunded in full at 10:06). P2 [02-05, 03-05): attempt 1 declined
--    02-05 10:00 (REJECT_CARD_PAYMENT), attempt 2 paid 02-06 10:00. P3 paid 03-05 10:00. P4 [04-05,
--    05-05): attempt 1 failed 04-05 10:00 (PROVIDER_ERROR, transient), attempt 2 paid 10:30. Active,
--    set to cancel at period end on 04-10.
select pg_temp.customer('user-a') as ca \gset
select pg_temp.subscription(:'ca', '2028-01-05 10:00+09') as a \gset
select pg_temp.period(:'a', 1) as a1 \gset
select pg_temp.pay(pg_temp.attempt(:'a1', 1, 'succeeded', '2028-01-05 10:00+09'), '2028-01-05 10:00+09') as a1_pay \gset
select pg_temp.pay(pg_temp.attempt(:'a1', 2, 'duplicate', '2028-01-05 10:05+09'), '2028-01-05 10:05+09', false) as a1_dup \gset
select pg_temp.refund(:'a1_dup', 9900, '2028-01-05 10:06+09');
select pg_temp.period(:'a', 2) as a2 \gset
select pg_temp.attempt(:'a2', 1, 'declined', '2028-02-05 10:00+09', 'REJECT_CARD_PAYMENT', 'decline') is not null as _ \gset
select pg_temp.pay(pg_temp.attempt(:'a2', 2, 'succeeded', '2028-02-06 10:00+09'), '2028-02-06 10:00+09') is not null as _ \gset
select pg_temp.period(:'a', 3) as a3 \gset
select pg_temp.pay(pg_temp.attempt(:'a3', 1, 'succeeded', '2028-03-05 10:00+09'), '2028-03-05 10:00+09') is not null as _ \gset
select pg_temp.period(:'a', 4) as a4 \gset
select pg_temp.attempt(:'a4', 1, 'failed', '2028-04-05 10:00+09', 'PROVIDER_ERROR', 'transient') is not null as _ \gset
select pg_temp.pay(pg_temp.attempt(:'a4', 2, 'succeeded', '2028-04-05 10:30+09'), '2028-04-05 10:30+09') is not null as _ \gset
update billing.subscriptions set cancel_at_period_end = true, cancel_requested_at = '2028-04-10 10:00+09' where id = :'a';

-- B: anchored 01-20 10:00. P1 paid 01-20. P2 [02-20, 03-20): declined 02-20 and 02-21
--    (REJECT_CARD_PAYMENT), paid 02-23 10:00 by attempt 3. P3 [03-20, 04-20) paid 03-20; a refund of
--    1,000 on it failed at Toss (no money moved). Active.
select pg_temp.customer('user-b') as cb \gset
select pg_temp.subscription(:'cb', '2028-01-20 10:00+09') as b \gset
select pg_temp.period(:'b', 1) as b1 \gset
select pg_temp.pay(pg_temp.attempt(:'b1', 1, 'succeeded', '2028-01-20 10:00+09'), '2028-01-20 10:00+09') is not null as _ \gset
select pg_temp.period(:'b', 2) as b2 \gset
select pg_temp.attempt(:'b2', 1, 'declined', '2028-02-20 10:00+09', 'REJECT_CARD_PAYMENT', 'decline') is not null as _ \gset
select pg_temp.attempt(:'b2', 2, 'declined', '2028-02-21 10:00+09', 'REJECT_CARD_PAYMENT', 'decline') is not null as _ \gset
select pg_temp.pay(pg_temp.attempt(:'b2', 3, 'succeeded', '2028-02-23 10:00+09'), '2028-02-23 10:00+09') is not null as _ \gset
select pg_temp.period(:'b', 3) as b3 \gset
select pg_temp.pay(pg_temp.attempt(:'b3', 1, 'succeeded', '2028-03-20 10:00+09'), '2028-03-20 10:00+09') as b3_pay \gset
select pg_temp.refund(:'b3_pay', 1000, '2028-03-21 10:00+09', 'failed');

-- C: anchored 02-10 10:00. P1 paid 02-10. P2 [03-10, 04-10): declined 03-10 10:00 with a dead card
--    (INVALID_STOPPED_CARD, needs_new_card); no new card, so the grace ran out and it ended
--    03-17 10:00 (canceled, P2 unpaid): involuntary churn.
select pg_temp.customer('user-c') as cc \gset
select pg_temp.subscription(:'cc', '2028-02-10 10:00+09') as c \gset
select pg_temp.period(:'c', 1) as c1 \gset
select pg_temp.pay(pg_temp.attempt(:'c1', 1, 'succeeded', '2028-02-10 10:00+09'), '2028-02-10 10:00+09') is not null as _ \gset
select pg_temp.period(:'c', 2) as c2 \gset
select pg_temp.attempt(:'c2', 1, 'declined', '2028-03-10 10:00+09', 'INVALID_STOPPED_CARD', 'needs_new_card') is not null as _ \gset
update billing.billing_periods set status = 'unpaid' where id = :'c2';
update billing.subscriptions
   set status = 'canceled', past_due_since = '2028-03-10 10:00+09', canceled_at = '2028-03-17 10:00+09',
       ended_at = '2028-03-17 10:00+09'
 where id = :'c';

-- D: anchored 02-25 10:00. P1 [02-25, 03-25) paid 02-25; 3,000 refunded 03-02 10:00 (goodwill);
--    cancel at period end requested 03-01, ended 03-25 10:00: voluntary churn. The same customer
--    subscribes again (D2) on 04-02 10:00, paid at once: reactivated.
select pg_temp.customer('user-d') as cd \gset
select pg_temp.subscription(:'cd', '2028-02-25 10:00+09') as d \gset
select pg_temp.period(:'d', 1) as d1 \gset
select pg_temp.pay(pg_temp.attempt(:'d1', 1, 'succeeded', '2028-02-25 10:00+09'), '2028-02-25 10:00+09') as d1_pay \gset
select pg_temp.refund(:'d1_pay', 3000, '2028-03-02 10:00+09');
update billing.subscriptions
   set status = 'canceled', cancel_at_period_end = true, cancel_requested_at = '2028-03-01 10:00+09',
       canceled_at = '2028-03-01 10:00+09', ended_at = '2028-03-25 10:00+09'
 where id = :'d';
select pg_temp.subscription(:'cd', '2028-04-02 10:00+09') as d2 \gset
select pg_temp.period(:'d2', 1) as d2p1 \gset
select pg_temp.pay(pg_temp.attempt(:'d2p1', 1, 'succeeded', '2028-04-02 10:00+09'), '2028-04-02 10:00+09') is not null as _ \gset

-- E: anchored 03-01 00:30 KST (= 02-29 15:30 UTC: a March payment in Seoul, February in UTC). P1
--    paid 03-01 00:30, refunded in full 03-02 12:00 (credits revoked), the subscription goes on. P2
--    [04-01 00:30, 05-01 00:30) paid 04-01 00:30 (= 03-31 15:30 UTC). Active.
select pg_temp.customer('user-e') as ce \gset
select pg_temp.subscription(:'ce', '2028-03-01 00:30+09') as e \gset
select pg_temp.period(:'e', 1) as e1 \gset
select pg_temp.pay(pg_temp.attempt(:'e1', 1, 'succeeded', '2028-03-01 00:30+09'), '2028-03-01 00:30+09') as e1_pay \gset
select pg_temp.refund(:'e1_pay', 9900, '2028-03-02 12:00+09');
select pg_temp.period(:'e', 2) as e2 \gset
select pg_temp.pay(pg_temp.attempt(:'e2', 1, 'succeeded', '2028-04-01 00:30+09'), '2028-04-01 00:30+09') is not null as _ \gset

-- F: anchored 04-15 09:00; its first charge declined at 09:00 (REJECT_CARD_PAYMENT): incomplete,
--    awaiting a card. Never paid: neither new nor a dunning episode.
select pg_temp.customer('user-f') as cf \gset
select pg_temp.subscription(:'cf', '2028-04-15 09:00+09') as f \gset
select pg_temp.period(:'f', 1) as f1 \gset
select pg_temp.attempt(:'f1', 1, 'declined', '2028-04-15 09:00+09', 'REJECT_CARD_PAYMENT', 'decline') is not null as _ \gset
update billing.subscriptions
   set status = 'incomplete', awaiting_card = true, grace_ends_at = '2028-04-16 09:00+09'
 where id = :'f';

-- G: anchored 03-10 00:30 KST (= 03-09 15:30 UTC). P1 paid 03-10 00:30. P2 [04-10 00:30, 05-10
--    00:30): declined 04-10 00:30 and 04-11 00:30 (REJECT_CARD_PAYMENT); attempt 3 was sent and its
--    outcome is unknown. Past due since 04-10 00:30.
select pg_temp.customer('user-g') as cg \gset
select pg_temp.subscription(:'cg', '2028-03-10 00:30+09') as g \gset
select pg_temp.period(:'g', 1) as g1 \gset
select pg_temp.pay(pg_temp.attempt(:'g1', 1, 'succeeded', '2028-03-10 00:30+09'), '2028-03-10 00:30+09') is not null as _ \gset
select pg_temp.period(:'g', 2) as g2 \gset
select pg_temp.attempt(:'g2', 1, 'declined', '2028-04-10 00:30+09', 'REJECT_CARD_PAYMENT', 'decline') is not null as _ \gset
select pg_temp.attempt(:'g2', 2, 'declined', '2028-04-11 00:30+09', 'REJECT_CARD_PAYMENT', 'decline') is not null as _ \gset
select pg_temp.attempt(:'g2', 3, 'unknown', '2028-04-13 00:30+09') is not null as _ \gset
update billing.subscriptions
   set status = 'past_due', past_due_since = '2028-04-10 00:30+09', grace_ends_at = '2028-04-17 00:30+09'
 where id = :'g';

-- Credits of every paid period (granted when it was paid, 10 each): consumed, then closed.
select pg_temp.credits(:'a1', 4, 'expired'), pg_temp.credits(:'a2', 10, 'expired'),
       pg_temp.credits(:'a3', 0, 'expired'), pg_temp.credits(:'a4', 1, 'active'),
       pg_temp.credits(:'b1', 0, 'expired'), pg_temp.credits(:'b2', 5, 'expired'),
       pg_temp.credits(:'b3', 2, 'active'), pg_temp.credits(:'c1', 3, 'expired'),
       pg_temp.credits(:'d1', 6, 'expired'), pg_temp.credits(:'d2p1', 0, 'active'),
       pg_temp.credits(:'e1', 2, 'revoked'), pg_temp.credits(:'e2', 0, 'active'),
       pg_temp.credits(:'g1', 1, 'expired');

-- What the analyst sees: every view read as analyst, kept for the assertions (which run as the
-- owner, since pgTAP lives in a schema the analyst cannot use) ---------------------------------------
set local role analyst;
create temp table v_clock as select * from analytics.clock;
create temp table v_days as select * from analytics.calendar_days;
create temp table v_months as select * from analytics.calendar_months;
create temp table v_mrr as select * from analytics.mrr_by_month;
create temp table v_status as select * from analytics.subscribers_by_status;
create temp table v_moves as select * from analytics.subscription_movements_by_month;
create temp table v_success_day as select * from analytics.charge_success_by_day;
create temp table v_success_n as select * from analytics.charge_success_by_attempt_number;
create temp table v_declines as select * from analytics.decline_reasons_by_month;
create temp table v_dunning as select * from analytics.dunning_recovery_by_month;
create temp table v_rev_day as select * from analytics.revenue_by_day;
create temp table v_rev_month as select * from analytics.revenue_by_month;
create temp table v_cohorts as select * from analytics.cohort_retention;
create temp table v_credits as select * from analytics.credits_by_month;
create temp table v_recent as select * from analytics.revenue_by_month where month >= date '2028-03-01';
-- Every billing relation (and any partition of one), tried as the analyst: each read must be refused.
create temp table v_billing_reads (relname text, outcome text);
do $$
declare
  t text;
begin
  for t in select c.oid::regclass::text from pg_catalog.pg_class c
            where c.relnamespace in (select n.oid from pg_catalog.pg_namespace n where n.nspname like 'billing%')
              and c.relkind in ('r', 'p', 'v', 'm') order by 1
  loop
    begin
      execute format('select 1 from %s limit 1', t);
      insert into v_billing_reads values (t, 'read');
    exception when insufficient_privilege then
      insert into v_billing_reads values (t, 'refused');
    end;
  end loop;
end $$;
reset role;

-- Privileges and exposure -------------------------------------------------------------------------
select set_eq(
  $$ select c.relname::text from pg_class c where c.relnamespace = 'analytics'::regnamespace and c.relkind = 'v' $$,
  array['subscription_counts', 'clock', 'calendar_days', 'calendar_months', 'mrr_by_month', 'subscribers_by_status',
        'subscription_movements_by_month', 'charge_success_by_day', 'charge_success_by_attempt_number',
        'decline_reasons_by_month', 'dunning_recovery_by_month', 'revenue_by_day', 'revenue_by_month',
        'cohort_retention', 'credits_by_month'],
  'analytics holds exactly these views');
select is_empty(
  $$ select c.relname from pg_class c
      where c.relnamespace = 'analytics'::regnamespace and c.relkind <> 'v' $$,
  'analytics holds views only (no tables, sequences or materialized copies)');
select is_empty(
  $$ select c.relname from pg_class c
      where c.relnamespace = 'analytics'::regnamespace and c.relkind = 'v'
        and (c.relowner <> 'postgres'::regrole
             or not coalesce(c.reloptions @> array['security_barrier=true'], false)
             or obj_description(c.oid, 'pg_class') is null) $$,
  'every view is owned by postgres, a security barrier, and carries its definition as a comment');
select is_empty(
  $$ select c.relname from pg_class c
      where c.relnamespace = 'analytics'::regnamespace and c.relkind = 'v'
        and not has_table_privilege('analyst', c.oid, 'select') $$,
  'the analyst may select every view');
select is_empty(
  $$ select c.relname, p.privilege
       from pg_class c
      cross join unnest(array['insert', 'update', 'delete', 'truncate', 'references', 'trigger']) p(privilege)
      where c.relnamespace = 'analytics'::regnamespace and has_table_privilege('analyst', c.oid, p.privilege) $$,
  'the analyst may only read');
select is_empty(
  $$ select r.rolname, c.relname
       from pg_class c
      cross join (values ('anon'), ('authenticated'), ('billing_service'), ('service_role')) r(rolname)
      where c.relnamespace = 'analytics'::regnamespace
        and has_table_privilege(r.rolname, c.oid, 'select, insert, update, delete, truncate, references, trigger') $$,
  'anon, authenticated, billing_service and service_role reach no analytics view');
select is_empty(
  $$ select c.oid::regclass from pg_class c
      where c.relnamespace in (select n.oid from pg_namespace n where n.nspname like 'billing%')
        and c.relkind in ('r', 'p', 'v', 'm', 'S')
        and has_table_privilege('analyst', c.oid, 'select, insert, update, delete, truncate, references, trigger') $$,
  'the analyst holds no privilege on any billing relation');
select is_empty($$ select relname from v_billing_reads where outcome <> 'refused' $$,
  'reading any billing table as the analyst is refused');
select ok((select count(*) from v_billing_reads) >= 18
          and (select count(*) from v_billing_reads)
              = (select count(*) from pg_class c
                  where c.relnamespace in (select n.oid from pg_namespace n where n.nspname like 'billing%')
                    and c.relkind in ('r', 'p', 'v', 'm')),
  'every billing table was tried');
select is_empty(
  $$ select table_name, column_name from information_schema.columns
      where table_schema = 'analytics'
        and column_name ~* '(user|email|card_number|masked|issuer|billing_key|customer_key|customer_id|payment_key|order_id|secret|^sub$|name$)' $$,
  'no view exposes a user id, email, card number, customerKey, billing key, order or payment key');
select is_empty(
  $$ select c.relname from pg_class c
      where c.relnamespace = 'analytics'::regnamespace and c.relkind = 'v'
        and pg_get_viewdef(c.oid) ~* '(email|card_number|billing_key|customer_key|\.secret|raw)' $$,
  'no view even reads an email, card number, billing key, customerKey, payment secret or raw payload');

-- The clock and the calendar ----------------------------------------------------------------------
select results_eq($$ select as_of, kst_date, kst_month from v_clock $$,
  $$ values (billing.now(), date '2028-04-15', date '2028-04-01') $$,
  'the clock is billing''s test clock, with its KST date and month');
update billing.clock set enabled = false;
select is((select as_of from analytics.clock), billing.now(), 'the clock is billing.now() with the test clock off too');
update billing.clock set enabled = true;
-- From the first subscription's day (01-05) to today (04-15): 27 (Jan 5–31) + 29 (Feb 2028)
-- + 31 + 15 = 102 days; months January to April.
select results_eq($$ select count(*)::int, min(day), max(day) from v_days $$,
  $$ values (102, date '2028-01-05', date '2028-04-15') $$, 'calendar days run from the first subscription to today');
select results_eq($$ select month, starts_at, ends_at from v_months order by month $$,
  $$ values (date '2028-01-01', '2028-01-01 00:00+09'::timestamptz, '2028-02-01 00:00+09'::timestamptz),
            (date '2028-02-01', '2028-02-01 00:00+09'::timestamptz, '2028-03-01 00:00+09'::timestamptz),
            (date '2028-03-01', '2028-03-01 00:00+09'::timestamptz, '2028-04-01 00:00+09'::timestamptz),
            (date '2028-04-01', '2028-04-01 00:00+09'::timestamptz, '2028-05-01 00:00+09'::timestamptz) $$,
  'calendar months are KST months');

-- MRR and ARR ---------------------------------------------------------------------------------------
-- Jan, at 02-01 00:00: A1 [01-05, 02-05), B1 [01-20, 02-20) → 2 × 9,900 = 19,800; ARR × 12 = 237,600.
-- Feb, at 03-01 00:00: A2, B2 (paid late, on 02-23), C1 [02-10, 03-10), D1 [02-25, 03-25) (3,000
--   refunded: partial, still counts) → 4 × 9,900 = 39,600; ARR 475,200. E1 starts 03-01 00:30: not yet.
-- Mar, at 04-01 00:00: A3 [03-05, 04-05), B3 [03-20, 04-20), G1 [03-10 00:30, 04-10 00:30) → 3 ×
--   9,900 = 29,700; ARR 356,400. Not C (ended 03-17), not D (ended 03-25), not E1 (running, but
--   refunded in full).
-- Apr, now (04-15 12:00): A4 (cancel at period end: counts until then), B3 (till 04-20), D2,
--   E2 [04-01 00:30, 05-01 00:30) → 4 × 9,900 = 39,600; ARR 475,200. Not G (P2 unpaid, past due),
--   not F (incomplete).
select results_eq($$ select month, measured_at, paying_subscriptions::int, mrr, arr from v_mrr order by month $$,
  $$ values (date '2028-01-01', '2028-02-01 00:00+09'::timestamptz, 2, 19800::bigint, 237600::bigint),
            (date '2028-02-01', '2028-03-01 00:00+09'::timestamptz, 4, 39600::bigint, 475200::bigint),
            (date '2028-03-01', '2028-04-01 00:00+09'::timestamptz, 3, 29700::bigint, 356400::bigint),
            (date '2028-04-01', '2028-04-15 12:00+09'::timestamptz, 4, 39600::bigint, 475200::bigint) $$,
  'mrr_by_month: paid periods running at month end, full refunds out, partial refunds in');

-- Subscribers by status -----------------------------------------------------------------------------
-- active: A (cancel at period end), B, D2, E → 4, 1 cancel scheduled; canceled: C, D (its cancel
-- flag stays set) → 2, 1; incomplete: F, awaiting a card → 1; past_due: G → 1.
select results_eq(
  $$ select status, subscriptions::int, cancel_at_period_end::int, awaiting_card::int from v_status order by status $$,
  $$ values ('active', 4, 1, 0), ('canceled', 2, 1, 0), ('incomplete', 1, 0, 1), ('past_due', 1, 0, 0) $$,
  'subscribers_by_status: now, per status');

-- New, reactivated, churned ---------------------------------------------------------------------------
-- First periods paid: Jan A, B; Feb C, D; Mar E (03-01 00:30 KST), G; Apr D2 (customer D paid before:
-- reactivated). Ended: C 03-17 (its last period unpaid: involuntary), D 03-25 (voluntary). F never
-- paid: not counted. Net: 2 + 0 - 0 = 2; 2; 2 - 2 = 0; 0 + 1 - 0 = 1.
select results_eq(
  $$ select month, new_subscriptions::int, reactivated::int, churned::int, churned_voluntary::int,
            churned_involuntary::int, net_change::int from v_moves order by month $$,
  $$ values (date '2028-01-01', 2, 0, 0, 0, 0, 2), (date '2028-02-01', 2, 0, 0, 0, 0, 2),
            (date '2028-03-01', 2, 0, 2, 1, 1, 0), (date '2028-04-01', 0, 1, 0, 0, 0, 1) $$,
  'subscription_movements_by_month: new, reactivated, churned (voluntary / involuntary), net');

-- Charge success by day -------------------------------------------------------------------------------
-- Settled attempts: succeeded A1#1, A2#2, A3, A4#2, B1, B2#3, B3, C1, D1, D2, E1, E2, G1 = 13;
-- declined A2#1, B2#1, B2#2, C2#1, G2#1, G2#2, F = 7; failed A4#1 = 1; total 21. Not counted: A1#2
-- (duplicate), G2#3 (unknown).
select results_eq($$ select sum(attempts)::int, sum(succeeded)::int, sum(declined)::int, sum(failed)::int from v_success_day $$,
  $$ values (21, 13, 7, 1) $$, 'charge_success_by_day: 21 settled attempts in all');
-- 01-05: A1#1 only (the duplicate is not counted) → 1/1 = 1.0.
-- 03-10: G1 at 00:30 KST (03-09 in UTC) and C2#1 declined → 1/2 = 0.5; 03-09 has none.
-- 04-05: A4#1 failed, A4#2 succeeded → 1/2 = 0.5. 02-20: B2#1 declined → 0/1 = 0.
select results_eq(
  $$ select day, attempts::int, succeeded::int, declined::int, failed::int, success_rate from v_success_day
      where day in ('2028-01-05', '2028-02-20', '2028-03-09', '2028-03-10', '2028-04-05') order by day $$,
  $$ values (date '2028-01-05', 1, 1, 0, 0, 1.0000), (date '2028-02-20', 1, 0, 1, 0, 0.0000),
            (date '2028-03-09', 0, 0, 0, 0, null), (date '2028-03-10', 2, 1, 1, 0, 0.5000),
            (date '2028-04-05', 2, 1, 0, 1, 0.5000) $$,
  'charge_success_by_day: per KST day');
-- Days with settled attempts: 01-05, 01-20, 02-05, 02-06, 02-10, 02-20, 02-21, 02-23, 02-25, 03-01,
-- 03-05, 03-10, 03-20, 04-01, 04-02, 04-05, 04-10, 04-11, 04-15 = 19 of the 102.
select results_eq($$ select count(*)::int, count(*) filter (where attempts > 0)::int from v_success_day $$,
  $$ values (102, 19) $$, 'charge_success_by_day: a row for every day, 19 with settled attempts');

-- By attempt number ----------------------------------------------------------------------------------
-- Jan #1: A1#1, B1 → 2/2. Feb #1: A2#1 declined, B2#1 declined, C1, D1 → 2/4 = 0.5; #2: A2#2, B2#2
-- declined → 1/2; #3: B2#3 → 1/1. Mar #1: E1, A3, G1, B3, C2#1 declined → 4/5 = 0.8. Apr #1: E2, D2,
-- A4#1 failed, G2#1 declined, F declined → 2/5 = 0.4; #2: A4#2, G2#2 declined → 1/2.
select results_eq(
  $$ select month, attempt_number, attempts::int, succeeded::int, declined::int, failed::int, success_rate
       from v_success_n order by month, attempt_number $$,
  $$ values (date '2028-01-01', 1, 2, 2, 0, 0, 1.0000),
            (date '2028-02-01', 1, 4, 2, 2, 0, 0.5000), (date '2028-02-01', 2, 2, 1, 1, 0, 0.5000),
            (date '2028-02-01', 3, 1, 1, 0, 0, 1.0000),
            (date '2028-03-01', 1, 5, 4, 1, 0, 0.8000),
            (date '2028-04-01', 1, 5, 2, 2, 1, 0.4000), (date '2028-04-01', 2, 2, 1, 1, 0, 0.5000) $$,
  'charge_success_by_attempt_number: per KST month and attempt number');

-- Decline reasons --------------------------------------------------------------------------------------
-- Feb: REJECT_CARD_PAYMENT A2#1, B2#1, B2#2 → 3 attempts, 2 subscriptions. Mar: INVALID_STOPPED_CARD
-- C2#1 → 1, 1. Apr: PROVIDER_ERROR A4#1 → 1, 1; REJECT_CARD_PAYMENT G2#1, G2#2, F → 3, 2.
select results_eq(
  $$ select month, error_code, classification, attempts::int, subscriptions::int from v_declines
      order by month, error_code $$,
  $$ values (date '2028-02-01', 'REJECT_CARD_PAYMENT', 'decline', 3, 2),
            (date '2028-03-01', 'INVALID_STOPPED_CARD', 'needs_new_card', 1, 1),
            (date '2028-04-01', 'PROVIDER_ERROR', 'transient', 1, 1),
            (date '2028-04-01', 'REJECT_CARD_PAYMENT', 'decline', 3, 2) $$,
  'decline_reasons_by_month: per KST month, code and class');

-- Dunning recovery ------------------------------------------------------------------------------------
-- Episodes (renewal periods with a decline, by their first decline): Feb A2 (02-05 10:00 → paid
-- 02-06 10:00: 24 h) and B2 (02-20 10:00 → 02-23 10:00: 72 h): 2 recovered, rate 2/2, avg and median
-- (24 + 72) / 2 = 48. Mar C2 (lost: unpaid) → 0/1. Apr G2 (open; its second decline is the same
-- episode) → in progress, no settled episode: rate null. Not episodes: F (a first period), A4 (a
-- transient failure, retried at once). Jan: none.
select results_eq(
  $$ select month, episodes::int, recovered::int, lost::int, in_progress::int, recovery_rate,
            avg_hours_to_recover, median_hours_to_recover from v_dunning order by month $$,
  $$ values (date '2028-01-01', 0, 0, 0, 0, null::numeric, null::numeric, null::numeric),
            (date '2028-02-01', 2, 2, 0, 0, 1.0000, 48.00, 48.00),
            (date '2028-03-01', 1, 0, 1, 0, 0.0000, null, null),
            (date '2028-04-01', 1, 0, 0, 1, null, null, null) $$,
  'dunning_recovery_by_month: episodes by the month of their first decline');

-- Revenue ----------------------------------------------------------------------------------------------
-- 01-05: A1 and its duplicate approved (2 × 9,900 = 19,800), the duplicate refunded (9,900) → net 9,900.
-- 03-01: E1 at 00:30 KST (02-29 in UTC) → 9,900. 03-02: no payment; refunds D1 3,000 + E1 9,900 =
-- 12,900 → net -12,900. 03-21: B3's failed refund moved no money → 0.
select results_eq(
  $$ select day, payments::int, gross, refunds::int, refunded, net from v_rev_day
      where day in ('2028-01-05', '2028-02-29', '2028-03-01', '2028-03-02', '2028-03-21') order by day $$,
  $$ values (date '2028-01-05', 2, 19800::bigint, 1, 9900::bigint, 9900::bigint),
            (date '2028-02-29', 0, 0::bigint, 0, 0::bigint, 0::bigint),
            (date '2028-03-01', 1, 9900::bigint, 0, 0::bigint, 9900::bigint),
            (date '2028-03-02', 0, 0::bigint, 2, 12900::bigint, -12900::bigint),
            (date '2028-03-21', 0, 0::bigint, 0, 0::bigint, 0::bigint) $$,
  'revenue_by_day: per KST day, refunds on the day Toss made them');
-- Jan: A1, A1 duplicate, B1 = 3 × 9,900 = 29,700; refunded 9,900 → net 19,800.
-- Feb: A2, B2, C1, D1 = 39,600 (E1 is March in KST); no refunds → 39,600.
-- Mar: E1, A3, G1, B3 = 39,600; refunded 3,000 + 9,900 = 12,900 → 26,700.
-- Apr: E2 (04-01 00:30 KST), D2, A4 = 29,700 → 29,700.
select results_eq(
  $$ select month, payments::int, gross, refunds::int, refunded, net from v_rev_month order by month $$,
  $$ values (date '2028-01-01', 3, 29700::bigint, 1, 9900::bigint, 19800::bigint),
            (date '2028-02-01', 4, 39600::bigint, 0, 0::bigint, 39600::bigint),
            (date '2028-03-01', 4, 39600::bigint, 2, 12900::bigint, 26700::bigint),
            (date '2028-04-01', 3, 29700::bigint, 0, 0::bigint, 29700::bigint) $$,
  'revenue_by_month: per KST month');
-- 14 payments, 138,600 gross, 22,800 refunded, 115,800 net, by day and by month alike.
select results_eq(
  $$ select sum(payments)::int, sum(gross)::bigint, sum(refunded)::bigint, sum(net)::bigint from v_rev_day $$,
  $$ values (14, 138600::bigint, 22800::bigint, 115800::bigint) $$, 'revenue_by_day adds up to the whole');
select results_eq($$ select * from v_recent order by month $$,
  $$ select * from v_rev_month where month >= date '2028-03-01' order by month $$,
  'a month filter on a view gives the same rows as the whole view');

-- Cohort retention -------------------------------------------------------------------------------------
-- Jan {A, B}: k=0 2; k=1 A2, B2 paid → 2; k=2 A3, B3 → 2; k=3 A4 only → 1/2 = 0.5.
-- Feb {C, D}: k=0 2; k=1 C2 unpaid, D has none → 0; k=2 → 0.
-- Mar {E, G}: k=0 2; k=1 E2 paid, G2 open → 1/2. Apr {D2}: k=0 1.
select results_eq(
  $$ select cohort_month, months_since_start, cohort_size::int, retained::int, retention_rate
       from v_cohorts order by cohort_month, months_since_start $$,
  $$ values (date '2028-01-01', 0, 2, 2, 1.0000), (date '2028-01-01', 1, 2, 2, 1.0000),
            (date '2028-01-01', 2, 2, 2, 1.0000), (date '2028-01-01', 3, 2, 1, 0.5000),
            (date '2028-02-01', 0, 2, 2, 1.0000), (date '2028-02-01', 1, 2, 0, 0.0000),
            (date '2028-02-01', 2, 2, 0, 0.0000),
            (date '2028-03-01', 0, 2, 2, 1.0000), (date '2028-03-01', 1, 2, 1, 0.5000),
            (date '2028-04-01', 0, 1, 1, 1.0000) $$,
  'cohort_retention: by month of first payment, up to the current month');

-- Credits -------------------------------------------------------------------------------------------------
-- Jan grants A1 (4 used, 6 expired), B1 (10 expired): 20 granted, 4 consumed, 16 expired → 4/20 = 0.2.
-- Feb A2 (10 used), B2 (5, 5 expired), C1 (3, 7), D1 (6, 4): 40; consumed 24; expired 16 → 0.6.
-- Mar A3 (10 expired), B3 (2 used, 8 left), E1 (2 used, 8 revoked), G1 (1, 9 expired): 40; consumed 5,
--   expired 19, revoked 8, remaining 8 (5 + 19 + 8 + 8 = 40) → 5/40 = 0.125.
-- Apr A4 (1 used, 9 left), D2 (10 left), E2 (10 left): 30; consumed 1; remaining 29 → 1/30 = 0.0333.
select results_eq(
  $$ select month, grants::int, granted, consumed, expired, revoked, remaining, used_rate from v_credits order by month $$,
  $$ values (date '2028-01-01', 2, 20::bigint, 4::bigint, 16::bigint, 0::bigint, 0::bigint, 0.2000),
            (date '2028-02-01', 4, 40::bigint, 24::bigint, 16::bigint, 0::bigint, 0::bigint, 0.6000),
            (date '2028-03-01', 4, 40::bigint, 5::bigint, 19::bigint, 8::bigint, 8::bigint, 0.1250),
            (date '2028-04-01', 3, 30::bigint, 1::bigint, 0::bigint, 0::bigint, 29::bigint, 0.0333) $$,
  'credits_by_month: granted vs consumed, expired, revoked and remaining, by month of grant');

select * from finish();
rollback;

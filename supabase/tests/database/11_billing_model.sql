-- The model: clock, calendar, seed, immutability and append-only guards, constraints, RLS policies
-- and the audit trail.
begin;
select plan(40);

-- The helpers (tests.as_user, tests.svc, tests.register, tests.serve, ...) come from 01_helpers.sql.

-- Clock -------------------------------------------------------------------------------------------
select is(billing.now(), now(), 'without a test clock billing.now() is the transaction time');
select throws_ok($$ select billing.set_test_clock('2028-01-01 00:00+09') $$, 'SB403', null,
  'set_test_clock refuses until the test clock is enabled');
select throws_ok($$ select billing.advance_test_clock('1 day') $$, 'SB403', null,
  'advance_test_clock refuses until the test clock is enabled');
select isnt(billing.enable_test_clock(), null, 'enable_test_clock enables the test clock');
select is(billing.set_test_clock('2028-01-10 10:00+09'), '2028-01-10 10:00+09'::timestamptz, 'set_test_clock');
select is(billing.now(), '2028-01-10 10:00+09'::timestamptz, 'billing.now() follows the test clock');
select is(billing.advance_test_clock('1 day 2 hours'), '2028-01-11 12:00+09'::timestamptz, 'advance_test_clock');
select throws_ok($$ select billing.advance_test_clock('-1 minute') $$, 'SB400', null, 'the clock only advances');
select throws_ok($$ select billing.set_test_clock('infinity') $$, 'SB400', null, 'the clock needs a finite time');
select billing.set_test_clock('2028-01-10 10:00+09') is not null as _ \gset
select is((select count(*)::int from billing.events where entity_type = 'clock'), 4,
  'every clock change is in the event log');
select throws_ok($$ select tests.svc('select to_jsonb(billing.set_test_clock(%L))', '2030-01-01') $$,
  '42501', null, 'the service cannot move the clock');

-- Calendar ----------------------------------------------------------------------------------------
select results_eq(
  $$ select billing.period_start('2028-01-31 10:00+09', n) from generate_series(0, 4) n $$,
  $$ values ('2028-01-31 10:00+09'::timestamptz), ('2028-02-29 10:00+09'), ('2028-03-31 10:00+09'),
            ('2028-04-30 10:00+09'), ('2028-05-31 10:00+09') $$,
  'period_start: anchor 31 clamps to month end and returns (leap February)');
select is(billing.period_start('2027-01-31 00:30+09', 1), '2027-02-28 00:30+09'::timestamptz,
  'period_start computes in Asia/Seoul (00:30 KST is the previous day in UTC)');
select is(billing.add_local('2028-02-28 23:00+09', '1 day'), '2028-02-29 23:00+09'::timestamptz, 'add_local');
select results_eq($$ select billing.backoff(n, '1 minute', '1 hour') from generate_series(1, 8) n $$,
  $$ values ('1 minute'::interval), ('2 minutes'), ('4 minutes'), ('8 minutes'), ('16 minutes'), ('32 minutes'),
            ('1 hour'), ('1 hour') $$, 'backoff doubles up to its cap');
select ok(billing.dunning_schedule_is_valid('{1 day,3 days}') and billing.dunning_schedule_is_valid('{}')
          and not billing.dunning_schedule_is_valid('{3 days,1 day}')
          and not billing.dunning_schedule_is_valid('{0 days}'), 'dunning schedules increase and are positive');

-- Seed --------------------------------------------------------------------------------------------
select results_eq(
  $$ select name, currency, billing_interval::text, credits_per_period, dunning_schedule, dunning_final_status::text
       from billing.plans where code = 'pro' $$,
  $$ values ('Saju맛피아 Pro'::text, 'KRW'::text, 'month'::text, 10, '{1 day,3 days,5 days,7 days}'::interval[],
             'canceled'::text) $$,
  'the Pro plan: monthly, 10 credits, dunning +1/+3/+5/+7 days, then canceled');
select is((billing.price_at((select id from billing.plans where code = 'pro'), billing.now())).amount, 9900::bigint,
  'the Pro plan costs 9,900 KRW');

-- Guards ------------------------------------------------------------------------------------------
select throws_ok($$ update billing.plan_prices set amount = 1 $$, 'SB403', null, 'prices are never edited in place');
select throws_ok($$ delete from billing.plan_prices $$, 'SB403', null, 'prices are never deleted');
select throws_ok($$ update billing.events set reason = 'x' $$, 'SB403', null, 'the event log is append-only (update)');
select throws_ok($$ delete from billing.events $$, 'SB403', null, 'the event log is append-only (delete)');
select throws_ok($$ truncate billing.events $$, 'SB403', null, 'the event log is append-only (truncate)');
select throws_ok($$ insert into billing.plan_prices (plan_id, amount, effective_from)
                    select id, 99, now() from billing.plans where code = 'pro' $$,
  '23514', null, 'prices are at least 100 KRW (Toss''s card minimum)');

select tests.register('user-a', 'bk_a') as a \gset
select tests.register('user-b', 'bk_b') as b \gset

select throws_ok($$ truncate billing.credit_entries $$, 'SB403', null, 'the credit ledger is append-only');
select throws_ok(
  format($$ update billing.charge_attempts set order_id = 'bad order id!' where id = %L $$, :'a'::jsonb ->> 'attemptId'),
  '23514', null, 'orderIds follow Toss''s rule ^[A-Za-z0-9_-]{6,64}$');
select throws_ok(
  format($$ update billing.charge_attempts set amount = 1 where id = %L $$, :'a'::jsonb ->> 'attemptId'),
  '23503', null, 'an attempt''s amount is its period''s amount (composite foreign key)');
select throws_ok(
  format($$ insert into billing.charge_attempts (period_id, subscription_id, user_id, payment_method_id, attempt_number,
                                                 order_id, amount, order_name, not_before, status)
           select period_id, subscription_id, user_id, payment_method_id, 2, 'ord_second_success', amount, order_name,
                  not_before, 'succeeded' from billing.charge_attempts where id = %1$L;
           update billing.charge_attempts set status = 'succeeded' where id = %1$L $$, :'a'::jsonb ->> 'attemptId'),
  '23505', null, 'at most one succeeded attempt per period');
select throws_ok(
  format($$ insert into billing.subscriptions (customer_id, user_id, plan_id, billing_anchor, current_period_starts_at,
                                              current_period_ends_at, payment_method_id, grace_ends_at)
           select customer_id, user_id, plan_id, now(), now(), now() + interval '1 month', payment_method_id, now()
             from billing.subscriptions where id = %L $$, :'a'::jsonb ->> 'subscriptionId'),
  '23505', null, 'at most one live subscription per customer');
select throws_ok(
  format($$ update billing.card_registrations set customer_key = 'has space' where customer_key = %L $$,
         :'a'::jsonb ->> 'customerKey'),
  '23514', null, 'customerKeys follow Toss''s rule');
select matches(:'a'::jsonb ->> 'customerKey', '^ck_[0-9a-f]{32}$', 'customerKeys are ck_ + 128 random bits');

-- RLS: should SELECT ever be granted, a subscriber still sees only their own rows; anon nothing.
grant usage on schema billing to authenticated, anon;
grant select on billing.subscriptions, billing.customers, billing.events to authenticated, anon;
select tests.as_user('user-a');
select results_eq($$ select user_id from billing.subscriptions $$, $$ values ('user-a') $$,
  'RLS: user-a sees only user-a''s subscription');
select results_eq($$ select user_id from billing.customers $$, $$ values ('user-a') $$,
  'RLS: user-a sees only user-a''s customer row');
select is_empty($$ select 1 from billing.events $$, 'RLS: the event log has no subscriber policy');
select tests.as_user('user-b');
select results_eq($$ select user_id from billing.subscriptions $$, $$ values ('user-b') $$,
  'RLS: user-b sees only user-b''s subscription');
select tests.as_user('someone-else');
select is_empty($$ select 1 from billing.subscriptions $$, 'RLS: a stranger sees nothing');
select tests.as_owner();
select set_config('role', 'anon', true) is not null as _ \gset
select is_empty($$ select 1 from billing.subscriptions $$, 'RLS: anon sees nothing even with a grant');
select tests.as_owner();
revoke all on billing.subscriptions, billing.customers, billing.events from authenticated, anon;
revoke usage on schema billing from authenticated, anon;

-- Audit -------------------------------------------------------------------------------------------
select results_eq(
  format($$ select entity_type, action, old_status, new_status, reason, actor_role
              from billing.events where entity_id = %L order by id $$, :'a'::jsonb ->> 'subscriptionId'),
  $$ values ('subscriptions'::text, 'created'::text, null::text, 'incomplete'::text, 'card registered'::text,
             'billing_service'::text) $$,
  'creating a subscription is logged with who and why');
select results_eq(
  format($$ select action, new_status, actor_role, actor_sub from billing.events
             where entity_type = 'card_registrations' and entity_id = (
               select id from billing.card_registrations where customer_key = %L) order by id $$,
         :'a'::jsonb ->> 'customerKey'),
  $$ values ('created'::text, 'pending'::text, 'authenticated'::text, 'user-a'::text),
            ('status_changed', 'completed', 'billing_service', null) $$,
  'the subscriber''s JWT sub is recorded for their own actions');
select is((select count(*)::int from billing.events e join billing.charge_attempts a on a.id = e.entity_id
            where a.subscription_id = (:'a'::jsonb ->> 'subscriptionId')::uuid), 1,
  'a new attempt is logged once');

select * from finish();
rollback;

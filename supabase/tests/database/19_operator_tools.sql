-- Operator tools: billing at a glance, a subscriber's history, the alerts raised.
begin;
select plan(9);

select billing.enable_test_clock() is not null as _ \gset
select billing.set_test_clock('2028-01-10 10:00+09') is not null as _ \gset

-- One paid subscriber, one whose first charge is declined (an incomplete subscription awaiting a
-- card), and one alert (a refund that fails).
select tests.register('user-a', 'bk_a') as a \gset
select tests.serve('ok') is not null as _ \gset
select tests.register('user-b', 'bk_b') as b \gset
select tests.serve('decline', 'REJECT_CARD_PAYMENT') is not null as _ \gset

select is(billing.ops_status() -> 'subscriptions', '{"active": 1, "incomplete": 1}'::jsonb,
  'ops_status: subscriptions by status');
select is((billing.ops_status() ->> 'awaitingCard')::int, 1, 'ops_status: the declined first charge awaits a card');
select is((billing.ops_status() ->> 'attemptsInFlight')::int + (billing.ops_status() ->> 'attemptsUnknown')::int, 0,
  'ops_status: nothing in flight or unknown');

-- user-a's trail: registration, card, subscription, period, attempt (queued → claimed → succeeded),
-- payment, credit grant; oldest first; only theirs.
select ok((select bool_and(h.entity_id is not null) and count(*) >= 12 from billing.ops_history('user-a') h),
  'ops_history by user id: the whole trail');
select is((select count(distinct h.entity_type) from billing.ops_history('user-a') h
            where h.entity_type in ('card_registrations', 'payment_methods', 'subscriptions', 'billing_periods',
                                    'charge_attempts', 'payments', 'credit_grants')), 7::bigint,
  'ops_history: every kind of row the subscriber has');
select is((select count(*) from billing.ops_history(:'a'::jsonb ->> 'subscriptionId')),
          (select count(*) from billing.ops_history('user-a')),
  'ops_history by subscription id: the same trail');
select is_empty($$ select 1 from billing.ops_history('user-a') h
                    join billing.subscriptions s on s.id = h.entity_id where s.user_id <> 'user-a' $$,
  'ops_history: nobody else''s rows');
select throws_ok($$ select * from billing.ops_history('nobody') $$, 'SB404', null, 'ops_history: unknown: SB404');

select billing.raise_alert('test alert', 'payments', null, '{"x": 1}') is not null as _ \gset
select is((select topic from billing.ops_alerts() limit 1), 'test alert', 'ops_alerts: newest first');

select * from finish();
rollback;

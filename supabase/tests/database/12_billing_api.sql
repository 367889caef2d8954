-- The subscriber API: each function's privileges and behaviour, as signed-in users (role
-- authenticated with request.jwt.claims), as anon and without a JWT.
begin;
select plan(57);

-- The helpers (tests.as_user, tests.svc, tests.register, tests.serve, ...) come from 01_helpers.sql.

select billing.enable_test_clock() is not null as _ \gset
select billing.set_test_clock('2028-01-10 10:00+09') is not null as _ \gset
insert into billing.plans (code, name, credits_per_period) values ('basic', 'Saju맛피아 Basic', 3);
insert into billing.plan_prices (plan_id, amount, effective_from)
select id, 4900, '2000-01-01' from billing.plans where code = 'basic';

-- Privileges: anon may call nothing, and a missing JWT is SB401 ------------------------------------
select set_config('role', 'anon', true) is not null as _ \gset
select throws_ok($$ select api.begin_registration() $$, '42501', null, 'anon cannot begin a registration');
select throws_ok($$ select api.my_subscription() $$, '42501', null, 'anon cannot read a subscription');
select throws_ok($$ select api.my_payments() $$, '42501', null, 'anon cannot read payments');
select throws_ok($$ select api.my_credits() $$, '42501', null, 'anon cannot read credits');
select throws_ok($$ select api.cancel_subscription() $$, '42501', null, 'anon cannot cancel');
select throws_ok($$ select api.resume_subscription() $$, '42501', null, 'anon cannot resume');
select throws_ok($$ select api.consume_credit('x') $$, '42501', null, 'anon cannot consume credits');
select tests.as_owner();
select set_config('role', 'service_role', true) is not null as _ \gset
select throws_ok($$ select api.my_subscription() $$, '42501', null, 'Supabase''s service_role cannot call api');
select tests.as_owner();
select throws_ok($$ select tests.svc('select api.my_subscription()') $$, '42501', null,
  'billing_service cannot call api');

select set_config('role', 'authenticated', true) is not null as _ \gset
select throws_ok($$ select api.my_subscription() $$, 'SB401', 'not signed in', 'no JWT: SB401');
select set_config('request.jwt.claims', '{"role": "authenticated"}', true) is not null as _ \gset
select throws_ok($$ select api.consume_credit('x') $$, 'SB401', null, 'a JWT without sub: SB401');
select tests.as_owner();

-- begin_registration ------------------------------------------------------------------------------
select tests.as_user('user-a');
select api.begin_registration() as reg_a \gset
select tests.as_owner();
select matches(:'reg_a'::jsonb ->> 'customerKey', '^ck_[0-9a-f]{32}$', 'a fresh unguessable customerKey');
select is(:'reg_a'::jsonb - 'customerKey' - 'registrationId',
  '{"amount": 9900, "currency": "KRW", "orderName": "Saju맛피아 Pro 2028.01.10~2028.02.09",
    "expiresAt": "2028-01-10T02:00:00+00:00", "replacesCard": false, "customerEmail": "user-a@example.com",
    "customerName": null,
    "plan": {"code": "pro", "name": "Saju맛피아 Pro", "amount": 9900, "currency": "KRW", "interval": "month",
             "creditsPerPeriod": 10}}'::jsonb,
  'what the SDK needs: amount, orderName, plan; the registration expires in an hour');
select results_eq(
  format($$ select c.user_id, c.email, r.status::text from billing.card_registrations r
              join billing.customers c on c.id = r.customer_id where r.customer_key = %L $$,
         :'reg_a'::jsonb ->> 'customerKey'),
  $$ values ('user-a'::text, 'user-a@example.com'::text, 'pending'::text) $$,
  'the customerKey is bound to the caller server-side');
select tests.as_user('user-a');
select throws_ok($$ select api.begin_registration('gold') $$, 'SB404', null, 'unknown plan: SB404');
select throws_ok($$ select api.begin_registration(null) $$, 'SB400', null, 'no plan: SB400');
select lives_ok($$ select api.begin_registration(); select api.begin_registration();
                   select api.begin_registration(); select api.begin_registration() $$,
  'up to five registrations may be pending');
select throws_ok($$ select api.begin_registration() $$, 'SB422', null, 'a sixth pending registration: SB422');
select tests.as_owner();

select tests.register('user-b', 'bk_b') as b \gset
select tests.as_user('user-b');
select throws_ok($$ select api.begin_registration('basic') $$, 'SB422', null,
  'another plan while subscribed: SB422 (no plan changes)');
select is((api.begin_registration('pro') ->> 'replacesCard')::boolean, true,
  'registering again while subscribed replaces the card');
select tests.as_owner();

-- my_subscription ---------------------------------------------------------------------------------
select tests.as_user('user-c');
select is(api.my_subscription(), null, 'no subscription yet: null');
select tests.as_user('user-b');
select is(api.my_subscription() - 'subscriptionId' - 'billingAnchor' - 'cancelRequestedAt',
  '{"status": "incomplete", "plan": {"code": "pro", "name": "Saju맛피아 Pro", "creditsPerPeriod": 10},
    "currentPeriod": {"index": 1, "startsAt": "2028-01-10T01:00:00+00:00", "endsAt": "2028-02-10T01:00:00+00:00",
                      "amount": 9900, "status": "open"},
    "anchorDay": 10, "cancelAtPeriodEnd": false, "canceledAt": null, "endedAt": null, "pastDueSince": null,
    "graceEndsAt": "2028-01-11T01:00:00+00:00", "awaitingCard": false, "nextChargeAt": "2028-01-10T01:00:00+00:00",
    "card": {"numberMasked": "4330****1234", "issuerCode": "61", "cardType": "신용", "status": "active"}}'::jsonb,
  'a new subscription is incomplete until its first charge; the first charge is due now');
select tests.as_owner();
select is(jsonb_array_length(tests.serve('ok')), 1, 'the service charges the first period');
select tests.as_user('user-b');
select is(api.my_subscription() ->> 'status', 'active', 'paid: active');
select is(api.my_subscription() ->> 'nextChargeAt', '2028-02-10T01:00:00+00:00', 'the next charge is at period end');
select tests.as_user('user-a');
select is(api.my_subscription(), null, 'user-a does not see user-b''s subscription');

-- my_payments -------------------------------------------------------------------------------------
select tests.as_user('user-b');
select is(jsonb_array_length(api.my_payments()), 1, 'one payment');
select is((api.my_payments() -> 0) - 'paymentId' - 'orderId' - 'receiptUrl',
  '{"status": "DONE", "totalAmount": 9900, "balanceAmount": 9900, "approvedAt": "2028-01-10T01:00:00+00:00",
    "periodIndex": 1, "periodStartsAt": "2028-01-10T01:00:00+00:00", "periodEndsAt": "2028-02-10T01:00:00+00:00",
    "refunds": []}'::jsonb, 'the payment with its period');
select tests.as_user('user-c');
select is(api.my_payments(), '[]'::jsonb, 'someone else sees no payments');

-- my_credits and consume_credit -------------------------------------------------------------------
select tests.as_user('user-b');
select is((api.my_credits() ->> 'balance')::int, 10, 'a paid period grants 10 credits');
select is(api.my_credits() -> 'grants' -> 0 ->> 'expiresAt', '2028-02-10T01:00:00+00:00',
  'credits expire at period end');
select is(api.my_credits() -> 'entries' -> 0 ->> 'kind', 'grant', 'the ledger shows the grant');
select throws_ok($$ select api.consume_credit('') $$, 'SB400', null, 'an empty reason: SB400');
select throws_ok(format('select api.consume_credit(%L)', repeat('x', 201)), 'SB400', null, 'a long reason: SB400');
select throws_ok(format('select api.consume_credit(%L)', E'\t\n \r\n'), 'SB400', 'reason must be 1–200 characters',
  'a reason of tabs and newlines only is blank: SB400');
select is((api.my_credits() ->> 'balance')::int, 10, 'refused reasons spend nothing');
select is((api.consume_credit('saju test') ->> 'balance')::int, 9, 'consuming one credit leaves 9');
select results_eq($$ select e ->> 'kind', (e ->> 'amount')::int, e ->> 'reason'
                      from jsonb_array_elements(api.my_credits() -> 'entries') e $$,
  $$ values ('consume'::text, -1, 'saju test'::text), ('grant', 10, 'period 1 paid') $$,
  'the ledger records the consumption, newest first');
select lives_ok($$ select api.consume_credit('t') from generate_series(1, 9) $$, 'nine more succeed');
select throws_ok($$ select api.consume_credit('one too many') $$, 'SB422', 'no credits left',
  'none left: SB422');
select is((api.my_credits() ->> 'balance')::int, 0, 'the balance stops at zero');
select tests.as_user('user-c');
select throws_ok($$ select api.consume_credit('x') $$, 'SB422', null, 'never subscribed: SB422');
select is(api.my_credits(), '{"balance": 0, "grants": [], "entries": []}'::jsonb, 'no credits for a stranger');

-- cancel_subscription and resume_subscription -----------------------------------------------------
select throws_ok($$ select api.cancel_subscription() $$, 'SB404', null, 'nothing to cancel: SB404');
select throws_ok($$ select api.resume_subscription() $$, 'SB404', null, 'nothing to resume: SB404');
select tests.as_user('user-b');
-- The message names the subscription (it once printed <NULL>).
select throws_ok($$ select api.resume_subscription() $$, 'SB409',
  format('subscription %s is not scheduled to cancel (or its period has ended)', :'b'::jsonb ->> 'subscriptionId'),
  'not scheduled to cancel: SB409, naming the subscription');
select api.cancel_subscription() as canceled \gset
select is((:'canceled'::jsonb ->> 'cancelAtPeriodEnd')::boolean, true, 'cancel: at the end of the period');
select is(:'canceled'::jsonb ->> 'status', 'active', 'access continues until then');
select is(api.cancel_subscription() ->> 'cancelRequestedAt', :'canceled'::jsonb ->> 'cancelRequestedAt',
  'canceling again changes nothing');
select is(api.my_subscription() ->> 'nextChargeAt', null, 'no next charge after a cancel');
select is((api.resume_subscription() ->> 'cancelAtPeriodEnd')::boolean, false, 'resume before the end');
select tests.as_owner();
select results_eq(
  format($$ select kind::text from billing.notifications where subscription_id = %L
             and kind in ('cancel_scheduled', 'resumed') order by id $$, :'b'::jsonb ->> 'subscriptionId'),
  $$ values ('cancel_scheduled'::text), ('resumed'::text) $$, 'both are notified');
select tests.as_user('user-b');
select api.cancel_subscription() is not null as _ \gset
select tests.as_owner();
select billing.advance_test_clock('31 days') is not null as _ \gset
select tests.as_user('user-b');
select throws_ok($$ select api.resume_subscription() $$, 'SB409',
  format('subscription %s is not scheduled to cancel (or its period has ended)', :'b'::jsonb ->> 'subscriptionId'),
  'too late once the period has ended');
select tests.as_owner();

-- Canceling while past_due ends the subscription at once
select billing.set_test_clock('2028-01-10 10:00+09') is not null as _ \gset
select tests.register('user-d', 'bk_d') as d \gset
select is(jsonb_array_length(tests.serve('decline')), 1, 'the first charge of user-d is declined');
select tests.as_user('user-d');
select is(api.my_subscription() ->> 'status', 'incomplete', 'a declined first charge leaves it incomplete');
select is((api.cancel_subscription() - 'subscriptionId' - 'billingAnchor' - 'card' - 'currentPeriod' - 'plan'
           - 'anchorDay'),
  '{"status": "canceled", "cancelAtPeriodEnd": false, "cancelRequestedAt": "2028-01-10T01:00:00+00:00",
    "canceledAt": "2028-01-10T01:00:00+00:00", "endedAt": "2028-01-10T01:00:00+00:00", "pastDueSince": null,
    "graceEndsAt": null, "awaitingCard": false, "nextChargeAt": null}'::jsonb,
  'canceling an unpaid subscription ends it now');
select tests.as_owner();
select is((select status::text from billing.billing_periods where subscription_id = (:'d'::jsonb ->> 'subscriptionId')::uuid),
  'void', 'its unpaid period is void');

select * from finish();
rollback;

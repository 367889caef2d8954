-- The scheduler (billing.tick and the doorbell) and the operator functions: renewals, cancels at
-- period end, grace, credit expiry, lease expiry, price versions, immediate cancel with a prorated
-- refund, manual retries and dunning configuration.
begin;
select plan(85);

-- The helpers (tests.as_user, tests.svc, tests.register, tests.serve, ...) come from 01_helpers.sql.

select billing.enable_test_clock() is not null as _ \gset
select billing.set_test_clock('2028-01-10 10:00+09') is not null as _ \gset

-- The doorbell --------------------------------------------------------------------------------------
select is(billing.ring_service('{"x": 1}'), null, 'no secrets in the vault: the doorbell stays quiet');
select vault.create_secret('http://127.0.0.1:8787/', 'saju_billing_service_url') is not null as _ \gset
select vault.create_secret('doorbell-token', 'saju_billing_doorbell_token') is not null as _ \gset
select count(*) as queued_before from net.http_request_queue \gset
select is(billing.tick() - 'steps',
  '{"at": "2028-01-10T01:00:00+00:00", "renewals": 0, "cardsNeeded": 0, "endedAtPeriodEnd": 0, "endedAfterGrace": 0,
    "creditGrantsExpired": 0, "registrationsExpired": 0, "doorbellRequestId": null,
    "leasesExpired": {"attempts": 0, "refunds": 0, "webhooks": 0, "keyDeletions": 0},
    "claimable": {"attempts": false, "refunds": false, "webhooks": false, "keyDeletions": false, "notifications": false}}'::jsonb,
  'an idle tick does nothing and rings nobody');
select tests.register('user-a', 'bk_a') as a \gset
select (billing.tick() ->> 'doorbellRequestId')::bigint as bell \gset
select ok(:'bell'::bigint is not null, 'with a charge due, the tick rings the service');
select results_eq(format($$ select method::text, url, headers ->> 'Authorization', timeout_milliseconds,
                                   convert_from(body, 'UTF8')::jsonb -> 'claimable' ->> 'attempts'
                              from net.http_request_queue where id = %s $$, :bell),
  $$ values ('POST'::text, 'http://127.0.0.1:8787/internal/doorbell'::text, 'Bearer doorbell-token'::text, 5000,
             'true'::text) $$,
  'net.http_post to <service url>/internal/doorbell with the bearer token from the vault and the summary');
select is((select count(*) from net.http_request_queue), (:queued_before + 1)::bigint, 'one request per ringing tick');
select throws_ok($$ select billing.ops_configure_doorbell('ftp://127.0.0.1/', 'doorbell-token-0123456789') $$,
  'SB400', null, 'ops_configure_doorbell: not an http(s) URL: SB400');
select throws_ok($$ select billing.ops_configure_doorbell('http://127.0.0.1:8788', 'short-token') $$,
  'SB400', null, 'ops_configure_doorbell: a token under 16 characters: SB400');
select throws_ok($$ select billing.ops_configure_doorbell('http://127.0.0.1:8788', 'doorbell token 0123456789') $$,
  'SB400', null, 'ops_configure_doorbell: a token with white space: SB400');
select throws_ok($$ select tests.svc('select billing.ops_configure_doorbell(%L, %L)', 'http://127.0.0.1:8788',
                                     'doorbell-token-0123456789') $$,
  '42501', null, 'ops_configure_doorbell: the service cannot move its own doorbell');
select is(billing.ops_configure_doorbell('http://127.0.0.1:8788/', 'doorbell-token-rotated-0001'),
  '{"serviceUrl": "http://127.0.0.1:8788", "changed": ["saju_billing_service_url", "saju_billing_doorbell_token"]}'::jsonb,
  'ops_configure_doorbell: replaces both secrets in the vault');
select is(billing.ops_configure_doorbell('http://127.0.0.1:8788', 'doorbell-token-rotated-0001') -> 'changed', '[]'::jsonb,
  'ops_configure_doorbell: the same again changes nothing');
select billing.ring_service('{"x": 2}') as bell2 \gset
select results_eq(format($$ select url, headers ->> 'Authorization' from net.http_request_queue where id = %s $$, :bell2),
  $$ values ('http://127.0.0.1:8788/internal/doorbell'::text, 'Bearer doorbell-token-rotated-0001'::text) $$,
  'the doorbell rings where it was configured, with the new token');
select is_empty($$ select e.id from billing.events e where e::text like '%doorbell-token%' $$,
  'the doorbell token is never written to the event log');

-- Five subscribers at 2028-01-10 10:00 KST ----------------------------------------------------------
select tests.register('user-b', 'bk_b') as b \gset
select tests.register('user-c', 'bk_c') as c \gset
select tests.register('user-e', 'bk_e') as e \gset
select tests.register('user-f', 'bk_f') as f \gset
select is(jsonb_array_length(tests.serve('ok')), 5, 'five first charges succeed');
select tests.register('user-d', 'bk_d') as d \gset
select is(jsonb_array_length(tests.serve('decline')), 1, 'user-d''s first charge is declined');
select tests.as_user('user-a');
select api.cancel_subscription() is not null as _ \gset
select tests.as_owner();
select tests.svc('select billing.service_mark_payment_method_deleted(%L, %L)', :'c'::jsonb ->> 'sha', 'x') is not null as _ \gset

-- Grace of an incomplete subscription
select billing.set_test_clock('2028-01-11 09:59+09') is not null as _ \gset
select is((billing.tick() ->> 'endedAfterGrace')::int, 0, 'not before its grace ends');
select billing.set_test_clock('2028-01-11 10:00+09') is not null as _ \gset
select is((billing.tick() ->> 'endedAfterGrace')::int, 1, 'a day after a failed first charge the tick ends it');
select results_eq(format($$ select s.status::text, s.status_reason, bp.status::text from billing.subscriptions s
                              join billing.billing_periods bp on bp.subscription_id = s.id where s.id = %L $$,
                         :'d'::jsonb ->> 'subscriptionId'),
  $$ values ('canceled'::text, 'first charge never succeeded'::text, 'void'::text) $$, 'canceled, its period void');

-- cancel_subscription_now ---------------------------------------------------------------------------
select billing.set_test_clock('2028-01-20 10:00+09') is not null as _ \gset
select throws_ok($$ select billing.cancel_subscription_now(gen_random_uuid(), true, 'x') $$, 'SB404', null,
  'unknown subscription: SB404');
select throws_ok(format('select billing.cancel_subscription_now(%L, true, %L)', :'e'::jsonb ->> 'subscriptionId', ''),
  'SB400', null, 'no reason: SB400');
select throws_ok(format($$ select tests.svc('select billing.cancel_subscription_now(%%L, true, %%L)', %L, 'x') $$,
                        :'e'::jsonb ->> 'subscriptionId'),
  '42501', null, 'the service cannot cancel subscriptions');
select billing.cancel_subscription_now((:'e'::jsonb ->> 'subscriptionId')::uuid, true, 'support ticket 42') as e_out \gset
select is(:'e_out'::jsonb ->> 'refundAmount', '6706',
  'prorated refund: floor(9,900 × 21 of 31 days left) = 6,706 KRW');
select results_eq(format($$ select r.amount, r.source::text, r.status::text, r.reason from billing.refunds r
                              where r.id = %L $$, :'e_out'::jsonb ->> 'refundId'),
  $$ values (6706::bigint, 'prorated_cancel'::text, 'requested'::text, 'prorated: support ticket 42'::text) $$,
  'the refund is queued for the service');
select results_eq(format($$ select s.status::text, s.ended_at, g.status::text, kd.status::text
                              from billing.subscriptions s join billing.credit_grants g on g.subscription_id = s.id
                              join billing.key_deletions kd on kd.payment_method_id = s.payment_method_id
                             where s.id = %L $$, :'e'::jsonb ->> 'subscriptionId'),
  $$ values ('canceled'::text, '2028-01-20 10:00+09'::timestamptz, 'expired'::text, 'requested'::text) $$,
  'ended now: credits expire, the billing key is queued for deletion');
select throws_ok(format('select billing.cancel_subscription_now(%L, true, %L)', :'e'::jsonb ->> 'subscriptionId', 'again'),
  'SB409', null, 'already ended: SB409');

-- change_plan_price ---------------------------------------------------------------------------------
select throws_ok($$ select billing.change_plan_price('gold', 12900, '2028-02-01') $$, 'SB404', null, 'unknown plan: SB404');
select throws_ok($$ select billing.change_plan_price('pro', 50, '2028-02-01') $$, 'SB400', null, 'below 100 KRW: SB400');
select throws_ok($$ select billing.change_plan_price('pro', 12900, '2028-01-01') $$, 'SB422', null,
  'in the past: SB422');
select isnt(billing.change_plan_price('pro', 12900, '2028-02-10 10:00+09'), null, 'a new price version');
select throws_ok($$ select billing.change_plan_price('pro', 13900, '2028-02-10 10:00+09') $$, 'SB409', null,
  'two versions at the same instant: SB409');
select billing.set_test_clock('2028-01-09 10:00+09') is not null as _ \gset
select throws_ok($$ select billing.change_plan_price('pro', 13900, '2028-01-09 12:00+09') $$, 'SB422', null,
  'a clock moved back cannot put a price under periods that exist already: SB422');
select billing.set_test_clock('2028-01-20 10:00+09') is not null as _ \gset
select results_eq($$ select amount, effective_from from billing.plan_prices pp join billing.plans p on p.id = pp.plan_id
                      where p.code = 'pro' order by effective_from $$,
  $$ values (9900::bigint, '2000-01-01 00:00+09'::timestamptz), (12900, '2028-02-10 10:00+09') $$,
  'the old version stays as it was');

-- The first renewal day ------------------------------------------------------------------------------
select billing.set_test_clock('2028-02-10 10:00+09') is not null as _ \gset
select billing.tick() as t1 \gset
select is(array[(:'t1'::jsonb ->> 'renewals')::int, (:'t1'::jsonb ->> 'cardsNeeded')::int,
                (:'t1'::jsonb ->> 'endedAtPeriodEnd')::int, (:'t1'::jsonb ->> 'creditGrantsExpired')::int],
          array[3, 1, 1, 4],
  'period end: b and f renew, c has no card, a ends as asked, four grants expire');
select results_eq(format($$ select status::text, ended_at, canceled_at from billing.subscriptions where id = %L $$,
                         :'a'::jsonb ->> 'subscriptionId'),
  $$ values ('canceled'::text, '2028-02-10 10:00+09'::timestamptz, '2028-01-10 10:00+09'::timestamptz) $$,
  'cancel at period end: ended at the period end, canceled when asked');
select is((select count(*)::int from billing.billing_periods where subscription_id = (:'a'::jsonb ->> 'subscriptionId')::uuid),
  1, 'no renewal for it');
select results_eq(format($$ select bp.period_index, bp.starts_at, bp.ends_at, bp.amount, ca.status::text, ca.amount
                              from billing.billing_periods bp join billing.charge_attempts ca on ca.period_id = bp.id
                             where bp.subscription_id = %L and bp.period_index = 2 $$, :'b'::jsonb ->> 'subscriptionId'),
  $$ values (2, '2028-02-10 10:00+09'::timestamptz, '2028-03-10 10:00+09'::timestamptz, 12900::bigint, 'queued'::text,
             12900::bigint) $$,
  'renewal: period 2 at the price in effect at its start, its attempt due now');
select results_eq(format($$ select s.status::text, s.awaiting_card, s.grace_ends_at,
                                   (select count(*) from billing.charge_attempts ca where ca.subscription_id = s.id
                                       and ca.status = 'queued')
                              from billing.subscriptions s where s.id = %L $$, :'c'::jsonb ->> 'subscriptionId'),
  $$ values ('past_due'::text, true, '2028-02-17 10:00+09'::timestamptz, 0::bigint) $$,
  'renewal without a usable card: past_due, waiting for a card, nothing to charge');
select results_eq($$ select kind::text, amount from billing.credit_entries where kind = 'expire' order by id $$,
  $$ values ('expire'::text, -10), ('expire', -10), ('expire', -10), ('expire', -10), ('expire', -10) $$,
  'expired credits are written off in the ledger (one by the immediate cancel)');

-- retry_subscription_charge -------------------------------------------------------------------------
select tests.serve('claim') as sent \gset
select is(jsonb_array_length(:'sent'), 2, 'b''s and f''s renewals are sent');
select c ->> 'attempt_id' as b_attempt, c ->> 'order_id' as b_order, c ->> 'lease_token' as b_tok
  from jsonb_array_elements(:'sent') c where c ->> 'subscription_id' = :'b'::jsonb ->> 'subscriptionId' \gset
select c ->> 'attempt_id' as f_attempt, c ->> 'lease_token' as f_tok
  from jsonb_array_elements(:'sent') c where c ->> 'subscription_id' = :'f'::jsonb ->> 'subscriptionId' \gset
select (tests.rec('select billing.service_record_charge_success(%L, %L, %L)', :'b_attempt', :'b_tok',
                   tests.payment(:'b_order', 12900)::text)).status as _ \gset
select (tests.rec('select billing.service_record_charge_failure(%L, %L, %L, null, %L)', :'f_attempt', :'f_tok',
                   'INVALID_REQUEST', 'bug')).status as _ \gset
select is((select status::text from billing.subscriptions where id = (:'f'::jsonb ->> 'subscriptionId')::uuid), 'past_due',
  'a bug leaves the renewal unpaid');
select throws_ok(format('select billing.retry_subscription_charge(%L)', :'b'::jsonb ->> 'subscriptionId'), 'SB409', null,
  'nothing to retry on a paid subscription: SB409');
select throws_ok(format('select billing.retry_subscription_charge(%L)', :'c'::jsonb ->> 'subscriptionId'), 'SB422', null,
  'no usable card: SB422');
select throws_ok($$ select billing.retry_subscription_charge(gen_random_uuid()) $$, 'SB404', null, 'unknown: SB404');
select isnt(billing.retry_subscription_charge((:'f'::jsonb ->> 'subscriptionId')::uuid, 'fixed the request'), null,
  'after fixing the cause, support retries');
select throws_ok(format('select billing.retry_subscription_charge(%L)', :'f'::jsonb ->> 'subscriptionId'), 'SB409', null,
  'an attempt is already in flight: SB409');
select is(jsonb_array_length(tests.serve('ok')), 1, 'the retry is charged');
select is((select status::text from billing.subscriptions where id = (:'f'::jsonb ->> 'subscriptionId')::uuid), 'active',
  'and the subscription is active again');

-- Leases expire -------------------------------------------------------------------------------------
select billing.request_refund(p.id, 1000, 'goodwill') is not null as _ from billing.payments p
 where p.order_id = :'b_order' \gset
select tests.svc($q$ select to_jsonb(w) from billing.service_ingest_webhook('whtrans_l', 'PAYMENT_STATUS_CHANGED',
  '{"eventType": "PAYMENT_STATUS_CHANGED", "data": {}}') w $q$) is not null as _ \gset
select is(tests.svc($q$ select jsonb_build_array(
                           (select count(*) from billing.service_claim_refunds('w', 10)),
                           (select count(*) from billing.service_claim_webhooks('w', 10)),
                           (select count(*) from billing.service_claim_key_deletions('w', 1))) $q$),
  '[2, 1, 1]'::jsonb, 'refunds, a webhook and a key deletion are claimed');
select billing.advance_test_clock('2 minutes') is not null as _ \gset
select is(billing.tick() -> 'leasesExpired', '{"attempts": 0, "refunds": 2, "webhooks": 1, "keyDeletions": 1}'::jsonb,
  'when their leases expire the tick makes them claimable again');
select results_eq($$ select (select count(*) from billing.refunds where status = 'requested'),
                            (select count(*) from billing.webhook_events where status = 'received'),
                            (select count(*) from billing.key_deletions where status = 'claimed') $$,
  $$ values (2::bigint, 1::bigint, 0::bigint) $$, 'back to requested / received');
select is((select count(*)::int from billing.refunds where status = 'requested' and lease_owner is null
             and lease_token is not null), 2,
  'an expired lease leaves its token on the row until the next claim replaces it');

-- Grace of a past_due subscription -------------------------------------------------------------------
select billing.set_test_clock('2028-02-17 10:00+09') is not null as _ \gset
select is((billing.tick() ->> 'endedAfterGrace')::int, 1, 'no card within the dunning window: the tick ends it');
select results_eq(format($$ select s.status::text, bp.status::text from billing.subscriptions s
                              join billing.billing_periods bp on bp.id = s.current_period_id where s.id = %L $$,
                         :'c'::jsonb ->> 'subscriptionId'),
  $$ values ('canceled'::text, 'unpaid'::text) $$, 'in the plan''s final status, its period unpaid');

-- configure_plan_dunning ----------------------------------------------------------------------------
select throws_ok($$ select billing.configure_plan_dunning('pro', '{1 day}', 'paused') $$, 'SB400', null,
  'final status must be canceled or unpaid: SB400');
select throws_ok($$ select billing.configure_plan_dunning('pro', '{3 days,1 day}', 'unpaid') $$, 'SB400', null,
  'a schedule must increase: SB400');
select throws_ok($$ select billing.configure_plan_dunning('gold', '{1 day}', 'unpaid') $$, 'SB404', null,
  'unknown plan: SB404');
select lives_ok($$ select billing.configure_plan_dunning('pro', '{1 day}', 'unpaid') $$, 'one retry, then unpaid');
select tests.register('user-g', 'bk_g') as g \gset
select is(jsonb_array_length(tests.serve('ok')), 1, 'user-g subscribes');
select billing.set_test_clock('2028-03-17 10:00+09') is not null as _ \gset
select billing.tick() is not null as _ \gset
select tests.svc($q$ select to_jsonb(array_agg(c)) from billing.service_claim_attempts('w') c $q$) as due \gset
select c ->> 'attempt_id' as g_attempt, c ->> 'lease_token' as g_tok
  from jsonb_array_elements(:'due') c where c ->> 'subscription_id' = :'g'::jsonb ->> 'subscriptionId' \gset
select is((tests.rec('select billing.service_record_charge_failure(%L, %L, %L, null, %L)', :'g_attempt', :'g_tok',
                      'REJECT_CARD_PAYMENT', 'decline')).detail -> 'next' ->> 'notBefore', '2028-03-18T01:00:00+00:00',
  'declined: the single retry a day later');
select billing.set_test_clock('2028-03-18 10:00+09') is not null as _ \gset
select a.id as g_retry from billing.charge_attempts a
 where a.subscription_id = (:'g'::jsonb ->> 'subscriptionId')::uuid and a.status = 'queued' \gset
select tests.svc($q$ select to_jsonb(array_agg(c)) from billing.service_claim_attempts('w') c $q$) -> 0 as g_claim \gset
select is(:'g_claim'::jsonb ->> 'attempt_id', :'g_retry', 'the retry is claimed');
select is((tests.rec('select billing.service_record_charge_failure(%L, %L, %L, null, %L)', :'g_retry',
                       :'g_claim'::jsonb ->> 'lease_token', 'REJECT_CARD_PAYMENT', 'decline')).detail -> 'next',
  '{"action": "ended", "status": "unpaid"}'::jsonb, 'declined again: the schedule is exhausted');
select results_eq(format($$ select s.status::text, s.ended_at, bp.status::text from billing.subscriptions s
                              join billing.billing_periods bp on bp.id = s.current_period_id where s.id = %L $$,
                         :'g'::jsonb ->> 'subscriptionId'),
  $$ values ('unpaid'::text, '2028-03-18 10:00+09'::timestamptz, 'unpaid'::text) $$, 'the subscription ends unpaid');
select is((select payload ->> 'status' from billing.notifications
            where subscription_id = (:'g'::jsonb ->> 'subscriptionId')::uuid and kind = 'canceled'), 'unpaid',
  'the subscriber is told');
select is((select kd.status::text from billing.key_deletions kd join billing.subscriptions s on s.payment_method_id = kd.payment_method_id
            where s.id = (:'g'::jsonb ->> 'subscriptionId')::uuid), 'requested',
  'its billing key is queued for deletion at Toss');

-- Reconciliation with Toss's transaction list ------------------------------------------------------
select throws_ok($$ select billing.request_reconciliation('2028-01-11 00:00+09', '2028-01-10 00:00+09') $$, 'SB400', null,
  'request_reconciliation: a window that ends before it starts: SB400');
select throws_ok($$ select billing.request_reconciliation('2028-01-01 00:00+09', '2028-02-02 00:00+09') $$, 'SB400', null,
  'request_reconciliation: a window over 31 days: SB400');
select throws_ok($$ select tests.svc('select to_jsonb(billing.request_reconciliation(%L, %L))', '2028-01-10', '2028-01-11') $$,
  '42501', null, 'the service cannot queue reconciliations');
-- Every payment here was approved on 2028-01-10 (tests.payment), so that day's window holds them all.
select billing.request_reconciliation('2028-01-10 00:00+09', '2028-01-11 00:00+09') as rec1 \gset
select is(billing.request_reconciliation('2028-01-10 00:00+09', '2028-01-11 00:00+09'), :'rec1'::uuid,
  'the same window while it is queued: the same run');
select tests.svc($q$ select jsonb_agg(to_jsonb(c)) from billing.service_claim_reconciliations('w') c $q$) as rc \gset
select is((select jsonb_agg(e - 'lease_token') from jsonb_array_elements(:'rc') e),
  jsonb_build_array(jsonb_build_object('reconciliation_id', :'rec1', 'window_start', '2028-01-09T15:00:00+00:00',
    'window_end', '2028-01-10T15:00:00+00:00', 'lease_expires_at', '2028-03-18T01:10:00+00:00')),
  'service_claim_reconciliations: the window under a ten-minute lease');
select :'rc'::jsonb -> 0 ->> 'lease_token' as rec_tok \gset
select (select payment_key from billing.payments order by payment_key limit 1) as pk_known,
       (select array_agg(payment_key order by payment_key) from billing.payments) as pks \gset
select is(tests.svc('select jsonb_agg(k.payment_key) from billing.service_unknown_payment_keys(%L) k',
                    array['pk_at_toss_only', :'pk_known', null, 'pk_at_toss_only']::text),
  '["pk_at_toss_only"]'::jsonb, 'service_unknown_payment_keys: the keys the ledger lacks, once each, nulls ignored');
select throws_ok(format($$ select tests.rec('select billing.service_record_reconciliation(%%L, %%L)', %L, %L) $$,
                        :'rec1', :'rec_tok'),
  'SB400', null, 'service_record_reconciliation: neither payment keys nor an error: SB400');
select throws_ok(format($$ select tests.rec('select billing.service_record_reconciliation(%%L, %%L, %%L)', %L, %L, %L) $$,
                        :'rec1', gen_random_uuid(), :'pks'),
  'SB409', null, 'service_record_reconciliation: another lease''s token: SB409');
select throws_ok(format($$ select tests.rec('select billing.service_record_reconciliation(%%L, null, %%L)', %L, %L) $$,
                        :'rec1', :'pks'),
  'SB400', null, 'service_record_reconciliation: no token: SB400');
select throws_ok($$ select tests.rec('select billing.service_record_reconciliation(%L, %L, null, %L)', gen_random_uuid()::text,
                                     gen_random_uuid()::text, 'X') $$,
  'SB404', null, 'service_record_reconciliation: an unknown run: SB404');
select is((select status::text from billing.reconciliation_runs where id = :'rec1'), 'claimed', 'refused results change nothing');
select count(*)::int as alerts_before from billing.notifications where kind = 'alert' \gset
-- Toss lists one payment the ledger lacks and leaves out the ledger's first one.
select is(tests.rec('select billing.service_record_reconciliation(%L, %L, %L)', :'rec1', :'rec_tok',
                    ((:'pks'::text[])[2:] || array['pk_at_toss_only'])::text),
  row(:'rec1', 'done', true, jsonb_build_object('listed', cardinality(:'pks'::text[]), 'unknown', 1, 'missing', 1))::billing.recorded,
  'service_record_reconciliation: done, counting what each side lacks');
select results_eq(format($$ select payload ->> 'topic', payload -> 'details' from billing.notifications
                             where kind = 'alert' order by id offset %s $$, :alerts_before),
  format($$ values ('approved at Toss but missing from the ledger'::text, '{"paymentKeys": ["pk_at_toss_only"]}'::jsonb),
                   ('in the ledger but not listed by Toss', %L::jsonb) $$,
         (select jsonb_build_object('paymentKey', payment_key, 'orderId', order_id, 'amount', total_amount,
                                    'reconciliationId', :'rec1') from billing.payments where payment_key = :'pk_known')),
  'each gap is an operator alert');
select is((tests.rec('select billing.service_record_reconciliation(%L, %L, %L)', :'rec1', :'rec_tok', :'pks')).changed, false,
  'the same result again changes nothing');
select is(billing.request_reconciliation('2028-01-10 00:00+09', '2028-01-11 00:00+09'), :'rec1'::uuid,
  'a window already reconciled can be run again');
select tests.svc($q$ select jsonb_agg(to_jsonb(c)) from billing.service_claim_reconciliations('w') c $q$) -> 0 ->> 'lease_token'
  as rec_tok2 \gset
select is(tests.rec('select billing.service_record_reconciliation(%L, %L, null, %L, %L)', :'rec1', :'rec_tok2',
                    'COMMON_ERROR', 'try later'),
  row(:'rec1', 'requested', true, '{}'::jsonb)::billing.recorded, 'an error: requested again');
select is((select not_before from billing.reconciliation_runs where id = :'rec1'), '2028-03-18 10:10+09'::timestamptz,
  'after a backoff');
select results_eq($$ select status, listed, unknown, missing, error_code from billing.ops_reconciliation_report(100) $$,
  format($$ values ('requested'::text, %s, 1, 1, 'COMMON_ERROR'::text) $$, (select count(*) from billing.payments)),
  'ops_reconciliation_report: the runs of the last days with their counts');
select is_empty($$ select * from billing.ops_reconciliation_report(30) $$, 'ops_reconciliation_report: only the days asked for');
select billing.schedule_reconciliation() as rec2 \gset
select results_eq(format($$ select window_start, window_end, status::text from billing.reconciliation_runs where id = %L $$, :'rec2'),
  $$ values ('2028-03-17 00:00+09'::timestamptz, '2028-03-18 00:00+09'::timestamptz, 'requested'::text) $$,
  'schedule_reconciliation: the previous Asia/Seoul day');

-- Every operator function is for the owner alone
select is_empty($$ select p.oid::regprocedure from pg_proc p
                    where p.pronamespace = 'billing'::regnamespace
                      and p.proname in ('request_refund', 'change_plan_price', 'cancel_subscription_now',
                                        'retry_subscription_charge', 'configure_plan_dunning', 'tick', 'ring_service',
                                        'enable_test_clock', 'set_test_clock', 'advance_test_clock',
                                        'ops_configure_doorbell', 'request_reconciliation', 'schedule_reconciliation',
                                        'ops_reconciliation_report')
                      and (has_function_privilege('billing_service', p.oid, 'execute')
                           or has_function_privilege('authenticated', p.oid, 'execute')
                           or has_function_privilege('service_role', p.oid, 'execute')) $$,
  'operator and scheduler functions: owner only');

select * from finish();
rollback;

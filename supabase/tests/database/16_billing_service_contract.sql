-- The service contract's guarantees beyond single calls: a subscriber's cancel while a charge may be
-- at Toss, one attempt per period in flight, a processed temporary error spending the key (a new
-- attempt after a backoff, three a period, then dunning), and the helpers behind fencing.
begin;
select plan(80);

-- The helpers (tests.as_user, tests.svc, tests.rec, tests.register, tests.serve, ...) come from
-- 01_helpers.sql.

select billing.enable_test_clock() is not null as _ \gset
select billing.set_test_clock('2028-01-10 10:00+09') is not null as _ \gset

-- Fencing helpers -----------------------------------------------------------------------------------
select gen_random_uuid() as tok_a, gen_random_uuid() as tok_b \gset
select lives_ok(format('select billing.check_lease_token(%L, %L, %L, %L)', 'refund', 'r1', :'tok_a', :'tok_a'),
  'check_lease_token: the current token passes');
select throws_ok(format('select billing.check_lease_token(%L, %L, %L, %L)', 'refund', 'r1', :'tok_a', :'tok_b'),
  'SB409', format('refund r1: lease %s is not the current lease (the work was claimed again); result refused', :'tok_b'),
  'check_lease_token: another token is SB409');
select throws_ok(format('select billing.check_lease_token(%L, %L, %L, null)', 'refund', 'r1', :'tok_a'),
  'SB400', 'lease_token is required to record a result for refund r1', 'check_lease_token: no token is SB400');
select throws_ok(format('select billing.check_lease_token(%L, %L, null, %L)', 'refund', 'r1', :'tok_a'),
  'SB409', null, 'check_lease_token: a row never claimed accepts no token');
select throws_ok(format('select billing.lock_leased_attempt(%L, %L)', :'tok_a', :'tok_b'),
  'SB404', null, 'lock_leased_attempt: an unknown attempt is SB404');

-- Cancel while the first charge is at Toss, and it is approved: the subscription keeps the period ---
select tests.register('user-v', 'bk_v') as v \gset
select is(billing.charge_possibly_sent((:'v'::jsonb ->> 'subscriptionId')::uuid), false,
  'charge_possibly_sent: an attempt never handed out is not at Toss');
select tests.serve('claim') -> 0 as v1 \gset
select is(:'v1'::jsonb ->> 'subscription_id', :'v'::jsonb ->> 'subscriptionId', 'user-v''s first charge is sent');
select is(billing.charge_possibly_sent((:'v'::jsonb ->> 'subscriptionId')::uuid), true,
  'charge_possibly_sent: a claimed attempt may be');
select tests.as_user('user-v');
select api.cancel_subscription() as v_cancel \gset
select tests.as_owner();
select is(array[:'v_cancel'::jsonb ->> 'status', :'v_cancel'::jsonb ->> 'cancelAtPeriodEnd', :'v_cancel'::jsonb ->> 'chargeInFlight',
                :'v_cancel'::jsonb ->> 'endedAt'],
          array['incomplete', 'true', 'true', null],
  'cancel during a charge: pending, the result says chargeInFlight, nothing ended yet');
select tests.as_user('user-v');
select is(api.cancel_subscription() ->> 'chargeInFlight', 'true', 'canceling again says the same');
select tests.as_owner();
select results_eq(format($$ select kind::text, payload - 'subscriptionId' from billing.notifications where subscription_id = %L
                              and kind = 'cancel_scheduled' $$, :'v'::jsonb ->> 'subscriptionId'),
  $$ values ('cancel_scheduled'::text, '{"endsAt": null, "chargeInFlight": true}'::jsonb) $$,
  'the subscriber is told once');
select is(billing.settle_pending_cancel((:'v'::jsonb ->> 'subscriptionId')::uuid), false,
  'settle_pending_cancel: nothing is settled while the charge is in flight');
select :'v1'::jsonb ->> 'attempt_id' as v_attempt, :'v1'::jsonb ->> 'order_id' as v_order,
       :'v1'::jsonb ->> 'lease_token' as v_tok \gset
select is((tests.rec('select billing.service_record_charge_success(%L, %L, %L)', :'v_attempt', :'v_tok',
                     tests.payment(:'v_order', 9900)::text)).status, 'succeeded', 'the charge in flight is approved');
select results_eq(format($$ select status::text, cancel_at_period_end, ended_at, current_period_ends_at
                              from billing.subscriptions where id = %L $$, :'v'::jsonb ->> 'subscriptionId'),
  $$ values ('active'::text, true, null::timestamptz, '2028-02-10 10:00+09'::timestamptz) $$,
  'approved: the subscription runs to the end of the period it paid for, then ends');

-- ... and declined: it ends at once -------------------------------------------------------------------
select tests.register('user-w', 'bk_w') as w \gset
select tests.serve('claim') -> 0 as w1 \gset
select is(:'w1'::jsonb ->> 'subscription_id', :'w'::jsonb ->> 'subscriptionId', 'user-w''s first charge is sent');
select tests.as_user('user-w');
select is(api.cancel_subscription() ->> 'chargeInFlight', 'true', 'user-w cancels while it is at Toss');
select tests.as_owner();
select :'w1'::jsonb ->> 'attempt_id' as w_attempt, :'w1'::jsonb ->> 'lease_token' as w_tok \gset
select is((tests.rec('select billing.service_record_charge_failure(%L, %L, %L, %L, %L)', :'w_attempt', :'w_tok',
                     'REJECT_CARD_PAYMENT', 'refused', 'decline')).detail -> 'next',
  '{"action": "ended", "status": "canceled", "why": "cancel requested during the charge"}'::jsonb,
  'declined: the pending cancel ends it');
select results_eq(format($$ select s.status::text, s.ended_at, bp.status::text from billing.subscriptions s
                              join billing.billing_periods bp on bp.id = s.current_period_id where s.id = %L $$,
                         :'w'::jsonb ->> 'subscriptionId'),
  $$ values ('canceled'::text, '2028-01-10 10:00+09'::timestamptz, 'void'::text) $$, 'ended now, its period void');

-- ... and a re-send that was waiting: looked up instead of charged, then ended ----------------------
select tests.register('user-x', 'bk_x') as x \gset
select tests.svc($q$ select to_jsonb(array_agg(c)) from billing.service_claim_attempts('w') c $q$) -> 0 as x1 \gset
select is((tests.rec('select billing.service_record_charge_failure(%L, %L, %L, null, %L)', :'x1'::jsonb ->> 'attempt_id',
                     :'x1'::jsonb ->> 'lease_token', 'IDEMPOTENT_REQUEST_PROCESSING', 'unprocessed')).status, 'queued',
  'unprocessed: queued to be sent again');
select tests.as_user('user-x');
select is(api.cancel_subscription() ->> 'chargeInFlight', 'true', 'a re-send waiting counts as in flight');
select tests.as_owner();
select is(billing.resend_allowed((:'x1'::jsonb ->> 'attempt_id')::uuid), false, 'resend_allowed: not with a cancel pending');
select billing.advance_test_clock('1 minute') is not null as _ \gset
select tests.svc($q$ select to_jsonb(array_agg(c)) from billing.service_claim_attempts('w') c $q$) -> 0 as x2 \gset
select is(array[:'x2'::jsonb ->> 'attempt_id', :'x2'::jsonb ->> 'mode'], array[:'x1'::jsonb ->> 'attempt_id', 'lookup'],
  'the claim looks the order up instead of charging again');
select is(tests.rec('select billing.service_record_lookup_not_found(%L, %L)', :'x1'::jsonb ->> 'attempt_id',
                    :'x2'::jsonb ->> 'lease_token'),
  row(:'x1'::jsonb ->> 'attempt_id', 'canceled', true,
      jsonb_build_object('notBefore', '2028-01-10T01:01:00+00:00', 'orderId', :'x1'::jsonb ->> 'order_id',
                         'classification', null, 'ended', true))::billing.recorded,
  'not found: the attempt is withdrawn and the subscription ends');
select is((select status::text from billing.subscriptions where id = (:'x'::jsonb ->> 'subscriptionId')::uuid), 'canceled',
  'user-x is canceled');

-- One attempt per period in flight --------------------------------------------------------------------
select tests.register('user-u', 'bk_u') as u \gset
select (select current_period_id from billing.subscriptions where id = (:'u'::jsonb ->> 'subscriptionId')::uuid) as u_period \gset
select throws_ok(format($$ select billing.create_attempt(%L, billing.now(), 'a second attempt') $$, :'u_period'),
  '23505', 'duplicate key value violates unique constraint "charge_attempts_one_in_flight_per_period_key"',
  'a second attempt while one is queued: 23505');
select tests.serve('claim') -> 0 as u1 \gset
select is(:'u1'::jsonb ->> 'subscription_id', :'u'::jsonb ->> 'subscriptionId', 'user-u''s first charge is sent');
select throws_ok(format($$ select billing.create_attempt(%L, billing.now(), 'a second attempt') $$, :'u_period'),
  '23505', 'duplicate key value violates unique constraint "charge_attempts_one_in_flight_per_period_key"',
  'a second attempt while one is claimed: 23505');
select :'u1'::jsonb ->> 'attempt_id' as u_attempt, :'u1'::jsonb ->> 'lease_token' as u_tok \gset
select (tests.rec('select billing.service_record_charge_unknown(%L, %L, %L)', :'u_attempt', :'u_tok', 'timeout')).status
  as _ \gset
select throws_ok(format($$ select billing.create_attempt(%L, billing.now(), 'a second attempt') $$, :'u_period'),
  '23505', 'duplicate key value violates unique constraint "charge_attempts_one_in_flight_per_period_key"',
  'a second attempt while one is unknown: 23505');
select is(billing.charge_possibly_sent((:'u'::jsonb ->> 'subscriptionId')::uuid), true,
  'charge_possibly_sent: an unknown outcome may have charged');
select results_eq(format($$ select status::text, count(*)::int from billing.charge_attempts where period_id = %L group by 1 $$,
                         :'u_period'),
  $$ values ('unknown'::text, 1) $$, 'the period still has its one attempt');

select billing.advance_test_clock('1 minute') is not null as _ \gset
select tests.svc($q$ select to_jsonb(array_agg(c)) from billing.service_claim_attempts('w') c $q$) -> 0 as u2 \gset
select is((tests.rec('select billing.service_record_charge_failure(%L, %L, %L, null, %L)', :'u_attempt',
                     :'u2'::jsonb ->> 'lease_token', 'REJECT_CARD_PAYMENT', 'decline')).status, 'declined',
  'the lookup finds it declined');
select is(billing.charge_possibly_sent((:'u'::jsonb ->> 'subscriptionId')::uuid), false,
  'charge_possibly_sent: nothing in flight once resolved');

-- A processed temporary error spends the key ---------------------------------------------------------
select tests.register('user-t', 'bk_t') as t \gset
select tests.svc($q$ select to_jsonb(array_agg(c)) from billing.service_claim_attempts('w') c $q$) -> 0 as t0 \gset
select is((tests.rec('select billing.service_record_charge_success(%L, %L, %L)', :'t0'::jsonb ->> 'attempt_id',
                     :'t0'::jsonb ->> 'lease_token', tests.payment(:'t0'::jsonb ->> 'order_id', 9900)::text)).status,
  'succeeded', 'user-t subscribes');
select is(billing.attempt_recorded(ca, false, '{"extra": 1}'),
  row(ca.id::text, 'succeeded', false, jsonb_build_object('notBefore', ca.not_before, 'orderId', ca.order_id,
                                                        'classification', null, 'extra', 1))::billing.recorded,
  'attempt_recorded: the attempt and its status, with notBefore, orderId, classification and any extra')
  from billing.charge_attempts ca where ca.id = (:'t0'::jsonb ->> 'attempt_id')::uuid;
select billing.set_test_clock('2028-02-10 10:02+09') is not null as _ \gset
select is(billing.tick() ->> 'renewals', '1', 'user-t renews');
select tests.svc($q$ select to_jsonb(array_agg(c)) from billing.service_claim_attempts('w') c $q$) as t1s \gset
select :'t1s'::jsonb -> 0 as t1 \gset
select is(array[jsonb_array_length(:'t1s')::text, :'t1'::jsonb ->> 'mode', :'t1'::jsonb ->> 'subscription_id'],
          array['1', 'charge', :'t'::jsonb ->> 'subscriptionId'], 'only user-t''s renewal is due, to charge');
select is(tests.rec('select billing.service_record_charge_failure(%L, %L, %L, %L, %L)', :'t1'::jsonb ->> 'attempt_id',
                    :'t1'::jsonb ->> 'lease_token', 'FAILED_INTERNAL_SYSTEM_PROCESSING', 'try later', 'transient'),
  row(:'t1'::jsonb ->> 'attempt_id', 'unknown', true,
      jsonb_build_object('notBefore', '2028-02-10T01:02:00+00:00', 'orderId', :'t1'::jsonb ->> 'order_id',
                         'classification', 'transient', 'next', jsonb_build_object('action', 'lookup')))::billing.recorded,
  'transient on a charge: unknown (the key is spent), to be looked up now');
select is((tests.rec('select billing.service_record_charge_failure(%L, %L, %L, null, %L)', :'t1'::jsonb ->> 'attempt_id',
                     :'t1'::jsonb ->> 'lease_token', 'FAILED_INTERNAL_SYSTEM_PROCESSING', 'transient')).changed, false,
  'the lease holder repeating it changes nothing');
select tests.svc($q$ select to_jsonb(array_agg(c)) from billing.service_claim_attempts('w') c $q$) -> 0 as t1l \gset
select is(array[:'t1l'::jsonb ->> 'attempt_id', :'t1l'::jsonb ->> 'mode'], array[:'t1'::jsonb ->> 'attempt_id', 'lookup'],
  'handed out for a lookup at once');
select r.status as t1_status, r.detail -> 'next' as t1_next
  from tests.rec('select billing.service_record_lookup_not_found(%L, %L)', :'t1'::jsonb ->> 'attempt_id',
                 :'t1l'::jsonb ->> 'lease_token') r \gset
select is(array[:'t1_status', :'t1_next'::jsonb ->> 'action', :'t1_next'::jsonb ->> 'notBefore'],
          array['failed', 'retry', '2028-02-10T01:12:00+00:00'],
  'not found: the attempt fails, and a new attempt follows after 10 minutes');
select results_eq(format($$ select attempt_number, status::text, classification::text, not_before, order_id <> %L,
                                   idempotency_key <> %L::uuid
                              from billing.charge_attempts where period_id = %L order by attempt_number $$,
                         :'t1'::jsonb ->> 'order_id', :'t1'::jsonb ->> 'idempotency_key', :'t1'::jsonb ->> 'period_id'),
  $$ values (1, 'failed'::text, 'transient'::text, '2028-02-10 10:02+09'::timestamptz, false, false),
            (2, 'queued', null, '2028-02-10 10:12+09', true, true) $$,
  'the new attempt has a new orderId and Idempotency-Key');
select is(tests.svc($q$ select to_jsonb(array_agg(c)) from billing.service_claim_attempts('w') c $q$), null,
  'nothing is sent before the backoff');

select billing.set_test_clock('2028-02-10 10:12+09') is not null as _ \gset
select tests.svc($q$ select to_jsonb(array_agg(c)) from billing.service_claim_attempts('w') c $q$) -> 0 as t2 \gset
select is(tests.rec('select billing.service_record_charge_failure(%L, %L, %L, %L, %L)', :'t2'::jsonb ->> 'attempt_id',
                    :'t2'::jsonb ->> 'lease_token', 'DUPLICATED_ORDER_ID', 'duplicate', 'reconcile'),
  row(:'t2'::jsonb ->> 'attempt_id', 'unknown', true,
      jsonb_build_object('notBefore', '2028-02-10T01:12:00+00:00', 'orderId', :'t2'::jsonb ->> 'order_id',
                         'classification', 'reconcile', 'next', jsonb_build_object('action', 'lookup')))::billing.recorded,
  'reconcile on a charge: unknown as well, looked up now');
select tests.svc($q$ select to_jsonb(array_agg(c)) from billing.service_claim_attempts('w') c $q$) -> 0 as t2l \gset
select is((tests.rec('select billing.service_record_lookup_not_found(%L, %L)', :'t2'::jsonb ->> 'attempt_id',
                     :'t2l'::jsonb ->> 'lease_token')).detail -> 'next' ->> 'notBefore', '2028-02-10T01:32:00+00:00',
  'not found: the second new attempt after 20 minutes');

select billing.set_test_clock('2028-02-10 10:32+09') is not null as _ \gset
select tests.svc($q$ select to_jsonb(array_agg(c)) from billing.service_claim_attempts('w') c $q$) -> 0 as t3 \gset
select is((tests.rec('select billing.service_record_charge_failure(%L, %L, %L, null, %L)', :'t3'::jsonb ->> 'attempt_id',
                     :'t3'::jsonb ->> 'lease_token', 'FAILED_INTERNAL_SYSTEM_PROCESSING', 'transient')).status, 'unknown',
  'the third attempt fails the same way');
select tests.svc($q$ select to_jsonb(array_agg(c)) from billing.service_claim_attempts('w') c $q$) -> 0 as t3l \gset
select is((tests.rec('select billing.service_record_charge_failure(%L, %L, %L, null, %L)', :'t3'::jsonb ->> 'attempt_id',
                     :'t3l'::jsonb ->> 'lease_token', 'FAILED_INTERNAL_SYSTEM_PROCESSING', 'transient')).detail
          -> 'next' ->> 'notBefore', '2028-02-10T02:12:00+00:00',
  'a lookup that finds the failed payment: failed, the third new attempt after 40 minutes');
select is((select status::text from billing.charge_attempts where id = (:'t3'::jsonb ->> 'attempt_id')::uuid), 'failed',
  'a failure recorded on a lookup claim is final for that attempt');

select billing.set_test_clock('2028-02-10 11:12+09') is not null as _ \gset
select tests.svc($q$ select to_jsonb(array_agg(c)) from billing.service_claim_attempts('w') c $q$) -> 0 as t4 \gset
select (tests.rec('select billing.service_record_charge_failure(%L, %L, %L, null, %L)', :'t4'::jsonb ->> 'attempt_id',
                  :'t4'::jsonb ->> 'lease_token', 'FAILED_INTERNAL_SYSTEM_PROCESSING', 'transient')).status as _ \gset
select tests.svc($q$ select to_jsonb(array_agg(c)) from billing.service_claim_attempts('w') c $q$) -> 0 as t4l \gset
select is((tests.rec('select billing.service_record_lookup_not_found(%L, %L)', :'t4'::jsonb ->> 'attempt_id',
                     :'t4l'::jsonb ->> 'lease_token')).detail -> 'next' ->> 'notBefore', '2028-02-11T02:12:00+00:00',
  'after three new attempts: dunning, the next try on the plan''s schedule (+1 day)');
select results_eq(format($$ select status::text, past_due_since from billing.subscriptions where id = %L $$,
                         :'t'::jsonb ->> 'subscriptionId'),
  $$ values ('past_due'::text, '2028-02-10 11:12+09'::timestamptz) $$, 'the subscription is past_due');
select results_eq(format($$ select attempt_number, status::text, classification::text, not_before
                              from billing.charge_attempts where period_id = %L order by attempt_number $$,
                         :'t1'::jsonb ->> 'period_id'),
  $$ values (1, 'failed'::text, 'transient'::text, '2028-02-10 10:02+09'::timestamptz),
            (2, 'failed', 'reconcile', '2028-02-10 10:12+09'),
            (3, 'failed', 'transient', '2028-02-10 10:32+09'),
            (4, 'failed', 'transient', '2028-02-10 11:12+09'),
            (5, 'queued', null, '2028-02-11 11:12+09') $$,
  'five attempts for the period, each its own orderId, one in flight');
select is((select count(distinct order_id)::int from billing.charge_attempts where period_id = (:'t1'::jsonb ->> 'period_id')::uuid),
  5, 'five distinct orderIds');
select is((select payload ->> 'nextRetryAt' from billing.notifications
            where subscription_id = (:'t'::jsonb ->> 'subscriptionId')::uuid and kind = 'payment_failed'),
  '2028-02-11T02:12:00+00:00', 'the subscriber is told when the card is tried again');

-- Once the three new attempts are spent, every further failure of the period, passing or not, moves
-- dunning on: a passing error on a dunning retry must not bring the schedule back to its first step
-- (that step is already due, so it would retry at once, again and again).
select billing.set_test_clock('2028-02-11 11:12+09') is not null as _ \gset
select tests.svc($q$ select to_jsonb(array_agg(c)) from billing.service_claim_attempts('w') c $q$) -> 0 as t5c \gset
select (tests.rec('select billing.service_record_charge_failure(%L, %L, %L, null, %L)', :'t5c'::jsonb ->> 'attempt_id',
                  :'t5c'::jsonb ->> 'lease_token', 'FAILED_INTERNAL_SYSTEM_PROCESSING', 'transient')).status as _ \gset
select tests.svc($q$ select to_jsonb(array_agg(c)) from billing.service_claim_attempts('w') c $q$) -> 0 as t5l \gset
select is((tests.rec('select billing.service_record_lookup_not_found(%L, %L)', :'t5c'::jsonb ->> 'attempt_id',
                     :'t5l'::jsonb ->> 'lease_token')).detail -> 'next' ->> 'notBefore', '2028-02-13T02:12:00+00:00',
  'a passing error on the first dunning retry: the second step of the schedule (+3 days), not an immediate retry');

-- resend_allowed: only on the active card of a subscription that is not waiting for anything ----------
select id as t5 from billing.charge_attempts where period_id = (:'t1'::jsonb ->> 'period_id')::uuid and attempt_number = 6 \gset
select is(billing.resend_allowed(:'t5'), true, 'resend_allowed: the dunning retry may be charged');
select throws_ok(format('select billing.lock_leased_attempt(%L, %L)', :'t5', :'tok_a'),
  'SB409', null, 'lock_leased_attempt: no token fits an attempt that was never claimed');
select throws_ok(format('select billing.lock_leased_attempt(%L, %L)', :'t4'::jsonb ->> 'attempt_id', :'t4'::jsonb ->> 'lease_token'),
  'SB409', null, 'lock_leased_attempt: nor the charge''s token once the lookup took the attempt over');
select is((billing.lock_leased_attempt((:'t4'::jsonb ->> 'attempt_id')::uuid, (:'t4l'::jsonb ->> 'lease_token')::uuid)).status::text,
  'failed', 'lock_leased_attempt: the latest claim''s token locks and returns the attempt');
savepoint probe;
update billing.subscriptions set awaiting_card = true where id = (:'t'::jsonb ->> 'subscriptionId')::uuid;
select is(billing.resend_allowed(:'t5'), false, 'resend_allowed: not while a card is awaited');
rollback to savepoint probe;
update billing.payment_methods set status = 'deleted', deleted_at = billing.now()
 where id = (:'t'::jsonb ->> 'paymentMethodId')::uuid;
select is(billing.resend_allowed(:'t5'), false, 'resend_allowed: not on a card that is no longer active');
rollback to savepoint probe;
select is(billing.resend_allowed(:'t5'), true, 'resend_allowed: (the probes are undone)');

-- Key rotation: envelopes re-sealed under the active key id -----------------------------------------
select throws_ok($$ select tests.svc('select count(*) from billing.service_keys_to_rotate(%L)', 'k 2') $$,
  'SB400', null, 'service_keys_to_rotate: a malformed key id: SB400');
select throws_ok($$ select tests.svc('select count(*) from billing.service_keys_to_rotate(%L, 0)', 'k2') $$,
  'SB400', null, 'service_keys_to_rotate: batch 0: SB400');
select is(tests.svc($q$ select jsonb_agg(c.payment_method_id order by c.payment_method_id)
                          from billing.service_keys_to_rotate('k2', 1000) c $q$),
  (select jsonb_agg(id order by id) from billing.payment_methods),
  'service_keys_to_rotate: every payment method still under another key id, ended ones included');
select throws_ok(format($$ select tests.rec('select billing.service_record_key_rotated(%%L, %%L, %%L, %%L)', %L, 'k1', %L, 'k2') $$,
                        :'t'::jsonb ->> 'paymentMethodId', convert_to('bk_t', 'UTF8')),
  'SB400', null, 'service_record_key_rotated: not an envelope: SB400');
select throws_ok(format($$ select tests.rec('select billing.service_record_key_rotated(%%L, %%L, %%L, %%L)', %L, 'k1', %L, 'k2') $$,
                        gen_random_uuid(), tests.envelope('bk_t', 'k2')),
  'SB404', null, 'service_record_key_rotated: an unknown payment method: SB404');
select is((select billing_key_key_id from billing.payment_methods where id = (:'t'::jsonb ->> 'paymentMethodId')::uuid),
  'k1', 'refused rotations change nothing');
select is(tests.rec('select billing.service_record_key_rotated(%L, %L, %L, %L)', :'t'::jsonb ->> 'paymentMethodId', 'k1',
                    tests.envelope('bk_t', 'k2')::text, 'k2'),
  row(:'t'::jsonb ->> 'paymentMethodId', 'rotated', true, '{}'::jsonb)::billing.recorded,
  'service_record_key_rotated: the envelope under the new key id is stored');
select results_eq(format($$ select billing_key_ciphertext, billing_key_key_id from billing.payment_methods where id = %L $$,
                         :'t'::jsonb ->> 'paymentMethodId'),
  format($$ values (%L::bytea, 'k2'::text) $$, tests.envelope('bk_t', 'k2')), 'the payment method holds it');
select is(tests.rec('select billing.service_record_key_rotated(%L, %L, %L, %L)', :'t'::jsonb ->> 'paymentMethodId', 'k1',
                    tests.envelope('bk_t', 'k3')::text, 'k3'),
  row(:'t'::jsonb ->> 'paymentMethodId', 'unchanged', false, '{}'::jsonb)::billing.recorded,
  'service_record_key_rotated: no longer under the old key id: left alone (compare and set)');
select is(tests.svc($q$ select count(*) from billing.service_keys_to_rotate('k2') c $q$),
  to_jsonb((select count(*) from billing.payment_methods) - 1), 'the rotated one is no longer listed');

-- A new card while the old card's charge is still in flight ------------------------------------------
select tests.register('user-y', 'bk_y1') as y \gset
select tests.svc($q$ select to_jsonb(array_agg(c)) from billing.service_claim_attempts('w') c $q$) -> 0 as y1 \gset
select is((tests.rec('select billing.service_record_charge_failure(%L, %L, %L, null, %L)', :'y1'::jsonb ->> 'attempt_id',
                     :'y1'::jsonb ->> 'lease_token', 'IDEMPOTENT_REQUEST_PROCESSING', 'unprocessed')).status, 'queued',
  'user-y''s first charge waits to be sent again');
select tests.register('user-y', 'bk_y2') as y2 \gset
select is(:'y2'::jsonb ->> 'attemptId', null, 'a new card while that charge may be at Toss: no second attempt yet');
select billing.advance_test_clock('1 minute') is not null as _ \gset
select tests.svc($q$ select to_jsonb(array_agg(c)) from billing.service_claim_attempts('w') c $q$) -> 0 as y1l \gset
select is(:'y1l'::jsonb ->> 'mode', 'lookup', 'the old card''s charge is looked up, not sent again');
select is((tests.rec('select billing.service_record_lookup_not_found(%L, %L)', :'y1'::jsonb ->> 'attempt_id',
                     :'y1l'::jsonb ->> 'lease_token')).status, 'canceled', 'not found: withdrawn');
select results_eq(format($$ select status::text, payment_method_id, not_before from billing.charge_attempts
                             where subscription_id = %L and status in ('queued', 'claimed', 'unknown') $$,
                         :'y'::jsonb ->> 'subscriptionId'),
  format($$ values ('queued'::text, %L::uuid, '2028-02-11 11:13+09'::timestamptz) $$, :'y2'::jsonb ->> 'paymentMethodId'),
  'and the unpaid period is charged on the new card at once (it would otherwise wait for nothing)');

select is(jsonb_array_length(tests.serve('ok')), 1, 'and charged');
select tests.register('user-z', 'bk_z1') as z \gset
select tests.svc($q$ select to_jsonb(array_agg(c)) from billing.service_claim_attempts('w') c $q$) as zs \gset
select :'zs'::jsonb -> 0 as z1 \gset
select is(array[jsonb_array_length(:'zs')::text, :'z1'::jsonb ->> 'subscription_id'],
          array['1', :'z'::jsonb ->> 'subscriptionId'], 'user-z''s first charge is sent (alone)');
select (tests.rec('select billing.service_record_charge_unknown(%L, %L, %L)', :'z1'::jsonb ->> 'attempt_id',
                  :'z1'::jsonb ->> 'lease_token', 'read timeout')).status as _ \gset
select tests.register('user-z', 'bk_z2') as z2 \gset
select billing.advance_test_clock('1 minute') is not null as _ \gset
select tests.svc($q$ select to_jsonb(array_agg(c)) from billing.service_claim_attempts('w') c $q$) -> 0 as z1l \gset
select is((tests.rec('select billing.service_record_charge_failure(%L, %L, %L, null, %L)', :'z1'::jsonb ->> 'attempt_id',
                     :'z1l'::jsonb ->> 'lease_token', 'INVALID_STOPPED_CARD', 'needs_new_card')).detail -> 'next' ->> 'action',
  'retry', 'the lookup finds the old card dead: the card registered meanwhile is tried, not asked for again');
select results_eq(format($$ select s.awaiting_card, ca.payment_method_id, ca.not_before from billing.subscriptions s
                              join billing.charge_attempts ca on ca.subscription_id = s.id and ca.status = 'queued'
                             where s.id = %L $$, :'z'::jsonb ->> 'subscriptionId'),
  format($$ values (false, %L::uuid, '2028-02-11 11:14+09'::timestamptz) $$, :'z2'::jsonb ->> 'paymentMethodId'),
  'on the new card, at once');

-- Queue depths for /metrics: whatever the database holds, counted per queue and state.
select results_eq(
  $$ select queue, ready + leased - expired from billing.service_queue_depths() order by queue $$,
  $$ select q, n from (values
       ('charge_attempts', (select count(*) from billing.charge_attempts
                             where (status = 'claimed' and lease_expires_at > billing.now())
                                or (status in ('queued', 'unknown') and not_before <= billing.now()))),
       ('key_deletions', (select count(*) from billing.key_deletions
                           where (status = 'claimed' and lease_expires_at > billing.now())
                              or (status = 'requested' and not_before <= billing.now()))),
       ('notifications', (select count(*) from billing.notifications where delivered_at is null)),
       ('refunds', (select count(*) from billing.refunds
                     where (status = 'claimed' and lease_expires_at > billing.now())
                        or (status = 'requested' and not_before <= billing.now()))),
       ('webhook_events', (select count(*) from billing.webhook_events
                            where (status = 'processing' and lease_expires_at > billing.now())
                               or (status = 'received' and not_before <= billing.now())))
     ) v(q, n) order by q $$,
  'service_queue_depths: every queue''s ready and leased rows');

select * from finish();
rollback;

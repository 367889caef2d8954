-- Service functions for registration and charging: completing/failing registrations, claiming
-- attempts, and every kind of charge result, with their SQLSTATEs.
begin;
select plan(106);

-- The helpers (tests.as_user, tests.svc, tests.register, tests.serve, ...) come from 01_helpers.sql.

select billing.enable_test_clock() is not null as _ \gset
select billing.set_test_clock('2028-01-10 10:00+09') is not null as _ \gset

-- service_complete_registration -------------------------------------------------------------------
select tests.as_user('user-a');
select api.begin_registration() as reg_a \gset
select throws_ok(format($$ select billing.service_complete_registration(%L, %L, 'k1', repeat('a', 64), null) $$,
                        :'reg_a'::jsonb ->> 'customerKey', tests.envelope('bk_a')),
  '42501', null, 'a subscriber cannot complete a registration');
select tests.as_owner();
select encode(extensions.digest('bk_a', 'sha256'), 'hex') as sha_a \gset

select throws_ok($$ select tests.svc('select billing.service_complete_registration(%L, %L, %L, %L, null)',
                                       'ck_nope', tests.envelope('bk_nope')::text, 'k1', repeat('a', 64)) $$,
  'SB404', null, 'unknown customerKey: SB404');
select throws_ok(format($$ select tests.svc('select billing.service_complete_registration(%%L, %%L, %%L, %%L, null)',
                                              %L, %L, 'k1', 'not-a-sha') $$, :'reg_a'::jsonb ->> 'customerKey',
                        tests.envelope('bk_a')),
  'SB400', null, 'malformed sha256: SB400');
select throws_ok(format($$ select tests.svc('select billing.service_complete_registration(%%L, %%L, %%L, %%L, %%L)',
                                              %L, %L, 'k1', %L, '{"billingKey": "bk_a"}') $$,
                        :'reg_a'::jsonb ->> 'customerKey', tests.envelope('bk_a'), :'sha_a'),
  'SB400', null, 'a plaintext billing key is refused: SB400');
select throws_ok(format($$ select tests.svc('select billing.service_complete_registration(%%L, %%L, %%L, %%L, null)',
                                              %L, '\x', 'k1', %L) $$, :'reg_a'::jsonb ->> 'customerKey', :'sha_a'),
  'SB400', null, 'an empty ciphertext: SB400');
-- Only the service's envelope is accepted as the billing key's ciphertext (billing.is_key_envelope).
select ok(billing.is_key_envelope(tests.envelope('bk_a'), 'k1'), 'is_key_envelope: a v1 envelope under its key id');
select ok(not billing.is_key_envelope(convert_to('bk_a', 'UTF8'), 'k1'), 'is_key_envelope: a plaintext key is refused');
select ok(not billing.is_key_envelope(set_byte(tests.envelope('bk_a'), 0, 2), 'k1'),
  'is_key_envelope: another version is refused');
select ok(not billing.is_key_envelope(tests.envelope('bk_a', 'k2'), 'k1')
          and not billing.is_key_envelope(tests.envelope('bk_a'), 'k2')
          and not billing.is_key_envelope(set_byte(tests.envelope('bk_a'), 1, 3), 'k1'),
  'is_key_envelope: another key id (or a wrong key-id length) is refused');
select ok(not billing.is_key_envelope(substr(tests.envelope('bk_a'), 1, 2 + 2 + 12 + 16), 'k1')
          and not billing.is_key_envelope('\x01'::bytea, 'k1') and not billing.is_key_envelope('\x'::bytea, 'k1'),
  'is_key_envelope: too short to hold a nonce, a ciphertext and a tag is refused (without raising)');
select ok(billing.is_key_envelope(substr(tests.envelope('bk_a'), 1, 2 + 2 + 12 + 16 + 1), 'k1'),
  'is_key_envelope: one byte of ciphertext after the nonce and before the tag is enough');
select ok(not billing.is_key_envelope(null, 'k1') and not billing.is_key_envelope(tests.envelope('bk_a'), null)
          and not billing.is_key_envelope(tests.envelope('bk_a', 'k 1'), 'k 1'),
  'is_key_envelope: null, or a key id outside [A-Za-z0-9_.-], is refused');
select throws_ok(format($$ select tests.svc('select billing.service_complete_registration(%%L, %%L, %%L, %%L, null)',
                                              %L, %L, 'k1', %L) $$, :'reg_a'::jsonb ->> 'customerKey',
                        convert_to('bk_a', 'UTF8'), :'sha_a'),
  'SB400', null, 'a plaintext billing key as the ciphertext: SB400');
select throws_ok(format($$ select tests.svc('select billing.service_complete_registration(%%L, %%L, %%L, %%L, null)',
                                              %L, %L, 'k2', %L) $$, :'reg_a'::jsonb ->> 'customerKey',
                        tests.envelope('bk_a'), :'sha_a'),
  'SB400', null, 'an envelope under another key id than the one named: SB400');
select results_eq(format($$ select r.status::text, r.payment_method_id,
                                   (select count(*) from billing.payment_methods pm where pm.customer_key = r.customer_key),
                                   (select count(*) from billing.subscriptions su where su.user_id = 'user-a')
                              from billing.card_registrations r where r.customer_key = %L $$,
                         :'reg_a'::jsonb ->> 'customerKey'),
  $$ values ('pending'::text, null::uuid, 0::bigint, 0::bigint) $$,
  'a refused registration changes nothing: still pending, no payment method, no subscription');

select tests.svc('select billing.service_complete_registration(%L, %L, %L, %L, %L)',
  :'reg_a'::jsonb ->> 'customerKey', tests.envelope('bk_a')::text, 'k1', :'sha_a',
  '{"mId": "tvivarepublica", "cardCompany": "현대", "card": {"number": "4330****1234", "issuerCode": "61", "acquirerCode": "61", "cardType": "신용", "ownerType": "개인"}}') as a \gset
select is(:'a'::jsonb ->> 'replay', 'false', 'the billing key is recorded');
select results_eq(
  format($$ select status::text, current_period_index, current_period_starts_at, current_period_ends_at, anchor_day,
                   anchor_local_time from billing.subscriptions where id = %L $$, :'a'::jsonb ->> 'subscriptionId'),
  $$ values ('incomplete'::text, 1, '2028-01-10 10:00+09'::timestamptz, '2028-02-10 10:00+09'::timestamptz,
             10::smallint, '10:00'::time) $$,
  'a new subscription: incomplete, period 1 of a calendar month from now, anchored on the 10th 10:00 KST');
select results_eq(
  format($$ select status::text, attempt_number, amount, not_before, order_id ~ '^[A-Za-z0-9_-]{6,64}$', order_name
              from billing.charge_attempts where id = %L $$, :'a'::jsonb ->> 'attemptId'),
  $$ values ('queued'::text, 1, 9900::bigint, '2028-01-10 10:00+09'::timestamptz, true,
             'Saju맛피아 Pro 2028.01.10~2028.02.09'::text) $$,
  'its first attempt is queued for now with the period''s amount');
select results_eq(
  format($$ select status::text, card_number_masked, issuer_code, acquirer_code, card_type, owner_type,
                   billing_key_ciphertext, billing_key_key_id
              from billing.payment_methods where id = %L $$, :'a'::jsonb ->> 'paymentMethodId'),
  format($$ values ('active'::text, '4330****1234'::text, '61'::text, '61'::text, '신용'::text, '개인'::text,
                    %L::bytea, 'k1'::text) $$, tests.envelope('bk_a')),
  'the payment method keeps only the ciphertext (the service''s envelope) and the card details');
select throws_ok(format($$ update billing.payment_methods set billing_key_ciphertext = convert_to('bk_a', 'UTF8')
                            where id = %L $$, :'a'::jsonb ->> 'paymentMethodId'),
  '23514', 'new row for relation "payment_methods" violates check constraint "payment_methods_billing_key_envelope_check"',
  'not even the owner can store a billing key outside an envelope');
select is(tests.svc('select billing.service_complete_registration(%L, %L, %L, %L, null)',
            :'reg_a'::jsonb ->> 'customerKey', tests.envelope('bk_a')::text, 'k1', :'sha_a') - 'registrationId',
  jsonb_build_object('subscriptionId', :'a'::jsonb -> 'subscriptionId', 'paymentMethodId',
                     :'a'::jsonb -> 'paymentMethodId', 'replay', true),
  'the same billing key again is a replay');
select throws_ok(format($$ select tests.svc('select billing.service_complete_registration(%%L, %%L, %%L, %%L, null)',
                                              %L, %L, 'k1', repeat('b', 64)) $$, :'reg_a'::jsonb ->> 'customerKey',
                        tests.envelope('bk_b')),
  'SB409', null, 'another billing key for a completed registration: SB409');

select tests.as_user('user-e');
select api.begin_registration() as reg_e \gset
select tests.as_owner();
select billing.advance_test_clock('61 minutes') is not null as _ \gset
select throws_ok(format($$ select tests.svc('select billing.service_complete_registration(%%L, %%L, %%L, %%L, null)',
                                              %L, %L, 'k1', repeat('e', 64)) $$, :'reg_e'::jsonb ->> 'customerKey',
                        tests.envelope('bk_e')),
  'SB409', null, 'an expired registration: SB409');
select is((billing.tick() ->> 'registrationsExpired')::int, 1, 'the tick expires it');
select is((select status::text from billing.card_registrations where customer_key = :'reg_e'::jsonb ->> 'customerKey'),
  'expired', 'expired');
select billing.set_test_clock('2028-01-10 10:00+09') is not null as _ \gset

-- service_fail_registration -----------------------------------------------------------------------
select tests.as_user('user-f');
select api.begin_registration() as reg_f \gset
select tests.as_owner();
select is(tests.svc('select billing.service_fail_registration(%L, %L, %L)', :'reg_f'::jsonb ->> 'customerKey',
                      'PAY_PROCESS_CANCELED', '사용자가 결제를 취소했습니다') ->> 'changed', 'true',
  'the fail URL''s code is recorded');
select results_eq(format($$ select status::text, fail_code from billing.card_registrations where customer_key = %L $$,
                         :'reg_f'::jsonb ->> 'customerKey'),
  $$ values ('failed'::text, 'PAY_PROCESS_CANCELED'::text) $$, 'the registration failed with its code');
select is(tests.svc('select billing.service_fail_registration(%L, %L, null)', :'reg_f'::jsonb ->> 'customerKey',
                      'PAY_PROCESS_CANCELED') ->> 'changed', 'false', 'recording it again changes nothing');
select throws_ok($$ select tests.svc('select billing.service_fail_registration(%L, %L, null)', 'ck_nope', 'X') $$,
  'SB404', null, 'unknown customerKey: SB404');
select throws_ok(format($$ select tests.svc('select billing.service_fail_registration(%%L, %%L, null)', %L, 'X') $$,
                        :'reg_a'::jsonb ->> 'customerKey'),
  'SB409', null, 'a completed registration cannot fail: SB409');
select throws_ok(format($$ select tests.svc('select billing.service_fail_registration(%%L, null, null)', %L) $$,
                        :'reg_f'::jsonb ->> 'customerKey'),
  'SB400', null, 'no code: SB400');

-- service_claim_attempts --------------------------------------------------------------------------
select throws_ok($$ select tests.svc('select to_jsonb(array_agg(c)) from billing.service_claim_attempts(%L, 0) c', 'w') $$,
  'SB400', null, 'batch 0: SB400');
select throws_ok($$ select tests.svc($q$ select to_jsonb(array_agg(c)) from billing.service_claim_attempts('w', 10, '1 second') c $q$) $$,
  'SB400', null, 'a one-second lease: SB400');
select throws_ok($$ select tests.svc($q$ select to_jsonb(array_agg(c)) from billing.service_claim_attempts('') c $q$) $$,
  'SB400', null, 'no worker name: SB400');
select tests.svc($q$ select to_jsonb(array_agg(c)) from billing.service_claim_attempts('w1') c $q$) -> 0 as c1 \gset
select is(:'c1'::jsonb - 'attempt_id' - 'lease_token' - 'order_id' - 'idempotency_key' - 'subscription_id' - 'period_id',
  jsonb_build_object('mode', 'charge', 'amount', 9900, 'order_name', 'Saju맛피아 Pro 2028.01.10~2028.02.09',
                     'customer_key', :'reg_a'::jsonb ->> 'customerKey', 'billing_key_ciphertext', tests.envelope('bk_a'),
                     'billing_key_key_id', 'k1', 'customer_email', 'user-a@example.com', 'customer_name', null,
                     'attempt_number', 1, 'lease_expires_at', '2028-01-10T01:02:00+00:00'),
  'a claim carries everything needed to charge, under a two-minute lease');
select is(:'c1'::jsonb ->> 'attempt_id', :'a'::jsonb ->> 'attemptId', 'the due attempt was claimed');
select is(:'c1'::jsonb ->> 'lease_token',
          (select lease_token::text from billing.charge_attempts where id = (:'c1'::jsonb ->> 'attempt_id')::uuid),
  'the claim hands out the attempt''s current lease token');
select is(tests.svc($q$ select to_jsonb(array_agg(c)) from billing.service_claim_attempts('w2') c $q$), null,
  'a leased attempt is not handed out again');
select billing.advance_test_clock('3 minutes') is not null as _ \gset
select is(billing.tick() -> 'leasesExpired' ->> 'attempts', '1', 'the tick re-queues an expired lease');
select tests.svc($q$ select to_jsonb(array_agg(c)) from billing.service_claim_attempts('w3') c $q$) -> 0 as c2 \gset
select is(array[:'c2'::jsonb ->> 'order_id', :'c2'::jsonb ->> 'idempotency_key'],
          array[:'c1'::jsonb ->> 'order_id', :'c1'::jsonb ->> 'idempotency_key'],
  'the re-sent attempt keeps its orderId and Idempotency-Key');
select is((select sends from billing.charge_attempts where id = (:'c1'::jsonb ->> 'attempt_id')::uuid), 2,
  'it was handed out twice');
select isnt(:'c2'::jsonb ->> 'lease_token', :'c1'::jsonb ->> 'lease_token', 'each claim has a fresh lease token');

-- service_record_charge_success -------------------------------------------------------------------
select throws_ok($$ select tests.rec('select billing.service_record_charge_success(%L, %L, %L)',
                                       gen_random_uuid()::text, gen_random_uuid()::text, tests.payment('ord_x', 9900)::text) $$,
  'SB404', null, 'unknown attempt: SB404');
select throws_ok(format($$ select tests.rec('select billing.service_record_charge_success(%%L, %%L, %%L)', %L, %L, %L) $$,
                        :'c1'::jsonb ->> 'attempt_id', :'c2'::jsonb ->> 'lease_token', tests.payment('ord_other', 9900)),
  'SB400', null, 'a payment of another order: SB400');
select throws_ok(format($$ select tests.rec('select billing.service_record_charge_success(%%L, %%L, %%L)', %L, %L, %L) $$,
                        :'c1'::jsonb ->> 'attempt_id', :'c2'::jsonb ->> 'lease_token',
                        tests.payment(:'c1'::jsonb ->> 'order_id', 9900) || '{"status": "ABORTED"}'),
  'SB400', null, 'a payment that was not approved: SB400');
select throws_ok(format($$ select tests.rec('select billing.service_record_charge_success(%%L, %%L, %%L)', %L, %L, %L) $$,
                        :'c1'::jsonb ->> 'attempt_id', :'c2'::jsonb ->> 'lease_token', '{"paymentKey": "pk"}'),
  'SB400', null, 'a malformed payment: SB400');
-- The first claim's lease was taken over by the second, yet its approval is a fact about money:
-- recorded all the same (fencing refuses only failures and unknowns).
select r.status as ok1_status, r.changed::text as ok1_changed, r.detail as ok1_detail, r.id as ok1_id
  from tests.rec('select billing.service_record_charge_success(%L, %L, %L)', :'c1'::jsonb ->> 'attempt_id',
                 :'c1'::jsonb ->> 'lease_token', tests.payment(:'c1'::jsonb ->> 'order_id', 9900)::text) r \gset
-- changed replaces the old replay flag (changed = not replay).
select is(array[:'ok1_detail'::jsonb ->> 'applied', :'ok1_changed', :'ok1_status', :'ok1_id'],
          array['true', 'true', 'succeeded', :'c1'::jsonb ->> 'attempt_id'],
  'the success is applied, even from the holder of a stale lease');
select ok(:'ok1_detail'::jsonb ?& array['paymentId', 'applied', 'refundId', 'wrongAmount', 'next', 'sync']
          and not :'ok1_detail'::jsonb ?| array['attemptId', 'attemptStatus', 'replay'],
  'its detail: paymentId, applied, refundId, wrongAmount, next, sync');
select results_eq(format($$ select s.status::text, bp.status::text, bp.paid_at, p.total_amount, p.status
                              from billing.subscriptions s join billing.billing_periods bp on bp.id = s.current_period_id
                              join billing.payments p on p.id = bp.payment_id where s.id = %L $$,
                         :'a'::jsonb ->> 'subscriptionId'),
  $$ values ('active'::text, 'paid'::text, '2028-01-10 10:03+09'::timestamptz, 9900::bigint, 'DONE'::text) $$,
  'the period is paid by the payment and the subscription is active');
select results_eq(format($$ select amount, remaining, expires_at from billing.credit_grants where subscription_id = %L $$,
                         :'a'::jsonb ->> 'subscriptionId'),
  $$ values (10, 10, '2028-02-10 10:00+09'::timestamptz) $$, '10 credits, expiring at period end');
select is((tests.rec('select billing.service_record_charge_success(%L, %L, %L)', :'c1'::jsonb ->> 'attempt_id',
                      :'c2'::jsonb ->> 'lease_token', tests.payment(:'c1'::jsonb ->> 'order_id', 9900)::text)).changed,
  false, 'the same success again is a replay: nothing changed');
select results_eq(format($$ select (select count(*) from billing.payments where subscription_id = %1$L),
                                   (select count(*) from billing.credit_entries e join billing.credit_grants g on g.id = e.grant_id
                                     where g.subscription_id = %1$L),
                                   (select count(*) from billing.notifications where subscription_id = %1$L and kind = 'activated') $$,
                         :'a'::jsonb ->> 'subscriptionId'),
  $$ values (1::bigint, 1::bigint, 1::bigint) $$, 'applied once: one payment, one grant, one notification');
select throws_ok(format($$ select tests.rec('select billing.service_record_charge_success(%%L, %%L, %%L)', %L, %L, %L) $$,
                        :'c1'::jsonb ->> 'attempt_id', :'c2'::jsonb ->> 'lease_token',
                        tests.payment(:'c1'::jsonb ->> 'order_id', 9900) || '{"paymentKey": "pk_other"}'),
  'SB409', null, 'a different payment for the same attempt: SB409');

-- Renewal and service_record_charge_failure -------------------------------------------------------
select billing.set_test_clock('2028-02-10 10:00+09') is not null as _ \gset
select is((billing.tick() ->> 'renewals')::int, 1, 'the period ended: renewal');
select tests.svc($q$ select to_jsonb(array_agg(c)) from billing.service_claim_attempts('w') c $q$) -> 0 as r1 \gset
select throws_ok(format($$ select tests.rec('select billing.service_record_charge_failure(%%L, %%L, %%L, null, %%L)', %L, %L, 'X', 'soft') $$,
                        :'r1'::jsonb ->> 'attempt_id', :'r1'::jsonb ->> 'lease_token'),
  'SB400', null, 'an unknown classification: SB400');
select throws_ok(format($$ select tests.rec('select billing.service_record_charge_failure(%%L, null, %%L, null, %%L)', %L, 'X', 'decline') $$,
                        :'r1'::jsonb ->> 'attempt_id'),
  'SB400', null, 'no lease token: SB400');
select throws_ok(format($$ select tests.rec('select billing.service_record_charge_failure(%%L, %%L, %%L, null, %%L)', %L, %L, 'X', 'decline') $$,
                        :'r1'::jsonb ->> 'attempt_id', gen_random_uuid()),
  'SB409', null, 'a lease token that is not the current one: SB409');
select results_eq(format($$ select status::text, lease_token, error_code from billing.charge_attempts where id = %L $$,
                         :'r1'::jsonb ->> 'attempt_id'),
  format($$ values ('claimed'::text, %L::uuid, null::text) $$, :'r1'::jsonb ->> 'lease_token'),
  'refused results change nothing: still claimed under its lease');
-- What a transient error did before (the same request again) is now the unprocessed class's: Toss did
-- not process it, so nothing is spent.
select is(tests.rec('select billing.service_record_charge_failure(%L, %L, %L, %L, %L)', :'r1'::jsonb ->> 'attempt_id',
                      :'r1'::jsonb ->> 'lease_token', 'IDEMPOTENT_REQUEST_PROCESSING', 'in progress', 'unprocessed'),
  row(:'r1'::jsonb ->> 'attempt_id', 'queued', true,
      jsonb_build_object('notBefore', '2028-02-10T01:01:00+00:00', 'orderId', :'r1'::jsonb ->> 'order_id',
                         'classification', null))::billing.recorded,
  'unprocessed: the same attempt is queued again after a backoff, same orderId');
select is((tests.rec('select billing.service_record_charge_failure(%L, %L, %L, null, %L)', :'r1'::jsonb ->> 'attempt_id',
                       :'r1'::jsonb ->> 'lease_token', 'IDEMPOTENT_REQUEST_PROCESSING', 'unprocessed')).changed, false,
  'the lease holder repeating its unprocessed result changes nothing');
select is(tests.svc($q$ select to_jsonb(array_agg(c)) from billing.service_claim_attempts('w') c $q$), null,
  'not handed out before its backoff');
select billing.advance_test_clock('1 minute') is not null as _ \gset
select tests.svc($q$ select to_jsonb(array_agg(c)) from billing.service_claim_attempts('w') c $q$) -> 0 as r1b \gset
select is(array[:'r1b'::jsonb ->> 'attempt_id', :'r1b'::jsonb ->> 'mode', :'r1b'::jsonb ->> 'order_id',
                :'r1b'::jsonb ->> 'idempotency_key'],
          array[:'r1'::jsonb ->> 'attempt_id', 'charge', :'r1'::jsonb ->> 'order_id', :'r1'::jsonb ->> 'idempotency_key'],
  'unprocessed is re-sent with the same orderId and Idempotency-Key');
select throws_ok(format($$ select tests.rec('select billing.service_record_charge_failure(%%L, %%L, %%L, null, %%L)', %L, %L,
                                             'REJECT_CARD_PAYMENT', 'decline') $$,
                        :'r1'::jsonb ->> 'attempt_id', :'r1'::jsonb ->> 'lease_token'),
  'SB409', null, 'the first claim''s stale lease cannot record a failure: SB409');
select results_eq(format($$ select status::text, lease_token, error_code, claim_mode::text from billing.charge_attempts
                             where id = %L $$, :'r1'::jsonb ->> 'attempt_id'),
  format($$ values ('claimed'::text, %L::uuid, 'IDEMPOTENT_REQUEST_PROCESSING'::text, 'charge'::text) $$,
         :'r1b'::jsonb ->> 'lease_token'),
  'and nothing changed: the re-send is still claimed under the new lease');
select is((tests.rec('select billing.service_record_charge_failure(%L, %L, %L, %L, %L)', :'r1'::jsonb ->> 'attempt_id',
                       :'r1b'::jsonb ->> 'lease_token', 'REJECT_CARD_PAYMENT', 'refused', 'decline')).status, 'declined',
  'declined on the re-send');
select results_eq(format($$ select status::text, past_due_since, grace_ends_at from billing.subscriptions where id = %L $$,
                         :'a'::jsonb ->> 'subscriptionId'),
  $$ values ('past_due'::text, '2028-02-10 10:01+09'::timestamptz, '2028-02-17 10:01+09'::timestamptz) $$,
  'decline: past_due, with the dunning window ending after the last retry');
select results_eq(format($$ select attempt_number, status::text, not_before, order_id <> %L from billing.charge_attempts
                             where period_id = %L order by attempt_number $$,
                         :'r1'::jsonb ->> 'order_id', :'r1'::jsonb ->> 'period_id'),
  $$ values (1, 'declined'::text, '2028-02-10 10:01+09'::timestamptz, false),
            (2, 'queued', '2028-02-11 10:01+09', true) $$,
  'the next attempt is a new one (new orderId) on the dunning schedule: +1 day');
select is((select payload ->> 'nextRetryAt' from billing.notifications where kind = 'payment_failed'),
  '2028-02-11T01:01:00+00:00', 'the subscriber is told when the card is tried again');
select is((tests.rec('select billing.service_record_charge_failure(%L, %L, %L, null, %L)', :'r1'::jsonb ->> 'attempt_id',
                       :'r1b'::jsonb ->> 'lease_token', 'REJECT_CARD_PAYMENT', 'decline')).changed, false,
  'the same decline again changes nothing');
select throws_ok(format($$ select tests.rec('select billing.service_record_charge_failure(%%L, %%L, %%L, null, %%L)', %L, %L, 'X', 'bug') $$,
                        :'r1'::jsonb ->> 'attempt_id', :'r1b'::jsonb ->> 'lease_token'),
  'SB409', null, 'another result for a resolved attempt: SB409');
select throws_ok(format($$ select tests.rec('select billing.service_record_charge_unknown(%%L, %%L, %%L)', %L, %L, 'timeout') $$,
                        :'r1'::jsonb ->> 'attempt_id', :'r1b'::jsonb ->> 'lease_token'),
  'SB409', null, 'unknown for a resolved attempt: SB409');

select billing.set_test_clock('2028-02-11 10:01+09') is not null as _ \gset
select tests.svc($q$ select to_jsonb(array_agg(c)) from billing.service_claim_attempts('w') c $q$) -> 0 as r2 \gset
-- A reconcile error (DUPLICATED_ORDER_ID) used to be looked up and re-sent under the same key; it now
-- spends the key (see the transient scenario in 16_billing_service_contract.sql). The lookup cycle of
-- a charge whose answer was lost is shown here with a timeout instead.
select is(tests.rec('select billing.service_record_charge_unknown(%L, %L, %L)', :'r2'::jsonb ->> 'attempt_id',
                      :'r2'::jsonb ->> 'lease_token', 'read timeout'),
  row(:'r2'::jsonb ->> 'attempt_id', 'unknown', true,
      jsonb_build_object('notBefore', '2028-02-11T01:02:00+00:00', 'orderId', :'r2'::jsonb ->> 'order_id',
                         'classification', null))::billing.recorded,
  'no answer to the charge: the attempt becomes unknown, to be looked up after a backoff');
select is((tests.rec('select billing.service_record_charge_unknown(%L, %L, null)', :'r2'::jsonb ->> 'attempt_id',
                       :'r2'::jsonb ->> 'lease_token')).changed,
  false, 'unknown again changes nothing');
select billing.advance_test_clock('1 minute') is not null as _ \gset
select tests.svc($q$ select to_jsonb(array_agg(c)) from billing.service_claim_attempts('w') c $q$) -> 0 as r2l \gset
select is(:'r2l'::jsonb ->> 'mode', 'lookup', 'an unknown attempt is handed out for a lookup');
select is(tests.rec('select billing.service_record_charge_unknown(%L, %L, %L)', :'r2'::jsonb ->> 'attempt_id',
                      :'r2l'::jsonb ->> 'lease_token', 'lookup timed out'),
  row(:'r2'::jsonb ->> 'attempt_id', 'unknown', true,
      jsonb_build_object('notBefore', '2028-02-11T01:04:00+00:00', 'orderId', :'r2'::jsonb ->> 'order_id',
                         'classification', null))::billing.recorded,
  'a failed lookup: still unknown, looked up again after a backoff');
select throws_ok(format($$ select tests.rec('select billing.service_record_charge_unknown(%%L, %%L, %%L)', %L, %L, 'late') $$,
                        :'r2'::jsonb ->> 'attempt_id', :'r2'::jsonb ->> 'lease_token'),
  'SB409', null, 'the charge''s stale lease cannot record an unknown outcome: SB409');
select throws_ok(format($$ select tests.rec('select billing.service_record_charge_unknown(%%L, null, %%L)', %L, 'late') $$,
                        :'r2'::jsonb ->> 'attempt_id'),
  'SB400', null, 'nor can a missing lease token: SB400');
select results_eq(format($$ select status::text, error_message, not_before from billing.charge_attempts where id = %L $$,
                         :'r2'::jsonb ->> 'attempt_id'),
  $$ values ('unknown'::text, 'lookup timed out'::text, '2028-02-11 10:04+09'::timestamptz) $$,
  'and nothing changed');
select billing.advance_test_clock('2 minutes') is not null as _ \gset
select tests.svc($q$ select to_jsonb(array_agg(c)) from billing.service_claim_attempts('w') c $q$) -> 0 as r2l2 \gset
select is(:'r2l2'::jsonb ->> 'mode', 'lookup', 'looked up again');
select throws_ok(format($$ select tests.rec('select billing.service_record_lookup_not_found(%%L, %%L)', %L, %L) $$,
                        :'r2'::jsonb ->> 'attempt_id', :'r2l'::jsonb ->> 'lease_token'),
  'SB409', null, 'the previous lookup''s stale lease cannot record not found: SB409');
select throws_ok(format($$ select tests.rec('select billing.service_record_lookup_not_found(%%L, null)', %L) $$,
                        :'r2'::jsonb ->> 'attempt_id'),
  'SB400', null, 'nor can a missing lease token: SB400');
select results_eq(format($$ select status::text, claim_mode::text, lease_token from billing.charge_attempts where id = %L $$,
                         :'r2'::jsonb ->> 'attempt_id'),
  format($$ values ('claimed'::text, 'lookup'::text, %L::uuid) $$, :'r2l2'::jsonb ->> 'lease_token'),
  'and nothing changed: still claimed for the current lookup');
select is(tests.rec('select billing.service_record_lookup_not_found(%L, %L)', :'r2'::jsonb ->> 'attempt_id',
                      :'r2l2'::jsonb ->> 'lease_token'),
  row(:'r2'::jsonb ->> 'attempt_id', 'queued', true,
      jsonb_build_object('notBefore', '2028-02-11T01:04:00+00:00', 'orderId', :'r2'::jsonb ->> 'order_id',
                         'classification', null))::billing.recorded,
  'not found at Toss (and its key never answered): the same attempt is sent again now');
select is((tests.rec('select billing.service_record_lookup_not_found(%L, %L)', :'r2'::jsonb ->> 'attempt_id',
                       :'r2l2'::jsonb ->> 'lease_token')).changed,
  false, 'not found again changes nothing');
select tests.svc($q$ select to_jsonb(array_agg(c)) from billing.service_claim_attempts('w') c $q$) -> 0 as r2c \gset
select is(array[:'r2c'::jsonb ->> 'mode', :'r2c'::jsonb ->> 'order_id'], array['charge', :'r2'::jsonb ->> 'order_id'],
  'handed out to charge, under the same orderId');
select throws_ok(format($$ select tests.rec('select billing.service_record_lookup_not_found(%%L, %%L)', %L, %L) $$,
                        :'r2'::jsonb ->> 'attempt_id', :'r2c'::jsonb ->> 'lease_token'),
  'SB409', null, 'not found for an attempt that was being charged: SB409');
select is((tests.rec('select billing.service_record_charge_failure(%L, %L, %L, null, %L)', :'r2'::jsonb ->> 'attempt_id',
                       :'r2c'::jsonb ->> 'lease_token', 'INVALID_STOPPED_CARD', 'needs_new_card')).detail -> 'next' ->> 'action',
  'await_card', 'needs_new_card: no retry, wait for a card');
select results_eq(format($$ select awaiting_card, (select count(*) from billing.charge_attempts ca
                                                   where ca.subscription_id = s.id and ca.status = 'queued')
                              from billing.subscriptions s where s.id = %L $$, :'a'::jsonb ->> 'subscriptionId'),
  $$ values (true, 0::bigint) $$, 'awaiting a card, nothing queued');
select is((select count(*)::int from billing.notifications where kind = 'card_needed'), 1, 'the subscriber is asked for a card');

-- A new card charges the unpaid period at once
select tests.register('user-a', 'bk_a2') as a2 \gset
select is(:'a2'::jsonb ->> 'subscriptionId', :'a'::jsonb ->> 'subscriptionId', 'the new card goes to the same subscription');
select results_eq(format($$ select status::text from billing.payment_methods where user_id = 'user-a' order by created_at $$),
  $$ values ('replaced'::text), ('active') $$, 'the old card is replaced');
select is((select status::text from billing.key_deletions where payment_method_id = (:'a'::jsonb ->> 'paymentMethodId')::uuid),
  'requested', 'and its billing key queued for deletion at Toss');
select results_eq(format($$ select status::text, not_before, payment_method_id from billing.charge_attempts where id = %L $$,
                         :'a2'::jsonb ->> 'attemptId'),
  format($$ values ('queued'::text, '2028-02-11 10:04+09'::timestamptz, %L::uuid) $$, :'a2'::jsonb ->> 'paymentMethodId'),
  'an attempt on the new card is due now');
select is(jsonb_array_length(tests.serve('ok')), 1, 'it is charged');
select results_eq(format($$ select status::text, awaiting_card, past_due_since from billing.subscriptions where id = %L $$,
                         :'a'::jsonb ->> 'subscriptionId'),
  $$ values ('active'::text, false, null::timestamptz) $$, 'recovered: active again');

-- bug ---------------------------------------------------------------------------------------------
select tests.register('user-g', 'bk_g') as g \gset
select is(jsonb_array_length(tests.serve('bug', 'NOT_MATCHES_CUSTOMER_KEY')), 1, 'a bug');
select is((select status::text from billing.charge_attempts where id = (:'g'::jsonb ->> 'attemptId')::uuid), 'failed',
  'bug: the attempt failed, no retry');
select is((select payload ->> 'topic' from billing.notifications where kind = 'alert'),
  'charge failed with a bug classification; no retry', 'operators are alerted');

-- service_apply_payment_snapshot ------------------------------------------------------------------
select tests.register('user-h', 'bk_h') as h \gset
select tests.serve('claim') as h_sent \gset
select is(jsonb_array_length(:'h_sent'), 1, 'user-h''s first charge is sent');
select (tests.rec('select billing.service_record_charge_unknown(%L, %L, %L)', :'h'::jsonb ->> 'attemptId',
                  :'h_sent'::jsonb -> 0 ->> 'lease_token', 'read timeout')).status as _ \gset
select (select order_id from billing.charge_attempts where id = (:'h'::jsonb ->> 'attemptId')::uuid) as h_order \gset
select is(tests.svc('select billing.service_apply_payment_snapshot(%L)',
                      (tests.payment(:'h_order', 9900) || '{"status": "ABORTED", "failure": {"code": "REJECT_CARD_PAYMENT"}}')::text)
          - 'attemptId',
  '{"matched": "attempt", "attemptStatus": "unknown", "action": "classify_failure", "failure": {"code": "REJECT_CARD_PAYMENT"}}'::jsonb,
  'a failed payment found by lookup is left for the service to classify');
select is(tests.svc('select billing.service_apply_payment_snapshot(%L)', tests.payment(:'h_order', 9900)::text)
          ->> 'applied', 'true', 'an approved payment found by lookup resolves the unknown attempt');
select is((select status::text from billing.subscriptions where id = (:'h'::jsonb ->> 'subscriptionId')::uuid), 'active',
  'and activates the subscription');
select is(tests.svc('select billing.service_apply_payment_snapshot(%L)', tests.payment('ord_not_ours', 5000)::text)
          ->> 'action', 'recorded_unmatched', 'an approval under an orderId that is not ours is recorded');
select results_eq($$ select applied, attempt_id, total_amount from billing.payments where order_id = 'ord_not_ours' $$,
  $$ values (false, null::uuid, 5000::bigint) $$, 'unapplied, for an operator to look at');
select is(tests.svc('select billing.service_apply_payment_snapshot(%L)', tests.payment('ord_not_ours', 5000)::text)
          ->> 'matched', 'payment', 'seen again it is the same payment');
select throws_ok($$ select tests.svc('select billing.service_apply_payment_snapshot(%L)', '{"orderId": 1}') $$,
  'SB400', null, 'a malformed snapshot: SB400');

select * from finish();
rollback;

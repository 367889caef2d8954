-- Refunds (operator request, service claim and result), the webhook inbox, billing-key deletion
-- at Toss and the notification outbox, with their SQLSTATEs.
begin;
select plan(73);

-- The helpers (tests.as_user, tests.svc, tests.register, tests.serve, ...) come from 01_helpers.sql.

select billing.enable_test_clock() is not null as _ \gset
select billing.set_test_clock('2028-01-10 10:00+09') is not null as _ \gset
select tests.register('user-a', 'bk_a') as a \gset
select tests.serve('ok') is not null as _ \gset
select p.id as pay_a, p.payment_key as pk_a from billing.payments p
 where p.subscription_id = (:'a'::jsonb ->> 'subscriptionId')::uuid \gset

-- request_refund (operator) -----------------------------------------------------------------------
select throws_ok($$ select billing.request_refund(gen_random_uuid(), 100, 'x') $$, 'SB404', null, 'unknown payment: SB404');
select throws_ok(format('select billing.request_refund(%L, 0, %L)', :'pay_a', 'x'), 'SB400', null, 'amount 0: SB400');
select throws_ok(format('select billing.request_refund(%L, 100, %L)', :'pay_a', ''), 'SB400', null, 'no reason: SB400');
select throws_ok(format('select billing.request_refund(%L, 9901, %L)', :'pay_a', 'x'), 'SB422', null,
  'more than was paid: SB422');
select throws_ok(format($$ select tests.svc('select to_jsonb(billing.request_refund(%%L, 100, %%L))', %L, 'x') $$, :'pay_a'),
  '42501', null, 'the service cannot request refunds');
select billing.request_refund(:'pay_a', 3000, 'goodwill') as r1 \gset
select results_eq(format('select amount, status::text, source::text, requested_by from billing.refunds where id = %L', :'r1'),
  $$ values (3000::bigint, 'requested'::text, 'operator'::text, 'postgres'::text) $$, 'a partial refund is requested');
select billing.request_refund(:'pay_a', null, 'the rest') as r2 \gset
select is((select amount from billing.refunds where id = :'r2'), 6900::bigint,
  'no amount: everything still refundable (pending refunds count)');
select throws_ok(format('select billing.request_refund(%L, 1, %L)', :'pay_a', 'x'), 'SB422', null,
  'nothing left to refund: SB422');

-- service_claim_refunds ---------------------------------------------------------------------------
select is(tests.svc($q$ select jsonb_agg(to_jsonb(c) order by c.cancel_amount) from billing.service_claim_refunds('w', 10) c $q$),
  jsonb_build_array(
    jsonb_build_object('refund_id', :'r1', 'idempotency_key', :'r1', 'payment_key', :'pk_a', 'cancel_amount', 3000,
                       'cancel_reason', 'goodwill', 'balance_amount', 9900, 'lease_expires_at', '2028-01-10T01:02:00+00:00'),
    jsonb_build_object('refund_id', :'r2', 'idempotency_key', :'r2', 'payment_key', :'pk_a', 'cancel_amount', 6900,
                       'cancel_reason', 'the rest', 'balance_amount', 9900, 'lease_expires_at', '2028-01-10T01:02:00+00:00')),
  'claimed refunds carry the cancel call (Idempotency-Key = refund id)');
select is(tests.svc($q$ select jsonb_agg(c.refund_id) from billing.service_claim_refunds('w', 10) c $q$), null,
  'not handed out twice while leased');

-- service_record_refund_result --------------------------------------------------------------------
select tests.payment(substr(:'pk_a', 4), 9900) || jsonb_build_object(
  'status', 'PARTIAL_CANCELED', 'balanceAmount', 6900, 'lastTransactionKey', 'tx_cancel_1',
  'cancels', jsonb_build_array(jsonb_build_object('cancelAmount', 3000, 'cancelReason', 'goodwill',
    'transactionKey', 'tx_cancel_1', 'canceledAt', '2028-01-10T10:00:00+09:00', 'cancelStatus', 'DONE',
    'refundableAmount', 6900))) as cancel1 \gset
select throws_ok(format($$ select tests.svc('select billing.service_record_refund_result(%%L)', %L) $$, :'r1'),
  'SB400', null, 'neither a payment nor an error: SB400');
select throws_ok($$ select tests.svc('select billing.service_record_refund_result(%L, null, %L)', gen_random_uuid()::text, 'X') $$,
  'SB404', null, 'unknown refund: SB404');
select throws_ok(format($$ select tests.svc('select billing.service_record_refund_result(%%L, %%L)', %L, %L) $$,
                        :'r1', tests.payment('ord_other', 9900)),
  'SB400', null, 'the Payment of another payment: SB400');
select is(tests.svc('select billing.service_record_refund_result(%L, %L)', :'r1', :'cancel1') ->> 'status', 'succeeded',
  'the cancel is recorded');
select results_eq(format($$ select r.status::text, r.toss_transaction_key, p.status, p.balance_amount
                              from billing.refunds r join billing.payments p on p.id = r.payment_id where r.id = %L $$, :'r1'),
  $$ values ('succeeded'::text, 'tx_cancel_1'::text, 'PARTIAL_CANCELED'::text, 6900::bigint) $$,
  'the refund has Toss''s transaction; the payment its new balance');
select is(tests.svc('select billing.service_record_refund_result(%L, %L)', :'r1', :'cancel1') ->> 'changed', 'false',
  'the same result again changes nothing');
select is((select remaining from billing.credit_grants where payment_id = :'pay_a'), 10,
  'a partial refund leaves the credits');
select throws_ok(format($$ select tests.svc('select billing.service_record_refund_result(%%L, %%L)', %L, %L) $$,
                        :'r2', :'cancel1'),
  'SB422', null, 'a Payment that shows no cancel for this refund: SB422');
select is(tests.svc('select billing.service_record_refund_result(%L, null, %L, %L, true)', :'r2',
                      'FAILED_REFUND_PROCESS', 'try again') - 'refundId',
  '{"status": "requested", "changed": true}'::jsonb, 'a retryable error: requested again');
select is((select not_before from billing.refunds where id = :'r2'), '2028-01-10 10:01+09'::timestamptz,
  'after a backoff, with the same Idempotency-Key');
select is(tests.svc('select billing.service_record_refund_result(%L, null, %L, null, true)', :'r2',
                      'FAILED_REFUND_PROCESS') ->> 'changed', 'false', 'a retryable error while waiting changes nothing');
select billing.advance_test_clock('1 minute') is not null as _ \gset
select is(tests.svc($q$ select jsonb_agg(c.refund_id) from billing.service_claim_refunds('w', 10) c $q$),
  jsonb_build_array(:'r2'), 'claimed again');
select is(tests.svc('select billing.service_record_refund_result(%L, null, %L, %L)', :'r2',
                      'REFUND_REJECTED', 'rejected') ->> 'status', 'failed', 'a final error: failed');
select is((select payload ->> 'topic' from billing.notifications where kind = 'alert'), 'refund failed',
  'operators are alerted');
select throws_ok(format($$ select tests.svc('select billing.service_record_refund_result(%%L, null, %%L)', %L, 'OTHER') $$, :'r2'),
  'SB409', null, 'another error for a failed refund: SB409');
-- Toss did cancel after all: the payment's cancels[] brings the refund in.
select :'cancel1'::jsonb || jsonb_build_object('balanceAmount', 0, 'lastTransactionKey', 'tx_cancel_2',
  'cancels', (:'cancel1'::jsonb -> 'cancels') || jsonb_build_array(jsonb_build_object('cancelAmount', 6900,
    'cancelReason', 'the rest', 'transactionKey', 'tx_cancel_2', 'canceledAt', '2028-01-10T10:01:00+09:00',
    'cancelStatus', 'DONE', 'refundableAmount', 0))) as cancel2 \gset
select is(tests.svc('select billing.service_apply_payment_snapshot(%L)', :'cancel2') -> 'sync' ->> 'refundsMatched', '1',
  'a snapshot matches its cancels to our refunds');
select results_eq(format($$ select status::text, toss_transaction_key from billing.refunds where id = %L $$, :'r2'),
  $$ values ('succeeded'::text, 'tx_cancel_2'::text) $$, 'the failed refund is succeeded after all');
select results_eq(format($$ select p.status, p.balance_amount, g.status::text, g.remaining
                              from billing.payments p join billing.credit_grants g on g.payment_id = p.id where p.id = %L $$,
                         :'pay_a'),
  $$ values ('PARTIAL_CANCELED'::text, 0::bigint, 'revoked'::text, 0) $$,
  'fully refunded means balanceAmount 0, even while PARTIAL_CANCELED: the credits are revoked');
select is((select amount from billing.credit_entries where kind = 'revoke'), -10, 'the ledger shows the revocation');
select throws_ok(format('select billing.request_refund(%L, null, %L)', :'pay_a', 'x'), 'SB422', null,
  'a fully refunded payment has nothing left: SB422');
select is(tests.svc('select billing.service_apply_payment_snapshot(%L)', :'cancel1') -> 'sync' ->> 'stale', 'true',
  'an older snapshot arriving late is ignored');

select tests.register('user-b', 'bk_b') as b \gset
select tests.serve('ok') is not null as _ \gset
select p.id as pay_b, p.order_id as order_b from billing.payments p
 where p.subscription_id = (:'b'::jsonb ->> 'subscriptionId')::uuid \gset
select is(tests.svc('select billing.service_apply_payment_snapshot(%L)',
  (tests.payment(:'order_b', 9900) || jsonb_build_object('status', 'CANCELED', 'balanceAmount', 0,
    'cancels', jsonb_build_array(jsonb_build_object('cancelAmount', 9900, 'transactionKey', 'tx_console',
      'cancelReason', '고객 요청', 'canceledAt', '2028-01-10T10:01:00+09:00', 'cancelStatus', 'DONE'))))::text)
  -> 'sync' ->> 'refundsExternal', '1', 'a cancel made in Toss''s console is recorded');
select results_eq(format($$ select amount, status::text, source::text, reason from billing.refunds where payment_id = %L $$, :'pay_b'),
  $$ values (9900::bigint, 'succeeded'::text, 'external'::text, '고객 요청'::text) $$, 'as an external refund');
select throws_ok(format('select billing.request_refund(%L, null, %L)', :'pay_b', 'x'), 'SB409', null,
  'a CANCELED payment cannot be refunded: SB409');

-- Webhook inbox -----------------------------------------------------------------------------------
select tests.svc($q$ select to_jsonb(w) from billing.service_ingest_webhook('whtrans_1', 'PAYMENT_STATUS_CHANGED',
  '{"eventType": "PAYMENT_STATUS_CHANGED", "data": {"paymentKey": "pk_x"}}', '{"tosspayments-webhook-transmission-id": "whtrans_1"}') w $q$) as w1 \gset
select is(:'w1'::jsonb - 'webhook_event_id',
  '{"status": "received", "resolved_event_type": "PAYMENT_STATUS_CHANGED", "duplicate": false}'::jsonb, 'stored first');
select is(tests.svc($q$ select to_jsonb(w) from billing.service_ingest_webhook('whtrans_1', 'PAYMENT_STATUS_CHANGED',
  '{"eventType": "PAYMENT_STATUS_CHANGED", "data": {"paymentKey": "pk_x"}}') w $q$),
  :'w1'::jsonb || '{"duplicate": true}', 'a repeated transmission returns the stored row');
select is(tests.svc($q$ select to_jsonb(w) from billing.service_ingest_webhook('whtrans_2', null,
  '{"eventType": "METHOD_UPDATED", "data": {}}') w $q$) ->> 'status', 'ignored', 'unknown event types are stored, ignored');
select is(tests.svc($q$ select to_jsonb(w) from billing.service_ingest_webhook('whtrans_3', 'BILLING_DELETED',
  '{"eventType": "BILLING_DELETED", "data": {"billingKey": "bk_a", "reason": "삭제 API 요청"}}') w $q$) ->> 'status', 'received',
  'BILLING_DELETED is stored');
select is((select payload -> 'data' from billing.webhook_events where transmission_id = 'whtrans_3'),
  jsonb_build_object('billingKeySha256', :'a'::jsonb ->> 'sha', 'reason', '삭제 API 요청'),
  'with the billing key''s sha256 only, never the key');
select is(tests.svc($q$ select to_jsonb(w) from billing.service_ingest_webhook('whtrans_4', null,
  '{"createdAt": "2028-01-10T10:00:00.000", "secret": "ps_forged", "status": "DONE", "transactionKey": "t", "orderId": "ord_x"}') w $q$)
  - 'webhook_event_id', '{"status": "ignored", "resolved_event_type": "DEPOSIT_CALLBACK", "duplicate": false}'::jsonb,
  'a DEPOSIT_CALLBACK whose secret matches no payment is ignored');
select is(tests.svc('select to_jsonb(w) from billing.service_ingest_webhook(%L, null, %L) w', 'whtrans_5',
  (select jsonb_build_object('createdAt', 'x', 'secret', secret, 'status', 'DONE', 'transactionKey', 't',
                             'orderId', order_id)::text from billing.payments where id = :'pay_b')) ->> 'status',
  'received', 'one with the stored secret is kept for processing');
select is(tests.svc('select to_jsonb(w) from billing.service_ingest_webhook(%L, %L, %L) w', 'whtrans_5f',
  'PAYMENT_STATUS_CHANGED',
  (select jsonb_build_object('eventType', 'PAYMENT_STATUS_CHANGED',
                             'data', raw || '{"status": "CANCELED", "balanceAmount": 0, "secret": "ps_forged"}')::text
     from billing.payments where id = :'pay_b')) ->> 'status',
  'ignored', 'a PAYMENT_STATUS_CHANGED whose secret differs from the stored payment''s is ignored');
select is(tests.svc('select to_jsonb(w) from billing.service_ingest_webhook(%L, %L, %L) w', 'whtrans_5g',
  'PAYMENT_STATUS_CHANGED',
  (select jsonb_build_object('eventType', 'PAYMENT_STATUS_CHANGED', 'data', raw - 'secret')::text
     from billing.payments where id = :'pay_b')) ->> 'status',
  'ignored', 'and so is one without the secret');
select throws_ok($$ select tests.svc($q$ select to_jsonb(w) from billing.service_ingest_webhook('whtrans_6', 'X', '[]') w $q$) $$,
  'SB400', null, 'a payload that is not an object: SB400');
select throws_ok($$ select tests.svc($q$ select to_jsonb(w) from billing.service_ingest_webhook('', 'X', '{}') w $q$) $$,
  'SB400', null, 'no transmission id: SB400');
select is(tests.svc($q$ select jsonb_agg(c.transmission_id order by c.transmission_id) from billing.service_claim_webhooks('w', 10) c $q$),
  '["whtrans_1", "whtrans_3", "whtrans_5"]'::jsonb, 'claiming hands out the received events');
select is(tests.svc('select billing.service_record_webhook_result(%L, %L)', :'w1'::jsonb ->> 'webhook_event_id',
                      'processed') ->> 'status', 'processed', 'processed');
select is(tests.svc('select billing.service_record_webhook_result(%L, %L)', :'w1'::jsonb ->> 'webhook_event_id',
                      'processed') ->> 'changed', 'false', 'processed again changes nothing');
select id as w5 from billing.webhook_events where transmission_id = 'whtrans_5' \gset
select is(tests.svc('select billing.service_record_webhook_result(%L, %L, %L)', :'w5', 'retry', 'Toss timed out')
          ->> 'status', 'received', 'retry: received again');
select is((select not_before from billing.webhook_events where transmission_id = 'whtrans_5'),
  '2028-01-10 10:02+09'::timestamptz, 'after a backoff');
select throws_ok(format($$ select tests.svc('select billing.service_record_webhook_result(%%L, %%L)', %L, 'processed') $$, :'w5'),
  'SB409', null, 'a result for an event not being processed: SB409');
select throws_ok($$ select tests.svc('select billing.service_record_webhook_result(%L, %L)', gen_random_uuid()::text, 'processed') $$,
  'SB404', null, 'unknown event: SB404');
select throws_ok(format($$ select tests.svc('select billing.service_record_webhook_result(%%L, %%L)', %L, 'done') $$,
                        :'w1'::jsonb ->> 'webhook_event_id'),
  'SB400', null, 'an unknown outcome: SB400');

-- BILLING_DELETED -> service_mark_payment_method_deleted ------------------------------------------
select is(tests.svc('select billing.service_mark_payment_method_deleted(%L, %L)', repeat('0', 64), 'x'),
  '{"found": false, "changed": false}'::jsonb, 'a key we never stored: nothing to do');
select throws_ok($$ select tests.svc('select billing.service_mark_payment_method_deleted(%L, null)', 'bk_a') $$,
  'SB400', null, 'not a sha256: SB400');
select is(tests.svc('select billing.service_mark_payment_method_deleted(%L, %L)', :'a'::jsonb ->> 'sha', '카드사 요청') ->> 'changed',
  'true', 'the payment method is marked deleted');
select results_eq(format($$ select pm.status::text, s.awaiting_card,
                                   (select count(*) from billing.notifications n where n.subscription_id = s.id and n.kind = 'card_needed')
                              from billing.subscriptions s join billing.payment_methods pm on pm.id = s.payment_method_id
                             where s.id = %L $$, :'a'::jsonb ->> 'subscriptionId'),
  $$ values ('deleted'::text, true, 1::bigint) $$, 'its subscription waits for a new card and says so');
select is(tests.svc('select billing.service_mark_payment_method_deleted(%L, %L)', :'a'::jsonb ->> 'sha', 'x') ->> 'changed',
  'false', 'a second delivery changes nothing');

-- Billing-key deletion at Toss --------------------------------------------------------------------
select tests.register('user-c', 'bk_c1') as c1 \gset
select tests.register('user-c', 'bk_c2') as c2 \gset
select tests.register('user-d', 'bk_d1') as d1 \gset
select tests.svc($q$ select to_jsonb(array_agg(c)) from billing.service_claim_attempts('w') c $q$) is not null as _ \gset
select tests.register('user-d', 'bk_d2') as d2 \gset
select is(tests.svc($q$ select jsonb_agg(jsonb_build_object('pm', c.payment_method_id, 'ct', c.billing_key_ciphertext,
                                                              'ck', c.customer_key)) from billing.service_claim_key_deletions('w', 10) c $q$),
  jsonb_build_array(jsonb_build_object('pm', :'c1'::jsonb ->> 'paymentMethodId', 'ct', '\x63743a626b5f6331',
                                       'ck', :'c1'::jsonb ->> 'customerKey')),
  'the replaced key is handed out for deletion; one with a charge in flight is not');
select id as kd_c from billing.key_deletions where payment_method_id = (:'c1'::jsonb ->> 'paymentMethodId')::uuid \gset
select is(tests.svc('select billing.service_record_key_deleted(%L, %L, %L)', :'kd_c', 'COMMON_ERROR', 'try later') ->> 'status',
  'requested', 'an error: requested again');
select is((select not_before from billing.key_deletions where id = :'kd_c'), '2028-01-10 10:06+09'::timestamptz,
  'after a backoff');
select billing.advance_test_clock('6 minutes') is not null as _ \gset
select is(tests.svc($q$ select jsonb_agg(c.key_deletion_id) from billing.service_claim_key_deletions('w', 10) c $q$),
  jsonb_build_array(:'kd_c'), 'claimed again');
select is(tests.svc('select billing.service_record_key_deleted(%L)', :'kd_c') ->> 'status', 'deleted', 'deleted at Toss');
select is((select status::text from billing.payment_methods where id = (:'c1'::jsonb ->> 'paymentMethodId')::uuid), 'deleted',
  'the payment method is deleted');
select is(tests.svc('select billing.service_record_key_deleted(%L)', :'kd_c') ->> 'changed', 'false',
  'recording it again changes nothing');
select throws_ok(format($$ select tests.svc('select billing.service_record_key_deleted(%%L, %%L)', %L, 'X') $$, :'kd_c'),
  'SB409', null, 'an error for a deleted key: SB409');
select throws_ok($$ select tests.svc('select billing.service_record_key_deleted(%L)', gen_random_uuid()::text) $$,
  'SB404', null, 'unknown deletion: SB404');

-- Notification outbox -----------------------------------------------------------------------------
select count(*)::int as pending from billing.notifications where delivered_at is null \gset
select is(tests.svc($q$ select count(*) from billing.service_claim_notifications('w', 100) $q$), to_jsonb(:pending),
  'every undelivered notification is handed out');
select is(tests.svc($q$ select count(*) from billing.service_claim_notifications('w', 100) $q$), '0'::jsonb,
  'not twice while leased');
select min(id) as n1 from billing.notifications \gset
select is(tests.svc('select to_jsonb(billing.service_record_notification_delivered(%L))', :'n1'), 'true'::jsonb, 'delivered');
select is(tests.svc('select to_jsonb(billing.service_record_notification_delivered(%L))', :'n1'), 'false'::jsonb,
  'delivered again: false');
select throws_ok($$ select tests.svc('select to_jsonb(billing.service_record_notification_delivered(%L))', '-1') $$,
  'SB404', null, 'unknown notification: SB404');
select billing.advance_test_clock('3 minutes') is not null as _ \gset
select is(tests.svc($q$ select count(*) from billing.service_claim_notifications('w', 100) $q$), to_jsonb(:pending - 1),
  'an expired lease makes the rest claimable again');

select * from finish();
rollback;

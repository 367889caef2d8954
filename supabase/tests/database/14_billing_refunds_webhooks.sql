-- Refunds (operator request, service claim and result), the webhook inbox, billing-key deletion
-- at Toss and the notification outbox, with their SQLSTATEs.
begin;
select plan(104);

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
select tests.svc($q$ select jsonb_agg(to_jsonb(c) order by c.cancel_amount) from billing.service_claim_refunds('w', 10) c $q$)
  as rc \gset
select :'rc'::jsonb -> 0 ->> 'lease_token' as r1_tok, :'rc'::jsonb -> 1 ->> 'lease_token' as r2_tok \gset
select is((select jsonb_agg(e - 'lease_token' order by n) from jsonb_array_elements(:'rc') with ordinality x(e, n)),
  jsonb_build_array(
    jsonb_build_object('refund_id', :'r1', 'idempotency_key', :'r1', 'payment_key', :'pk_a', 'cancel_amount', 3000,
                       'cancel_reason', 'goodwill', 'balance_amount', 9900, 'lease_expires_at', '2028-01-10T01:02:00+00:00'),
    jsonb_build_object('refund_id', :'r2', 'idempotency_key', :'r2', 'payment_key', :'pk_a', 'cancel_amount', 6900,
                       'cancel_reason', 'the rest', 'balance_amount', 9900, 'lease_expires_at', '2028-01-10T01:02:00+00:00')),
  'claimed refunds carry the cancel call (Idempotency-Key = refund id)');
select results_eq(format($$ select id, lease_token from billing.refunds where id in (%L, %L) order by amount $$, :'r1', :'r2'),
  format($$ values (%L::uuid, %L::uuid), (%L, %L) $$, :'r1', :'r1_tok', :'r2', :'r2_tok'),
  'each with its own lease token, the one on the row');
select is(tests.svc($q$ select jsonb_agg(c.refund_id) from billing.service_claim_refunds('w', 10) c $q$), null,
  'not handed out twice while leased');

-- service_record_refund_result --------------------------------------------------------------------
select tests.payment(substr(:'pk_a', 4), 9900) || jsonb_build_object(
  'status', 'PARTIAL_CANCELED', 'balanceAmount', 6900, 'lastTransactionKey', 'tx_cancel_1',
  'cancels', jsonb_build_array(jsonb_build_object('cancelAmount', 3000, 'cancelReason', 'goodwill',
    'transactionKey', 'tx_cancel_1', 'canceledAt', '2028-01-10T10:00:00+09:00', 'cancelStatus', 'DONE',
    'refundableAmount', 6900))) as cancel1 \gset
select throws_ok(format($$ select tests.rec('select billing.service_record_refund_result(%%L, %%L)', %L, %L) $$,
                        :'r1', :'r1_tok'),
  'SB400', null, 'neither a payment nor an error: SB400');
select throws_ok($$ select tests.rec('select billing.service_record_refund_result(%L, %L, null, %L, null, %L)',
                                     gen_random_uuid()::text, gen_random_uuid()::text, 'X', 'bug') $$,
  'SB404', null, 'unknown refund: SB404');
select throws_ok(format($$ select tests.rec('select billing.service_record_refund_result(%%L, %%L, null, %%L)', %L, %L, 'X') $$,
                        :'r1', :'r1_tok'),
  'SB400', null, 'an error without its classification: SB400');
select throws_ok(format($$ select tests.rec('select billing.service_record_refund_result(%%L, %%L, %%L)', %L, %L, %L) $$,
                        :'r1', :'r1_tok', tests.payment('ord_other', 9900)),
  'SB400', null, 'the Payment of another payment: SB400');
select is((tests.rec('select billing.service_record_refund_result(%L, %L, %L)', :'r1', :'r1_tok', :'cancel1')).status,
  'succeeded', 'the cancel is recorded');
select results_eq(format($$ select r.status::text, r.toss_transaction_key, p.status, p.balance_amount
                              from billing.refunds r join billing.payments p on p.id = r.payment_id where r.id = %L $$, :'r1'),
  $$ values ('succeeded'::text, 'tx_cancel_1'::text, 'PARTIAL_CANCELED'::text, 6900::bigint) $$,
  'the refund has Toss''s transaction; the payment its new balance');
-- A refund Toss made is a fact: whoever reports it (any token, or none) is heard, and nothing repeats.
select is((tests.rec('select billing.service_record_refund_result(%L, %L, %L)', :'r1', gen_random_uuid()::text,
                     :'cancel1')).changed, false,
  'the same result again, from anyone, changes nothing');
select is((select remaining from billing.credit_grants where payment_id = :'pay_a'), 10,
  'a partial refund leaves the credits');
select throws_ok(format($$ select tests.rec('select billing.service_record_refund_result(%%L, %%L, %%L)', %L, %L, %L) $$,
                        :'r2', :'r2_tok', :'cancel1'),
  'SB422', null, 'a Payment that shows no cancel for this refund: SB422');
-- The old retryable flag is now the failure class: only unprocessed (409 IDEMPOTENT_REQUEST_PROCESSING,
-- 429) is sent again under the same Idempotency-Key.
select is(tests.rec('select billing.service_record_refund_result(%L, %L, null, %L, %L, %L)', :'r2', :'r2_tok',
                      'IDEMPOTENT_REQUEST_PROCESSING', 'in progress', 'unprocessed'),
  row(:'r2', 'requested', true, '{}'::jsonb)::billing.recorded, 'an unprocessed error: requested again');
select is((select not_before from billing.refunds where id = :'r2'), '2028-01-10 10:01+09'::timestamptz,
  'after a backoff, with the same Idempotency-Key');
select is((tests.rec('select billing.service_record_refund_result(%L, %L, null, %L, null, %L)', :'r2', :'r2_tok',
                      'IDEMPOTENT_REQUEST_PROCESSING', 'unprocessed')).changed, false,
  'an unprocessed error while waiting changes nothing');
select billing.advance_test_clock('1 minute') is not null as _ \gset
select tests.svc($q$ select jsonb_agg(jsonb_build_object('id', c.refund_id, 'tok', c.lease_token)) from billing.service_claim_refunds('w', 10) c $q$)
  as rc2 \gset
select is((select jsonb_agg(e -> 'id') from jsonb_array_elements(:'rc2') e), jsonb_build_array(:'r2'), 'claimed again');
select :'rc2'::jsonb -> 0 ->> 'tok' as r2_tok2 \gset
select throws_ok(format($$ select tests.rec('select billing.service_record_refund_result(%%L, %%L, null, %%L, null, %%L)', %L, %L,
                                             'REFUND_REJECTED', 'decline') $$, :'r2', :'r2_tok'),
  'SB409', null, 'the first claim''s stale lease cannot record an error: SB409');
select throws_ok(format($$ select tests.rec('select billing.service_record_refund_result(%%L, null, null, %%L, null, %%L)', %L,
                                             'REFUND_REJECTED', 'decline') $$, :'r2'),
  'SB400', null, 'nor can a missing lease token: SB400');
select results_eq(format($$ select status::text, lease_token, error_code from billing.refunds where id = %L $$, :'r2'),
  format($$ values ('claimed'::text, %L::uuid, 'IDEMPOTENT_REQUEST_PROCESSING'::text) $$, :'r2_tok2'),
  'and nothing changed');
-- A processed error is replayed under the refund's key, so even a passing one (retried before) fails.
select is((tests.rec('select billing.service_record_refund_result(%L, %L, null, %L, %L, %L)', :'r2', :'r2_tok2',
                      'FAILED_REFUND_PROCESS', 'try again', 'transient')).status, 'failed', 'a processed error: failed');
select results_eq($$ select payload ->> 'topic', payload -> 'details' ->> 'classification' from billing.notifications
                      where kind = 'alert' $$,
  $$ values ('refund failed'::text, 'transient'::text) $$, 'operators are alerted, with the class');
select throws_ok(format($$ select tests.rec('select billing.service_record_refund_result(%%L, %%L, null, %%L, null, %%L)', %L, %L,
                                             'OTHER', 'bug') $$, :'r2', :'r2_tok2'),
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
select throws_ok($$ select tests.svc($q$ select to_jsonb(w) from billing.service_ingest_webhook('whtrans_6e', null,
  '{"eventType": "", "data": {}}') w $q$) $$, 'SB400', null, 'an empty eventType: SB400');
select throws_ok($$ select tests.svc($q$ select to_jsonb(w) from billing.service_ingest_webhook('whtrans_6f', '',
  '{"eventType": "", "data": {}}') w $q$) $$, 'SB400', null, 'an empty eventType and event_type: SB400');
select is((select count(*) from billing.webhook_events where transmission_id in ('whtrans_6e', 'whtrans_6f')), 0::bigint,
  'and nothing was stored');
select tests.svc($q$ select jsonb_agg(to_jsonb(c) order by c.transmission_id) from billing.service_claim_webhooks('w', 10) c $q$)
  as wc \gset
select is((select jsonb_agg(e -> 'transmission_id') from jsonb_array_elements(:'wc') e),
  '["whtrans_1", "whtrans_3", "whtrans_5"]'::jsonb, 'claiming hands out the received events');
select :'wc'::jsonb -> 0 ->> 'lease_token' as w1_tok, :'wc'::jsonb -> 2 ->> 'webhook_event_id' as w5,
       :'wc'::jsonb -> 2 ->> 'lease_token' as w5_tok \gset
select is((tests.rec('select billing.service_record_webhook_result(%L, %L, %L)', :'w1'::jsonb ->> 'webhook_event_id',
                       :'w1_tok', 'processed')).status, 'processed', 'processed');
select is((tests.rec('select billing.service_record_webhook_result(%L, %L, %L)', :'w1'::jsonb ->> 'webhook_event_id',
                       :'w1_tok', 'processed')).changed, false, 'processed again changes nothing');
select is(tests.rec('select billing.service_record_webhook_result(%L, %L, %L, %L)', :'w5', :'w5_tok', 'retry', 'Toss timed out'),
  row(:'w5', 'received', true, '{}'::jsonb)::billing.recorded, 'retry: received again');
select is((select not_before from billing.webhook_events where transmission_id = 'whtrans_5'),
  '2028-01-10 10:02+09'::timestamptz, 'after a backoff');
select throws_ok(format($$ select tests.rec('select billing.service_record_webhook_result(%%L, %%L, %%L)', %L, %L, 'processed') $$,
                        :'w5', :'w5_tok'),
  'SB409', null, 'a result for an event not being processed: SB409');
select throws_ok($$ select tests.rec('select billing.service_record_webhook_result(%L, %L, %L)', gen_random_uuid()::text,
                                     gen_random_uuid()::text, 'processed') $$,
  'SB404', null, 'unknown event: SB404');
select throws_ok(format($$ select tests.rec('select billing.service_record_webhook_result(%%L, %%L, %%L)', %L, %L, 'done') $$,
                        :'w1'::jsonb ->> 'webhook_event_id', :'w1_tok'),
  'SB400', null, 'an unknown outcome: SB400');
select billing.advance_test_clock('1 minute') is not null as _ \gset
select tests.svc($q$ select jsonb_agg(jsonb_build_object('id', c.webhook_event_id, 'tok', c.lease_token)) from billing.service_claim_webhooks('w', 10) c $q$)
  as wc2 \gset
select is((select jsonb_agg(e -> 'id') from jsonb_array_elements(:'wc2') e), jsonb_build_array(:'w5'), 'claimed again after its backoff');
select throws_ok(format($$ select tests.rec('select billing.service_record_webhook_result(%%L, %%L, %%L)', %L, %L, 'processed') $$,
                        :'w5', :'w5_tok'),
  'SB409', null, 'the first claim''s stale lease cannot record a result: SB409');
select throws_ok(format($$ select tests.rec('select billing.service_record_webhook_result(%%L, null, %%L)', %L, 'processed') $$,
                        :'w5'),
  'SB400', null, 'nor can a missing lease token: SB400');
select results_eq(format($$ select status::text, lease_token, attempts from billing.webhook_events where id = %L $$, :'w5'),
  format($$ values ('processing'::text, %L::uuid, 2) $$, :'wc2'::jsonb -> 0 ->> 'tok'),
  'and nothing changed: still processing under the second lease');
select is((tests.rec('select billing.service_record_webhook_result(%L, %L, %L)', :'w5', :'wc2'::jsonb -> 0 ->> 'tok',
                       'processed')).status, 'processed', 'the current lease records it');

-- No billing key and no stray header reaches the inbox ----------------------------------------------
select is(billing.redact_billing_keys(
            '{"billingKey": "bk_top", "n": 1, "data": {"card": {"billingKey": "bk_nested", "number": "4330****1234"},
              "list": [{"billingKey": "bk_item"}, [{"billingKey": "bk_deep"}], "billingKey", 2, null]}}'),
  jsonb_build_object('billingKeySha256', encode(extensions.digest('bk_top', 'sha256'), 'hex'), 'n', 1,
    'data', jsonb_build_object(
      'card', jsonb_build_object('billingKeySha256', encode(extensions.digest('bk_nested', 'sha256'), 'hex'),
                                 'number', '4330****1234'),
      'list', jsonb_build_array(
        jsonb_build_object('billingKeySha256', encode(extensions.digest('bk_item', 'sha256'), 'hex')),
        jsonb_build_array(jsonb_build_object('billingKeySha256', encode(extensions.digest('bk_deep', 'sha256'), 'hex'))),
        'billingKey', 2, null))),
  'redact_billing_keys: every billingKey, in nested objects and arrays, becomes its sha256 (order kept)');
select is(billing.redact_billing_keys('{"billingKey": {"value": "bk_x"}, "a": [{"billingKey": 12}], "b": "bk_plain"}'),
  '{"a": [{}], "b": "bk_plain"}'::jsonb,
  'redact_billing_keys: a billingKey that is not a string is dropped; other members stay as they are');
select ok(billing.redact_billing_keys('"bk"') = '"bk"' and billing.redact_billing_keys('[]') = '[]'
          and billing.redact_billing_keys(null) is null,
  'redact_billing_keys: scalars, empty arrays and null pass through');
select is(billing.redact_billing_keys('{"note": "say \"billingKey\"", "v": "billingKey", "d": {"billingKey": "bk_1"}}'),
  pg_catalog.jsonb_build_object('note', 'say "billingKey"', 'v', 'billingKey',
    'd', pg_catalog.jsonb_build_object('billingKeySha256', pg_catalog.encode(extensions.digest('bk_1', 'sha256'), 'hex'))),
  'redact_billing_keys: the name inside a string, or as a value, is not a member; a member beside them still is');
select is(billing.redact_billing_keys('{"data": {"card": {"number": "4330****", "billingKeys": ["x"]}, "cancels": [{"a": 1}]}}'),
  '{"data": {"card": {"number": "4330****", "billingKeys": ["x"]}, "cancels": [{"a": 1}]}}'::jsonb,
  'redact_billing_keys: a document without a billingKey member comes back unchanged');
select is(billing.webhook_headers(
            '{"Authorization": "Basic dGVzdF9za186", "Cookie": "sb=1", "Set-Cookie": "sb=2", "X-Forwarded-For": "10.0.0.1",
              "TossPayments-Webhook-Transmission-Id": "wh_h", "tosspayments-webhook-transmission-time": "2028-01-10T10:00:00+09:00",
              "TossPayments-Webhook-Transmission-Retried-Count": "0", "TossPayments-Webhook-Signature": "v1:abc",
              "Content-Type": "application/json", "User-Agent": "TossPayments"}'),
  '{"tosspayments-webhook-transmission-id": "wh_h", "tosspayments-webhook-transmission-time": "2028-01-10T10:00:00+09:00",
    "tosspayments-webhook-transmission-retried-count": "0", "tosspayments-webhook-signature": "v1:abc",
    "content-type": "application/json", "user-agent": "TossPayments"}'::jsonb,
  'webhook_headers: only the allow-list, names lowercased; Authorization and cookies are dropped');
select ok(billing.webhook_headers('[]') = '{}' and billing.webhook_headers(null) = '{}'
          and billing.webhook_headers(jsonb_build_object('user-agent', 1, 'content-type', repeat('x', 501))) = '{}',
  'webhook_headers: not an object, non-string or over-long values: nothing kept');
select is(tests.svc($q$ select to_jsonb(w) from billing.service_ingest_webhook('whtrans_7', 'METHOD_UPDATED',
  '{"eventType": "METHOD_UPDATED", "billingKey": "bk_a", "data": {"methods": [{"billingKey": "bk_c1", "card": {"billingKey": "bk_c2"}}]}}',
  '{"Authorization": "Basic dGVzdF9za186", "Cookie": "sb=1", "Content-Type": "application/json",
    "TossPayments-Webhook-Transmission-Id": "whtrans_7"}') w $q$) ->> 'status',
  'ignored', 'an unknown event type carrying billing keys is stored, ignored');
select results_eq($$ select payload, headers from billing.webhook_events where transmission_id = 'whtrans_7' $$,
  format($$ values (%L::jsonb, %L::jsonb) $$,
    jsonb_build_object('eventType', 'METHOD_UPDATED', 'billingKeySha256', :'a'::jsonb ->> 'sha',
      'data', jsonb_build_object('methods', jsonb_build_array(jsonb_build_object(
        'billingKeySha256', encode(extensions.digest('bk_c1', 'sha256'), 'hex'),
        'card', jsonb_build_object('billingKeySha256', encode(extensions.digest('bk_c2', 'sha256'), 'hex')))))),
    '{"content-type": "application/json", "tosspayments-webhook-transmission-id": "whtrans_7"}'),
  'with every billing key (top level too) stored as its sha256 only, and the allow-listed headers only');
select is(tests.svc($q$ select to_jsonb(w) from billing.service_ingest_webhook('whtrans_8', 'PAYMENT_STATUS_CHANGED',
  '{"eventType": "PAYMENT_STATUS_CHANGED", "data": {"paymentKey": "pk_y", "billingKey": "bk_a"}}') w $q$) ->> 'status',
  'received', 'a handled event type is stored the same way');
select is((select payload -> 'data' from billing.webhook_events where transmission_id = 'whtrans_8'),
  jsonb_build_object('paymentKey', 'pk_y', 'billingKeySha256', :'a'::jsonb ->> 'sha'),
  'PAYMENT_STATUS_CHANGED keeps the billing key''s sha256 only');
select is_empty($$ select transmission_id from billing.webhook_events
                    where payload::text ~ '"bk_' or headers::text ~* 'authorization|cookie|basic' $$,
  'no stored webhook holds a billing key, a credential or a cookie');

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
select tests.svc($q$ select jsonb_agg(jsonb_build_object('pm', c.payment_method_id, 'ct', c.billing_key_ciphertext,
                                                          'ck', c.customer_key, 'tok', c.lease_token))
                      from billing.service_claim_key_deletions('w', 10) c $q$) as kdc \gset
select is((select jsonb_agg(e - 'tok') from jsonb_array_elements(:'kdc') e),
  jsonb_build_array(jsonb_build_object('pm', :'c1'::jsonb ->> 'paymentMethodId', 'ct', tests.envelope('bk_c1'),
                                       'ck', :'c1'::jsonb ->> 'customerKey')),
  'the replaced key is handed out for deletion; one with a charge in flight is not');
select :'kdc'::jsonb -> 0 ->> 'tok' as kd_tok \gset
select id as kd_c from billing.key_deletions where payment_method_id = (:'c1'::jsonb ->> 'paymentMethodId')::uuid \gset
select is(tests.rec('select billing.service_record_key_deleted(%L, %L, %L, %L)', :'kd_c', :'kd_tok', 'COMMON_ERROR', 'try later'),
  row(:'kd_c', 'requested', true, '{}'::jsonb)::billing.recorded, 'an error: requested again');
select is((select not_before from billing.key_deletions where id = :'kd_c'), '2028-01-10 10:07+09'::timestamptz,
  'after a backoff');
select billing.advance_test_clock('6 minutes') is not null as _ \gset
select tests.svc($q$ select jsonb_agg(jsonb_build_object('id', c.key_deletion_id, 'tok', c.lease_token))
                      from billing.service_claim_key_deletions('w', 10) c $q$) as kdc2 \gset
select is((select jsonb_agg(e -> 'id') from jsonb_array_elements(:'kdc2') e), jsonb_build_array(:'kd_c'), 'claimed again');
select throws_ok(format($$ select tests.rec('select billing.service_record_key_deleted(%%L, %%L, %%L)', %L, %L, 'COMMON_ERROR') $$,
                        :'kd_c', :'kd_tok'),
  'SB409', null, 'the first claim''s stale lease cannot record an error: SB409');
select throws_ok(format($$ select tests.rec('select billing.service_record_key_deleted(%%L, null, %%L)', %L, 'COMMON_ERROR') $$,
                        :'kd_c'),
  'SB400', null, 'nor can a missing lease token: SB400');
select results_eq(format($$ select status::text, lease_token, attempts from billing.key_deletions where id = %L $$, :'kd_c'),
  format($$ values ('claimed'::text, %L::uuid, 2) $$, :'kdc2'::jsonb -> 0 ->> 'tok'),
  'and nothing changed');
-- A key Toss deleted is gone whoever reports it: the stale lease's report of the deletion counts.
select is((tests.rec('select billing.service_record_key_deleted(%L, %L)', :'kd_c', :'kd_tok')).status, 'deleted',
  'deleted at Toss (reported by any worker)');
select is((select status::text from billing.payment_methods where id = (:'c1'::jsonb ->> 'paymentMethodId')::uuid), 'deleted',
  'the payment method is deleted');
select is((tests.rec('select billing.service_record_key_deleted(%L, null)', :'kd_c')).changed, false,
  'recording it again changes nothing');
select throws_ok(format($$ select tests.rec('select billing.service_record_key_deleted(%%L, %%L, %%L)', %L, %L, 'X') $$,
                        :'kd_c', :'kdc2'::jsonb -> 0 ->> 'tok'),
  'SB409', null, 'an error for a deleted key: SB409');
select throws_ok($$ select tests.rec('select billing.service_record_key_deleted(%L, %L)', gen_random_uuid()::text,
                                     gen_random_uuid()::text) $$,
  'SB404', null, 'unknown deletion: SB404');

-- Notification outbox -----------------------------------------------------------------------------
select count(*)::int as pending from billing.notifications where delivered_at is null \gset
select tests.svc($q$ select jsonb_object_agg(c.notification_id, c.lease_token) from billing.service_claim_notifications('w', 100) c $q$)
  as nc \gset
select is((select count(*)::int from jsonb_object_keys(:'nc')), :pending, 'every undelivered notification is handed out');
select is(tests.svc($q$ select count(*) from billing.service_claim_notifications('w', 100) $q$), '0'::jsonb,
  'not twice while leased');
select min(id) as n1, max(id) as n2 from billing.notifications \gset
select is(tests.rec('select billing.service_record_notification_delivered(%L, %L)', :'n1', :'nc'::jsonb ->> :'n1'),
  row(:'n1', 'delivered', true, '{}'::jsonb)::billing.recorded, 'delivered');
select is((tests.rec('select billing.service_record_notification_delivered(%L, %L)', :'n1', :'nc'::jsonb ->> :'n1')).changed,
  false, 'delivered again: nothing changed');
select throws_ok(format($$ select tests.rec('select billing.service_record_notification_delivered(%%L, null)', %L) $$, :'n2'),
  'SB400', null, 'no lease token: SB400');
select is((select delivered_at from billing.notifications where id = :'n2'), null, 'and nothing changed');
select is((tests.rec('select billing.service_record_notification_delivered(%L, %L)', :'n2', gen_random_uuid()::text)).changed,
  true, 'delivered is a fact: recorded from any worker''s lease');
select throws_ok($$ select tests.rec('select billing.service_record_notification_delivered(%L, %L)', '-1', gen_random_uuid()::text) $$,
  'SB404', null, 'unknown notification: SB404');
select billing.advance_test_clock('3 minutes') is not null as _ \gset
select is(tests.svc($q$ select count(*) from billing.service_claim_notifications('w', 100) $q$), to_jsonb(:pending - 2),
  'an expired lease makes the rest claimable again');

select * from finish();
rollback;

-- One chunk of the bulk loader (service/bench/loader.py): a plan of ids per subscriber, then every
-- table from it. Runs as a superuser with session_replication_role = replica (no triggers, no
-- foreign-key checks: the ids are consistent by construction), so the audit events are written here,
-- in the order the triggers write them. Parameters are psycopg's named placeholders; the Toss Payment
-- expression replaces the payment marker.
create temporary table load_plan on commit drop as
select g.i, g.user_id, g.at,
       -- Ids as the tables' defaults make them, at the subscriber's (simulated) creation time.
       billing.new_id(g.at) as customer_id, billing.new_id(g.at) as registration_id,
       billing.new_id(g.at) as payment_method_id, billing.new_id(g.at) as subscription_id,
       billing.new_id(g.at) as period_id, billing.new_id(g.at) as attempt_id,
       billing.new_id(g.at) as payment_id, billing.new_id(g.at) as grant_id,
       billing.new_order_id(g.at) as order_id,
       'ck_' || pg_catalog.encode(extensions.gen_random_bytes(16), 'hex') as customer_key,
       'bk_' || %(prefix)s || g.i as billing_key,
       pl.id as plan_id, pl.name as plan_name, pl.credits_per_period
  from (select i, %(prefix)s || i as user_id,
               %(start)s::timestamptz + %(spread)s::interval * i / %(n)s as at
          from pg_catalog.generate_series(%(first)s, %(last)s) i) g
 cross join billing.plans pl
 where pl.code = 'pro';

alter table load_plan add column ends_at timestamptz, add column price_id uuid, add column amount bigint,
                      add column payment jsonb;
update load_plan lp
   set ends_at = billing.period_start(lp.at, 1), price_id = pr.id, amount = pr.amount
  from (select lp2.i, (billing.price_at(lp2.plan_id, lp2.at)).* from load_plan lp2) pr
 where pr.i = lp.i;
update load_plan lp set payment = /* payment */ null;

insert into billing.customers (id, user_id, email, name, created_at)
select customer_id, user_id, user_id || '@example.com', null, at from load_plan;

insert into billing.card_registrations (id, customer_id, user_id, plan_id, customer_key, status, status_reason,
                                        expires_at, completed_at, payment_method_id, subscription_id, created_at)
select registration_id, customer_id, user_id, plan_id, customer_key, 'completed', 'billing key issued',
       at + interval '1 hour', at, payment_method_id, subscription_id, at
  from load_plan;

insert into billing.payment_methods (id, customer_id, user_id, registration_id, customer_key, billing_key_ciphertext,
                                     billing_key_key_id, billing_key_sha256, card_number_masked, issuer_code,
                                     card_type, owner_type, status, status_reason, created_at)
select payment_method_id, customer_id, user_id, registration_id, customer_key,
       -- loader.ciphertext(): an envelope-shaped stand-in under key id k1.
       '\x01026b31'::bytea
         || pg_catalog.substr(extensions.digest(pg_catalog.convert_to(billing_key, 'UTF8'), 'sha256'), 1, 12)
         || pg_catalog.convert_to('ct:' || billing_key, 'UTF8') || '\x00000000000000000000000000000000'::bytea,
       'k1',
       pg_catalog.encode(extensions.digest(pg_catalog.convert_to(billing_key, 'UTF8'), 'sha256'), 'hex'),
       %(card_number)s, %(issuer_code)s, %(card_type)s, %(owner_type)s, 'active', 'billing key issued', at
  from load_plan;

insert into billing.subscriptions (id, customer_id, user_id, plan_id, status, status_reason, billing_anchor,
                                   current_period_id, current_period_index, current_period_starts_at,
                                   current_period_ends_at, payment_method_id, created_at)
select subscription_id, customer_id, user_id, plan_id, 'active', 'period 1 paid', at, period_id, 1, at, ends_at,
       payment_method_id, at
  from load_plan;

insert into billing.billing_periods (id, subscription_id, user_id, period_index, starts_at, ends_at, price_id, amount,
                                     status, status_reason, paid_at, payment_id, created_at)
select period_id, subscription_id, user_id, 1, at, ends_at, price_id, amount, 'paid', 'paid by attempt 1', at,
       payment_id, at
  from load_plan;

insert into billing.charge_attempts (id, period_id, subscription_id, user_id, payment_method_id, attempt_number,
                                     order_id, amount, order_name, status, status_reason, not_before, sends,
                                     resolved_at, lease_token, idempotency_key, created_at)
select attempt_id, period_id, subscription_id, user_id, payment_method_id, 1, order_id, amount,
       billing.order_name(plan_name, at, ends_at), 'succeeded', 'approved as payment ' || (payment ->> 'paymentKey'),
       at, 1, at, pg_catalog.gen_random_uuid(), billing.new_id(at), at
  from load_plan;

insert into billing.payments (id, payment_key, order_id, attempt_id, subscription_id, period_id, customer_id, user_id,
                              applied, status, method, total_amount, balance_amount, approved_at, secret,
                              receipt_url, last_transaction_key, raw, created_at, updated_at)
select payment_id, payment ->> 'paymentKey', order_id, attempt_id, subscription_id, period_id, customer_id, user_id,
       true, 'DONE', payment ->> 'method', amount, amount, (payment ->> 'approvedAt')::timestamptz,
       payment ->> 'secret', payment -> 'receipt' ->> 'url', payment ->> 'lastTransactionKey', payment, at, at
  from load_plan;

insert into billing.credit_grants (id, customer_id, user_id, subscription_id, period_id, payment_id, amount,
                                   remaining, status, status_reason, granted_at, expires_at, created_at)
select grant_id, customer_id, user_id, subscription_id, period_id, payment_id, credits_per_period,
       credits_per_period, 'active', 'period 1 paid', at, ends_at, at
  from load_plan;

insert into billing.credit_entries (customer_id, user_id, grant_id, kind, amount, reason, created_at)
select customer_id, user_id, grant_id, 'grant', credits_per_period, 'period 1 paid', at
  from load_plan order by i;

insert into billing.notifications (kind, customer_id, user_id, subscription_id, payload, created_at)
select 'activated', customer_id, user_id, subscription_id,
       pg_catalog.jsonb_build_object('amount', amount, 'paymentId', payment_id,
                                     'receiptUrl', payment -> 'receipt' ->> 'url', 'periodIndex', 1,
                                     'periodEndsAt', ends_at, 'periodStartsAt', at,
                                     'subscriptionId', subscription_id), at
  from load_plan order by i;

insert into billing.events (occurred_at, actor_role, actor_sub, entity_type, entity_id, action, old_status,
                            new_status, reason)
select lp.at, e.actor_role, case when e.actor_role = 'authenticated' then lp.user_id end, e.entity_type,
       e.entity_id, e.action, e.old_status, e.new_status, e.reason
  from load_plan lp
 cross join lateral (values
   (1, 'authenticated', 'customers', lp.customer_id, 'created', null, null, null),
   (2, 'authenticated', 'card_registrations', lp.registration_id, 'created', null, 'pending', 'new subscription'),
   (3, 'billing_service', 'payment_methods', lp.payment_method_id, 'created', null, 'active', 'billing key issued'),
   (4, 'billing_service', 'subscriptions', lp.subscription_id, 'created', null, 'incomplete', 'card registered'),
   (5, 'billing_service', 'billing_periods', lp.period_id, 'created', null, 'open', 'first period'),
   (6, 'billing_service', 'charge_attempts', lp.attempt_id, 'created', null, 'queued', 'first charge'),
   (7, 'billing_service', 'card_registrations', lp.registration_id, 'status_changed', 'pending', 'completed',
    'billing key issued'),
   (8, 'billing_service', 'charge_attempts', lp.attempt_id, 'status_changed', 'queued', 'claimed',
    'charge by ' || %(worker)s),
   (9, 'billing_service', 'payments', lp.payment_id, 'created', null, 'DONE', null),
   (10, 'billing_service', 'charge_attempts', lp.attempt_id, 'status_changed', 'claimed', 'succeeded',
    'approved as payment ' || (lp.payment ->> 'paymentKey')),
   (11, 'billing_service', 'billing_periods', lp.period_id, 'status_changed', 'open', 'paid', 'paid by attempt 1'),
   (12, 'billing_service', 'subscriptions', lp.subscription_id, 'status_changed', 'incomplete', 'active',
    'period 1 paid'),
   (13, 'billing_service', 'credit_grants', lp.grant_id, 'created', null, 'active', 'period 1 paid')
 ) e(step, actor_role, entity_type, entity_id, action, old_status, new_status, reason)
 order by lp.i, e.step;

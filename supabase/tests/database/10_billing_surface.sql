-- The exposed surface of billing core, pinned: every function in api and billing with who may
-- execute it, every table and who may touch it (nobody but the owner), RLS, search paths, roles.
begin;
select plan(25);

-- Roles
select has_role('billing_service', 'the service''s role exists');
select has_role('analyst', 'the analyst role exists');
select is((select rolcanlogin from pg_roles where rolname = 'billing_service'), false,
  'billing_service is NOLOGIN (deployment grants LOGIN out of band)');
select is((select rolcanlogin from pg_roles where rolname = 'analyst'), false, 'analyst is NOLOGIN');
select is((select rolbypassrls or rolsuper from pg_roles where rolname = 'billing_service'), false,
  'billing_service neither bypasses RLS nor is a superuser');
select is_member_of('billing_service', 'postgres', 'postgres may SET ROLE billing_service');

-- Schemas
select ok(has_schema_privilege('billing_service', 'billing', 'usage')
          and not has_schema_privilege('billing_service', 'billing', 'create'),
  'billing_service uses billing and creates nothing there');
select ok(not has_schema_privilege('billing_service', 'api', 'usage'), 'billing_service cannot use api');
select ok(has_schema_privilege('analyst', 'analytics', 'usage')
          and not has_schema_privilege('analyst', 'billing', 'usage')
          and not has_schema_privilege('analyst', 'api', 'usage'),
  'analyst uses analytics only');
select ok(not has_schema_privilege('service_role', 'billing', 'usage')
          and not has_schema_privilege('service_role', 'api', 'usage'),
  'Supabase''s service_role reaches neither billing nor api');

-- Functions: the complete list of each schema
select functions_are('api', array[
  'begin_registration', 'my_subscription', 'my_payments', 'my_credits', 'cancel_subscription',
  'resume_subscription', 'consume_credit'], 'api holds exactly the subscriber functions');

select functions_are('billing', array[
  -- clock, calendar, helpers
  'now', 'dunning_schedule_is_valid', 'period_start', 'add_local', 'backoff', 'enable_test_clock',
  'require_test_clock', 'move_test_clock', 'set_test_clock', 'advance_test_clock', 'log_event',
  'notify_subscriber', 'raise_alert', 'price_at', 'new_order_id', 'order_name', 'parse_payment',
  'open_period', 'create_attempt', 'withdraw_attempts', 'schedule_key_deletion', 'grant_period_credits',
  'close_credit_grant', 'end_subscription', 'payment_cancels', 'cancel_count', 'sync_payment',
  'apply_charge_success', 'mark_past_due', 'after_charge_failure', 'replace_card', 'actor_role',
  'jwt_sub', 'require_sub', 'subscription_json', 'credit_balance', 'check_claim_args',
  'check_error_args', 'resend_allowed', 'lock_attempt', 'attempt_result', 'check_reason',
  'refundable_amount', 'create_refund', 'expire_leases',
  -- triggers
  'forbid_change', 'forbid_price_edit', 'audit_status', 'audit_subscription_settings',
  -- service
  'service_complete_registration', 'service_fail_registration', 'service_claim_attempts',
  'service_record_charge_success', 'service_record_charge_failure', 'service_record_charge_unknown',
  'service_record_lookup_not_found', 'service_apply_payment_snapshot', 'service_claim_refunds',
  'service_record_refund_result', 'service_ingest_webhook', 'service_claim_webhooks',
  'service_record_webhook_result', 'service_mark_payment_method_deleted',
  'service_claim_key_deletions', 'service_record_key_deleted', 'service_claim_notifications',
  'service_record_notification_delivered',
  -- operator and scheduler
  'request_refund', 'change_plan_price', 'cancel_subscription_now', 'retry_subscription_charge',
  'configure_plan_dunning', 'ring_service', 'tick',
  -- the scheduler's steps and the event log's partitions
  'tick_expire_registrations', 'tick_expire_leases', 'tick_end_at_period_end', 'tick_renew', 'tick_end_grace',
  'tick_expire_credits', 'tick_maintain_event_partitions', 'run_tick_step', 'seal_event_table',
  'ensure_event_partition', 'archive_event_month'], 'billing holds exactly these functions');

-- Who may execute what: every (function, role) pair for the API roles, the service and the analyst.
select set_eq(
  $$ select n.nspname || '.' || p.proname || '(' || pg_get_function_identity_arguments(p.oid) || ')', r.rolname
       from pg_proc p
       join pg_namespace n on n.oid = p.pronamespace
      cross join (values ('anon'), ('authenticated'), ('service_role'), ('billing_service'), ('analyst')) r(rolname)
      where n.nspname in ('api', 'billing', 'analytics')
        and has_function_privilege(r.rolname, p.oid, 'execute') $$,
  $$ values
       ('api.begin_registration(plan text)', 'authenticated'),
       ('api.my_subscription()', 'authenticated'),
       ('api.my_payments()', 'authenticated'),
       ('api.my_credits()', 'authenticated'),
       ('api.cancel_subscription()', 'authenticated'),
       ('api.resume_subscription()', 'authenticated'),
       ('api.consume_credit(reason text)', 'authenticated'),
       ('billing.service_complete_registration(customer_key text, billing_key_ciphertext bytea, billing_key_key_id text, billing_key_sha256 text, card jsonb)', 'billing_service'),
       ('billing.service_fail_registration(customer_key text, code text, message text)', 'billing_service'),
       ('billing.service_claim_attempts(worker text, batch integer, lease interval)', 'billing_service'),
       ('billing.service_record_charge_success(attempt_id uuid, payment jsonb)', 'billing_service'),
       ('billing.service_record_charge_failure(attempt_id uuid, code text, message text, classification text)', 'billing_service'),
       ('billing.service_record_charge_unknown(attempt_id uuid, detail text)', 'billing_service'),
       ('billing.service_record_lookup_not_found(attempt_id uuid)', 'billing_service'),
       ('billing.service_apply_payment_snapshot(payment jsonb)', 'billing_service'),
       ('billing.service_claim_refunds(worker text, batch integer, lease interval)', 'billing_service'),
       ('billing.service_record_refund_result(refund_id uuid, payment jsonb, error_code text, error_message text, retryable boolean)', 'billing_service'),
       ('billing.service_ingest_webhook(transmission_id text, event_type text, payload jsonb, headers jsonb)', 'billing_service'),
       ('billing.service_claim_webhooks(worker text, batch integer, lease interval)', 'billing_service'),
       ('billing.service_record_webhook_result(webhook_event_id uuid, outcome text, error text)', 'billing_service'),
       ('billing.service_mark_payment_method_deleted(billing_key_sha256 text, reason text)', 'billing_service'),
       ('billing.service_claim_key_deletions(worker text, batch integer, lease interval)', 'billing_service'),
       ('billing.service_record_key_deleted(key_deletion_id uuid, error_code text, error_message text)', 'billing_service'),
       ('billing.service_claim_notifications(worker text, batch integer, lease interval)', 'billing_service'),
       ('billing.service_record_notification_delivered(notification_id bigint)', 'billing_service') $$,
  'api is executable by authenticated only, service_* by billing_service only, nothing else by anyone');

select is_empty(
  $$ select p.oid::regprocedure from pg_proc p
      where p.pronamespace in ('api'::regnamespace, 'billing'::regnamespace, 'analytics'::regnamespace)
        and has_function_privilege('public', p.oid, 'execute') $$,
  'no function is executable by PUBLIC');

select is_empty(
  $$ select p.oid::regprocedure from pg_proc p
      where p.pronamespace in ('api'::regnamespace, 'billing'::regnamespace)
        and p.prosecdef and not coalesce(p.proconfig @> array['search_path=""'], false) $$,
  'every security-definer function pins search_path to ''''');

select is_empty(
  $$ select p.oid::regprocedure from pg_proc p
      where p.pronamespace = 'api'::regnamespace and not p.prosecdef $$,
  'every api function is security definer (tables stay private)');

select is_empty(
  $$ select p.oid::regprocedure from pg_proc p
      where p.pronamespace in ('api'::regnamespace, 'billing'::regnamespace)
        and obj_description(p.oid, 'pg_proc') is null $$,
  'every function carries a COMMENT (what, who, raises)');

-- Tables
select tables_are('billing', array[
  'clock', 'plans', 'plan_prices', 'customers', 'card_registrations', 'payment_methods', 'subscriptions',
  'billing_periods', 'charge_attempts', 'payments', 'refunds', 'credit_grants', 'credit_entries',
  'webhook_events', 'key_deletions', 'notifications', 'events'], 'billing holds exactly these tables');
select is_empty(
  $$ select c.oid::regclass from pg_class c where c.relnamespace = 'api'::regnamespace $$,
  'api holds no tables, views or sequences');
select is_empty(
  $$ select c.relname from pg_class c
      where c.relnamespace = 'billing'::regnamespace and c.relkind = 'r' and not c.relrowsecurity $$,
  'row-level security is on for every billing table');
select is_empty(
  $$ select r.rolname, c.oid::regclass
       from pg_class c
      cross join (values ('anon'), ('authenticated'), ('service_role'), ('billing_service'), ('analyst')) r(rolname)
      where c.relnamespace = 'billing'::regnamespace
        and (has_table_privilege(r.rolname, c.oid, 'select, insert, update, delete, truncate, references, trigger')
             or (c.relkind = 'S' and has_sequence_privilege(r.rolname, c.oid, 'usage, select, update'))) $$,
  'no billing table or sequence is reachable by API roles, the service or the analyst');
select set_eq(
  $$ select tablename::text from pg_policies where schemaname = 'billing' and cmd = 'SELECT'
        and roles = '{authenticated}' and qual like '%auth.jwt()%sub%' $$,
  array['customers', 'card_registrations', 'payment_methods', 'subscriptions', 'billing_periods',
        'charge_attempts', 'payments', 'refunds', 'credit_grants', 'credit_entries', 'notifications'],
  'subscriber tables have an own-rows SELECT policy keyed on the JWT sub');
select is((select count(*)::int from pg_policies where schemaname = 'billing' and cmd <> 'SELECT'), 0,
  'no policy allows writing');

-- Analytics
select ok(has_table_privilege('analyst', 'analytics.subscription_counts', 'select')
          and not has_table_privilege('authenticated', 'analytics.subscription_counts', 'select')
          and not has_table_privilege('anon', 'analytics.subscription_counts', 'select')
          and not has_table_privilege('billing_service', 'analytics.subscription_counts', 'select'),
  'analytics views are for the analyst alone');

-- The scheduler
select results_eq(
  $$ select schedule, command from cron.job where jobname = 'saju-billing-tick' $$,
  $$ values ('* * * * *'::text, 'select billing.tick()'::text) $$,
  'pg_cron runs billing.tick() every minute');

select * from finish();
rollback;

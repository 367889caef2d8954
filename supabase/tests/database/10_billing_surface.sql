-- The exposed surface of billing core, pinned: every function in api and billing with who may
-- execute it, every table and who may touch it (nobody but the owner), RLS, search paths, roles.
begin;
select plan(38);

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
  'notify_subscriber', 'raise_alert', 'price_at', 'new_order_id', 'new_id', 'order_name', 'parse_payment',
  'open_period', 'create_attempt', 'withdraw_attempts', 'schedule_key_deletion', 'grant_period_credits',
  'close_credit_grant', 'end_subscription', 'payment_cancels', 'cancel_count', 'sync_payment',
  'apply_charge_success', 'mark_past_due', 'after_charge_failure', 'replace_card', 'actor_role',
  'jwt_sub', 'require_sub', 'subscription_json', 'credit_balance', 'check_claim_args',
  'check_error_args', 'resend_allowed', 'lock_attempt', 'check_reason',
  'refundable_amount', 'create_refund', 'expire_leases',
  -- the service contract: envelope check, fencing, one result shape, in-flight charges, redaction
  'is_key_envelope', 'recorded_of', 'check_lease_token', 'charge_possibly_sent', 'settle_pending_cancel',
  'attempt_recorded', 'lock_leased_attempt', 'redact_billing_keys', 'webhook_headers', 'audit_payment_status', 'audit_created',
  'assert_surface_locked_down',
  -- triggers
  'forbid_change', 'forbid_price_edit', 'audit_status', 'audit_subscription_settings',
  -- service
  'service_complete_registration', 'service_fail_registration', 'service_claim_attempts',
  'service_record_charge_success', 'service_record_charge_failure', 'service_record_charge_unknown',
  'service_record_lookup_not_found', 'service_apply_payment_snapshot', 'service_claim_refunds',
  'service_record_refund_result', 'service_ingest_webhook', 'service_claim_webhooks',
  'service_record_webhook_result', 'service_mark_payment_method_deleted',
  'service_claim_key_deletions', 'service_record_key_deleted', 'service_claim_notifications',
  'service_record_notification_delivered', 'service_keys_to_rotate', 'service_record_key_rotated',
  'service_claim_reconciliations', 'service_unknown_payment_keys', 'service_record_reconciliation',
  'service_queue_depths', 'service_check_registration',
  -- operator and scheduler
  'request_refund', 'change_plan_price', 'cancel_subscription_now', 'retry_subscription_charge',
  'configure_plan_dunning', 'ring_service', 'tick', 'ops_configure_doorbell', 'request_reconciliation',
  'schedule_reconciliation', 'ops_reconciliation_report', 'ops_status', 'ops_history', 'ops_alerts',
  -- the scheduler's steps and the event log's partitions
  'tick_expire_registrations', 'tick_expire_leases', 'tick_end_at_period_end', 'tick_renew', 'tick_end_grace',
  'tick_expire_credits', 'tick_maintain_event_partitions', 'run_tick_step', 'seal_event_table',
  'ensure_event_partition', 'archive_event_month',
  -- the tick's probe, its summary, one budgeted round, and the procedure that commits between rounds
  'tick_probe', 'tick_summary', 'tick_idle', 'tick_run', 'run_ticks', 'run_renewals',
  -- the idle minute without the probe: signals, the horizon
  'signal_tick', 'tick_asleep', 'tick_wake', 'tick_settle'], 'billing holds exactly these functions');

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
       ('billing.service_record_charge_success(attempt_id uuid, lease_token uuid, payment jsonb)', 'billing_service'),
       ('billing.service_record_charge_failure(attempt_id uuid, lease_token uuid, code text, message text, classification text)', 'billing_service'),
       ('billing.service_record_charge_unknown(attempt_id uuid, lease_token uuid, detail text)', 'billing_service'),
       ('billing.service_record_lookup_not_found(attempt_id uuid, lease_token uuid)', 'billing_service'),
       ('billing.service_apply_payment_snapshot(payment jsonb)', 'billing_service'),
       ('billing.service_claim_refunds(worker text, batch integer, lease interval)', 'billing_service'),
       ('billing.service_record_refund_result(refund_id uuid, lease_token uuid, payment jsonb, error_code text, error_message text, classification text)', 'billing_service'),
       ('billing.service_ingest_webhook(transmission_id text, event_type text, payload jsonb, headers jsonb)', 'billing_service'),
       ('billing.service_claim_webhooks(worker text, batch integer, lease interval)', 'billing_service'),
       ('billing.service_record_webhook_result(webhook_event_id uuid, lease_token uuid, outcome text, error text)', 'billing_service'),
       ('billing.service_mark_payment_method_deleted(billing_key_sha256 text, reason text)', 'billing_service'),
       ('billing.service_claim_key_deletions(worker text, batch integer, lease interval)', 'billing_service'),
       ('billing.service_record_key_deleted(key_deletion_id uuid, lease_token uuid, error_code text, error_message text)', 'billing_service'),
       ('billing.service_claim_notifications(worker text, batch integer, lease interval)', 'billing_service'),
       ('billing.service_record_notification_delivered(notification_id bigint, lease_token uuid)', 'billing_service'),
       ('billing.service_keys_to_rotate(active_key_id text, batch integer)', 'billing_service'),
       ('billing.service_record_key_rotated(payment_method_id uuid, old_key_id text, billing_key_ciphertext bytea, billing_key_key_id text)', 'billing_service'),
       ('billing.service_claim_reconciliations(worker text, batch integer, lease interval)', 'billing_service'),
       ('billing.service_unknown_payment_keys(payment_keys text[])', 'billing_service'),
       ('billing.service_record_reconciliation(reconciliation_id uuid, lease_token uuid, payment_keys text[], error_code text, error_message text)', 'billing_service'),
       ('billing.service_queue_depths()', 'billing_service'),
       ('billing.service_check_registration(customer_key text)', 'billing_service') $$,
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
  'webhook_events', 'key_deletions', 'notifications', 'events', 'reconciliation_runs', 'tick_wakeup',
  'tick_signals'],
  'billing holds exactly these tables');
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

-- The service contract: fencing tokens and one result shape ----------------------------------------
select results_eq(
  $$ select p.proname::text collate "default", a.name collate "default", format_type(a.type, null)
       from pg_proc p
      cross join lateral (select x.name, x.type
                            from unnest(p.proargnames, p.proargmodes, p.proallargtypes) x(name, mode, type)
                           where x.mode = 't' offset 1 limit 1) a
      where p.pronamespace = 'billing'::regnamespace and p.proname like 'service\_claim\_%'
      order by 1 $$,
  $$ values ('service_claim_attempts'::text, 'lease_token'::text, 'uuid'::text),
            ('service_claim_key_deletions', 'lease_token', 'uuid'),
            ('service_claim_notifications', 'lease_token', 'uuid'),
            ('service_claim_reconciliations', 'lease_token', 'uuid'),
            ('service_claim_refunds', 'lease_token', 'uuid'),
            ('service_claim_webhooks', 'lease_token', 'uuid') $$,
  'every claim hands out its lease_token (uuid) as its second column');
select results_eq(
  $$ select p.proname::text collate "default", p.proargnames[2] collate "default", format_type(p.proargtypes[1], null), format_type(p.prorettype, null)
       from pg_proc p
      where p.pronamespace = 'billing'::regnamespace and p.proname like 'service\_record\_%'
      order by 1 $$,
  $$ values ('service_record_charge_failure'::text, 'lease_token'::text, 'uuid'::text, 'billing.recorded'::text),
            ('service_record_charge_success', 'lease_token', 'uuid', 'billing.recorded'),
            ('service_record_charge_unknown', 'lease_token', 'uuid', 'billing.recorded'),
            ('service_record_key_deleted', 'lease_token', 'uuid', 'billing.recorded'),
            ('service_record_key_rotated', 'old_key_id', 'text', 'billing.recorded'),
            ('service_record_lookup_not_found', 'lease_token', 'uuid', 'billing.recorded'),
            ('service_record_notification_delivered', 'lease_token', 'uuid', 'billing.recorded'),
            ('service_record_reconciliation', 'lease_token', 'uuid', 'billing.recorded'),
            ('service_record_refund_result', 'lease_token', 'uuid', 'billing.recorded'),
            ('service_record_webhook_result', 'lease_token', 'uuid', 'billing.recorded') $$,
  'every service_record_* returns billing.recorded, and each recording a queue''s work takes lease_token (uuid) '
  'second (a key rotation is no queue work: it compares and sets the key id instead)');
select results_eq(
  $$ select a.attname::text collate "default", format_type(a.atttypid, a.atttypmod)
       from pg_attribute a
      where a.attrelid = (select typrelid from pg_type where oid = 'billing.recorded'::regtype)
        and a.attnum > 0 and not a.attisdropped
      order by a.attnum $$,
  $$ values ('id'::text, 'text'::text), ('status', 'text'), ('changed', 'boolean'), ('detail', 'jsonb') $$,
  'billing.recorded is (id text, status text, changed boolean, detail jsonb)');
select is(billing.recorded_of('42', 'queued', true, null),
  row('42', 'queued', true, '{}'::jsonb)::billing.recorded, 'recorded_of builds one, with an empty detail for null');
select set_eq(
  $$ select c.relname::text from pg_attribute a join pg_class c on c.oid = a.attrelid
      where c.relnamespace = 'billing'::regnamespace and a.attname = 'lease_token'
        and a.atttypid = 'uuid'::regtype and not a.attisdropped $$,
  array['charge_attempts', 'refunds', 'webhook_events', 'key_deletions', 'notifications', 'reconciliation_runs'],
  'every work queue carries a lease_token');
select enum_has_labels('billing', 'failure_class',
  array['unprocessed', 'transient', 'decline', 'needs_new_card', 'reconcile', 'bug'],
  'failure classes: unprocessed (re-sent under the same key) comes before transient');
select is(
  (select pg_get_indexdef(i.indexrelid) from pg_index i
    where i.indexrelid = 'billing.charge_attempts_one_in_flight_per_period_key'::regclass and i.indisunique),
  'CREATE UNIQUE INDEX charge_attempts_one_in_flight_per_period_key ON billing.charge_attempts USING btree (period_id) '
  'WHERE (status = ANY (ARRAY[''queued''::billing.attempt_status, ''claimed''::billing.attempt_status, '
  '''unknown''::billing.attempt_status]))',
  'a unique index keeps one attempt per period in flight');
select is(
  (select pg_get_constraintdef(c.oid) from pg_constraint c where c.conname = 'payment_methods_billing_key_envelope_check'
      and c.conrelid = 'billing.payment_methods'::regclass),
  'CHECK (billing.is_key_envelope(billing_key_ciphertext, billing_key_key_id))',
  'a payment method holds its billing key only as an envelope');

-- billing.assert_surface_locked_down, which every migration ends with ------------------------------
select lives_ok($$ select billing.assert_surface_locked_down() $$, 'the surface as migrated passes its own check');
create table billing.surface_probe (id int);
grant execute on function billing.backoff(integer, interval, interval) to authenticated;
select throws_ok($$ select billing.assert_surface_locked_down() $$, 'P0001',
  'billing tables without row-level security: surface_probe',
  'it refuses a billing table without row-level security (and would stop a migration)');
alter table billing.surface_probe enable row level security;
select throws_ok($$ select billing.assert_surface_locked_down() $$, 'P0001',
  'functions with unintended EXECUTE privileges: billing.backoff(integer,interval,interval)',
  'it refuses a billing function a subscriber could execute');

-- The scheduler
select results_eq(
  $$ select schedule, command from cron.job where jobname = 'saju-billing-tick' $$,
  $$ values ('* * * * *'::text, 'call billing.run_ticks()'::text) $$,
  'pg_cron calls billing.run_ticks() every minute (short committed rounds)');
select results_eq(
  $$ select schedule, command from cron.job where jobname = 'saju-billing-renewals' $$,
  $$ values ('* * * * *'::text, 'call billing.run_renewals()'::text) $$,
  'pg_cron calls billing.run_renewals() every minute (a second renewer for bursts)');
select results_eq(
  $$ select schedule, command from cron.job where jobname = 'saju-billing-reconcile' $$,
  $$ values ('0 18 * * *'::text, 'select billing.schedule_reconciliation()'::text) $$,
  'pg_cron queues the reconciliation of the previous day at 03:00 KST (18:00 UTC)');

select * from finish();
rollback;

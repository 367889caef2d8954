-- Billing model: roles, types, tables, constraints, indexes, row-level security, the test clock
-- and the Pro plan. Functions live in the following migrations.
--
-- Conventions: tables are private to schema billing and reachable only through functions; every
-- table has RLS on (subscriber policies are keyed on the JWT "sub" as text, so Supabase Auth and
-- third-party JWTs such as Clerk both work — hence no foreign key to auth.users); money is bigint
-- KRW; time is timestamptz; every stateful row keeps its last transition reason in status_reason
-- and a trigger copies each transition into billing.events.

-- ---------------------------------------------------------------------------------------------
-- Roles (cluster-global, so created only when missing)
-- ---------------------------------------------------------------------------------------------
do $$
begin
  if not exists (select from pg_catalog.pg_roles where rolname = 'billing_service') then
    -- The service's least-privilege role; deployment grants LOGIN (or a login member) out of band.
    create role billing_service nologin;
  end if;
  if not exists (select from pg_catalog.pg_roles where rolname = 'analyst') then
    create role analyst nologin;
  end if;
end
$$;

-- Lets the owner (and tests) act as the service with SET ROLE.
grant billing_service to postgres;

grant usage on schema billing to billing_service;

-- Deny by default. PUBLIC's EXECUTE on new functions is a global default that a per-schema
-- ALTER DEFAULT PRIVILEGES cannot take away, and changing it globally for postgres would change
-- every other schema too; so each definition revokes it explicitly, and the security migration
-- refuses to finish if any billing/api function is still executable by PUBLIC.

-- ---------------------------------------------------------------------------------------------
-- Types
-- ---------------------------------------------------------------------------------------------
create type billing.plan_interval as enum ('month');
create type billing.registration_status as enum ('pending', 'completed', 'failed', 'expired');
create type billing.payment_method_status as enum ('active', 'replaced', 'deleted');
create type billing.subscription_status as enum ('incomplete', 'active', 'past_due', 'canceled', 'unpaid');
create type billing.period_status as enum ('open', 'paid', 'unpaid', 'void');
-- canceled: withdrawn before it was ever sent; duplicate: approved by Toss for a period that
-- another attempt had already paid (the payment is refunded automatically).
create type billing.attempt_status as enum
  ('queued', 'claimed', 'succeeded', 'declined', 'unknown', 'failed', 'canceled', 'duplicate');
create type billing.attempt_mode as enum ('charge', 'lookup');
create type billing.failure_class as enum ('transient', 'decline', 'needs_new_card', 'reconcile', 'bug');
create type billing.refund_status as enum ('requested', 'claimed', 'succeeded', 'failed');
-- wrong_amount: Toss approved another amount than the attempt's (the period's price); never applied.
create type billing.refund_source as enum
  ('operator', 'prorated_cancel', 'duplicate_charge', 'late_charge', 'wrong_amount', 'external');
create type billing.credit_grant_status as enum ('active', 'expired', 'revoked');
create type billing.credit_entry_kind as enum ('grant', 'consume', 'expire', 'revoke');
create type billing.webhook_status as enum ('received', 'processing', 'processed', 'ignored', 'failed');
create type billing.key_deletion_status as enum ('requested', 'claimed', 'deleted', 'failed');
create type billing.notification_kind as enum
  ('activated', 'renewed', 'payment_failed', 'card_needed', 'card_replaced', 'cancel_scheduled',
   'resumed', 'canceled', 'refunded', 'alert');

-- ---------------------------------------------------------------------------------------------
-- The clock: one per database. Production never enables it; tests move it.
-- ---------------------------------------------------------------------------------------------
create table billing.clock (
  singleton boolean not null default true,
  enabled boolean not null default false,
  frozen_at timestamptz,
  clock_offset interval not null default interval '0',
  changed_at timestamptz,
  constraint clock_pkey primary key (singleton),
  constraint clock_singleton_check check (singleton)
);
insert into billing.clock (singleton) values (true);

create function billing.now()
returns timestamptz
language sql
stable
parallel safe
set search_path = ''
as $$
  select case when c.enabled then coalesce(c.frozen_at, pg_catalog.now() + c.clock_offset)
              else pg_catalog.now() end
    from billing.clock c
   where c.singleton
$$;
revoke execute on function billing.now() from public;
comment on function billing.now() is
  'The one clock of all billing logic: transaction time, or the test clock when it is enabled. '
  'Owner only (used inside billing functions). Raises nothing.';

create function billing.dunning_schedule_is_valid(schedule interval[])
returns boolean
language sql
immutable
parallel safe
set search_path = ''
as $$
  select schedule is not null
     and pg_catalog.cardinality(schedule) between 0 and 10
     and pg_catalog.array_ndims(schedule) is not distinct from
         (case when pg_catalog.cardinality(schedule) = 0 then null else 1 end)
     and not exists (
       select 1
         from pg_catalog.unnest(schedule) with ordinality as s(step, n)
        where s.step is null
           or s.step <= interval '0'
           or s.step > interval '60 days'
           or (s.n > 1 and s.step <= schedule[s.n - 1])
     )
$$;
revoke execute on function billing.dunning_schedule_is_valid(interval[]) from public;
comment on function billing.dunning_schedule_is_valid(interval[]) is
  'True when a dunning schedule is 0–10 strictly increasing positive offsets of at most 60 days. '
  'Owner only (used by a check constraint). Raises nothing.';

-- ---------------------------------------------------------------------------------------------
-- Plans and versioned prices
-- ---------------------------------------------------------------------------------------------
create table billing.plans (
  id uuid not null default gen_random_uuid(),
  code text not null,
  name text not null,
  currency text not null default 'KRW',
  billing_interval billing.plan_interval not null default 'month',
  credits_per_period integer not null,
  -- Offsets from the first failed charge of a period at which a new attempt is made.
  dunning_schedule interval[] not null default '{1 day,3 days,5 days,7 days}',
  dunning_final_status billing.subscription_status not null default 'canceled',
  -- How long a subscription whose first charge failed waits for a working card.
  incomplete_grace interval not null default interval '1 day',
  active boolean not null default true,
  created_at timestamptz not null default billing.now(),
  constraint plans_pkey primary key (id),
  constraint plans_code_key unique (code),
  constraint plans_code_check check (code ~ '^[a-z][a-z0-9_]{1,31}$'),
  constraint plans_name_check check (pg_catalog.length(name) between 1 and 60),
  constraint plans_currency_check check (currency = 'KRW'),
  constraint plans_credits_per_period_check check (credits_per_period between 0 and 100000),
  constraint plans_dunning_schedule_check check (billing.dunning_schedule_is_valid(dunning_schedule)),
  constraint plans_dunning_final_status_check check (dunning_final_status in ('canceled', 'unpaid')),
  constraint plans_incomplete_grace_check
    check (incomplete_grace > interval '0' and incomplete_grace <= interval '30 days')
);

create table billing.plan_prices (
  id uuid not null default gen_random_uuid(),
  plan_id uuid not null,
  amount bigint not null,
  effective_from timestamptz not null,
  created_at timestamptz not null default billing.now(),
  constraint plan_prices_pkey primary key (id),
  constraint plan_prices_plan_id_fkey foreign key (plan_id) references billing.plans (id),
  constraint plan_prices_plan_id_effective_from_key unique (plan_id, effective_from),
  -- Toss refuses card charges below 100 KRW (BELOW_MINIMUM_AMOUNT).
  constraint plan_prices_amount_check check (amount between 100 and 100000000)
);

-- ---------------------------------------------------------------------------------------------
-- Customers, card registrations, payment methods
-- ---------------------------------------------------------------------------------------------
create table billing.customers (
  id uuid not null default gen_random_uuid(),
  user_id text not null,
  email text,
  name text,
  created_at timestamptz not null default billing.now(),
  constraint customers_pkey primary key (id),
  constraint customers_user_id_key unique (user_id),
  constraint customers_user_id_check check (pg_catalog.length(user_id) between 1 and 255),
  constraint customers_email_check check (pg_catalog.length(email) <= 100),
  constraint customers_name_check check (pg_catalog.length(name) <= 100)
);

create table billing.card_registrations (
  id uuid not null default gen_random_uuid(),
  customer_id uuid not null,
  user_id text not null,
  plan_id uuid not null,
  customer_key text not null,
  status billing.registration_status not null default 'pending',
  status_reason text,
  expires_at timestamptz not null,
  completed_at timestamptz,
  fail_code text,
  fail_message text,
  payment_method_id uuid,
  subscription_id uuid,
  created_at timestamptz not null default billing.now(),
  constraint card_registrations_pkey primary key (id),
  constraint card_registrations_customer_id_fkey foreign key (customer_id) references billing.customers (id),
  constraint card_registrations_plan_id_fkey foreign key (plan_id) references billing.plans (id),
  constraint card_registrations_customer_key_key unique (customer_key),
  -- Toss's customerKey rule; ours are 'ck_' + 32 hex digits (128 random bits).
  constraint card_registrations_customer_key_check check (customer_key ~ '^[A-Za-z0-9_=.@-]{2,50}$'),
  constraint card_registrations_expires_at_check check (expires_at > created_at),
  constraint card_registrations_completed_check
    check ((status = 'completed') = (payment_method_id is not null and completed_at is not null)),
  constraint card_registrations_failed_check check ((status = 'failed') = (fail_code is not null)),
  constraint card_registrations_fail_code_check check (pg_catalog.length(fail_code) between 1 and 100),
  constraint card_registrations_fail_message_check check (pg_catalog.length(fail_message) <= 510)
);
create index card_registrations_expiry_idx on billing.card_registrations (expires_at) where status = 'pending';
create index card_registrations_customer_idx on billing.card_registrations (customer_id, created_at);

create table billing.payment_methods (
  id uuid not null default gen_random_uuid(),
  customer_id uuid not null,
  user_id text not null,
  registration_id uuid not null,
  customer_key text not null,
  -- Card scope today; the column stays open for transfer/easy-pay billing.
  method text not null default 'CARD',
  -- The billing key exists here only as the service's AES-GCM ciphertext (key id for rotation);
  -- the sha256 (lowercase hex of the UTF-8 key) finds the row for BILLING_DELETED webhooks.
  billing_key_ciphertext bytea not null,
  billing_key_key_id text not null,
  billing_key_sha256 text not null,
  card_number_masked text,
  issuer_code text,
  acquirer_code text,
  card_type text,
  owner_type text,
  status billing.payment_method_status not null default 'active',
  status_reason text,
  replaced_at timestamptz,
  deleted_at timestamptz,
  created_at timestamptz not null default billing.now(),
  constraint payment_methods_pkey primary key (id),
  constraint payment_methods_customer_id_fkey foreign key (customer_id) references billing.customers (id),
  constraint payment_methods_registration_id_fkey
    foreign key (registration_id) references billing.card_registrations (id),
  constraint payment_methods_registration_id_key unique (registration_id),
  constraint payment_methods_billing_key_sha256_key unique (billing_key_sha256),
  constraint payment_methods_customer_key_check check (customer_key ~ '^[A-Za-z0-9_=.@-]{2,50}$'),
  constraint payment_methods_method_check check (method in ('CARD', 'TRANSFER')),
  constraint payment_methods_billing_key_ciphertext_check
    check (pg_catalog.octet_length(billing_key_ciphertext) between 1 and 4096),
  constraint payment_methods_billing_key_key_id_check
    check (pg_catalog.length(billing_key_key_id) between 1 and 100),
  constraint payment_methods_billing_key_sha256_check check (billing_key_sha256 ~ '^[0-9a-f]{64}$'),
  constraint payment_methods_card_number_masked_check check (pg_catalog.length(card_number_masked) <= 30),
  constraint payment_methods_replaced_check check ((status = 'replaced') <= (replaced_at is not null)),
  constraint payment_methods_deleted_check check ((status = 'deleted') = (deleted_at is not null))
);
create index payment_methods_customer_idx on billing.payment_methods (customer_id, created_at);

alter table billing.card_registrations
  add constraint card_registrations_payment_method_id_fkey
  foreign key (payment_method_id) references billing.payment_methods (id);

-- ---------------------------------------------------------------------------------------------
-- Subscriptions and billing periods
-- ---------------------------------------------------------------------------------------------
create table billing.subscriptions (
  id uuid not null default gen_random_uuid(),
  customer_id uuid not null,
  user_id text not null,
  plan_id uuid not null,
  status billing.subscription_status not null default 'incomplete',
  status_reason text,
  -- Periods are calendar months in Asia/Seoul from this instant (billing.period_start).
  billing_anchor timestamptz not null,
  anchor_day smallint generated always as
    (pg_catalog.date_part('day', pg_catalog.timezone('Asia/Seoul', billing_anchor))::smallint) stored,
  anchor_local_time time generated always as
    (pg_catalog.timezone('Asia/Seoul', billing_anchor)::time) stored,
  current_period_id uuid,
  current_period_index integer not null default 1,
  current_period_starts_at timestamptz not null,
  current_period_ends_at timestamptz not null,
  payment_method_id uuid not null,
  cancel_at_period_end boolean not null default false,
  cancel_requested_at timestamptz,
  canceled_at timestamptz,
  ended_at timestamptz,
  past_due_since timestamptz,
  -- When an incomplete or past_due subscription ends if nothing is paid by then.
  grace_ends_at timestamptz,
  -- No automatic retries until a new card is registered.
  awaiting_card boolean not null default false,
  created_at timestamptz not null default billing.now(),
  constraint subscriptions_pkey primary key (id),
  constraint subscriptions_customer_id_fkey foreign key (customer_id) references billing.customers (id),
  constraint subscriptions_plan_id_fkey foreign key (plan_id) references billing.plans (id),
  constraint subscriptions_payment_method_id_fkey
    foreign key (payment_method_id) references billing.payment_methods (id),
  constraint subscriptions_current_period_index_check check (current_period_index >= 1),
  constraint subscriptions_current_period_check check (current_period_ends_at > current_period_starts_at),
  constraint subscriptions_ended_check check ((status in ('canceled', 'unpaid')) = (ended_at is not null)),
  constraint subscriptions_cancel_at_period_end_check
    check (not cancel_at_period_end or cancel_requested_at is not null),
  constraint subscriptions_past_due_check check ((status = 'past_due') <= (past_due_since is not null)),
  constraint subscriptions_grace_check
    check ((status in ('incomplete', 'past_due')) <= (grace_ends_at is not null))
);
-- At most one live subscription per customer.
create unique index subscriptions_one_live_per_customer_key
  on billing.subscriptions (customer_id) where status in ('incomplete', 'active', 'past_due');
-- What billing.tick looks at: only due rows are ever visited.
create index subscriptions_renewal_due_idx
  on billing.subscriptions (current_period_ends_at) where status = 'active';
create index subscriptions_grace_due_idx
  on billing.subscriptions (grace_ends_at) where status in ('incomplete', 'past_due');
create index subscriptions_customer_idx on billing.subscriptions (customer_id, created_at);

alter table billing.card_registrations
  add constraint card_registrations_subscription_id_fkey
  foreign key (subscription_id) references billing.subscriptions (id);

create table billing.billing_periods (
  id uuid not null default gen_random_uuid(),
  subscription_id uuid not null,
  user_id text not null,
  period_index integer not null,
  starts_at timestamptz not null,
  ends_at timestamptz not null,
  price_id uuid not null,
  amount bigint not null,
  status billing.period_status not null default 'open',
  status_reason text,
  paid_at timestamptz,
  payment_id uuid,
  created_at timestamptz not null default billing.now(),
  constraint billing_periods_pkey primary key (id),
  constraint billing_periods_subscription_id_fkey
    foreign key (subscription_id) references billing.subscriptions (id),
  constraint billing_periods_price_id_fkey foreign key (price_id) references billing.plan_prices (id),
  constraint billing_periods_subscription_id_period_index_key unique (subscription_id, period_index),
  -- Target of the attempts' composite key: an attempt's amount is its period's amount.
  constraint billing_periods_id_subscription_id_amount_key unique (id, subscription_id, amount),
  constraint billing_periods_period_index_check check (period_index >= 1),
  constraint billing_periods_range_check check (ends_at > starts_at),
  constraint billing_periods_amount_check check (amount > 0),
  constraint billing_periods_paid_check check ((status = 'paid') = (paid_at is not null and payment_id is not null))
);

alter table billing.subscriptions
  add constraint subscriptions_current_period_id_fkey
  foreign key (current_period_id) references billing.billing_periods (id);

-- ---------------------------------------------------------------------------------------------
-- Charge attempts: one row = one Toss orderId = one Idempotency-Key
-- ---------------------------------------------------------------------------------------------
create table billing.charge_attempts (
  id uuid not null default gen_random_uuid(),
  period_id uuid not null,
  subscription_id uuid not null,
  user_id text not null,
  payment_method_id uuid not null,
  attempt_number integer not null,
  order_id text not null,
  idempotency_key uuid not null default gen_random_uuid(),
  amount bigint not null,
  order_name text not null,
  status billing.attempt_status not null default 'queued',
  status_reason text,
  not_before timestamptz not null,
  claim_mode billing.attempt_mode,
  lease_owner text,
  lease_expires_at timestamptz,
  -- How often it was handed out to charge / to look up, and transient failures so far.
  sends integer not null default 0,
  lookups integer not null default 0,
  transient_failures integer not null default 0,
  classification billing.failure_class,
  error_code text,
  error_message text,
  resolved_at timestamptz,
  created_at timestamptz not null default billing.now(),
  constraint charge_attempts_pkey primary key (id),
  constraint charge_attempts_period_fkey foreign key (period_id, subscription_id, amount)
    references billing.billing_periods (id, subscription_id, amount),
  constraint charge_attempts_payment_method_id_fkey
    foreign key (payment_method_id) references billing.payment_methods (id),
  constraint charge_attempts_period_id_attempt_number_key unique (period_id, attempt_number),
  constraint charge_attempts_order_id_key unique (order_id),
  constraint charge_attempts_idempotency_key_key unique (idempotency_key),
  -- Toss's orderId rule (the intersection of what its documents allow).
  constraint charge_attempts_order_id_check check (order_id ~ '^[A-Za-z0-9_-]{6,64}$'),
  constraint charge_attempts_order_name_check check (pg_catalog.length(order_name) between 1 and 100),
  constraint charge_attempts_amount_check check (amount > 0),
  constraint charge_attempts_attempt_number_check check (attempt_number >= 1),
  constraint charge_attempts_lease_check check (
    (status = 'claimed') = (lease_owner is not null and lease_expires_at is not null and claim_mode is not null)),
  constraint charge_attempts_counters_check check (sends >= 0 and lookups >= 0 and transient_failures >= 0)
);
-- Invariant 1: at most one successful charge per period, whatever the code path.
create unique index charge_attempts_one_success_per_period_key
  on billing.charge_attempts (period_id) where status = 'succeeded';
create index charge_attempts_claimable_idx
  on billing.charge_attempts (not_before) where status in ('queued', 'unknown');
create index charge_attempts_lease_idx on billing.charge_attempts (lease_expires_at) where status = 'claimed';
create index charge_attempts_in_flight_idx
  on billing.charge_attempts (payment_method_id) where status in ('queued', 'claimed', 'unknown');
create index charge_attempts_subscription_idx on billing.charge_attempts (subscription_id, created_at);

-- ---------------------------------------------------------------------------------------------
-- Payments (snapshots of Toss Payment objects) and refunds
-- ---------------------------------------------------------------------------------------------
create table billing.payments (
  id uuid not null default gen_random_uuid(),
  payment_key text not null,
  order_id text not null,
  attempt_id uuid,
  subscription_id uuid,
  period_id uuid,
  customer_id uuid,
  user_id text,
  -- True for the one payment that pays its period; false for one refunded automatically
  -- (a duplicate or late charge) or one whose orderId is not ours.
  applied boolean not null default false,
  status text not null,
  method text,
  total_amount bigint not null,
  balance_amount bigint not null,
  approved_at timestamptz,
  secret text,
  receipt_url text,
  last_transaction_key text,
  raw jsonb not null,
  created_at timestamptz not null default billing.now(),
  updated_at timestamptz not null default billing.now(),
  constraint payments_pkey primary key (id),
  constraint payments_payment_key_key unique (payment_key),
  constraint payments_order_id_key unique (order_id),
  constraint payments_attempt_id_key unique (attempt_id),
  constraint payments_attempt_id_fkey foreign key (attempt_id) references billing.charge_attempts (id),
  constraint payments_subscription_id_fkey foreign key (subscription_id) references billing.subscriptions (id),
  constraint payments_period_id_fkey foreign key (period_id) references billing.billing_periods (id),
  constraint payments_customer_id_fkey foreign key (customer_id) references billing.customers (id),
  constraint payments_payment_key_check check (pg_catalog.length(payment_key) between 1 and 200),
  constraint payments_status_check check (status in
    ('READY', 'IN_PROGRESS', 'WAITING_FOR_DEPOSIT', 'DONE', 'CANCELED', 'PARTIAL_CANCELED', 'ABORTED', 'EXPIRED')),
  constraint payments_amount_check check (total_amount > 0 and balance_amount between 0 and total_amount),
  constraint payments_applied_check check (not applied or (attempt_id is not null and period_id is not null)),
  constraint payments_matched_check check ((attempt_id is null) = (subscription_id is null))
);
-- Invariant 1 again, on the money side: one payment pays a period.
create unique index payments_one_per_period_key on billing.payments (period_id) where applied;
create index payments_customer_idx on billing.payments (customer_id, approved_at);

alter table billing.billing_periods
  add constraint billing_periods_payment_id_fkey foreign key (payment_id) references billing.payments (id);

create table billing.refunds (
  -- Also the Idempotency-Key of POST /v1/payments/{paymentKey}/cancel.
  id uuid not null default gen_random_uuid(),
  payment_id uuid not null,
  user_id text,
  amount bigint not null,
  reason text not null,
  source billing.refund_source not null,
  status billing.refund_status not null default 'requested',
  status_reason text,
  not_before timestamptz not null default billing.now(),
  lease_owner text,
  lease_expires_at timestamptz,
  attempts integer not null default 0,
  toss_transaction_key text,
  canceled_at timestamptz,
  error_code text,
  error_message text,
  requested_by text not null,
  created_at timestamptz not null default billing.now(),
  constraint refunds_pkey primary key (id),
  constraint refunds_payment_id_fkey foreign key (payment_id) references billing.payments (id),
  constraint refunds_toss_transaction_key_key unique (toss_transaction_key),
  constraint refunds_amount_check check (amount > 0),
  constraint refunds_reason_check check (pg_catalog.length(reason) between 1 and 200),
  constraint refunds_lease_check check ((status = 'claimed') = (lease_owner is not null and lease_expires_at is not null)),
  constraint refunds_succeeded_check check ((status = 'succeeded') = (toss_transaction_key is not null)),
  constraint refunds_attempts_check check (attempts >= 0)
);
create index refunds_claimable_idx on billing.refunds (not_before) where status = 'requested';
create index refunds_lease_idx on billing.refunds (lease_expires_at) where status = 'claimed';
create index refunds_payment_idx on billing.refunds (payment_id);

-- ---------------------------------------------------------------------------------------------
-- Credits: a grant per paid period (expiring at period end) and an append-only ledger
-- ---------------------------------------------------------------------------------------------
create table billing.credit_grants (
  id uuid not null default gen_random_uuid(),
  customer_id uuid not null,
  user_id text not null,
  subscription_id uuid not null,
  period_id uuid not null,
  payment_id uuid not null,
  amount integer not null,
  remaining integer not null,
  status billing.credit_grant_status not null default 'active',
  status_reason text,
  granted_at timestamptz not null,
  expires_at timestamptz not null,
  created_at timestamptz not null default billing.now(),
  constraint credit_grants_pkey primary key (id),
  constraint credit_grants_customer_id_fkey foreign key (customer_id) references billing.customers (id),
  constraint credit_grants_subscription_id_fkey foreign key (subscription_id) references billing.subscriptions (id),
  constraint credit_grants_period_id_fkey foreign key (period_id) references billing.billing_periods (id),
  constraint credit_grants_payment_id_fkey foreign key (payment_id) references billing.payments (id),
  constraint credit_grants_period_id_key unique (period_id),
  constraint credit_grants_amount_check check (amount > 0),
  -- The balance can never go below zero.
  constraint credit_grants_remaining_check check (remaining between 0 and amount),
  constraint credit_grants_closed_check check (status = 'active' or remaining = 0)
);
create index credit_grants_expiry_idx on billing.credit_grants (expires_at) where status = 'active';
create index credit_grants_customer_idx on billing.credit_grants (customer_id, expires_at) where status = 'active';

create table billing.credit_entries (
  id bigint generated always as identity,
  customer_id uuid not null,
  user_id text not null,
  grant_id uuid not null,
  kind billing.credit_entry_kind not null,
  amount integer not null,
  reason text,
  created_at timestamptz not null default billing.now(),
  constraint credit_entries_pkey primary key (id),
  constraint credit_entries_customer_id_fkey foreign key (customer_id) references billing.customers (id),
  constraint credit_entries_grant_id_fkey foreign key (grant_id) references billing.credit_grants (id),
  constraint credit_entries_amount_check check ((kind = 'grant') = (amount > 0) and amount <> 0),
  constraint credit_entries_reason_check check (pg_catalog.length(reason) <= 200)
);
create index credit_entries_customer_idx on billing.credit_entries (customer_id, id);
create index credit_entries_grant_idx on billing.credit_entries (grant_id);

-- ---------------------------------------------------------------------------------------------
-- Webhook inbox, billing-key deletions at Toss, notification outbox
-- ---------------------------------------------------------------------------------------------
create table billing.webhook_events (
  id uuid not null default gen_random_uuid(),
  transmission_id text not null,
  event_type text not null,
  payload jsonb not null,
  headers jsonb not null default '{}',
  received_at timestamptz not null default billing.now(),
  status billing.webhook_status not null default 'received',
  status_reason text,
  attempts integer not null default 0,
  not_before timestamptz not null default billing.now(),
  lease_owner text,
  lease_expires_at timestamptz,
  last_error text,
  processed_at timestamptz,
  constraint webhook_events_pkey primary key (id),
  constraint webhook_events_transmission_id_key unique (transmission_id),
  constraint webhook_events_transmission_id_check check (pg_catalog.length(transmission_id) between 1 and 200),
  constraint webhook_events_event_type_check check (pg_catalog.length(event_type) between 1 and 100),
  constraint webhook_events_payload_check check (pg_catalog.jsonb_typeof(payload) = 'object'),
  constraint webhook_events_headers_check check (pg_catalog.jsonb_typeof(headers) = 'object'),
  constraint webhook_events_lease_check
    check ((status = 'processing') = (lease_owner is not null and lease_expires_at is not null)),
  constraint webhook_events_attempts_check check (attempts >= 0)
);
create index webhook_events_claimable_idx on billing.webhook_events (not_before) where status = 'received';
create index webhook_events_lease_idx on billing.webhook_events (lease_expires_at) where status = 'processing';

create table billing.key_deletions (
  id uuid not null default gen_random_uuid(),
  payment_method_id uuid not null,
  reason text not null,
  status billing.key_deletion_status not null default 'requested',
  status_reason text,
  not_before timestamptz not null default billing.now(),
  lease_owner text,
  lease_expires_at timestamptz,
  attempts integer not null default 0,
  error_code text,
  error_message text,
  deleted_at timestamptz,
  created_at timestamptz not null default billing.now(),
  constraint key_deletions_pkey primary key (id),
  constraint key_deletions_payment_method_id_fkey
    foreign key (payment_method_id) references billing.payment_methods (id),
  constraint key_deletions_payment_method_id_key unique (payment_method_id),
  constraint key_deletions_lease_check
    check ((status = 'claimed') = (lease_owner is not null and lease_expires_at is not null)),
  constraint key_deletions_deleted_check check ((status = 'deleted') = (deleted_at is not null)),
  constraint key_deletions_attempts_check check (attempts >= 0)
);
create index key_deletions_claimable_idx on billing.key_deletions (not_before) where status = 'requested';
create index key_deletions_lease_idx on billing.key_deletions (lease_expires_at) where status = 'claimed';

create table billing.notifications (
  id bigint generated always as identity,
  kind billing.notification_kind not null,
  customer_id uuid,
  user_id text,
  subscription_id uuid,
  payload jsonb not null default '{}',
  created_at timestamptz not null default billing.now(),
  lease_owner text,
  lease_expires_at timestamptz,
  attempts integer not null default 0,
  delivered_at timestamptz,
  constraint notifications_pkey primary key (id),
  constraint notifications_customer_id_fkey foreign key (customer_id) references billing.customers (id),
  constraint notifications_subscription_id_fkey foreign key (subscription_id) references billing.subscriptions (id),
  constraint notifications_payload_check check (pg_catalog.jsonb_typeof(payload) = 'object'),
  -- Alerts go to operators; everything else to a subscriber.
  constraint notifications_audience_check check ((kind = 'alert') = (customer_id is null))
);
create index notifications_pending_idx on billing.notifications (id) where delivered_at is null;
create index notifications_customer_idx on billing.notifications (customer_id, id);

-- ---------------------------------------------------------------------------------------------
-- The append-only event log: every state change, who, why, when (billing.now())
-- ---------------------------------------------------------------------------------------------
create table billing.events (
  id bigint generated always as identity,
  occurred_at timestamptz not null default billing.now(),
  -- The calling role (SET ROLE of the session, else the login user): current_user inside a
  -- security-definer function is the owner, which would say nothing.
  actor_role text not null,
  actor_sub text,
  entity_type text not null,
  entity_id uuid,
  action text not null,
  old_status text,
  new_status text,
  reason text,
  details jsonb,
  constraint events_pkey primary key (id),
  constraint events_entity_type_check check (pg_catalog.length(entity_type) between 1 and 63),
  constraint events_action_check check (pg_catalog.length(action) between 1 and 63)
);
create index events_entity_idx on billing.events (entity_id, id);

-- ---------------------------------------------------------------------------------------------
-- Guards and the audit trigger
-- ---------------------------------------------------------------------------------------------
create function billing.forbid_change()
returns trigger
language plpgsql
set search_path = ''
as $$
begin
  raise exception '% is append-only: % is not allowed', tg_table_name, lower(tg_op)
    using errcode = 'SB403';
end
$$;
revoke execute on function billing.forbid_change() from public;
comment on function billing.forbid_change() is
  'Trigger: refuses UPDATE/DELETE/TRUNCATE on append-only tables. Raises SB403.';

create trigger events_append_only before update or delete on billing.events
  for each row execute function billing.forbid_change();
create trigger events_no_truncate before truncate on billing.events
  for each statement execute function billing.forbid_change();
create trigger credit_entries_append_only before update or delete on billing.credit_entries
  for each row execute function billing.forbid_change();
create trigger credit_entries_no_truncate before truncate on billing.credit_entries
  for each statement execute function billing.forbid_change();

create function billing.forbid_price_edit()
returns trigger
language plpgsql
set search_path = ''
as $$
begin
  if tg_op = 'DELETE' then
    raise exception 'plan price % cannot be deleted; add a new version with billing.change_plan_price', old.id
      using errcode = 'SB403';
  end if;
  if new.amount is distinct from old.amount
     or new.plan_id is distinct from old.plan_id
     or new.effective_from is distinct from old.effective_from then
    raise exception 'plan price % is immutable; add a new version with billing.change_plan_price', old.id
      using errcode = 'SB403';
  end if;
  return new;
end
$$;
revoke execute on function billing.forbid_price_edit() from public;
comment on function billing.forbid_price_edit() is
  'Trigger: prices are versioned, never edited in place or deleted. Raises SB403.';

create trigger plan_prices_immutable before update or delete on billing.plan_prices
  for each row execute function billing.forbid_price_edit();

create function billing.actor_role()
returns text
language sql
stable
set search_path = ''
as $$
  select coalesce(nullif(pg_catalog.current_setting('role', true), 'none'), pg_catalog.session_user()::text)
$$;
revoke execute on function billing.actor_role() from public;
comment on function billing.actor_role() is
  'Who is calling: the SET ROLE of the session (as PostgREST sets it), else the login user. Owner only. Raises nothing.';

create function billing.jwt_sub()
returns text
language sql
stable
set search_path = ''
as $$
  select nullif(auth.jwt() ->> 'sub', '')
$$;
revoke execute on function billing.jwt_sub() from public;
comment on function billing.jwt_sub() is
  'The JWT "sub" of the request (Supabase Auth or a third-party JWT), or null. Owner only. Raises nothing.';

-- Copies each status transition (and creation) of a stateful row into billing.events.
create function billing.audit_status()
returns trigger
language plpgsql
set search_path = ''
as $$
declare
  v_new jsonb := pg_catalog.to_jsonb(new);
  v_old jsonb := case when tg_op = 'UPDATE' then pg_catalog.to_jsonb(old) end;
  v_reason text := v_new ->> 'status_reason';
begin
  -- A reason left over from an earlier transition is not this transition's reason.
  if tg_op = 'UPDATE' and v_reason is not distinct from v_old ->> 'status_reason' then
    v_reason := null;
  end if;
  insert into billing.events (actor_role, actor_sub, entity_type, entity_id, action, old_status, new_status, reason)
  values (billing.actor_role(), billing.jwt_sub(), tg_table_name, (v_new ->> 'id')::uuid,
          case when tg_op = 'INSERT' then 'created' else 'status_changed' end,
          v_old ->> 'status', v_new ->> 'status', v_reason);
  return null;
end
$$;
revoke execute on function billing.audit_status() from public;
comment on function billing.audit_status() is
  'Trigger: writes an event for every insert and status change of a stateful table. Raises nothing.';

-- Subscription changes that are not status changes but are state all the same.
create function billing.audit_subscription_settings()
returns trigger
language plpgsql
set search_path = ''
as $$
begin
  insert into billing.events (actor_role, actor_sub, entity_type, entity_id, action, reason, details)
  values (billing.actor_role(), billing.jwt_sub(), tg_table_name, new.id, 'settings_changed',
          nullif(new.status_reason, old.status_reason),
          pg_catalog.jsonb_strip_nulls(pg_catalog.jsonb_build_object(
            'cancel_at_period_end', case when new.cancel_at_period_end is distinct from old.cancel_at_period_end
                                         then pg_catalog.to_jsonb(new.cancel_at_period_end) end,
            'payment_method_id', case when new.payment_method_id is distinct from old.payment_method_id
                                      then pg_catalog.to_jsonb(new.payment_method_id) end,
            'awaiting_card', case when new.awaiting_card is distinct from old.awaiting_card
                                  then pg_catalog.to_jsonb(new.awaiting_card) end,
            'current_period_index', case when new.current_period_index is distinct from old.current_period_index
                                         then pg_catalog.to_jsonb(new.current_period_index) end)));
  return null;
end
$$;
revoke execute on function billing.audit_subscription_settings() from public;
comment on function billing.audit_subscription_settings() is
  'Trigger: writes an event when a subscription''s cancel flag, card, awaiting-card flag or period changes. Raises nothing.';

do $$
declare
  t text;
begin
  foreach t in array array['card_registrations', 'payment_methods', 'subscriptions', 'billing_periods',
                           'charge_attempts', 'payments', 'refunds', 'credit_grants', 'webhook_events',
                           'key_deletions']
  loop
    execute pg_catalog.format(
      'create trigger %1$s_audit_insert after insert on billing.%1$I
         for each row execute function billing.audit_status()', t);
    execute pg_catalog.format(
      'create trigger %1$s_audit_status after update of status on billing.%1$I
         for each row when (old.status is distinct from new.status)
         execute function billing.audit_status()', t);
  end loop;
end
$$;

-- Customers have no status, but their creation is a state change all the same.
create trigger customers_audit_insert after insert on billing.customers
  for each row execute function billing.audit_status();

create trigger subscriptions_audit_settings after update of cancel_at_period_end, payment_method_id, awaiting_card, current_period_index
  on billing.subscriptions
  for each row
  when (old.cancel_at_period_end is distinct from new.cancel_at_period_end
        or old.payment_method_id is distinct from new.payment_method_id
        or old.awaiting_card is distinct from new.awaiting_card
        or old.current_period_index is distinct from new.current_period_index)
  execute function billing.audit_subscription_settings();

-- ---------------------------------------------------------------------------------------------
-- Row-level security: on for every table. API roles have no table privileges at all (they reach
-- data only through api functions); the subscriber policies below are defence in depth should
-- a SELECT grant ever be added. Tables without a policy deny everyone but the owner.
-- ---------------------------------------------------------------------------------------------
do $$
declare
  t text;
begin
  foreach t in array array['clock', 'plans', 'plan_prices', 'customers', 'card_registrations',
                           'payment_methods', 'subscriptions', 'billing_periods', 'charge_attempts',
                           'payments', 'refunds', 'credit_grants', 'credit_entries', 'webhook_events',
                           'key_deletions', 'notifications', 'events']
  loop
    execute pg_catalog.format('alter table billing.%I enable row level security', t);
    execute pg_catalog.format('revoke all on billing.%I from public, anon, authenticated, service_role', t);
  end loop;
  foreach t in array array['customers', 'card_registrations', 'payment_methods', 'subscriptions',
                           'billing_periods', 'charge_attempts', 'payments', 'refunds', 'credit_grants',
                           'credit_entries', 'notifications']
  loop
    execute pg_catalog.format(
      'create policy %1$s_select_own on billing.%1$I for select to authenticated
         using (user_id = (select auth.jwt() ->> ''sub''))', t);
  end loop;
end
$$;

create policy plans_select_active on billing.plans for select to authenticated using (active);
create policy plan_prices_select_all on billing.plan_prices for select to authenticated using (true);

-- ---------------------------------------------------------------------------------------------
-- Seed: the Pro plan (9,900 KRW a month, 10 saju tests per month)
-- ---------------------------------------------------------------------------------------------
insert into billing.plans (code, name, credits_per_period, dunning_schedule, dunning_final_status)
values ('pro', 'Saju맛피아 Pro', 10, '{1 day,3 days,5 days,7 days}', 'canceled')
on conflict (code) do nothing;

insert into billing.plan_prices (plan_id, amount, effective_from)
select p.id, 9900, timestamptz '2000-01-01 00:00:00+09'
  from billing.plans p
 where p.code = 'pro'
on conflict (plan_id, effective_from) do nothing;

comment on table billing.plans is 'Sellable plans; the price lives in plan_prices versions.';
comment on table billing.plan_prices is 'Price versions; a period uses the version in effect at its start. Append-only.';
comment on table billing.customers is 'One per subscriber, keyed on the JWT sub (text).';
comment on table billing.card_registrations is 'A pending card registration: the customerKey handed to the Toss SDK.';
comment on table billing.payment_methods is 'Billing keys (encrypted by the service) and their card details.';
comment on table billing.subscriptions is 'Subscriptions; at most one live (incomplete/active/past_due) per customer.';
comment on table billing.billing_periods is 'Calendar-month periods in Asia/Seoul with the amount fixed at creation.';
comment on table billing.charge_attempts is 'One row = one Toss orderId = one Idempotency-Key.';
comment on table billing.payments is 'Snapshots of Toss Payment objects.';
comment on table billing.refunds is 'Refund requests; id is the Idempotency-Key of the cancel call.';
comment on table billing.credit_grants is 'Credits granted per paid period, expiring at period end.';
comment on table billing.credit_entries is 'Append-only credit ledger.';
comment on table billing.webhook_events is 'Inbox of Toss webhooks, stored before processing.';
comment on table billing.key_deletions is 'Billing keys to delete at Toss (DELETE /v1/billing/{billingKey}).';
comment on table billing.notifications is 'Outbox of subscriber notifications and operator alerts.';
comment on table billing.events is 'Append-only audit log of every state change.';
comment on table billing.clock is 'The per-database test clock; disabled in production.';

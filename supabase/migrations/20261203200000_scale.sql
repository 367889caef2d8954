-- Billing at a million subscriptions: indexes for every lookup the API, the claims and the
-- scheduler make; billing.tick() in named, separately testable steps that work through a burst
-- in small batches under a time budget; and the event log partitioned by month, with an
-- archive path that keeps the live log append-only. SQLSTATEs: see 20261121200100_billing_core.sql.

-- ---------------------------------------------------------------------------------------------
-- Indexes
-- ---------------------------------------------------------------------------------------------

-- The subscriber API finds its rows by the JWT sub (api.my_subscription, cancel, resume;
-- api.my_payments); payments grow by one row per subscriber and month.
create index subscriptions_user_idx on billing.subscriptions (user_id);
create index payments_user_idx on billing.payments (user_id);
-- api.my_credits lists every grant of a customer, not only the active ones the partial index
-- held; this one serves both (credit_balance and consume_credit filter on status).
drop index billing.credit_grants_customer_idx;
create index credit_grants_customer_idx on billing.credit_grants (customer_id, expires_at);
-- A full refund revokes the credits its payment granted; ending a subscription closes its active
-- grants.
create index credit_grants_payment_idx on billing.credit_grants (payment_id);
create index credit_grants_subscription_active_idx on billing.credit_grants (subscription_id)
  where status = 'active';

-- The claims order by (not_before, id): an index on not_before alone makes a claim sort the whole
-- ready backlog (tens of thousands of rows after an outage) to hand out ten.
drop index billing.charge_attempts_claimable_idx;
create index charge_attempts_claimable_idx
  on billing.charge_attempts (not_before, id) where status in ('queued', 'unknown');
drop index billing.refunds_claimable_idx;
create index refunds_claimable_idx on billing.refunds (not_before, id) where status = 'requested';
drop index billing.webhook_events_claimable_idx;
create index webhook_events_claimable_idx
  on billing.webhook_events (not_before, id) where status = 'received';
drop index billing.key_deletions_claimable_idx;
create index key_deletions_claimable_idx
  on billing.key_deletions (not_before, id) where status = 'requested';
-- Notifications are claimed in id order from notifications_pending_idx (id) already.

-- ---------------------------------------------------------------------------------------------
-- The scheduler in named steps
-- ---------------------------------------------------------------------------------------------
-- Each step does one batch of at most `batch` rows and returns its counts as a JSON object whose
-- "rows" says how many rows it took from its queue; billing.run_tick_step repeats a step while
-- batches come back full and the tick's time budget lasts. Small batches keep each statement short;
-- the budget bounds how long one tick holds the row locks of what it has done.

create function billing.tick_expire_registrations(batch integer)
returns jsonb
language plpgsql
set search_path = ''
as $$
declare
  v_count integer;
begin
  update billing.card_registrations cr
     set status = 'expired', status_reason = 'not completed before ' || cr.expires_at
   where cr.id in (select x.id from billing.card_registrations x
                    where x.status = 'pending' and x.expires_at <= billing.now()
                    order by x.expires_at limit batch for update skip locked);
  get diagnostics v_count = row_count;
  return pg_catalog.jsonb_build_object('rows', v_count, 'registrationsExpired', v_count);
end
$$;
revoke execute on function billing.tick_expire_registrations(integer) from public;
comment on function billing.tick_expire_registrations(integer) is
  'Tick step: expires up to batch pending card registrations past their expiry; returns '
  '{rows, registrationsExpired}. Owner only (called by billing.tick). Raises nothing.';

-- Expired leases: the work becomes claimable again under the same keys. A charge is re-sent only
-- while its period still needs paying; otherwise it is looked up.
create function billing.tick_expire_leases(batch integer)
returns jsonb
language plpgsql
set search_path = ''
as $$
declare
  v_now timestamptz := billing.now();
  v_attempts integer;
  v_refunds integer;
  v_webhooks integer;
  v_keys integer;
begin
  update billing.charge_attempts ca
     set status = case when ca.claim_mode = 'charge' and billing.resend_allowed(ca.id)
                       then 'queued'::billing.attempt_status else 'unknown' end,
         status_reason = 'lease of ' || ca.lease_owner || ' expired', claim_mode = null, lease_owner = null,
         -- The token goes with the lease: a late result from its holder is refused, not replayed.
         lease_expires_at = null, lease_token = null, not_before = v_now
   where ca.id in (select x.id from billing.charge_attempts x
                    where x.status = 'claimed' and x.lease_expires_at <= v_now
                    order by x.lease_expires_at limit batch for update skip locked);
  get diagnostics v_attempts = row_count;
  v_refunds := billing.expire_leases('billing.refunds', 'claimed', 'requested', batch);
  v_webhooks := billing.expire_leases('billing.webhook_events', 'processing', 'received', batch);
  v_keys := billing.expire_leases('billing.key_deletions', 'claimed', 'requested', batch);
  return pg_catalog.jsonb_build_object(
    'rows', greatest(v_attempts, v_refunds, v_webhooks, v_keys),
    'attempts', v_attempts, 'refunds', v_refunds, 'webhooks', v_webhooks, 'keyDeletions', v_keys);
end
$$;
revoke execute on function billing.tick_expire_leases(integer) from public;
comment on function billing.tick_expire_leases(integer) is
  'Tick step: hands up to batch expired leases of each work queue back to it (charge attempts: '
  're-send while the period needs paying, else look up); returns {rows, attempts, refunds, '
  'webhooks, keyDeletions}. Owner only (called by billing.tick). Raises nothing of its own.';

-- Subscriptions cancelled at period end whose period is over.
create function billing.tick_end_at_period_end(batch integer)
returns jsonb
language plpgsql
set search_path = ''
as $$
declare
  v_count integer;
begin
  perform billing.end_subscription(x.id, 'canceled', 'void', 'canceled at period end', x.current_period_ends_at)
     from (select su.id, su.current_period_ends_at from billing.subscriptions su
            where su.status = 'active' and su.current_period_ends_at <= billing.now() and su.cancel_at_period_end
            order by su.current_period_ends_at
            limit batch
              for update skip locked) x;
  get diagnostics v_count = row_count;
  return pg_catalog.jsonb_build_object('rows', v_count, 'endedAtPeriodEnd', v_count);
end
$$;
revoke execute on function billing.tick_end_at_period_end(integer) from public;
comment on function billing.tick_end_at_period_end(integer) is
  'Tick step: ends up to batch active subscriptions cancelled at period end whose period is over; '
  'returns {rows, endedAtPeriodEnd}. Owner only (called by billing.tick). Raises nothing of its own.';

-- Active subscriptions whose period has ended and is settled: open the next period and queue its
-- charge (or, without a usable card, ask for one). A period whose renewal charge is still pending
-- is never renewed past: that would leave it open behind the next one and charge the next month
-- before this one is settled (after a long outage, or a test clock moved by months, periods are
-- caught up one at a time).
create function billing.tick_renew(batch integer)
returns jsonb
language plpgsql
set search_path = ''
as $$
declare
  v_now timestamptz := billing.now();
  v_renewed integer := 0;
  v_cards_needed integer := 0;
  r record;
  p billing.billing_periods;
begin
  -- A join on the current period, one primary-key probe per due subscription walked in due order
  -- ("limit 1" keeps it a nested loop: as a plain join, or as the "or not exists" sub-plan it
  -- replaces, a burst turns it into a scan of every period and a sort of everything due).
  for r in
    select su.id, su.current_period_index, su.payment_method_id
      from billing.subscriptions su
      left join lateral (select bp.status from billing.billing_periods bp
                          where bp.id = su.current_period_id limit 1) cur on true
     where su.status = 'active' and su.current_period_ends_at <= v_now and not su.cancel_at_period_end
       and cur.status is distinct from 'open'
     order by su.current_period_ends_at
     limit batch
       for update of su skip locked
  loop
    p := billing.open_period(r.id, r.current_period_index + 1, 'renewal');
    if exists (select 1 from billing.payment_methods pm where pm.id = r.payment_method_id and pm.status = 'active') then
      perform billing.create_attempt(p.id, v_now, 'renewal of period ' || p.period_index);
    else
      -- The card is gone (deleted at Toss): no charge can work, so ask for a new one.
      perform billing.mark_past_due(r.id, 'renewal without a usable card', awaiting_card => true);
      perform billing.notify_subscriber('card_needed', r.id,
        pg_catalog.jsonb_build_object('reason', 'no usable card for the renewal', 'periodIndex', p.period_index));
      v_cards_needed := v_cards_needed + 1;
    end if;
    v_renewed := v_renewed + 1;
  end loop;
  return pg_catalog.jsonb_build_object('rows', v_renewed, 'renewals', v_renewed, 'cardsNeeded', v_cards_needed);
end
$$;
revoke execute on function billing.tick_renew(integer) from public;
comment on function billing.tick_renew(integer) is
  'Tick step: renews up to batch active subscriptions whose current period has ended and is not '
  'open (new period + charge attempt due now; without a usable card: past_due awaiting a card, '
  'subscriber notified); returns {rows, renewals, cardsNeeded}. Owner only (called by billing.tick). '
  'Raises SB422 when a plan has no price for the new period.';

-- Unpaid subscriptions whose grace is over and that have nothing left in flight.
create function billing.tick_end_grace(batch integer)
returns jsonb
language plpgsql
set search_path = ''
as $$
declare
  v_count integer;
begin
  perform case when x.status = 'incomplete'
               then billing.end_subscription(x.id, 'canceled', 'void', 'first charge never succeeded')
               else billing.end_subscription(x.id, pl.dunning_final_status, 'unpaid',
                                             'unpaid when the grace period ended') end
     from (select su.id, su.status, su.plan_id from billing.subscriptions su
            where su.status in ('incomplete', 'past_due') and su.grace_ends_at <= billing.now()
              and not exists (select 1 from billing.charge_attempts ca
                               where ca.subscription_id = su.id and ca.status in ('queued', 'claimed', 'unknown'))
            order by su.grace_ends_at
            limit batch
              for update of su skip locked) x
     join billing.plans pl on pl.id = x.plan_id;
  get diagnostics v_count = row_count;
  return pg_catalog.jsonb_build_object('rows', v_count, 'endedAfterGrace', v_count);
end
$$;
revoke execute on function billing.tick_end_grace(integer) from public;
comment on function billing.tick_end_grace(integer) is
  'Tick step: ends up to batch incomplete/past_due subscriptions whose grace is over and that have '
  'no attempt in flight (incomplete: canceled; past_due: the plan''s final dunning status); returns '
  '{rows, endedAfterGrace}. Owner only (called by billing.tick). Raises nothing of its own.';

-- Credits expire at the end of their period.
create function billing.tick_expire_credits(batch integer)
returns jsonb
language plpgsql
set search_path = ''
as $$
declare
  v_count integer;
begin
  perform billing.close_credit_grant(x.id, 'expired', 'period ended')
     from (select cg.id from billing.credit_grants cg
            where cg.status = 'active' and cg.expires_at <= billing.now()
            order by cg.expires_at
            limit batch
              for update skip locked) x;
  get diagnostics v_count = row_count;
  return pg_catalog.jsonb_build_object('rows', v_count, 'creditGrantsExpired', v_count);
end
$$;
revoke execute on function billing.tick_expire_credits(integer) from public;
comment on function billing.tick_expire_credits(integer) is
  'Tick step: expires up to batch active credit grants past their expiry (ledger entry for what was '
  'left); returns {rows, creditGrantsExpired}. Owner only (called by billing.tick). Raises nothing.';

-- Runs one step in batches: again while a batch comes back full and the deadline has not passed
-- (always at least once, so every step makes progress in every tick). Returns the step's counts
-- summed over its batches, with how many batches ran and how long they took.
create function billing.run_tick_step(step regproc, batch integer, deadline timestamptz)
returns jsonb
language plpgsql
set search_path = ''
as $$
declare
  v_started timestamptz := pg_catalog.clock_timestamp();
  v_total jsonb := '{}';
  v_result jsonb;
  v_batches integer := 0;
begin
  loop
    execute pg_catalog.format('select %s($1)', step) into v_result using batch;
    v_batches := v_batches + 1;
    if v_batches = 1 then
      v_total := v_result;  -- the usual case, without a query
    else
      select pg_catalog.jsonb_object_agg(r.key, coalesce((v_total ->> r.key)::integer, 0) + r.value::integer)
        into v_total
        from pg_catalog.jsonb_each_text(v_result) r;
    end if;
    exit when (v_result ->> 'rows')::integer < batch or pg_catalog.clock_timestamp() >= deadline;
  end loop;
  return v_total || pg_catalog.jsonb_build_object(
    'batches', v_batches,
    'ms', pg_catalog.round((extract(epoch from pg_catalog.clock_timestamp() - v_started) * 1000)::numeric, 3));
end
$$;
revoke execute on function billing.run_tick_step(regproc, integer, timestamptz) from public;
comment on function billing.run_tick_step(regproc, integer, timestamptz) is
  'Runs a tick step (a function (batch integer) returning jsonb counts with "rows") repeatedly '
  'while its batches come back full and the deadline has not passed; returns the summed counts '
  'plus batches and ms. Owner only (called by billing.tick). Raises what the step raises.';

-- ---------------------------------------------------------------------------------------------
-- The event log, partitioned by month
-- ---------------------------------------------------------------------------------------------
-- Monthly partitions (UTC months) live in schema billing_history, named events_YYYY_MM; the tick
-- keeps the current month and the next two in place ahead of the real clock. Rows for any other
-- instant (the per-database test clock can be years away) land in billing_history.events_default.
-- A month is archived by detaching its partition (billing.archive_event_month), exporting it and
-- dropping it; a detached partition stays append-only until dropped.
create schema billing_history;
revoke all on schema billing_history from public;
comment on schema billing_history is
  'Partitions of billing.events: live months, the default partition, and detached months awaiting export.';

-- Row triggers on the partitioned table are cloned onto every partition; TRUNCATE triggers are
-- not, so each partition gets its own (and a detached one gets its row triggers back).
create function billing.seal_event_table(rel regclass, detached boolean)
returns void
language plpgsql
set search_path = ''
as $$
begin
  execute pg_catalog.format('create trigger events_no_truncate before truncate on %s
                               for each statement execute function billing.forbid_change()', rel);
  if detached then
    execute pg_catalog.format('create trigger events_append_only before update or delete on %s
                                 for each row execute function billing.forbid_change()', rel);
  end if;
  execute pg_catalog.format('alter table %s enable row level security', rel);
  execute pg_catalog.format('revoke all on %s from public, anon, authenticated, service_role', rel);
end
$$;
revoke execute on function billing.seal_event_table(regclass, boolean) from public;
comment on function billing.seal_event_table(regclass, boolean) is
  'Makes a partition of billing.events (or a detached one) refuse TRUNCATE (and, detached, UPDATE '
  'and DELETE) with SB403, with row-level security on and no grants. Owner only. Raises nothing.';

-- The partition of billing.events for the UTC month starting at `month`, created and attached if
-- missing. Returns true when it was created.
create function billing.ensure_event_partition(month date)
returns boolean
language plpgsql
set search_path = ''
as $$
declare
  v_from timestamptz := pg_catalog.date_trunc('month', month::timestamp) at time zone 'UTC';
  v_name text := 'events_' || pg_catalog.to_char(month, 'YYYY_MM');
  v_rel regclass;
begin
  if pg_catalog.to_regclass('billing_history.' || v_name) is not null then
    return false;
  end if;
  -- Created apart and attached: attaching locks the log only against schema changes, not inserts.
  execute pg_catalog.format('create table billing_history.%I (like billing.events including defaults including constraints)',
                            v_name);
  v_rel := ('billing_history.' || v_name)::regclass;
  execute pg_catalog.format('alter table billing.events attach partition %s for values from (%L) to (%L)',
                            v_rel, v_from, v_from + interval '1 month');
  perform billing.seal_event_table(v_rel, false);
  -- Known to be empty: a never-analyzed table is planned as ten pages, and enough of those make
  -- every query on the log look expensive (and JIT-compiled).
  execute pg_catalog.format('analyze %s', v_rel);
  return true;
end
$$;
revoke execute on function billing.ensure_event_partition(date) from public;
comment on function billing.ensure_event_partition(date) is
  'Creates and attaches billing_history.events_YYYY_MM for the UTC month of `month` unless it '
  'exists; returns whether it did. Owner only. Raises check_violation (23514) when the default '
  'partition already holds rows of that month.';

create function billing.tick_maintain_event_partitions(batch integer)
returns jsonb
language plpgsql
set search_path = ''
as $$
declare
  v_created integer := 0;
  v_blocked integer := 0;
  v_month date;
begin
  -- The real clock, not billing.now(): partitions follow the calendar the database lives in.
  for v_month in
    select (pg_catalog.date_trunc('month', pg_catalog.now() at time zone 'UTC') + pg_catalog.make_interval(months => m))::date
      from pg_catalog.generate_series(0, 2) m
  loop
    continue when pg_catalog.to_regclass('billing_history.events_' || pg_catalog.to_char(v_month, 'YYYY_MM')) is not null;
    begin
      if billing.ensure_event_partition(v_month) then
        v_created := v_created + 1;
      end if;
    exception when check_violation then
      -- Rows of that month already sit in the default partition (written while the tick did not
      -- run): they stay there, still append-only, and the month is tried again next tick.
      v_blocked := v_blocked + 1;
    end;
  end loop;
  return pg_catalog.jsonb_build_object('rows', 0, 'partitionsCreated', v_created, 'partitionsBlocked', v_blocked);
end
$$;
revoke execute on function billing.tick_maintain_event_partitions(integer) from public;
comment on function billing.tick_maintain_event_partitions(integer) is
  'Tick step: makes sure billing.events has partitions for the current UTC month and the next two '
  '(batch is unused; one pass); returns {rows: 0, partitionsCreated, partitionsBlocked}. Owner only '
  '(called by billing.tick). Raises nothing.';

-- The log moves into a partitioned table of the same shape: ids continue, triggers and comments
-- are recreated. The primary key includes the partition key, as Postgres requires.
alter table billing.events rename to events_unpartitioned;
alter index billing.events_pkey rename to events_unpartitioned_pkey;
alter index billing.events_entity_idx rename to events_unpartitioned_entity_idx;
alter sequence billing.events_id_seq rename to events_unpartitioned_id_seq;

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
  constraint events_pkey primary key (id, occurred_at),
  constraint events_entity_type_check check (pg_catalog.length(entity_type) between 1 and 63),
  constraint events_action_check check (pg_catalog.length(action) between 1 and 63)
) partition by range (occurred_at);
create index events_entity_idx on billing.events (entity_id, id);
create trigger events_append_only before update or delete on billing.events
  for each row execute function billing.forbid_change();
create trigger events_no_truncate before truncate on billing.events
  for each statement execute function billing.forbid_change();
alter table billing.events enable row level security;
revoke all on billing.events from public, anon, authenticated, service_role;
revoke all on sequence billing.events_id_seq from public, anon, authenticated, service_role;
comment on table billing.events is
  'Append-only audit log of every state change, partitioned by UTC month (schema billing_history).';

create table billing_history.events_default partition of billing.events default;
select billing.seal_event_table('billing_history.events_default', false);

-- Months that already hold events (the log's past in real time, up to three years back) and the
-- next two get their own partitions; anything else stays in the default partition.
select billing.ensure_event_partition(m::date)
  from pg_catalog.generate_series(
         pg_catalog.date_trunc('month', coalesce(
           (select greatest(pg_catalog.min(e.occurred_at), pg_catalog.now() - interval '3 years')
              from billing.events_unpartitioned e where e.occurred_at <= pg_catalog.now()
            having pg_catalog.count(*) > 0),
           pg_catalog.now()) at time zone 'UTC'),
         pg_catalog.date_trunc('month', pg_catalog.now() at time zone 'UTC') + interval '2 months',
         interval '1 month') m;

insert into billing.events
  (id, occurred_at, actor_role, actor_sub, entity_type, entity_id, action, old_status, new_status, reason, details)
overriding system value
select e.id, e.occurred_at, e.actor_role, e.actor_sub, e.entity_type, e.entity_id, e.action, e.old_status,
       e.new_status, e.reason, e.details
  from billing.events_unpartitioned e;
select pg_catalog.setval('billing.events_id_seq',
                         coalesce((select pg_catalog.max(e.id) from billing.events_unpartitioned e), 0) + 1, false);
drop table billing.events_unpartitioned;
analyze billing.events;

-- Detaches a past month of the log for export; the live log (every attached partition) stays
-- append-only, and so does the detached table until it is dropped.
create function billing.archive_event_month(month date)
returns text
language plpgsql
set search_path = ''
as $$
declare
  v_name text := 'events_' || pg_catalog.to_char(month, 'YYYY_MM');
  v_rel regclass;
begin
  if month is null or month >= (pg_catalog.date_trunc('month', pg_catalog.now() at time zone 'UTC'))::date then
    raise exception 'only a month before the current one can be archived (got %)', month using errcode = 'SB400';
  end if;
  select c.oid::regclass into v_rel
    from pg_catalog.pg_inherits i
    join pg_catalog.pg_class c on c.oid = i.inhrelid
   where i.inhparent = 'billing.events'::regclass
     and c.relnamespace = 'billing_history'::regnamespace and c.relname = v_name;
  if v_rel is null then
    raise exception 'billing.events has no partition % attached', v_name using errcode = 'SB404';
  end if;
  execute pg_catalog.format('alter table billing.events detach partition %s', v_rel);
  -- Detaching drops the row triggers cloned from billing.events; put them back.
  execute pg_catalog.format('create trigger events_append_only before update or delete on %s
                               for each row execute function billing.forbid_change()', v_rel);
  perform billing.log_event('events', null, 'month_archived', v_name,
                            pg_catalog.jsonb_build_object('table', v_rel::text));
  return v_rel::text;
end
$$;
revoke execute on function billing.archive_event_month(date) from public;
comment on function billing.archive_event_month(date) is
  'Operator: detaches the partition of billing.events for a past UTC month and returns its name '
  '(billing_history.events_YYYY_MM), still append-only; export it (pg_dump -t), then drop it. '
  'Owner only. Raises SB400 for the current or a future month, SB404 when it is not attached.';

-- ---------------------------------------------------------------------------------------------
-- billing.tick(): the steps in order
-- ---------------------------------------------------------------------------------------------
create or replace function billing.tick()
returns jsonb
language plpgsql
security definer
set search_path = ''
as $$
declare
  v_now timestamptz := billing.now();
  -- Batches of 500 rows keep each statement short; the budget bounds how long one tick holds the
  -- locks of what it did (a burst beyond it continues in the next tick, a minute later).
  v_batch constant integer := 500;
  v_deadline timestamptz := pg_catalog.clock_timestamp() + interval '4 seconds';
  v_steps jsonb := '{}';
  v_step text;
  v_due text[];
  v_claimable jsonb;
  v_summary jsonb;
  v_request bigint;
begin
  -- pg_cron never overlaps a job with itself, but a manual call could.
  if not pg_catalog.pg_try_advisory_xact_lock(pg_catalog.hashtext('saju-billing-tick')::bigint) then
    return pg_catalog.jsonb_build_object('at', v_now, 'skipped', true);
  end if;

  -- Which steps have anything to do, in one statement of index probes: an idle tick (every minute,
  -- each in a new session under pg_cron) then plans this and the claimable check, and calls no
  -- step at all. Each probe walks its step's index in order (as an EXISTS it could read a table).
  select array_remove(array[
           case when (select true from billing.card_registrations x
                       where x.status = 'pending' and x.expires_at <= v_now order by x.expires_at limit 1)
                then 'expireRegistrations' end,
           case when (select true from billing.charge_attempts x
                       where x.status = 'claimed' and x.lease_expires_at <= v_now order by x.lease_expires_at limit 1)
                  or (select true from billing.refunds x
                       where x.status = 'claimed' and x.lease_expires_at <= v_now order by x.lease_expires_at limit 1)
                  or (select true from billing.webhook_events x
                       where x.status = 'processing' and x.lease_expires_at <= v_now
                       order by x.lease_expires_at limit 1)
                  or (select true from billing.key_deletions x
                       where x.status = 'claimed' and x.lease_expires_at <= v_now order by x.lease_expires_at limit 1)
                then 'expireLeases' end,
           case when (select true from billing.subscriptions x
                       where x.status = 'active' and x.current_period_ends_at <= v_now
                       order by x.current_period_ends_at limit 1)
                then 'endAtPeriodEnd' end,
           case when (select true from billing.subscriptions x
                       where x.status = 'active' and x.current_period_ends_at <= v_now
                       order by x.current_period_ends_at limit 1)
                then 'renew' end,
           case when (select true from billing.subscriptions x
                       where x.status in ('incomplete', 'past_due') and x.grace_ends_at <= v_now
                       order by x.grace_ends_at limit 1)
                then 'endGrace' end,
           case when (select true from billing.credit_grants x
                       where x.status = 'active' and x.expires_at <= v_now order by x.expires_at limit 1)
                then 'expireCredits' end,
           case when exists (select 1 from pg_catalog.generate_series(0, 2) m
                              where pg_catalog.to_regclass('billing_history.events_' || pg_catalog.to_char(
                                      pg_catalog.now() at time zone 'UTC' + pg_catalog.make_interval(months => m),
                                      'YYYY_MM')) is null)
                then 'maintainEventPartitions' end], null)
    into v_due;

  foreach v_step in array array['expireRegistrations', 'expireLeases', 'endAtPeriodEnd', 'renew', 'endGrace',
                                'expireCredits', 'maintainEventPartitions']
  loop
    v_steps := v_steps || pg_catalog.jsonb_build_object(v_step, case
      when v_step <> all (v_due) then '{"rows": 0, "batches": 0, "ms": 0}'::jsonb
      else billing.run_tick_step(
        case v_step
          when 'expireRegistrations' then 'billing.tick_expire_registrations'::regproc
          when 'expireLeases' then 'billing.tick_expire_leases'::regproc
          when 'endAtPeriodEnd' then 'billing.tick_end_at_period_end'::regproc
          when 'renew' then 'billing.tick_renew'::regproc
          when 'endGrace' then 'billing.tick_end_grace'::regproc
          when 'expireCredits' then 'billing.tick_expire_credits'::regproc
          else 'billing.tick_maintain_event_partitions'::regproc
        end, v_batch, v_deadline) end);
  end loop;

  -- Each check is ordered like its claim, so it walks the claim's index (an EXISTS drops the order
  -- and may read a table from its start when the ready rows are the newest, at its end).
  v_claimable := pg_catalog.jsonb_build_object(
    'attempts', (select true from billing.charge_attempts ca
                  where ca.status in ('queued', 'unknown') and ca.not_before <= v_now
                  order by ca.not_before, ca.id limit 1) is not null,
    'refunds', (select true from billing.refunds r where r.status = 'requested' and r.not_before <= v_now
                 order by r.not_before, r.id limit 1) is not null,
    'webhooks', (select true from billing.webhook_events we
                  where we.status = 'received' and we.not_before <= v_now
                  order by we.not_before, we.id limit 1) is not null,
    'keyDeletions', (select true from billing.key_deletions kd
                      where kd.status = 'requested' and kd.not_before <= v_now
                      order by kd.not_before, kd.id limit 1) is not null,
    'notifications', (select true from billing.notifications n
                       where n.delivered_at is null
                         and (n.lease_expires_at is null or n.lease_expires_at <= v_now)
                       order by n.id limit 1) is not null);
  v_summary := pg_catalog.jsonb_build_object(
    'at', v_now,
    'registrationsExpired', coalesce((v_steps #>> '{expireRegistrations,registrationsExpired}')::integer, 0),
    'leasesExpired', pg_catalog.jsonb_build_object(
      'attempts', coalesce((v_steps #>> '{expireLeases,attempts}')::integer, 0),
      'refunds', coalesce((v_steps #>> '{expireLeases,refunds}')::integer, 0),
      'webhooks', coalesce((v_steps #>> '{expireLeases,webhooks}')::integer, 0),
      'keyDeletions', coalesce((v_steps #>> '{expireLeases,keyDeletions}')::integer, 0)),
    'renewals', coalesce((v_steps #>> '{renew,renewals}')::integer, 0),
    'cardsNeeded', coalesce((v_steps #>> '{renew,cardsNeeded}')::integer, 0),
    'endedAtPeriodEnd', coalesce((v_steps #>> '{endAtPeriodEnd,endedAtPeriodEnd}')::integer, 0),
    'endedAfterGrace', coalesce((v_steps #>> '{endGrace,endedAfterGrace}')::integer, 0),
    'creditGrantsExpired', coalesce((v_steps #>> '{expireCredits,creditGrantsExpired}')::integer, 0),
    'claimable', v_claimable);
  if v_claimable @> '{"attempts": true}' or v_claimable @> '{"refunds": true}'
     or v_claimable @> '{"webhooks": true}' or v_claimable @> '{"keyDeletions": true}'
     or v_claimable @> '{"notifications": true}' then
    v_request := billing.ring_service(v_summary);
  end if;
  return v_summary || pg_catalog.jsonb_build_object('doorbellRequestId', v_request, 'steps', v_steps);
end
$$;
revoke execute on function billing.tick() from public;
comment on function billing.tick() is
  'Scheduler (pg_cron, every minute), in named steps run in this order when one index probe each '
  'finds work for them, each in batches of 500 while its batches come back full and the tick''s '
  '4-second budget lasts: tick_expire_registrations, '
  'tick_expire_leases, tick_end_at_period_end, tick_renew (new period + attempt for due paid-up '
  'subscriptions), tick_end_grace, tick_expire_credits, tick_maintain_event_partitions; then rings '
  'the service only if claimable work exists. Each step walks a partial index on its due time, so an '
  'idle tick is cheap. Returns the summary plus "steps" (per step: its counts, batches, ms). Owner '
  '(postgres, the cron job''s user) only. Raises nothing of its own.';

select billing.assert_surface_locked_down();

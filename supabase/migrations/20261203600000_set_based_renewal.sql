-- Billing work in sets: the audit log written once per statement (transition tables) instead of
-- once per row, the renewal and credit-expiry steps as a few statements per batch instead of a
-- loop of function calls, an idle tick that plans one probe and nothing else, and a procedure that
-- works through a burst in short transactions committed one after another. Every event the log
-- kept before is still written, with the same contents and, per entity, in the same order.
-- SQLSTATEs: see 20261121200100_billing_core.sql.

-- ---------------------------------------------------------------------------------------------
-- The audit log, one insert per statement
-- ---------------------------------------------------------------------------------------------
-- A row trigger ran a plpgsql call and a one-row insert for each changed row; a statement trigger
-- inserts the whole statement's events at once, in the rows' order. The rows are read as jsonb
-- so one function serves every table (plpgsql compiles it once per table).
create or replace function billing.audit_status()
returns trigger
language plpgsql
set search_path = ''
as $$
begin
  if tg_op = 'INSERT' then
    insert into billing.events (actor_role, actor_sub, entity_type, entity_id, action, new_status, reason)
    select billing.actor_role(), billing.jwt_sub(), tg_table_name, (n.j ->> 'id')::uuid, 'created',
           n.j ->> 'status', n.j ->> 'status_reason'
      from (select pg_catalog.to_jsonb(r) as j, pg_catalog.row_number() over () as pos from new_rows r) n
     order by n.pos;
  else
    -- A reason left over from an earlier transition is not this transition's reason.
    insert into billing.events (actor_role, actor_sub, entity_type, entity_id, action, old_status, new_status, reason)
    select billing.actor_role(), billing.jwt_sub(), tg_table_name, (n.j ->> 'id')::uuid, 'status_changed',
           o.j ->> 'status', n.j ->> 'status', nullif(n.j ->> 'status_reason', o.j ->> 'status_reason')
      from (select pg_catalog.to_jsonb(r) as j, pg_catalog.row_number() over () as pos from new_rows r) n
      join (select pg_catalog.to_jsonb(r) as j from old_rows r) o on o.j ->> 'id' = n.j ->> 'id'
     where o.j ->> 'status' is distinct from n.j ->> 'status'
     order by n.pos;
  end if;
  return null;
end
$$;
revoke execute on function billing.audit_status() from public;
comment on function billing.audit_status() is
  'Statement trigger (transition tables new_rows, old_rows): writes an event for every inserted row '
  'and every status change of a stateful table, in one insert per statement. Raises nothing.';

-- Subscriptions: the settings event and the status event of each row, in that order (as the two
-- row triggers fired, by name).
create or replace function billing.audit_subscription_settings()
returns trigger
language plpgsql
set search_path = ''
as $$
begin
  insert into billing.events (actor_role, actor_sub, entity_type, entity_id, action, old_status, new_status,
                              reason, details)
  select billing.actor_role(), billing.jwt_sub(), tg_table_name, n.id, e.action, e.old_status, e.new_status,
         nullif(n.status_reason, o.status_reason), e.details
    from (select r.*, pg_catalog.row_number() over () as pos from new_rows r) n
    join old_rows o on o.id = n.id
   cross join lateral (values
     (1, 'settings_changed', null, null, pg_catalog.jsonb_strip_nulls(pg_catalog.jsonb_build_object(
        'cancel_at_period_end', case when n.cancel_at_period_end is distinct from o.cancel_at_period_end
                                     then pg_catalog.to_jsonb(n.cancel_at_period_end) end,
        'payment_method_id', case when n.payment_method_id is distinct from o.payment_method_id
                                  then pg_catalog.to_jsonb(n.payment_method_id) end,
        'awaiting_card', case when n.awaiting_card is distinct from o.awaiting_card
                              then pg_catalog.to_jsonb(n.awaiting_card) end,
        'current_period_index', case when n.current_period_index is distinct from o.current_period_index
                                     then pg_catalog.to_jsonb(n.current_period_index) end))),
     (2, 'status_changed', o.status::text, n.status::text, null::jsonb)
   ) e(step, action, old_status, new_status, details)
   where (e.step = 1 and (n.cancel_at_period_end is distinct from o.cancel_at_period_end
                          or n.payment_method_id is distinct from o.payment_method_id
                          or n.awaiting_card is distinct from o.awaiting_card
                          or n.current_period_index is distinct from o.current_period_index))
      or (e.step = 2 and n.status is distinct from o.status)
   order by n.pos, e.step;
  return null;
end
$$;
revoke execute on function billing.audit_subscription_settings() from public;
comment on function billing.audit_subscription_settings() is
  'Statement trigger on subscriptions updates (transition tables new_rows, old_rows): per changed row, '
  'a settings_changed event when its cancel flag, card, awaiting-card flag or period changed, then a '
  'status_changed event when its status changed; one insert per statement. Raises nothing.';

do $$
declare
  t text;
begin
  foreach t in array array['customers', 'card_registrations', 'payment_methods', 'subscriptions', 'billing_periods',
                           'charge_attempts', 'payments', 'refunds', 'credit_grants', 'webhook_events',
                           'key_deletions', 'reconciliation_runs']
  loop
    execute pg_catalog.format('drop trigger %1$s_audit_insert on billing.%1$I', t);
    execute pg_catalog.format(
      'create trigger %1$s_audit_insert after insert on billing.%1$I referencing new table as new_rows
         for each statement execute function billing.audit_status()', t);
    continue when t in ('customers', 'subscriptions');
    execute pg_catalog.format('drop trigger %1$s_audit_status on billing.%1$I', t);
    -- Transition tables allow no column list: every update statement runs it, and it keeps only
    -- rows whose status changed.
    execute pg_catalog.format(
      'create trigger %1$s_audit_status after update on billing.%1$I
         referencing old table as old_rows new table as new_rows
         for each statement execute function billing.audit_status()', t);
  end loop;
end
$$;
drop trigger subscriptions_audit_status on billing.subscriptions;
drop trigger subscriptions_audit_settings on billing.subscriptions;
create trigger subscriptions_audit_update after update on billing.subscriptions
  referencing old table as old_rows new table as new_rows
  for each statement execute function billing.audit_subscription_settings();

-- ---------------------------------------------------------------------------------------------
-- Renewal in sets
-- ---------------------------------------------------------------------------------------------
-- Active subscriptions whose period has ended and is settled: open the next period and queue its
-- charge (or, without a usable card, ask for one). A period whose renewal charge is still pending
-- is never renewed past (see 20261203200000_scale.sql). Three statements per batch: the periods,
-- the subscriptions moved onto them, the attempts; only subscriptions without a usable card (rare)
-- go one by one. Per subscription the log reads as before: period created, subscription moved to
-- it, attempt created.
create or replace function billing.tick_renew(batch integer)
returns jsonb
language plpgsql
set search_path = ''
-- A custom plan sees the batch's tuple ids and, at a few thousand subscriptions, scans the table
-- for them (a hashed "= any"); at any size that matters a batch is fetched by tuple id.
set plan_cache_mode = force_generic_plan
as $$
declare
  v_now timestamptz := billing.now();
  v_period uuid[];
  v_subscription uuid[];
  v_index integer[];
  v_rows tid[];
  v_attempts integer;
  v_cards_needed integer := 0;
  r record;
begin
  -- The due subscriptions walked in due order with one primary-key probe each for the current
  -- period ("limit 1" keeps it a nested loop), locked, and their next periods opened.
  with due as (
    select su.id, su.ctid as row_id, su.user_id, su.plan_id, su.billing_anchor,
           su.current_period_index + 1 as period_index, su.current_period_ends_at
      from billing.subscriptions su
      left join lateral (select bp.status from billing.billing_periods bp
                          where bp.id = su.current_period_id limit 1) cur on true
     where su.status = 'active' and su.current_period_ends_at <= v_now and not su.cancel_at_period_end
       and cur.status is distinct from 'open'
     order by su.current_period_ends_at
     limit batch
       for update of su skip locked
  ), locked as (
    select pg_catalog.array_agg(d.row_id) as row_ids from due d
  ), dated as (
    select d.*, billing.period_start(d.billing_anchor, d.period_index - 1) as starts_at,
           billing.period_start(d.billing_anchor, d.period_index) as ends_at
      from due d
  ), opened as (
    insert into billing.billing_periods (subscription_id, user_id, period_index, starts_at, ends_at, price_id,
                                         amount, status_reason)
    select d.id, d.user_id, d.period_index, d.starts_at, d.ends_at, pr.id, pr.amount, 'renewal'
      from dated d
     cross join lateral billing.price_at(d.plan_id, d.starts_at) pr
     order by d.current_period_ends_at, d.id
    returning id, subscription_id, period_index
  )
  select pg_catalog.array_agg(o.id), pg_catalog.array_agg(o.subscription_id), pg_catalog.array_agg(o.period_index),
         (select l.row_ids from locked l)
    into v_period, v_subscription, v_index, v_rows
    from opened o;
  if v_period is null then
    return pg_catalog.jsonb_build_object('rows', 0, 'renewals', 0, 'cardsNeeded', 0);
  end if;

  -- The locked rows by their tuple ids (they cannot move while this transaction holds their lock;
  -- by key, a batch can be planned as a scan of every subscription), each set to its new period,
  -- found by (subscription, index).
  update billing.subscriptions su
     set (current_period_id, current_period_index, current_period_starts_at, current_period_ends_at) =
         (select bp.id, bp.period_index, bp.starts_at, bp.ends_at
            from billing.billing_periods bp
           where bp.subscription_id = su.id and bp.period_index = su.current_period_index + 1)
   where su.ctid = any (v_rows);

  -- The first attempt of a new period (as billing.create_attempt makes it), charged now.
  insert into billing.charge_attempts (period_id, subscription_id, user_id, payment_method_id, attempt_number,
                                       order_id, amount, order_name, not_before, status_reason)
  select bp.id, bp.subscription_id, bp.user_id, su.payment_method_id, 1, billing.new_order_id(), bp.amount,
         billing.order_name(pl.name, bp.starts_at, bp.ends_at), v_now, 'renewal of period ' || bp.period_index
    from pg_catalog.unnest(v_period) with ordinality as p(id, pos)
    join billing.billing_periods bp on bp.id = p.id
    join billing.subscriptions su on su.id = bp.subscription_id
    join billing.plans pl on pl.id = su.plan_id
    join billing.payment_methods pm on pm.id = su.payment_method_id and pm.status = 'active'
   order by p.pos;
  get diagnostics v_attempts = row_count;

  if v_attempts < pg_catalog.cardinality(v_period) then
    -- The card is gone (deleted at Toss): no charge can work, so ask for a new one.
    for r in
      select p.subscription_id, p.period_index
        from rows from (pg_catalog.unnest(v_subscription), pg_catalog.unnest(v_index))
               with ordinality as p(subscription_id, period_index, pos)
        join billing.subscriptions su on su.id = p.subscription_id
       where not exists (select 1 from billing.payment_methods pm
                          where pm.id = su.payment_method_id and pm.status = 'active')
       order by p.pos
    loop
      perform billing.mark_past_due(r.subscription_id, 'renewal without a usable card', awaiting_card => true);
      perform billing.notify_subscriber('card_needed', r.subscription_id,
        pg_catalog.jsonb_build_object('reason', 'no usable card for the renewal', 'periodIndex', r.period_index));
      v_cards_needed := v_cards_needed + 1;
    end loop;
  end if;
  return pg_catalog.jsonb_build_object('rows', pg_catalog.cardinality(v_period),
                                       'renewals', pg_catalog.cardinality(v_period), 'cardsNeeded', v_cards_needed);
end
$$;
revoke execute on function billing.tick_renew(integer) from public;
comment on function billing.tick_renew(integer) is
  'Tick step: renews up to batch active subscriptions whose current period has ended and is not '
  'open, in three statements (new periods, subscriptions moved onto them, charge attempts due now); '
  'without a usable card: past_due awaiting a card, subscriber notified; returns {rows, renewals, '
  'cardsNeeded}. Owner only (called by billing.tick). Raises SB422 when a plan has no price for the '
  'new period.';

-- Credits expire at the end of their period: the grants closed and what was left written to the
-- ledger, in one statement (as billing.close_credit_grant does for one grant).
create or replace function billing.tick_expire_credits(batch integer)
returns jsonb
language plpgsql
set search_path = ''
as $$
declare
  v_count integer;
begin
  with expiring as (
    select cg.ctid as row_id, cg.id, cg.customer_id, cg.user_id, cg.remaining, cg.expires_at
      from billing.credit_grants cg
     where cg.status = 'active' and cg.expires_at <= billing.now()
     order by cg.expires_at
     limit batch
       for update skip locked
  ), closed as (
    -- By the locked rows' tuple ids (as a join, a batch can be planned as a scan of every grant).
    update billing.credit_grants cg
       set status = 'expired', remaining = 0, status_reason = 'period ended'
     where cg.ctid = any (array(select x.row_id from expiring x))
    returning cg.id
  ), entries as (
    insert into billing.credit_entries (customer_id, user_id, grant_id, kind, amount, reason)
    select x.customer_id, x.user_id, x.id, 'expire', -x.remaining, 'period ended'
      from expiring x
     where x.remaining > 0
     order by x.expires_at, x.id
  )
  select pg_catalog.count(*) into v_count from closed;
  return pg_catalog.jsonb_build_object('rows', v_count, 'creditGrantsExpired', v_count);
end
$$;
revoke execute on function billing.tick_expire_credits(integer) from public;
comment on function billing.tick_expire_credits(integer) is
  'Tick step: expires up to batch active credit grants past their expiry, in one statement (ledger '
  'entry for what was left); returns {rows, creditGrantsExpired}. Owner only (called by billing.tick). '
  'Raises nothing.';

-- ---------------------------------------------------------------------------------------------
-- The tick: one probe, then the steps only when something is due
-- ---------------------------------------------------------------------------------------------
-- pg_cron runs each tick in a new session, where every statement is planned from scratch and every
-- relation it names is loaded into the session's caches. An idle tick therefore runs one SQL
-- statement of index probes (what is due, what is claimable) and returns; the plpgsql of the steps
-- is compiled only when there is work.
create function billing.tick_probe(probe_at timestamptz,
  out due text[], out claimable jsonb)
returns record
language sql
stable
set search_path = ''
as $$
  -- Each probe walks its step's (or its claim's) index in order: as an EXISTS it could read a
  -- table from its start when the due rows are at its end.
  select pg_catalog.array_remove(array[
           case when (select true from billing.card_registrations x
                       where x.status = 'pending' and x.expires_at <= probe_at order by x.expires_at limit 1)
                then 'expireRegistrations' end,
           case when (select true from billing.charge_attempts x
                       where x.status = 'claimed' and x.lease_expires_at <= probe_at order by x.lease_expires_at limit 1)
                  or (select true from billing.refunds x
                       where x.status = 'claimed' and x.lease_expires_at <= probe_at order by x.lease_expires_at limit 1)
                  or (select true from billing.webhook_events x
                       where x.status = 'processing' and x.lease_expires_at <= probe_at
                       order by x.lease_expires_at limit 1)
                  or (select true from billing.key_deletions x
                       where x.status = 'claimed' and x.lease_expires_at <= probe_at order by x.lease_expires_at limit 1)
                then 'expireLeases' end,
           case when s.active_due then 'endAtPeriodEnd' end,
           case when s.active_due then 'renew' end,
           case when (select true from billing.subscriptions x
                       where x.status in ('incomplete', 'past_due') and x.grace_ends_at <= probe_at
                       order by x.grace_ends_at limit 1)
                then 'endGrace' end,
           case when (select true from billing.credit_grants x
                       where x.status = 'active' and x.expires_at <= probe_at order by x.expires_at limit 1)
                then 'expireCredits' end,
           case when exists (select 1 from pg_catalog.generate_series(0, 2) m
                              where pg_catalog.to_regclass('billing_history.events_' || pg_catalog.to_char(
                                      pg_catalog.now() at time zone 'UTC' + pg_catalog.make_interval(months => m),
                                      'YYYY_MM')) is null)
                then 'maintainEventPartitions' end], null),
         pg_catalog.jsonb_build_object(
           'attempts', (select true from billing.charge_attempts ca
                         where ca.status in ('queued', 'unknown') and ca.not_before <= probe_at
                         order by ca.not_before, ca.id limit 1) is not null,
           'refunds', (select true from billing.refunds r where r.status = 'requested' and r.not_before <= probe_at
                        order by r.not_before, r.id limit 1) is not null,
           'webhooks', (select true from billing.webhook_events we
                         where we.status = 'received' and we.not_before <= probe_at
                         order by we.not_before, we.id limit 1) is not null,
           'keyDeletions', (select true from billing.key_deletions kd
                             where kd.status = 'requested' and kd.not_before <= probe_at
                             order by kd.not_before, kd.id limit 1) is not null,
           'notifications', (select true from billing.notifications n
                              where n.delivered_at is null and (n.lease_expires_at is null or n.lease_expires_at <= probe_at)
                              order by n.id limit 1) is not null)
    from (select (select true from billing.subscriptions x
                   where x.status = 'active' and x.current_period_ends_at <= probe_at
                   order by x.current_period_ends_at limit 1) is not null as active_due) s
$$;
revoke execute on function billing.tick_probe(timestamptz) from public;
comment on function billing.tick_probe(timestamptz) is
  'The tick''s probe, one statement of index probes: which steps have work at the given instant '
  '(due, in step order) and which work queues have claimable work (claimable, per queue). Owner only '
  '(called by billing.tick). Raises nothing.';

-- The tick's summary from its steps' counts, the same shape whether steps ran or not.
create function billing.tick_summary(tick_at timestamptz, steps jsonb, claimable jsonb)
returns jsonb
language sql
immutable
set search_path = ''
as $$
  select pg_catalog.jsonb_build_object(
    'at', tick_at,
    'registrationsExpired', coalesce((steps #>> '{expireRegistrations,registrationsExpired}')::integer, 0),
    'leasesExpired', pg_catalog.jsonb_build_object(
      'attempts', coalesce((steps #>> '{expireLeases,attempts}')::integer, 0),
      'refunds', coalesce((steps #>> '{expireLeases,refunds}')::integer, 0),
      'webhooks', coalesce((steps #>> '{expireLeases,webhooks}')::integer, 0),
      'keyDeletions', coalesce((steps #>> '{expireLeases,keyDeletions}')::integer, 0)),
    'renewals', coalesce((steps #>> '{renew,renewals}')::integer, 0),
    'cardsNeeded', coalesce((steps #>> '{renew,cardsNeeded}')::integer, 0),
    'endedAtPeriodEnd', coalesce((steps #>> '{endAtPeriodEnd,endedAtPeriodEnd}')::integer, 0),
    'endedAfterGrace', coalesce((steps #>> '{endGrace,endedAfterGrace}')::integer, 0),
    'creditGrantsExpired', coalesce((steps #>> '{expireCredits,creditGrantsExpired}')::integer, 0),
    'claimable', claimable)
$$;
revoke execute on function billing.tick_summary(timestamptz, jsonb, jsonb) from public;
comment on function billing.tick_summary(timestamptz, jsonb, jsonb) is
  'The summary billing.tick returns, from the instant, the steps'' counts and the claimable flags. '
  'Owner only. Raises nothing.';

-- One tick's work under a time budget: the steps that have work, in order, in batches of 500 while
-- batches come back full and the budget lasts; then the doorbell when asked for and claimable work
-- exists. "more" says a step stopped on the budget with work left.
create function billing.tick_run(budget interval, ring boolean)
returns jsonb
language plpgsql
set search_path = ''
as $$
declare
  v_now timestamptz := billing.now();
  v_batch constant integer := 500;
  v_deadline timestamptz := pg_catalog.clock_timestamp() + budget;
  v_steps jsonb := '{}';
  v_step text;
  v_result jsonb;
  v_more boolean := false;
  v_probe record;
  v_summary jsonb;
  v_request bigint;
begin
  -- pg_cron never overlaps a job with itself, but a manual call could.
  if not pg_catalog.pg_try_advisory_xact_lock(pg_catalog.hashtext('saju-billing-tick')::bigint) then
    return pg_catalog.jsonb_build_object('at', v_now, 'skipped', true, 'more', false);
  end if;
  select * into v_probe from billing.tick_probe(v_now);
  foreach v_step in array array['expireRegistrations', 'expireLeases', 'endAtPeriodEnd', 'renew', 'endGrace',
                                'expireCredits', 'maintainEventPartitions']
  loop
    if v_step <> all (v_probe.due) then
      v_result := '{"rows": 0, "batches": 0, "ms": 0}';
    else
      v_result := billing.run_tick_step(
        case v_step
          when 'expireRegistrations' then 'billing.tick_expire_registrations'::regproc
          when 'expireLeases' then 'billing.tick_expire_leases'::regproc
          when 'endAtPeriodEnd' then 'billing.tick_end_at_period_end'::regproc
          when 'renew' then 'billing.tick_renew'::regproc
          when 'endGrace' then 'billing.tick_end_grace'::regproc
          when 'expireCredits' then 'billing.tick_expire_credits'::regproc
          else 'billing.tick_maintain_event_partitions'::regproc
        end, v_batch, v_deadline);
      -- Its last batch came back full: the budget ran out before the step's work did.
      v_more := v_more or (v_result ->> 'rows')::integer >= v_batch * (v_result ->> 'batches')::integer;
    end if;
    v_steps := v_steps || pg_catalog.jsonb_build_object(v_step, v_result);
  end loop;
  -- What the steps did can make work claimable (renewals) or not: probe again only then.
  if v_steps @? '$.*.rows ? (@ > 0)' then
    select * into v_probe from billing.tick_probe(v_now);
  end if;
  v_summary := billing.tick_summary(v_now, v_steps, v_probe.claimable);
  if ring and v_probe.claimable @? '$.* ? (@ == true)' then
    v_request := billing.ring_service(v_summary);
  end if;
  return v_summary || pg_catalog.jsonb_build_object('doorbellRequestId', v_request, 'steps', v_steps,
                                                    'more', v_more);
end
$$;
revoke execute on function billing.tick_run(interval, boolean) from public;
comment on function billing.tick_run(interval, boolean) is
  'One tick within a time budget: the steps that billing.tick_probe finds work for, in order, each '
  'in batches of 500 while its batches come back full and the budget lasts; rings the service when '
  'ring and claimable work exists. Returns the tick summary plus doorbellRequestId, steps (per step: '
  'counts, batches, ms) and more (work left when the budget ran out). Owner only. Raises what the '
  'steps raise.';

-- The idle case: nothing due and nothing claimable gives the summary of a tick that did nothing,
-- else null.
create function billing.tick_idle(tick_at timestamptz)
returns jsonb
language sql
stable
set search_path = ''
as $$
  select billing.tick_summary(tick_at, '{}', p.claimable)
         || pg_catalog.jsonb_build_object('doorbellRequestId', null, 'more', false, 'steps',
              (select pg_catalog.jsonb_object_agg(s.step, '{"rows": 0, "batches": 0, "ms": 0}'::jsonb)
                 from pg_catalog.unnest(array['expireRegistrations', 'expireLeases', 'endAtPeriodEnd', 'renew',
                                              'endGrace', 'expireCredits', 'maintainEventPartitions']) s(step)))
    from billing.tick_probe(tick_at) p
   where pg_catalog.cardinality(p.due) = 0 and not p.claimable @? '$.* ? (@ == true)'
$$;
revoke execute on function billing.tick_idle(timestamptz) from public;
comment on function billing.tick_idle(timestamptz) is
  'The summary of an idle tick at the given instant when billing.tick_probe finds nothing due and '
  'nothing claimable, else null. Owner only. Raises nothing.';

create or replace function billing.tick()
returns jsonb
language plpgsql
security definer
set search_path = ''
as $$
declare
  v_now timestamptz := billing.now();
begin
  -- An idle tick plans one statement and compiles none of the steps; tick_run probes again under
  -- the tick's lock.
  -- The summary keeps its shape: "more" is for billing.run_ticks.
  return coalesce(billing.tick_idle(v_now), billing.tick_run(interval '4 seconds', true)) - 'more';
end
$$;
revoke execute on function billing.tick() from public;
comment on function billing.tick() is
  'Scheduler entry point for callers that want one transaction: when billing.tick_probe finds '
  'nothing due or claimable it returns at once, else it runs billing.tick_run with a 4-second budget '
  'and the doorbell (a burst beyond the budget continues in the next call; billing.run_ticks, which '
  'pg_cron calls, continues at once). Returns the summary plus "steps" (per step: its counts, '
  'batches, ms). Owner (postgres) only. Raises nothing of its own.';

-- ---------------------------------------------------------------------------------------------
-- A burst in short transactions
-- ---------------------------------------------------------------------------------------------
-- pg_cron runs "call billing.run_ticks()" as a top-level statement, so the procedure may commit:
-- each round is one tick of at most a quarter second, committed at once, so the attempts of a burst
-- become claimable as they are made and no transaction holds a subscriber's row for long. The
-- doorbell rings in the first round with claimable work and then at most every 5 seconds. It stops
-- when nothing is left or after 50 seconds (the next minute's call goes on). A procedure that
-- commits may not be security definer nor pin settings, so every name in it is qualified.
create procedure billing.run_ticks(budget interval default interval '50 seconds',
                                   round_budget interval default interval '250 milliseconds')
language plpgsql
as $$
declare
  v_deadline timestamptz := pg_catalog.clock_timestamp() + budget;
  v_rang_at timestamptz;
  v_result jsonb;
  v_ring boolean;
begin
  if billing.tick_idle(billing.now()) is not null then
    return;  -- the idle minute, in one planned statement
  end if;
  loop
    v_ring := v_rang_at is null or pg_catalog.clock_timestamp() >= v_rang_at + interval '5 seconds';
    v_result := billing.tick_run(round_budget, v_ring);
    if v_result ->> 'doorbellRequestId' is not null then
      v_rang_at := pg_catalog.clock_timestamp();
    end if;
    commit and no chain;
    exit when not coalesce((v_result ->> 'more')::boolean, false) or pg_catalog.clock_timestamp() >= v_deadline;
  end loop;
end
$$;
revoke execute on procedure billing.run_ticks(interval, interval) from public;
comment on procedure billing.run_ticks(interval, interval) is
  'Scheduler (pg_cron, every minute, as a top-level CALL): billing.tick_run rounds of round_budget '
  '(default 250 ms; every due step does at least one batch per round), each committed at once, until '
  'no step has work left or the budget (default 50 s) is spent; rings '
  'the service in the first round with claimable work and then at most every 5 seconds. Owner '
  '(postgres, the cron job''s user) only. Raises what the steps raise (the rounds committed before '
  'stay).';

select cron.schedule('saju-billing-tick', '* * * * *', 'call billing.run_ticks()');

-- ---------------------------------------------------------------------------------------------
-- Recording an approval with fewer statements
-- ---------------------------------------------------------------------------------------------
-- The period's credits in one statement (grant and ledger entry) from what the period names. In
-- plpgsql, as notify_subscriber below: a SQL function's statement is planned again on every call,
-- a plpgsql statement's plan is kept for the session.
create or replace function billing.grant_period_credits(period_id uuid, payment_id uuid)
returns uuid
language plpgsql
set search_path = ''
as $$
declare
  v_grant uuid;
begin
  with source as (
    select s.customer_id, s.user_id, s.id as subscription_id, p.id as period_id, p.ends_at,
           pl.credits_per_period, 'period ' || p.period_index || ' paid' as reason
      from billing.billing_periods p
      join billing.subscriptions s on s.id = p.subscription_id
      join billing.plans pl on pl.id = s.plan_id
     where p.id = grant_period_credits.period_id and pl.credits_per_period <> 0
  ), granted as (
    insert into billing.credit_grants (customer_id, user_id, subscription_id, period_id, payment_id, amount,
                                       remaining, granted_at, expires_at, status_reason)
    select x.customer_id, x.user_id, x.subscription_id, x.period_id, grant_period_credits.payment_id,
           x.credits_per_period, x.credits_per_period, billing.now(), x.ends_at, x.reason
      from source x
    on conflict on constraint credit_grants_period_id_key do nothing
    returning id, customer_id, user_id, amount, status_reason
  ), entry as (
    insert into billing.credit_entries (customer_id, user_id, grant_id, kind, amount, reason)
    select g.customer_id, g.user_id, g.id, 'grant', g.amount, g.status_reason from granted g
  )
  select g.id into v_grant from granted g;
  return v_grant;
end
$$;
revoke execute on function billing.grant_period_credits(uuid, uuid) from public;
comment on function billing.grant_period_credits(uuid, uuid) is
  'Grants the plan''s credits for a paid period (once), expiring at the period end; returns the grant '
  '(null when the plan grants none or the period already has its grant). Owner only. Raises nothing.';


create or replace function billing.notify_subscriber(kind billing.notification_kind, subscription_id uuid, payload jsonb)
returns bigint
language plpgsql
set search_path = ''
as $$
declare
  v_id bigint;
begin
  insert into billing.notifications (kind, customer_id, user_id, subscription_id, payload)
  select notify_subscriber.kind, s.customer_id, s.user_id, s.id,
         coalesce(notify_subscriber.payload, '{}'::jsonb) || pg_catalog.jsonb_build_object('subscriptionId', s.id)
    from billing.subscriptions s
   where s.id = notify_subscriber.subscription_id
  returning id into v_id;
  return v_id;
end
$$;
revoke execute on function billing.notify_subscriber(billing.notification_kind, uuid, jsonb) from public;
comment on function billing.notify_subscriber(billing.notification_kind, uuid, jsonb) is
  'Queues a notification for the subscriber of a subscription in the outbox; returns its id. Owner only. '
  'Raises nothing.';
-- The same contract as before; a plain approval skips billing.sync_payment (nothing to sync) and
-- the cancel of sibling attempts when there is none.
create or replace function billing.apply_charge_success(attempt_id uuid, payment jsonb)
returns jsonb
language plpgsql
set search_path = ''
as $$
declare
  v record;
  a billing.charge_attempts;
  s billing.subscriptions;
  p billing.billing_periods;
  pay billing.payments;
  v_applied boolean;
  v_was billing.subscription_status;
  v_now timestamptz := billing.now();
  v_sync jsonb;
  v_refund uuid;
  v_source billing.refund_source;
  v_wrong_amount boolean;
  v_status billing.attempt_status;
  v_was_status billing.attempt_status;
  v_after jsonb;
begin
  select * into v from billing.parse_payment(payment);
  select ca.subscription_id into s.id from billing.charge_attempts ca where ca.id = apply_charge_success.attempt_id;
  if not found then
    raise exception 'charge attempt % not found', attempt_id using errcode = 'SB404';
  end if;
  select * into strict s from billing.subscriptions su where su.id = s.id for update;
  select * into strict a from billing.charge_attempts ca where ca.id = apply_charge_success.attempt_id for update;
  select * into strict p from billing.billing_periods bp where bp.id = a.period_id for update;
  v_was_status := a.status;

  if v.order_id <> a.order_id then
    raise exception 'payment % is for order %, not attempt % (order %)', v.payment_key, v.order_id, a.id, a.order_id
      using errcode = 'SB400';
  end if;
  if v.status not in ('DONE', 'CANCELED', 'PARTIAL_CANCELED') or v.approved_at is null then
    raise exception 'payment % of attempt % is not approved (status %)', v.payment_key, a.id, v.status
      using errcode = 'SB400';
  end if;

  -- The same result again: refresh the snapshot, apply nothing twice.
  select * into pay from billing.payments where payments.attempt_id = a.id;
  if found then
    if pay.payment_key <> v.payment_key then
      raise exception 'attempt % already has payment %, not %', a.id, pay.payment_key, v.payment_key
        using errcode = 'SB409';
    end if;
    v_sync := billing.sync_payment(pay.id, payment);
    return pg_catalog.jsonb_build_object('attemptId', a.id, 'paymentId', pay.id, 'applied', pay.applied,
                                         'replay', true, 'attemptStatus', a.status, 'sync', v_sync);
  end if;
  if exists (select 1 from billing.payments where payments.payment_key = v.payment_key) then
    raise exception 'payment % is already recorded for another order', v.payment_key using errcode = 'SB409';
  end if;

  -- The amount is the period's price, fixed on the attempt; the service sends exactly that. Any
  -- other amount (a service bug, a forged body) never pays the period: the payment is still kept,
  -- since Toss holds the money and refusing it would leave the ledger short (re-sends replay the
  -- same answer, so it would never settle), but it is refunded in full, the attempt fails as a
  -- bug (no automatic retry) and operators are alerted.
  v_wrong_amount := v.total_amount <> a.amount;
  v_applied := not v_wrong_amount and p.status = 'open' and s.status in ('incomplete', 'active', 'past_due')
               and s.current_period_id = p.id;
  insert into billing.payments (payment_key, order_id, attempt_id, subscription_id, period_id, customer_id, user_id,
                                applied, status, method, total_amount, balance_amount, approved_at, secret,
                                receipt_url, last_transaction_key, raw)
  values (v.payment_key, v.order_id, a.id, a.subscription_id, a.period_id, s.customer_id, s.user_id,
          v_applied, v.status, v.method, v.total_amount, v.total_amount, v.approved_at, v.secret,
          v.receipt_url, v.last_transaction_key, payment)
  returning * into pay;

  -- One succeeded attempt per period, also for a period that ended unpaid and then saw two late
  -- approvals (the second is a duplicate of the first).
  v_status := case
    when v_wrong_amount then 'failed'::billing.attempt_status
    when p.status = 'paid'
         or exists (select 1 from billing.charge_attempts ca
                     where ca.period_id = p.id and ca.status = 'succeeded' and ca.id <> a.id) then 'duplicate'
    else 'succeeded' end;
  update billing.charge_attempts ca
     set status = v_status,
         status_reason = case v_status
           when 'failed' then 'approved for ' || v.total_amount || ' KRW instead of ' || ca.amount
           when 'duplicate' then 'approved, but period ' || p.id || ' already had a successful attempt'
           else 'approved as payment ' || v.payment_key end,
         claim_mode = null, lease_owner = null, lease_expires_at = null, resolved_at = v_now,
         classification = case when v_wrong_amount then 'bug'::billing.failure_class end,
         error_code = case when v_wrong_amount then 'AMOUNT_MISMATCH' else ca.error_code end,
         error_message = case when v_wrong_amount
                              then 'Toss approved ' || v.total_amount || ' KRW for an attempt of ' || ca.amount || ' KRW'
                              else ca.error_message end
   where ca.id = a.id and ca.status in ('queued', 'claimed', 'unknown', 'declined', 'failed', 'canceled')
  returning * into a;
  if not found then
    raise exception 'charge attempt % cannot record a success in its state', attempt_id using errcode = 'SB409';
  end if;

  if v_applied then
    update billing.billing_periods bp
       set status = 'paid', status_reason = 'paid by attempt ' || a.attempt_number, paid_at = v_now,
           payment_id = pay.id
     where bp.id = p.id and bp.status = 'open';
    v_was := s.status;
    update billing.subscriptions su
       set status = 'active', status_reason = 'period ' || p.period_index || ' paid',
           past_due_since = null, grace_ends_at = null, awaiting_card = false
     where su.id = s.id and su.status in ('incomplete', 'active', 'past_due');
    -- Other attempts of the period were only needed while it was unpaid. While this one was in
    -- flight no other could be queued (charge_attempts_one_in_flight_per_period_key), so only a
    -- late approval of an attempt that had ended needs the update (and its trigger).
    if v_was_status not in ('queued', 'claimed', 'unknown') then
      update billing.charge_attempts ca
         set status = 'canceled', status_reason = 'period paid by attempt ' || a.attempt_number, resolved_at = v_now
       where ca.period_id = p.id and ca.status = 'queued' and ca.sends = 0;
    end if;
    perform billing.grant_period_credits(p.id, pay.id);
    perform billing.notify_subscriber(case when v_was = 'incomplete' then 'activated'::billing.notification_kind
                                           else 'renewed' end,
      s.id, pg_catalog.jsonb_build_object('periodIndex', p.period_index, 'periodStartsAt', p.starts_at,
                                          'periodEndsAt', p.ends_at, 'amount', pay.total_amount,
                                          'paymentId', pay.id, 'receiptUrl', pay.receipt_url));
  else
    v_source := case when v_wrong_amount then 'wrong_amount'::billing.refund_source
                     when p.status = 'paid' then 'duplicate_charge'
                     else 'late_charge' end;
    insert into billing.refunds (payment_id, user_id, amount, reason, source, requested_by, status_reason)
    values (pay.id, pay.user_id, pay.total_amount,
            case v_source when 'wrong_amount' then 'charged amount differs from the period amount'
                          when 'duplicate_charge' then 'duplicate charge for an already paid period'
                          else 'charge approved after the subscription ended' end,
            v_source, 'billing', 'refund of a charge that must not stand')
    returning id into v_refund;
    perform billing.raise_alert(case v_source when 'wrong_amount' then 'charged amount differs from the period amount'
                                              when 'duplicate_charge' then 'duplicate charge refunded'
                                              else 'late charge refunded' end,
                                'payments', pay.id,
                                pg_catalog.jsonb_build_object('attemptId', a.id, 'periodId', p.id,
                                                              'refundId', v_refund, 'amount', pay.total_amount,
                                                              'expected', a.amount));
    if v_wrong_amount then
      -- The period is still unpaid: past_due (when active) and the bug alert, as for any bug.
      v_after := billing.after_charge_failure(a.id);
    end if;
  end if;

  -- A payment first seen already (partly) canceled brings its refunds along. A plain approval has
  -- nothing to bring: its row was written from this very snapshot, so the result is what
  -- billing.sync_payment would return for it, without its second parse, lock and update.
  if billing.cancel_count(payment) > 0 or v.balance_amount <> v.total_amount then
    v_sync := billing.sync_payment(pay.id, payment);
  else
    v_sync := pg_catalog.jsonb_build_object('paymentId', pay.id, 'status', pay.status,
                                            'balanceAmount', pay.balance_amount, 'stale', false,
                                            'refundsMatched', 0, 'refundsExternal', 0, 'creditsRevoked', 0,
                                            'fullyRefunded', false);
  end if;
  return pg_catalog.jsonb_build_object('attemptId', a.id, 'paymentId', pay.id, 'applied', v_applied,
                                       'replay', false, 'attemptStatus', a.status, 'refundId', v_refund,
                                       'wrongAmount', v_wrong_amount, 'next', v_after, 'sync', v_sync);
end
$$;
revoke execute on function billing.apply_charge_success(uuid, jsonb) from public;
comment on function billing.apply_charge_success(uuid, jsonb) is
  'Records an approved Toss payment for an attempt: pays the period, activates the subscription, grants '
  'credits and notifies; a second approval for a paid period (or one after the subscription ended) is '
  'recorded unapplied and refunded in full, and so is one for another amount than the attempt''s, '
  'which also fails the attempt as a bug (AMOUNT_MISMATCH) with an alert. Idempotent per attempt. Owner only. '
  'Raises SB404 (no attempt), SB400 (wrong order, not approved, malformed), SB409 (a different payment recorded).';

select billing.assert_surface_locked_down();

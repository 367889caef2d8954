-- The idle minute without the probe.
--
-- pg_cron runs the tick in a new session every minute, and the probe (billing.tick_probe) reads
-- eight tables. Planning it in a new session opens those tables and their 47 indexes: about 6 ms,
-- even in an empty database, most of an idle tick. Now a full tick also stores a horizon: the
-- earliest instant at which any step or queue can have work, as the tables stood after it. A write
-- that can bring work due sooner leaves a signal (a statement trigger on each probed table). While
-- there is no signal and the horizon lies ahead, a tick reads two one-page tables instead.
--
-- Nothing is skipped for good: a signal means a full tick next minute, and a full tick runs at least
-- every 10 minutes whatever the signals say (a write with triggers disabled, a bulk load, a
-- partition dropped by hand).
--
-- Why a signal is never missed:
-- * billing.run_ticks clears the signals in a transaction of its own before it probes, so a write
--   whose trigger runs after that commit finds none and leaves its own.
-- * A read-committed write whose trigger ran before that commit, and skipped because a signal was
--   there, holds a transaction id by then (it wrote rows first). When the tick stores the horizon,
--   that transaction has either committed, so the horizon's own probe sees its rows, or is still
--   running: then any running writer makes the tick store no horizon at all.
-- * A write under another isolation level reads an older snapshot, so it always leaves a signal.
-- * A concurrent call of run_ticks makes the older call's horizon stale; the generation counter
--   lets only the call that cleared last store one.

create table billing.tick_wakeup (
  singleton boolean primary key default true check (singleton),
  -- Bumped by each full tick that clears the signals; only that tick stores the horizon.
  generation bigint not null default 0,
  -- The earliest instant (billing.now()) at which a step or queue can have work; -infinity: now.
  next_at timestamptz not null default '-infinity',
  -- Real time: when a month's event partition must next be made; -infinity: now.
  partitions_due_at timestamptz not null default '-infinity',
  -- Real time of the full tick that stored the horizon.
  settled_at timestamptz not null default '-infinity'
);
alter table billing.tick_wakeup enable row level security;
insert into billing.tick_wakeup default values;
comment on table billing.tick_wakeup is
  'The tick''s horizon, one row: while no signal is in billing.tick_signals, nothing can be due before '
  'next_at (billing.now()) nor need a partition before partitions_due_at (real time). Stored by the '
  'full tick of billing.run_ticks that last cleared the signals (generation).';

create table billing.tick_signals (
  id bigint generated always as identity primary key,
  at timestamptz not null default pg_catalog.clock_timestamp()
);
alter table billing.tick_signals enable row level security;
comment on table billing.tick_signals is
  'A write to a table the tick probes left a row here: the next tick probes in full. Cleared by '
  'billing.run_ticks before it probes.';

-- ---------------------------------------------------------------------------------------------
-- The probe, with the instant its work falls due
-- ---------------------------------------------------------------------------------------------
-- Each probe now reads the first entry of its index without the instant as a bound: the same index
-- scan, stopped at the first row. Due now is at or before probe_at; next_at is the earliest of all.
drop function billing.tick_probe(timestamptz);
create function billing.tick_probe(probe_at timestamptz,
  out due text[], out claimable jsonb, out next_at timestamptz)
returns record
language plpgsql
stable
set search_path = ''
set plan_cache_mode = force_generic_plan
set jit = off
as $$
begin
  select pg_catalog.array_remove(array[
             case when t.registrations <= probe_at then 'expireRegistrations' end,
             case when least(t.attempt_leases, t.refund_leases, t.webhook_leases, t.deletion_leases) <= probe_at
                  then 'expireLeases' end,
             case when t.renewals <= probe_at then 'endAtPeriodEnd' end,
             case when t.renewals <= probe_at then 'renew' end,
             case when t.grace <= probe_at then 'endGrace' end,
             case when t.credits <= probe_at then 'expireCredits' end,
             case when t.partitions_missing then 'maintainEventPartitions' end], null),
         pg_catalog.jsonb_build_object(
           'attempts', coalesce(t.attempts <= probe_at, false),
           'refunds', coalesce(t.refunds <= probe_at, false),
           'webhooks', coalesce(t.webhooks <= probe_at, false),
           'keyDeletions', coalesce(t.key_deletions <= probe_at, false),
           'notifications', t.notifications_due),
         -- An undelivered notification, leased or not, keeps the horizon at now.
         least(t.registrations, t.attempt_leases, t.refund_leases, t.webhook_leases, t.deletion_leases,
                          t.renewals, t.grace, t.credits, t.attempts, t.refunds, t.webhooks, t.key_deletions,
                          case when t.notifications_waiting then '-infinity'::timestamptz end,
                          'infinity'::timestamptz)
    into due, claimable, next_at
    from (select
            (select x.expires_at from billing.card_registrations x
              where x.status = 'pending' order by x.expires_at limit 1) as registrations,
            (select x.lease_expires_at from billing.charge_attempts x
              where x.status = 'claimed' order by x.lease_expires_at limit 1) as attempt_leases,
            (select x.lease_expires_at from billing.refunds x
              where x.status = 'claimed' order by x.lease_expires_at limit 1) as refund_leases,
            (select x.lease_expires_at from billing.webhook_events x
              where x.status = 'processing' order by x.lease_expires_at limit 1) as webhook_leases,
            (select x.lease_expires_at from billing.key_deletions x
              where x.status = 'claimed' order by x.lease_expires_at limit 1) as deletion_leases,
            (select x.current_period_ends_at from billing.subscriptions x
              where x.status = 'active' order by x.current_period_ends_at limit 1) as renewals,
            (select x.grace_ends_at from billing.subscriptions x
              where x.status in ('incomplete', 'past_due') order by x.grace_ends_at limit 1) as grace,
            (select x.expires_at from billing.credit_grants x
              where x.status = 'active' order by x.expires_at limit 1) as credits,
            (select ca.not_before from billing.charge_attempts ca
              where ca.status in ('queued', 'unknown') order by ca.not_before, ca.id limit 1) as attempts,
            (select r.not_before from billing.refunds r
              where r.status = 'requested' order by r.not_before, r.id limit 1) as refunds,
            (select we.not_before from billing.webhook_events we
              where we.status = 'received' order by we.not_before, we.id limit 1) as webhooks,
            (select kd.not_before from billing.key_deletions kd
              where kd.status = 'requested' order by kd.not_before, kd.id limit 1) as key_deletions,
            (select true from billing.notifications n
              where n.delivered_at is null and (n.lease_expires_at is null or n.lease_expires_at <= probe_at)
              order by n.id limit 1) is not null as notifications_due,
            (select true from billing.notifications n
              where n.delivered_at is null order by n.id limit 1) is not null as notifications_waiting,
            exists (select 1 from pg_catalog.generate_series(0, 2) m
                     where pg_catalog.to_regclass('billing_history.events_' || pg_catalog.to_char(
                             pg_catalog.now() at time zone 'UTC' + pg_catalog.make_interval(months => m),
                             'YYYY_MM')) is null) as partitions_missing) t;
end
$$;
revoke execute on function billing.tick_probe(timestamptz) from public;
comment on function billing.tick_probe(timestamptz) is
  'The tick''s probe, one statement of index probes, each reading the first entry of its index: '
  'which steps have work at the given instant (due, in step order), which work queues have claimable '
  'work (claimable, per queue), and the earliest instant any of them can have work as the tables '
  'stand (next_at; -infinity while a notification is undelivered, infinity when nothing waits). '
  'Planned once per session, generically. Owner only (called by the tick). Raises nothing.';

-- ---------------------------------------------------------------------------------------------
-- Signals, the horizon, and the fast idle path
-- ---------------------------------------------------------------------------------------------
create function billing.signal_tick()
returns trigger
language plpgsql
set search_path = ''
set jit = off
as $$
begin
  -- Under read committed a signal already there stands for this write too (see the header); other
  -- isolation levels read an older snapshot, so they always leave one.
  if pg_catalog.current_setting('transaction_isolation') <> 'read committed'
     or not exists (select 1 from billing.tick_signals) then
    insert into billing.tick_signals default values;
  end if;
  return null;
end
$$;
revoke execute on function billing.signal_tick() from public;
comment on function billing.signal_tick() is
  'Statement trigger on every table billing.tick_probe reads: leaves a signal in billing.tick_signals '
  'unless one is there (read committed). Raises nothing.';

-- Each on the columns its probe reads: an update of others cannot bring work due sooner.
create trigger card_registrations_signal_tick after insert or update of status, expires_at
  on billing.card_registrations for each statement execute function billing.signal_tick();
create trigger charge_attempts_signal_tick after insert or update of status, lease_expires_at, not_before
  on billing.charge_attempts for each statement execute function billing.signal_tick();
create trigger refunds_signal_tick after insert or update of status, lease_expires_at, not_before
  on billing.refunds for each statement execute function billing.signal_tick();
create trigger webhook_events_signal_tick after insert or update of status, lease_expires_at, not_before
  on billing.webhook_events for each statement execute function billing.signal_tick();
create trigger key_deletions_signal_tick after insert or update of status, lease_expires_at, not_before
  on billing.key_deletions for each statement execute function billing.signal_tick();
create trigger subscriptions_signal_tick after insert or update of status, current_period_ends_at, grace_ends_at
  on billing.subscriptions for each statement execute function billing.signal_tick();
create trigger credit_grants_signal_tick after insert or update of status, expires_at
  on billing.credit_grants for each statement execute function billing.signal_tick();
create trigger notifications_signal_tick after insert or update of delivered_at, lease_expires_at
  on billing.notifications for each statement execute function billing.signal_tick();

create function billing.tick_asleep(at timestamptz)
returns boolean
language plpgsql
stable
set search_path = ''
set jit = off
as $$
begin
  return coalesce((select w.next_at > at and pg_catalog.now() < w.partitions_due_at
                          and pg_catalog.now() < w.settled_at + interval '10 minutes'
                     from billing.tick_wakeup w
                    where w.singleton), false)
         and not exists (select 1 from billing.tick_signals);
end
$$;
revoke execute on function billing.tick_asleep(timestamptz) from public;
comment on function billing.tick_asleep(timestamptz) is
  'True when nothing can be due at the given instant: no signal since the last full tick, its horizon '
  'not reached, no partition needed, and that tick less than 10 minutes ago (real time). Owner only. '
  'Raises nothing.';

create function billing.tick_wake()
returns bigint
language plpgsql
set search_path = ''
set jit = off
as $$
declare
  v_generation bigint;
begin
  delete from billing.tick_signals;
  update billing.tick_wakeup w
     set generation = w.generation + 1, next_at = '-infinity'
   where w.singleton
  returning w.generation into v_generation;
  return v_generation;
end
$$;
revoke execute on function billing.tick_wake() from public;
comment on function billing.tick_wake() is
  'Clears the signals and the horizon before a full tick; returns the new generation, which '
  'billing.tick_settle needs. The caller commits at once (billing.run_ticks). Owner only. Raises nothing.';

create function billing.tick_settle(generation bigint)
returns timestamptz
language plpgsql
set search_path = ''
set jit = off
as $$
declare
  v_probe record;
begin
  -- One statement, one snapshot: the horizon and whether any writer was still running when it was
  -- read (then nothing is stored: that writer may have skipped its signal).
  select p.due, p.next_at,
         exists (select 1 from pg_catalog.pg_snapshot_xip(pg_catalog.pg_current_snapshot())) as writers
    into v_probe
    from billing.tick_probe(billing.now()) p;
  update billing.tick_wakeup w
     set next_at = case when v_probe.writers then '-infinity' else v_probe.next_at end,
         partitions_due_at = case when 'maintainEventPartitions' = any (v_probe.due) then '-infinity'
                                  else pg_catalog.timezone('UTC', pg_catalog.date_trunc('month',
                                         pg_catalog.timezone('UTC', pg_catalog.now())) + interval '1 month') end,
         settled_at = pg_catalog.now()
   where w.singleton and w.generation = tick_settle.generation
  returning w.next_at into v_probe.next_at;
  return v_probe.next_at;
end
$$;
revoke execute on function billing.tick_settle(bigint) from public;
comment on function billing.tick_settle(bigint) is
  'Stores the horizon after a full tick of the given generation (none when a later call cleared the '
  'signals since, -infinity when a writer was running); returns what it stored, or null. Owner only. '
  'Raises nothing.';

-- The idle summary, now without the probe when the horizon allows.
create or replace function billing.tick_idle(tick_at timestamptz)
returns jsonb
language plpgsql
stable
set search_path = ''
set jit = off
as $$
declare
  p record;
  v_claimable jsonb := '{"attempts": false, "refunds": false, "webhooks": false, "keyDeletions": false,
                         "notifications": false}';
begin
  if not billing.tick_asleep(tick_at) then
    select * into p from billing.tick_probe(tick_at);
    if pg_catalog.cardinality(p.due) <> 0 or p.claimable @? '$.* ? (@ == true)' then
      return null;
    end if;
    v_claimable := p.claimable;
  end if;
  return billing.tick_summary(tick_at, '{}', v_claimable)
         || pg_catalog.jsonb_build_object('doorbellRequestId', null, 'more', false, 'steps',
              (select pg_catalog.jsonb_object_agg(s.step, '{"rows": 0, "batches": 0, "ms": 0}'::jsonb)
                 from pg_catalog.unnest(array['expireRegistrations', 'expireLeases', 'endAtPeriodEnd', 'renew',
                                              'endGrace', 'expireCredits', 'maintainEventPartitions']) s(step)));
end
$$;
comment on function billing.tick_idle(timestamptz) is
  'The summary of an idle tick at the given instant when billing.tick_asleep holds or '
  'billing.tick_probe finds nothing due and nothing claimable, else null. Owner only. Raises nothing.';

create or replace procedure billing.run_ticks(budget interval default interval '50 seconds',
                                              round_budget interval default interval '250 milliseconds')
language plpgsql
as $$
declare
  v_deadline timestamptz := pg_catalog.clock_timestamp() + budget;
  v_rang_at timestamptz;
  v_result jsonb;
  v_ring boolean;
  v_generation bigint;
begin
  if billing.tick_asleep(billing.now()) then
    return;  -- the idle minute: two one-page tables read
  end if;
  -- Committed before the probe, so a write after this leaves a signal of its own.
  v_generation := billing.tick_wake();
  commit and no chain;
  if billing.tick_idle(billing.now()) is null then
    loop
      v_ring := v_rang_at is null or pg_catalog.clock_timestamp() >= v_rang_at + interval '5 seconds';
      v_result := billing.tick_run(round_budget, v_ring);
      if v_result ->> 'doorbellRequestId' is not null then
        v_rang_at := pg_catalog.clock_timestamp();
      end if;
      commit and no chain;
      exit when not coalesce((v_result ->> 'more')::boolean, false) or pg_catalog.clock_timestamp() >= v_deadline;
    end loop;
  end if;
  perform billing.tick_settle(v_generation);
  commit and no chain;
end
$$;
comment on procedure billing.run_ticks(interval, interval) is
  'Scheduler (pg_cron, every minute, as a top-level CALL): returns at once when billing.tick_asleep '
  'holds; else clears the signals (committed), runs billing.tick_run rounds of round_budget '
  '(default 250 ms; every due step does at least one batch per round), each committed at once, until '
  'no step has work left or the budget (default 50 s) is spent, ringing the service in the first '
  'round with claimable work and then at most every 5 seconds, and stores the horizon '
  '(billing.tick_settle). Owner (postgres, the cron job''s user) only. Raises what the steps raise '
  '(the rounds committed before stay).';

select billing.assert_surface_locked_down();

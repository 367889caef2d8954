-- A burst of renewals first, in two sessions.
--
-- When a day's renewals fall due at once (after downtime, or anchors bunched by a launch-day
-- promotion), what matters is how soon every one of them is a claimable charge. Two changes:
--
-- * Renewals first. In each round of the tick every due step did at least one batch, so while
--   renewals were left the credit expiry of the same subscribers (due at the same instant) took a
--   batch of every round: at a million subscribers about a quarter of the burst's time. Now, while
--   the renewal step stops on the budget with work left, the steps after it that make nothing
--   claimable (end of grace, credit expiry, event partitions) wait for the round after the last
--   renewal; the same call of billing.run_ticks goes on until they are done. The steps before it
--   (registrations, leases, ends at period end) keep their batch per round.
-- * A second renewer. pg_cron also calls billing.run_renewals() every minute: the renewal step
--   alone, in rounds of 250 ms each committed at once, while renewals are due. It and the tick's
--   own renewal step take disjoint rows (each locks the due subscriptions it takes and skips the
--   locked ones), so on two cores a burst is renewed by two backends. An idle minute costs it what
--   it costs the tick: billing.tick_asleep.

create or replace function billing.tick_run(budget interval, ring boolean)
returns jsonb
language plpgsql
set search_path = ''
set jit = off
as $$
declare
  v_now timestamptz := billing.now();
  v_batch constant integer := 500;
  v_deadline timestamptz := pg_catalog.clock_timestamp() + budget;
  v_steps jsonb := '{}';
  v_step text;
  v_result jsonb;
  v_more boolean := false;
  v_renewals_left boolean := false;
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
    elsif v_renewals_left then
      -- Renewals first: this step makes nothing claimable, so it waits for a round without them.
      v_result := '{"rows": 0, "batches": 0, "ms": 0, "deferred": true}';
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
      if (v_result ->> 'rows')::integer >= v_batch * (v_result ->> 'batches')::integer then
        v_more := true;
        v_renewals_left := v_step = 'renew';
      end if;
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
comment on function billing.tick_run(interval, boolean) is
  'One tick within a time budget: the steps that billing.tick_probe finds work for, in order, each '
  'in batches of 500 while its batches come back full and the budget lasts (while renewals are left '
  'over, the steps after renew wait: "deferred"); rings the service when ring and claimable work '
  'exists. Returns the tick summary plus doorbellRequestId, steps (per step: counts, batches, ms) '
  'and more (work left when the budget ran out). Owner only. Raises what the steps raise.';

-- Like billing.run_ticks, a procedure that commits may not be security definer nor pin settings.
create procedure billing.run_renewals(budget interval default interval '50 seconds')
language plpgsql
as $$
declare
  v_deadline timestamptz := pg_catalog.clock_timestamp() + budget;
  v_result jsonb;
begin
  if billing.tick_asleep(billing.now()) then
    return;
  end if;
  loop
    -- One of these at a time (a manual call beside pg_cron's); the tick's renewal step may run too.
    exit when not pg_catalog.pg_try_advisory_xact_lock(pg_catalog.hashtext('saju-billing-renewals')::bigint);
    v_result := billing.run_tick_step('billing.tick_renew'::regproc, 500,
                                      pg_catalog.clock_timestamp() + interval '250 milliseconds');
    commit and no chain;
    exit when (v_result ->> 'rows')::integer < 500 * (v_result ->> 'batches')::integer
           or pg_catalog.clock_timestamp() >= v_deadline;
  end loop;
end
$$;
revoke execute on procedure billing.run_renewals(interval) from public;
comment on procedure billing.run_renewals(interval) is
  'Second renewer (pg_cron, every minute, as a top-level CALL): returns at once when '
  'billing.tick_asleep holds; else runs the renewal step (billing.tick_renew, batches of 500) in '
  'rounds of 250 ms, each committed at once, while renewals are due and the budget (default 50 s) '
  'lasts. Takes rows the tick''s own renewal step has not locked. Owner (postgres) only. Raises what '
  'the step raises (the rounds committed before stay).';

select cron.schedule('saju-billing-renewals', '* * * * *', 'call billing.run_renewals()');

select billing.assert_surface_locked_down();

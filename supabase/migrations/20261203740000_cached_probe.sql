-- The tick's probe planned once per session, without the values of the instant.
--
-- billing.tick_probe and billing.tick_idle were SQL functions with a SET clause, so their one
-- statement of fifteen index probes was planned again on every call, and planned with the instant
-- as a constant: the planner then reads each probed index's live ends to estimate "<= instant"
-- (get_actual_variable_range). After a burst of renewals the low end of the due index holds the
-- old entries of every renewed subscription until vacuum removes them, so each plan walked them:
-- at a million subscriptions a steady tick (three probes) took about 90 ms and an idle tick in a
-- new session about 30 ms. In plpgsql with a generic plan the statement is planned once per
-- session and never looks at the instant; each probe is an index scan in order with LIMIT 1
-- whatever the instant, which is the plan it always had.

create or replace function billing.tick_probe(probe_at timestamptz,
  out due text[], out claimable jsonb)
returns record
language plpgsql
stable
set search_path = ''
set plan_cache_mode = force_generic_plan
as $$
begin
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
      into due, claimable
    from (select (select true from billing.subscriptions x
                     where x.status = 'active' and x.current_period_ends_at <= probe_at
                     order by x.current_period_ends_at limit 1) is not null as active_due) s;
end
$$;
revoke execute on function billing.tick_probe(timestamptz) from public;
comment on function billing.tick_probe(timestamptz) is
  'The tick''s probe, one statement of index probes: which steps have work at the given instant '
  '(due, in step order) and which work queues have claimable work (claimable, per queue). Planned '
  'once per session, generically. Owner only (called by billing.tick). Raises nothing.';

create or replace function billing.tick_idle(tick_at timestamptz)
returns jsonb
language plpgsql
stable
set search_path = ''
as $$
declare
  p record;
begin
  select * into p from billing.tick_probe(tick_at);
  if pg_catalog.cardinality(p.due) <> 0 or p.claimable @? '$.* ? (@ == true)' then
    return null;
  end if;
  return billing.tick_summary(tick_at, '{}', p.claimable)
         || pg_catalog.jsonb_build_object('doorbellRequestId', null, 'more', false, 'steps',
              (select pg_catalog.jsonb_object_agg(s.step, '{"rows": 0, "batches": 0, "ms": 0}'::jsonb)
                 from pg_catalog.unnest(array['expireRegistrations', 'expireLeases', 'endAtPeriodEnd', 'renew',
                                              'endGrace', 'expireCredits', 'maintainEventPartitions']) s(step)));
end
$$;
revoke execute on function billing.tick_idle(timestamptz) from public;
comment on function billing.tick_idle(timestamptz) is
  'The summary of an idle tick at the given instant when billing.tick_probe finds nothing due and '
  'nothing claimable, else null. Owner only. Raises nothing.';

create or replace function billing.tick_summary(tick_at timestamptz, steps jsonb, claimable jsonb)
returns jsonb
language plpgsql
immutable
set search_path = ''
as $$
begin
  return pg_catalog.jsonb_build_object(
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
    'claimable', claimable);
end
$$;
revoke execute on function billing.tick_summary(timestamptz, jsonb, jsonb) from public;
comment on function billing.tick_summary(timestamptz, jsonb, jsonb) is
  'The summary billing.tick returns, from the instant, the steps'' counts and the claimable flags. '
  'Owner only. Raises nothing.';

select billing.assert_surface_locked_down();
